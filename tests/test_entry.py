"""The entry layer: ``python -m mige_lightning --help`` lists every subcommand, each subcommand's
parser lives in ``mige_cli/``, and every ``--option`` the docs write next to a subcommand is one
that subcommand's parser has.

The docs are read when the test runs: README.md, docs/*.md (less the dated log, whose commands are
those of their day) and the packages' module docstrings. An option is "next to" a subcommand on a
command line that names it (``mige_lightning <subcommand> …`` or ``<subcommand> --…``; lines
continued with ``\\`` joined; a comment line continues the command above it): it must be that
subcommand's. In prose, an option in a code span of its own must be one of a subcommand its
paragraph, table row or list item names (``python -m mige_lightning export …``, ``export``, not
``export``'s). ``--model.…`` / ``--data.…`` / ``--trainer.…`` with no subcommand near them are
checked against ``fit``'s parser; other options with none are another program's (not checked).
For fit / validate / test / predict the parser is the LightningCLI's: ``--data.X`` must be an
argument of one of the data modules, a key below a dict option (``--model.overrides.dit.…``) is
accepted; the other subcommands' own parsers, plus fit's for those that read fit's config.
"""

from __future__ import annotations

import ast
import collections.abc
import functools
import inspect
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import jsonargparse
import pytest

from mige_cli.cli import cli_parser
from mige_cli.main import SUBCOMMANDS, help_text, main, own_parser

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("mige_lightning", "datamodules", "callbacks", "mige_world")

# ----------------------------------------------------------------------------- --help, parsers


def test_help_lists_every_subcommand_with_one_line_each(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert out == help_text()
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(SUBCOMMANDS)
    assert {"fit", "validate", "test", "predict"} <= set(listed)
    assert all(len(line) <= 110 for line in out.splitlines())


def test_help_through_the_launcher_needs_no_lightning():
    done = subprocess.run(
        [sys.executable, "-m", "mige_lightning", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == help_text()
    probe = "import sys; from mige_cli.main import main; main(['--help']); print(sorted(sys.modules))"
    modules = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "'lightning'" not in modules.stdout and "'torch'" not in modules.stdout  # --help answers at once


def test_the_lightning_subcommands_are_the_clis_own():
    from mige_cli.cli import MIGECLI

    assert {n for n, s in SUBCOMMANDS.items() if s.lightning} == set(MIGECLI.subcommands())


@pytest.mark.parametrize("name", [n for n, s in SUBCOMMANDS.items() if not s.lightning])
def test_every_extra_subcommand_has_its_code_and_parser_in_mige_cli(name):
    sub = SUBCOMMANDS[name]
    assert sub.run.startswith("mige_cli.")
    parser = own_parser(name)
    if parser is None:  # cache-latents: fit's config and nothing else
        assert sub.fit_config
        return
    assert sub.parser.startswith("mige_cli.")
    assert parser.prog == f"python -m mige_lightning {name}"


def argument_parsers_outside_the_cli(root: Path) -> list[str]:
    """``ArgumentParser(…)`` / ``.add_argument(…)`` calls in the library packages."""
    found = []
    for package in LIBRARY:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                    if name in ("ArgumentParser", "add_argument"):
                        found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
    return found


def test_no_subcommand_parser_lives_outside_mige_cli(tmp_path):
    assert argument_parsers_outside_the_cli(REPO) == []
    (tmp_path / "datamodules").mkdir()
    (tmp_path / "datamodules" / "x.py").write_text(
        "import argparse\n\ndef main():\n    p = argparse.ArgumentParser()\n    p.add_argument('--a')\n"
    )
    assert argument_parsers_outside_the_cli(tmp_path) == [
        "datamodules/x.py:4: ArgumentParser",
        "datamodules/x.py:5: add_argument",
    ]


# ----------------------------------------------------------------------------- documented options

# a subcommand on a command line: after the launcher, or a subcommand's name right before an
# option (``fit --ckpt_path last``, ``#   then judge-synthetic --world …``)
LAUNCHED_RE = re.compile(r"mige[_-]lightning\s+([a-z][a-z-]*)")
NAMED_RE = re.compile(
    r"(?<![\w\-./])(" + "|".join(sorted(map(re.escape, SUBCOMMANDS), key=len, reverse=True)) + r")(?=\s+--)"
)
OPTION_RE = re.compile(r"(?<![\w\-./])--([A-Za-z](?:[\w.\-]*\w)?)\+?")
SPAN_RE = re.compile(r"`([^`]+)`(['’]s\b)?")
NEW_PARAGRAPH = re.compile(r"^\s*(\||#|[-*] |\d+\. |$)")  # a table row, heading, list item or blank line
LIGHTNING_SECTIONS = ("model.", "data.", "trainer.")
# options of other programs that prose about a subcommand's setting names (never on a command line
# of ours): sbatch's, in the SLURM notes
OTHER_PROGRAMS = {"signal": "sbatch", "requeue": "sbatch"}


@dataclass(frozen=True)
class Mention:
    where: str  # file:line
    subcommands: tuple[str, ...]  # the one on its command line, or those its paragraph names
    option: str  # without the leading --; a value after = or a trailing + dropped later


def _subcommands_in(text: str) -> list[tuple[int, str]]:
    marks = [(m.start(), m.group(1)) for m in LAUNCHED_RE.finditer(text)]
    marks += [(m.start(), m.group(1)) for m in NAMED_RE.finditer(text)]
    return sorted(marks)


def _code_block(lines: list[str], i: int, rel: Path, first_line: int = 1) -> list[Mention]:
    """The options of a code block starting at ``lines[i]`` (up to a closing fence): each belongs
    to the subcommand before it on its (``\\``-continued) line; a comment line continues the
    command above it. ``first_line``: the file's line number of ``lines[0]``."""
    found, context = [], ()
    while i < len(lines) and not lines[i].lstrip().startswith("```"):
        start, command = i, lines[i]
        while command.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command.rstrip()[:-1] + " " + lines[i]
        if not command.lstrip().startswith("#"):
            context = ()
        marks = _subcommands_in(command)
        for m in OPTION_RE.finditer(command):
            before = [name for pos, name in marks if pos < m.start()]
            where = f"{rel}:{start + first_line}"
            found.append(Mention(where, (before[-1],) if before else context, m.group(1)))
        context = (marks[-1][1],) if marks else context
        i += 1
    return found


def _paragraphs(lines: list[str]):
    """("prose", [(index, line), …]) per paragraph, table row, heading or list item, and
    ("code", index of its first line) per fenced code block, in order."""
    i, paragraph = 0, []
    while i < len(lines):
        if lines[i].lstrip().startswith("```") or NEW_PARAGRAPH.match(lines[i]):
            if paragraph:
                yield "prose", paragraph
            paragraph = []
        if lines[i].lstrip().startswith("```"):
            yield "code", i + 1
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith("```"):
                i += 1
        elif lines[i].strip():
            paragraph.append((i, lines[i]))
        i += 1
    if paragraph:
        yield "prose", paragraph


def documented_options(path: Path, root: Path = REPO) -> list[Mention]:
    """Every ``--option`` of a markdown file, with the subcommand(s) it is written next to: on a
    command line (also one in a code span), that line's; otherwise those the code spans of its
    paragraph (or table row, or list item) name: ``python -m mige_lightning export …``,
    ``fit --ckpt_path``, or a span that is just a subcommand's name (not followed by 's)."""
    rel = path.relative_to(root)
    lines = path.read_text().splitlines()
    found: list[Mention] = []
    for kind, part in _paragraphs(lines):
        if kind == "code":
            found += _code_block(lines, part, rel)
            continue
        spans = [(i, m) for i, line in part for m in SPAN_RE.finditer(line)]
        named = []
        for _, span in spans:
            text = span.group(1).strip()
            named += [name for _, name in _subcommands_in(text)]
            if text in SUBCOMMANDS and not span.group(2):
                named.append(text)
        for i, span in spans:
            marks = _subcommands_in(span.group(1))
            for m in OPTION_RE.finditer(span.group(1)):
                before = [name for pos, name in marks if pos < m.start()]
                if not before and m.group(1).split("=")[0] in OTHER_PROGRAMS:
                    continue
                near = (before[-1],) if before else tuple(dict.fromkeys(named))
                found.append(Mention(f"{rel}:{i + 1}", near, m.group(1)))
    return found


def docstring_options(path: Path, root: Path = REPO) -> list[Mention]:
    """The options of the command lines in a module's docstring (read as a code block)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    doc = ast.get_docstring(tree, clean=False)
    if not doc:
        return []
    return _code_block(doc.splitlines(), 0, path.relative_to(root), first_line=tree.body[0].lineno)


def _classes_in(hint) -> list[type]:
    """The classes a type hint admits subclasses of (``Optional[MIGEDataModule]``,
    ``Logger | Iterable[Logger]`` …); none for plain values and dicts."""
    if hint is typing.Any:
        return []
    if inspect.isclass(hint):
        if hint.__module__ == "builtins" or issubclass(hint, collections.abc.Mapping):
            return []
        return [hint]
    return [c for arg in typing.get_args(hint) for c in _classes_in(arg)]


def _is_dict(hint) -> bool:
    if hint is typing.Any:
        return True
    if inspect.isclass(hint):
        return issubclass(hint, collections.abc.Mapping)
    origin = typing.get_origin(hint)
    if inspect.isclass(origin) and issubclass(origin, collections.abc.Mapping):
        return True
    return any(_is_dict(arg) for arg in typing.get_args(hint))


def _subclasses(base: type) -> list[type]:
    out, todo = [base], [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.append(sub)
                todo.append(sub)
    return out


@functools.cache
def _class_parser(cls: type) -> jsonargparse.ArgumentParser | None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls, fail_untyped=False)
    except Exception:  # a class jsonargparse cannot describe: not one a config names
        return None
    return parser


def _options(parser) -> dict[str, object]:
    return {s[2:].rstrip("+"): a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def jsonargparse_has(parser, key: str) -> bool:
    """Whether ``--key`` reaches a parameter: an option of the parser, a key inside a dict option
    (``model.overrides.dit.num_layers``), or an argument of a class a subclass option may name
    (``data.synthetic``: an argument of one of the data modules; ``trainer.logger.init_args.version``)."""
    options = _options(parser)
    if key in options:
        return True
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        action = options.get(".".join(parts[:cut]))
        if action is None:
            continue
        rest = parts[cut:]
        hint = getattr(action, "_typehint", None)
        classes = _classes_in(hint)
        if classes:
            if rest[0] in ("class_path", "dict_kwargs") or rest == ["init_args"]:
                return True
            rest = rest[1:] if rest[0] == "init_args" else rest
            return any(
                (p := _class_parser(c)) is not None and jsonargparse_has(p, ".".join(rest))
                for base in classes
                for c in _subclasses(base)
            )
        return _is_dict(hint)
    return False


@functools.cache
def _lightning_parser(subcommand: str | None):
    return cli_parser(subcommand)


def subcommand_has(subcommand: str, option: str) -> bool:
    sub = SUBCOMMANDS[subcommand]
    if sub.lightning:
        return jsonargparse_has(_lightning_parser(subcommand), option)
    parser = own_parser(subcommand)
    if parser is not None and f"--{option}" in {s for a in parser._actions for s in a.option_strings}:
        return True
    return sub.fit_config and jsonargparse_has(_lightning_parser(None), option)


def wrong_options(paths: list[Path], root: Path = REPO) -> list[str]:
    wrong = []
    for path in paths:
        read = docstring_options if path.suffix == ".py" else documented_options
        for m in read(path, root):
            name = m.option.split("=", 1)[0]
            unknown = [s for s in m.subcommands if s not in SUBCOMMANDS]
            if unknown:
                wrong.append(f"{m.where}: `{unknown[-1]}` is no subcommand (--{name})")
            elif m.subcommands and not any(subcommand_has(s, name) for s in m.subcommands):
                wrong.append(f"{m.where}: {' / '.join(dict.fromkeys(m.subcommands))} has no --{name}")
            elif (
                not m.subcommands and name.startswith(LIGHTNING_SECTIONS) and not subcommand_has("fit", name)
            ):
                wrong.append(f"{m.where}: no subcommand near it, and fit has no --{name}")
    return wrong


# dated records of what was run then (commands of their day, some since renamed or removed)
HISTORY = ("docs/LOG.md",)


def doc_files(root: Path = REPO) -> list[Path]:
    """README.md, docs/*.md (less the history log), and the modules of the packages, whose
    docstrings show commands."""
    docs = [p for p in sorted((root / "docs").glob("*.md")) if str(p.relative_to(root)) not in HISTORY]
    modules = [p for package in (*LIBRARY, "mige_cli") for p in sorted((root / package).rglob("*.py"))]
    return [root / "README.md", *docs, *modules]


def test_the_docs_name_only_options_the_subcommands_have():
    wrong = wrong_options(doc_files())
    assert not wrong, "documented options that do not exist:\n" + "\n".join(wrong)


def test_the_docs_check_finds_a_wrong_option_and_checks_right_ones(tmp_path):
    doc = tmp_path / "docs.md"
    doc.write_text(
        "```bash\n"
        "python -m mige_lightning predict --config a.yaml \\\n"
        "    --data.predict_file requests.json --ckpt_path x   # --model.sampler ddim\n"
        "python -m mige_lightning export --output e --weights ema --model.lr 1 --nope\n"
        "python -m mige_lightning judge-synthetic --world w\n"
        "#   partial runs: --allow-missing, --allow-partial\n"
        "python -m mige_lightning fit --model.overrides.dit.num_layers=2 --trainer.logger.init_args.version=3\n"
        "python -m mige_lightning fit --data.synthetic.root=x --data.task_weights={} --data.no_such=1\n"
        "python -m mige_lightning frobnicate --x\n"
        "```\n\n"
        "Resume with `fit --ckpt_path last`; `python -m mige_lightning export …` (`--weights auto`,\n"
        "`--wieghts`).\n\nElsewhere `--model.lr 1` and `--model.note=x` and `--verbose` (another tool).\n"
    )
    wrong = wrong_options([doc], tmp_path)
    assert wrong == [
        "docs.md:2: predict has no --data.predict_file",
        "docs.md:4: export has no --nope",
        "docs.md:6: judge-synthetic has no --allow-partial",
        "docs.md:8: fit has no --data.no_such",
        "docs.md:9: `frobnicate` is no subcommand (--x)",
        "docs.md:13: fit / export has no --wieghts",
        "docs.md:15: no subcommand near it, and fit has no --model.note",
    ]


# ----------------------------------------------------------------------------- bench command lines

BENCH_BY_PATH = re.compile(r"python3?\s+(bench/[\w/]+\.py)")


def bench_run_by_path(paths: list[Path], root: Path = REPO) -> list[str]:
    """Command lines that run a bench script by its file path: bench is a package, its scripts
    import ``bench.…`` and ``tests.helpers`` and run as ``python -m bench.<script>``."""
    found = []
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(root)}:{n}: {m.group(1)}" for m in BENCH_BY_PATH.finditer(line)]
    return found


def test_bench_scripts_are_run_as_modules_in_the_docs_and_the_makefile(tmp_path):
    docs = [p for p in doc_files() if p.suffix == ".md"]
    assert bench_run_by_path([*docs, REPO / "Makefile", *sorted((REPO / "bench").glob("*.py"))]) == []
    (tmp_path / "a.md").write_text(
        "make x  # = .venv/bin/python bench/sample.py --presets mid\npython -m bench.sample\n"
    )
    assert bench_run_by_path([tmp_path / "a.md"], tmp_path) == ["a.md:1: bench/sample.py"]

"""Training records: the authors' manifest format (JSON list) and JSONL, read into frozen dataclasses.

Field names follow the authors' files (``image``, ``multi_prompt``, ``entity_path``,
``source_path``; optional ``input_caption`` / ``output_caption``, named as the benchmarks' caption
columns, for the validation loop's CLIP-T and CLIPdir); the task is explicit — a ``task`` field or the manifest's task in the data
config — and never guessed from a path. Reading never stops at the first bad record: every
problem is collected as ``file:line: reason`` so one report lists them all (``validation.py``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mige_lightning.images import not_a_regular_file
from mige_lightning.prompt import (
    PLACEHOLDER,
    Task,
    count_placeholders,
    normalize_instruction,
    placeholders_cut,
)

SUBTASKS = {Task.SUBJECT_EDIT: ("add", "replace")}


class ManifestError(ValueError):
    """Bad data, reported as one or more ``file:line: reason`` lines."""

    def __init__(self, message: str, *, kind: str = "bad record", problems: list[Problem] | None = None):
        super().__init__(message)
        self.kind = kind
        self.problems = problems or []


@dataclass(frozen=True)
class Problem:
    origin: str  # "path/to/manifest.jsonl:12"
    kind: str  # short category, used to count skipped records per reason
    detail: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.detail}"


@dataclass(frozen=True)
class Record:
    task: Task
    target: Path
    instruction: str
    references: tuple[Path, ...]  # fill the placeholders, in order
    source: Path | None  # conditional input for edit / subject_edit
    origin: str  # "manifest.json:12: record 7" (line, and n-th record of the file), for messages
    subtask: str | None = None  # "add" / "replace" inside subject_edit
    manifest: str = ""  # the manifest file it came from
    base: str = ""  # the folder its relative paths resolve against (the manifest's or its spec's base)
    input_caption: str | None = None  # what the source shows (CLIPdir's start), optional
    output_caption: str | None = None  # what the target shows (CLIP-T's text, CLIPdir's end), optional

    @property
    def pool(self) -> str:
        """The sampler pool: ``subject``, ``edit``, ``subject_edit/add``, ``subject_edit/replace``."""
        return f"{self.task.value}/{self.subtask}" if self.subtask else self.task.value

    @property
    def files(self) -> tuple[Path, ...]:
        """Every image file the record names: target, references, source."""
        return (self.target, *self.references, *((self.source,) if self.source else ()))


# where deeply nested JSON is reported from: a record needs 3 levels; Python's JSON reader gives up
# (RecursionError) near the interpreter's recursion limit, about 1,000
JSON_DEPTH_REPORTED = 100
_JSON_NESTING = re.compile(r'\\.|["\[\]{}]')  # an escape pair, a quote, a bracket


def nesting_beyond(text: str, limit: int = JSON_DEPTH_REPORTED) -> tuple[int, int] | None:
    """(line, column) where JSON ``text`` first nests deeper than ``limit`` levels, or None.
    Brackets inside strings do not count; one pass, stopping there."""
    depth, in_string = 0, False
    for m in _JSON_NESTING.finditer(text):
        c = m.group()
        if c == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif c in "[{":
            depth += 1
            if depth > limit:
                pos = m.start()
                return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1
        elif c in "]}":
            depth -= 1
    return None


def too_deep(text: str) -> str:
    """What a RecursionError from ``json.loads(text)`` means, with where the nesting gets absurd."""
    at = nesting_beyond(text)
    where = f" from line {at[0]}, column {at[1]}" if at else ""
    return (
        f"nested deeper than Python's JSON reader can follow (more than {JSON_DEPTH_REPORTED} levels"
        f"{where}; a record needs 3)"
    )


def entries_of(path: Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """(line, object) pairs from a JSON list or a JSONL file, plus the lines that failed to parse.
    Linear in the file's size (a JSON list's record lines are counted in one pass)."""
    lines = read_lines(path)
    first = next((t.lstrip() for _, t, _ in lines if t and t.strip()), "")
    undecodable = [(n, e) for n, _, e in lines if e]
    if first.startswith("[") and undecodable:
        lineno, err = undecodable[0]
        return [], [Problem(f"{path}:{lineno}", "malformed manifest", f"JSON list with {err}; fix the file")]
    text = "\n".join(t or "" for _, t, _ in lines)
    if first.startswith("{") and not undecodable and sum(bool(t and t.strip()) for _, t, _ in lines) > 1:
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None  # JSON Lines: each line is parsed (and reported) on its own below
        if isinstance(whole, dict):
            return [], [
                Problem(
                    f"{path}:1",
                    "malformed manifest",
                    "the file is one JSON object spread over several lines; expected a JSON list of "
                    "records ([{...}, ...]) or one record per line (JSON Lines)",
                )
            ]
    if first.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            # its records cannot be told apart: the whole file is unusable, in skip mode too
            return [], [
                Problem(
                    f"{path}:{e.lineno}",
                    "malformed manifest",
                    f"malformed JSON list (line {e.lineno}, column {e.colno}): {e.msg}; none of this "
                    "file's records can be read — fix the file",
                )
            ]
        except RecursionError:
            at = nesting_beyond(text)
            return [], [
                Problem(
                    f"{path}:{at[0] if at else 1}",
                    "malformed manifest",
                    f"JSON list {too_deep(text)}; none of this file's records can be read — fix the file",
                )
            ]
        # the line of each top-level element, so errors in a JSON list also point at a line: the
        # newlines are counted from the previous element on (from the start each time: quadratic)
        decoder, starts, pos = json.JSONDecoder(), [], text.index("[") + 1
        line, counted = 1, 0
        for _ in items:
            while text[pos] in " \t\r\n,":
                pos += 1
            line += text.count("\n", counted, pos)
            counted = pos
            starts.append(line)
            _, pos = decoder.raw_decode(text, pos)
        return list(zip(starts, items, strict=True)), []
    out, problems = [], []
    for lineno, line, err in lines:
        if err is not None:
            problems.append(Problem(f"{path}:{lineno}", "not UTF-8", err))
            continue
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(f"{path}:{lineno}", "malformed JSON", f"malformed JSON line: {e.msg}"))
        except RecursionError:
            problems.append(
                Problem(f"{path}:{lineno}", "malformed JSON", f"malformed JSON line: {too_deep(line)}")
            )
    return out, problems


def _as_list(value: Any, name: str) -> list[str]:
    """A path field: one non-empty string, or a list of them (``None`` / ``""`` / ``[]``: none)."""
    if value is None or value == "":
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
        raise TypeError(
            f"'{name}' must be a path or a list of paths (strings), got {type(value).__name__} {value!r}"[
                :300
            ]
        )
    return list(items)


def read_lines(path: Path) -> list[tuple[int, str | None, str | None]]:
    """(line number, text, error) per line, decoded as UTF-8 one line at a time (a byte-order
    mark is dropped), so one bad byte costs one line, named, not the whole file."""
    out = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            out.append((lineno, raw.decode("utf-8").rstrip("\r"), None))
        except UnicodeDecodeError as e:
            out.append(
                (
                    lineno,
                    None,
                    f"not UTF-8 text (byte {e.start + 1} of the line: {raw[e.start : e.start + 1]!r})",
                )
            )
    return out


def parse_record(
    obj: Any, *, origin: str, base: Path, task: Task | str | None = None, subtask: str | None = None
) -> Record:
    """One manifest entry → ``Record``; raises ``ManifestError`` with ``origin`` on anything wrong."""

    def bad(kind: str, reason: str) -> ManifestError:
        return ManifestError(f"{origin}: {reason}", kind=kind)

    if not isinstance(obj, dict):
        raise bad("malformed record", f"expected a JSON object, got {type(obj).__name__}")
    for name in ("image", "multi_prompt"):
        if not obj.get(name):
            raise bad("missing field", f"missing field '{name}'")
        if not isinstance(obj[name], str):
            raise bad(
                "wrong type", f"'{name}' must be a string, got {type(obj[name]).__name__} {obj[name]!r}"[:300]
            )
    for name in ("task", "subtask", "input_caption", "output_caption"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise bad(
                "wrong type", f"'{name}' must be a string, got {type(obj[name]).__name__} {obj[name]!r}"
            )
    for name in ("input_caption", "output_caption"):
        if obj.get(name) is not None and not obj[name].strip():
            raise bad("empty caption", f"'{name}' is empty; leave the field out (or null) for no caption")
    task_value = obj.get("task", task)
    if task_value is None:  # the authors' files have none: data.manifests[i].task gives it
        raise bad("missing task", "no 'task' field and no task given for this manifest in the data config")
    try:
        parsed_task = Task.parse(task_value)
    except ValueError as e:
        raise bad("unknown task", str(e)) from None
    sub = obj.get("subtask", subtask)
    if sub is not None and sub not in SUBTASKS.get(parsed_task, ()):
        raise bad(
            "unknown subtask",
            f"unknown subtask {sub!r} for task '{parsed_task.value}'; expected one of {SUBTASKS.get(parsed_task, ())}",
        )
    try:
        entities = _as_list(obj.get("entity_path"), "entity_path")
        refs = tuple(base / p for p in entities)
        sources = _as_list(obj.get("source_path"), "source_path")
    except TypeError as e:
        raise bad("wrong type", str(e)) from None
    if len(sources) > 1:
        raise bad("too many sources", f"'source_path' holds {len(sources)} images; at most one is allowed")
    if parsed_task.uses_source and not sources:
        raise bad("missing source", f"task '{parsed_task.value}' needs a 'source_path'")
    instruction = obj["multi_prompt"]
    mismatch = shape_mismatch(parsed_task, sub, entities=entities, sources=sources, instruction=instruction)
    if mismatch is not None:
        raise bad("task mismatch", mismatch)
    n_placeholders = count_placeholders(instruction)
    if n_placeholders != len(refs):
        raise bad(
            "placeholder count",
            f"{n_placeholders} <imagehere> placeholder(s) but {len(refs)} image(s) in 'entity_path'",
        )
    if (cut := placeholders_cut(instruction)) is not None:
        raise bad("placeholder cut", f"'multi_prompt': {cut}")
    return Record(
        task=parsed_task,
        target=base / obj["image"],
        instruction=instruction,
        references=refs,
        source=base / sources[0] if sources else None,
        origin=origin,
        subtask=sub,
        input_caption=obj.get("input_caption"),
        output_caption=obj.get("output_caption"),
    )


# words that say which subject_edit subtask an instruction asks for (in BLIP-normalised text)
SUBTASK_WORDS = {
    "add": {"add", "adds", "adding", "insert", "inserting", "put", "place", "placing"},
    "replace": {"replace", "replaces", "replacing", "swap", "swapping", "substitute", "exchange", "change"},
}
_WORD_RE = re.compile(r"[a-z]+")


def subtask_by_wording(instruction: str) -> str | None:
    """``add`` / ``replace`` when the instruction's words name one of them and not the other."""
    words = set(_WORD_RE.findall(normalize_instruction(instruction).replace(PLACEHOLDER, " ")))
    found = [sub for sub, vocab in SUBTASK_WORDS.items() if words & vocab]
    return found[0] if len(found) == 1 else None


def shape_mismatch(
    task: Task, subtask: str | None, *, entities: list[str], sources: list[str], instruction: str
) -> str | None:
    """Why a record's fields contradict its task (a mislabelled record), or None.

    ``subject``: no source image. ``edit``: one source, which is also its one referenced image
    (the instruction's placeholder shows the image to edit). ``subject_edit``: a source and at
    least one entity besides it; a declared ``add`` / ``replace`` whose wording names only the
    other subtask is a mismatch too.
    """
    if task is Task.SUBJECT and sources:
        return "'subject' record has a source image — edit or subject_edit?"
    if task is Task.EDIT and sources:
        if len(entities) != 1 or entities[0] != sources[0]:
            if any(e != sources[0] for e in entities):
                return (
                    f"'edit' record references {len(entities)} image(s) other than or besides its source; "
                    "an edit references exactly its source image — subject_edit?"
                )
            return (
                f"'edit' record references its source {len(entities)} times; an edit references "
                "exactly its source image, once"
            )
    if task is Task.SUBJECT_EDIT and sources:
        if not any(e != sources[0] for e in entities):
            return "'subject_edit' record has no entity image besides its source — edit?"
        said = subtask_by_wording(instruction)
        if subtask is not None and said is not None and said != subtask:
            return f"'{subtask}' record whose instruction says '{said}' — subtask {said}?"
    return None


def infer_task(obj: dict) -> str | None:
    """The task a record's shape says it has (``subject``, ``edit``, ``subject_edit``,
    ``subject_edit/add``, ``subject_edit/replace``), or None when its fields do not tell."""
    try:
        entities = _as_list(obj.get("entity_path"), "entity_path")
        sources = _as_list(obj.get("source_path"), "source_path")
    except TypeError:
        return None
    if not sources:
        return "subject"
    if len(sources) > 1:
        return None
    if entities == sources:
        return "edit"
    if not any(e != sources[0] for e in entities):
        return None
    instruction = obj.get("multi_prompt")
    sub = subtask_by_wording(instruction) if isinstance(instruction, str) else None
    return f"subject_edit/{sub}" if sub else "subject_edit"


def read_manifest(
    path: str | Path,
    *,
    task: Task | str | None = None,
    subtask: str | None = None,
    base: str | Path | None = None,
) -> tuple[list[Record], list[Problem]]:
    """All good records of one manifest and a ``Problem`` for every bad one. Relative paths
    resolve against ``base`` (e.g. a dataset root, as the authors' files are written), by default
    the manifest's own folder."""
    path = Path(path)
    base_dir = Path(base).expanduser() if base is not None else path.parent
    why = not_a_regular_file(path)  # a FIFO is never opened: reading it would block
    if why is not None and why.startswith("does not exist"):
        return [], [Problem(f"{path}:0", "missing manifest", f"manifest file {why}")]
    if why is not None:
        return [], [Problem(f"{path}:0", "manifest not a regular file", f"the manifest {why}")]
    entries, problems = entries_of(path)
    records = []
    for number, (line, obj) in enumerate(entries, start=1):
        # keyed by record, not by line: a one-line (minified) JSON list holds many records per line
        origin = f"{path}:{line}: record {number}"
        try:
            rec = parse_record(obj, origin=origin, base=base_dir, task=task, subtask=subtask)
            records.append(dataclasses.replace(rec, manifest=str(path), base=str(base_dir)))
        except ManifestError as e:
            reason = str(e).removeprefix(f"{origin}: ")
            problems.append(Problem(origin, e.kind, reason))
    if not entries and not problems:
        problems.append(Problem(f"{path}:1", "empty manifest", "manifest holds no records"))
    return records, problems

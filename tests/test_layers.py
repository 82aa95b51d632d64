"""The dependency direction of the project's packages (docs/DESIGN.md, "Layers"):

    mige_cli            the CLI and every command (+ ``mige_lightning/__main__.py``, its launcher)
       │         │
    datamodules  callbacks    siblings: neither imports the other
       │         │
    mige_world   │            the demo's synthetic world: generator, pixel judge, pretraining stages
       │         │            (datamodules offer it as a data source, with its judge of outputs)
    mige_lightning            the library: model, diffusion, pipeline, metrics, module, helpers

The library never imports the world: a data module hands the framework the world's judge
(``output_judge()``), so validation and ``test`` score with it without knowing it.

Every import counts, also one inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mige_lightning", "datamodules", "callbacks", "mige_world", "mige_cli")
MAY_IMPORT = {
    "mige_lightning": {"mige_lightning"},
    "datamodules": {"mige_lightning", "mige_world", "datamodules"},
    "callbacks": {"mige_lightning", "callbacks"},
    "mige_world": {"mige_lightning", "mige_world"},
    "mige_cli": set(PACKAGES),
}
LAUNCHER = Path("mige_lightning/__main__.py")  # `python -m mige_lightning`: runs mige_cli.main


def project_imports(path: Path) -> set[str]:
    """The project packages a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & set(PACKAGES)
    return found


def layer_violations(root: Path) -> list[str]:
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            layer = "mige_cli" if rel == LAUNCHER else package
            wrong = project_imports(path) - MAY_IMPORT[layer]
            if wrong:
                bad.append(f"{rel} ({layer}) imports {sorted(wrong)}")
    return bad


def test_packages_import_only_the_layers_below_them():
    assert layer_violations(REPO) == []


def test_the_check_sees_a_lazy_import_against_the_direction(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "mige_lightning" / "module.py").write_text(
        "def f():\n    from datamodules.training_data import TrainingDataModule\n"
    )
    (tmp_path / "callbacks" / "cb.py").write_text("import datamodules.records\n")
    (tmp_path / "datamodules" / "ok.py").write_text("from mige_lightning.images import load_rgb\n")
    assert layer_violations(tmp_path) == [
        "mige_lightning/module.py (mige_lightning) imports ['datamodules']",
        "callbacks/cb.py (callbacks) imports ['datamodules']",
    ]


# within the library: modules that must not import a part of it (a module, or a package and
# everything in it). The metrics score images: they read their backbones through
# ``mige_lightning/sources.py``, never through the model package.
MAY_NOT_IMPORT = {
    "mige_lightning/metrics.py": {"mige_lightning.models"},
    "mige_lightning/sources.py": {"mige_lightning"},
}


def module_imports(path: Path) -> set[str]:
    """Every absolute module name a file imports, anywhere in it (``from a.b import c``: ``a.b``
    and ``a.b.c``, since ``c`` may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def forbidden_imports(root: Path) -> list[str]:
    bad = []
    for rel, forbidden in MAY_NOT_IMPORT.items():
        for name in sorted(module_imports(root / rel)):
            hit = [f for f in forbidden if name == f or name.startswith(f + ".")]
            if hit:
                bad.append(f"{rel} imports {name} (may not import {hit[0]})")
    return bad


def test_modules_do_not_import_the_parts_of_the_library_they_must_not_depend_on():
    assert forbidden_imports(REPO) == []


def test_the_check_sees_metrics_importing_the_model_package(tmp_path):
    for rel in MAY_NOT_IMPORT:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("import json\n")
    (tmp_path / "mige_lightning/metrics.py").write_text(
        "def f():\n    from mige_lightning.models.loading import resolve_source\n"
        "from mige_lightning import models\n"
    )
    assert forbidden_imports(tmp_path) == [
        "mige_lightning/metrics.py imports mige_lightning.models (may not import mige_lightning.models)",
        "mige_lightning/metrics.py imports mige_lightning.models.loading (may not import mige_lightning.models)",
        "mige_lightning/metrics.py imports mige_lightning.models.loading.resolve_source "
        "(may not import mige_lightning.models)",
    ]


# bench/ and tests/ are packages imported by their names from the repository root (pytest's
# rootdir; `python -m bench.<script>`), never through sys.path edits or a file's path. No module
# imports a test module (tests/test_*.py, tests/conftest.py): what tests share is in tests.helpers
# (or a conftest fixture); bench reaches into tests only for tests.helpers.
SCRIPTS = ("bench", "tests")


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "tests" and len(parts) > 1 and (parts[1] == "conftest" or parts[1].startswith("test_"))


def script_violations(root: Path) -> list[str]:
    bare = {p.stem for folder in SCRIPTS for p in (root / folder).rglob("*.py")} - {"__init__"}
    bad = []
    for folder in SCRIPTS:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root)
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Attribute):
                    continue
                if node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
                    bad.append(f"{rel}:{node.lineno}: edits sys.path")
                elif node.attr == "spec_from_file_location":
                    bad.append(f"{rel}:{node.lineno}: imports a module from a file path")
            for name in sorted(module_imports(path)):
                top = name.split(".")[0]
                if top in bare:
                    bad.append(f"{rel}: imports {name} by a bare name (only importable through sys.path)")
                elif _is_test_module(name):
                    bad.append(f"{rel}: imports the test module {name}")
                elif (
                    folder == "bench"
                    and top == "tests"
                    and not name.startswith(("tests.helpers", "tests.fixtures"))
                ):
                    bad.append(f"{rel}: imports {name} (bench may use tests.helpers only)")
                elif rel.parts[:2] == ("tests", "helpers") and top == "bench":
                    bad.append(f"{rel}: imports {name} (the helpers are below bench and the tests)")
    return bad


def test_bench_and_tests_import_by_package_names_and_no_test_module():
    assert script_violations(REPO) == []


def test_the_check_sees_path_edits_and_test_module_imports(tmp_path):
    for folder in ("bench", "tests", "tests/helpers"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "bench" / "probe.py").write_text(
        "import sys\nsys.path.insert(0, 'x')\nfrom denoise import f\nfrom tests.conftest import make_batch\n"
    )
    (tmp_path / "bench" / "denoise.py").write_text("from tests.helpers.batches import make_batch\n")
    (tmp_path / "tests" / "conftest.py").write_text("")
    (tmp_path / "tests" / "test_a.py").write_text(
        "import importlib.util\nspec = importlib.util.spec_from_file_location('m', 'p.py')\n"
        "from tests.test_b import helper\nfrom bench.denoise import f\n"
    )
    (tmp_path / "tests" / "helpers" / "h.py").write_text("def f():\n    from bench import denoise\n")
    assert script_violations(tmp_path) == [
        "bench/probe.py:2: edits sys.path",
        "bench/probe.py: imports denoise by a bare name (only importable through sys.path)",
        "bench/probe.py: imports denoise.f by a bare name (only importable through sys.path)",
        "bench/probe.py: imports the test module tests.conftest",
        "bench/probe.py: imports the test module tests.conftest.make_batch",
        "tests/helpers/h.py: imports bench (the helpers are below bench and the tests)",
        "tests/helpers/h.py: imports bench.denoise (the helpers are below bench and the tests)",
        "tests/test_a.py:2: imports a module from a file path",
        "tests/test_a.py: imports the test module tests.test_b",
        "tests/test_a.py: imports the test module tests.test_b.helper",
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_installed(package):
    """pyproject's package list includes each one (an editable install of a fresh clone imports it)."""
    text = (REPO / "pyproject.toml").read_text()
    assert f'"{package}*"' in text

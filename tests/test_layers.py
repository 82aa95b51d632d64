"""The dependency direction of the project's packages (docs/DESIGN.md, "Layers"):

    mige_cli            the CLI and every command (+ ``mige_lightning/__main__.py``, its launcher)
       │         │          │
    datamodules  callbacks  mige_world   siblings: none imports another
       │         │          │            (mige_world: the synthetic world's pretraining stages)
    mige_lightning         the library: model, diffusion, pipeline, metrics, module, helpers

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
    "datamodules": {"mige_lightning", "datamodules"},
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


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_installed(package):
    """pyproject's package list includes each one (an editable install of a fresh clone imports it)."""
    text = (REPO / "pyproject.toml").read_text()
    assert f'"{package}*"' in text

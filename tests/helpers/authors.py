"""Random state dicts in the authors' layout (``tests/fixtures/authors_checkpoint/make_keys.py``,
written from their module structure) at our ``tiny`` preset's dimensions."""

from __future__ import annotations

from pathlib import Path

import torch

from mige_cli.main import main as cli_main
from tests.fixtures.authors_checkpoint import make_keys

TINY = make_keys.TINY


def authors_tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return make_keys.random_state(TINY, seed)


def convert_tiny(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    """``state`` saved as the authors save it, converted by ``convert-authors`` at the tiny preset
    (byte tokenizer, no VAE) → the converted folder."""
    src = tmp_path / "model.pth"
    torch.save({"state_dict": state, "epoch": 3, "optimizer": {"state": {}}}, src)
    out = tmp_path / "converted"
    cli_main(
        ["convert-authors", "--input", str(src), "--output", str(out), "--preset", "tiny"]
        + ["--tokenizer", "byte", "--vae", "none"]
    )
    return out

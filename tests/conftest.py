"""Shared tiny builders: every component from the ``tiny`` preset, random init, on CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mige_lightning.models import build_mige, get_config  # noqa: E402
from mige_lightning.prompt import PLACEHOLDER, build_prompt  # noqa: E402


@pytest.fixture
def tiny_config():
    return get_config("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_mige(tiny_config).eval()  # eval: T5 / Q-Former dropout off, so outputs compare exactly


def make_batch(config, counts: list[int], *, seed: int = 0) -> dict:
    """A synthetic training batch with ``counts[b]`` reference images in sample b."""
    gen = torch.Generator().manual_seed(seed)
    b, m, res, vres = len(counts), max(counts), config.resolution, config.vision_resolution
    tasks = ["subject" if c % 2 == 0 else "subject_edit" for c in counts]
    mask = torch.zeros(b, m, dtype=torch.bool)
    for i, c in enumerate(counts):
        mask[i, :c] = True
    return {
        "target": torch.rand(b, 3, res, res, generator=gen) * 2 - 1,
        "source": torch.rand(b, 3, res, res, generator=gen) * 2 - 1,
        "has_source": torch.tensor([t != "subject" for t in tasks]),
        "ref_pixels": torch.randn(b, m, 3, vres, vres, generator=gen),
        "ref_vae": torch.rand(b, m, 3, res, res, generator=gen) * 2 - 1,
        "ref_mask": mask,
        "instruction": [
            " and ".join([f"object {j} {PLACEHOLDER}" for j in range(c)]) or "a red ball" for c in counts
        ],
        "task": tasks,
    }


def prompts_of(batch: dict) -> list[str]:
    return [build_prompt(t, i) for t, i in zip(batch["task"], batch["instruction"], strict=True)]

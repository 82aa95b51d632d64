"""Synthetic training batches for the tiny preset, and the condition a model encodes from one."""

from __future__ import annotations

import torch

from mige_lightning.prompt import PLACEHOLDER, build_prompt


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


def encode_condition(model, batch, drop=None):
    """``model.encode_condition`` of a ``make_batch`` batch (reference latents: the means)."""
    latents = model.encode_references(batch["ref_vae"], batch["ref_mask"], sample=False)
    return model.encode_condition(
        prompts_of(batch),
        ref_pixels=batch["ref_pixels"],
        ref_latents=latents,
        ref_mask=batch["ref_mask"],
        drop=drop,
    )

"""Records → tensors, from image files or from the latent cache, and a collate that pads
references to the largest count *in the batch* with an explicit mask.

Pixel path keys: ``target``, ``source`` ([3, H, W] in [-1, 1]), ``ref_vae`` (per reference, same),
``ref_pixels`` (per reference, ViT-normalised). Cached path: ``target_latent``, ``source_latent``,
``ref_latent`` (sampled from the stored moments at load time) and ``ref_pixels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from datamodules.latent_cache import LatentCache
from datamodules.records import Record
from mige_lightning.images import load_rgb
from mige_lightning.transforms import Transforms

PER_REFERENCE = ("ref_pixels", "ref_vae", "ref_latent")


class MIGEDataset(Dataset):
    def __init__(
        self, records: Sequence[Record], transforms: Transforms, *, cache: LatentCache | None = None
    ):
        self.records = list(records)
        self.t = transforms
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        item = {
            "index": index,
            "has_source": rec.source is not None,
            "instruction": rec.instruction,
            "task": rec.task.value,
        }
        if self.cache is not None:
            c = self.cache
            item["target_latent"] = c.sample_latent(rec.target)
            item["source_latent"] = c.sample_latent(rec.source) if rec.source else torch.zeros(c.latent_shape)
            item["ref_latent"] = [c.sample_latent(p) for p in rec.references]
            item["ref_pixels"] = [self.t.vit_normalize(c.vit_pixels(p)) for p in rec.references]
            return item
        refs = [load_rgb(p) for p in rec.references]
        res = self.t.resolution
        item["target"] = self.t.vae(load_rgb(rec.target))
        item["source"] = self.t.vae(load_rgb(rec.source)) if rec.source else torch.zeros(3, res, res)
        item["ref_pixels"] = [self.t.vit(r) for r in refs]
        item["ref_vae"] = [self.t.vae(r) for r in refs]
        return item


def collate(samples: list[dict]) -> dict:
    """Stack a batch; per-reference lists padded to the batch's largest count M, ``ref_mask`` [B, M]."""
    batch, m = len(samples), max(len(s["ref_pixels"]) for s in samples)
    out: dict = {
        "index": torch.tensor([s["index"] for s in samples]),
        "has_source": torch.tensor([s["has_source"] for s in samples]),
        "instruction": [s["instruction"] for s in samples],
        "task": [s["task"] for s in samples],
        "ref_mask": torch.zeros(batch, m, dtype=torch.bool),
    }
    for key in ("target", "source", "target_latent", "source_latent"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    for key in PER_REFERENCE:
        if key not in samples[0]:
            continue
        shape = next((s[key][0].shape for s in samples if s[key]), None)
        padded = torch.zeros(batch, m, *(shape or (0,)))  # M = 0 when no sample has a reference
        for b, s in enumerate(samples):
            for j, img in enumerate(s[key]):
                padded[b, j] = img
        out[key] = padded
    for b, s in enumerate(samples):
        out["ref_mask"][b, : len(s["ref_pixels"])] = True
    return out

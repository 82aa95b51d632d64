"""Records → tensors, from image files or from the latent cache, and a collate that pads
references to the largest count *in the batch* with an explicit mask.

Pixel path keys: ``target``, ``source`` ([3, H, W] in [-1, 1]), ``ref_vae`` (per reference, same),
``ref_pixels`` (per reference, ViT-normalised). Cached path: ``target_latent``, ``source_latent``,
``ref_latent`` (sampled from the stored moments at load time) and ``ref_pixels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from datamodules.images import load_rgb
from datamodules.latent_cache import LatentCache
from datamodules.records import Record

PER_REFERENCE = ("ref_pixels", "ref_vae", "ref_latent")


@dataclass
class Transforms:
    """The image transforms for one model: VAE path (resize short side + center-crop, → [-1, 1]) and
    the vision tower's own resize (to its square input, as BLIP-2's processor) and normalisation."""

    resolution: int
    vision_resolution: int
    vision_mean: Sequence[float]
    vision_std: Sequence[float]

    def __post_init__(self):
        bicubic = v2.InterpolationMode.BICUBIC
        to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        self.vae = v2.Compose(
            [
                v2.Resize(self.resolution, interpolation=bicubic, antialias=True),
                v2.CenterCrop(self.resolution),
                *to_float,
                v2.Normalize([0.5] * 3, [0.5] * 3),
            ]
        )
        self.vit_resize = v2.Resize(
            (self.vision_resolution, self.vision_resolution), interpolation=bicubic, antialias=True
        )
        self.vit_normalize = v2.Normalize(list(self.vision_mean), list(self.vision_std))
        self.vit = v2.Compose([self.vit_resize, *to_float, self.vit_normalize])


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

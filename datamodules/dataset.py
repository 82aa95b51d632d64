"""Records → tensors: target / source on the VAE path, references on both paths, and a collate
that pads references to the largest count *in the batch* with an explicit mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from datamodules.records import Record


def load_rgb(path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class MIGEDataset(Dataset):
    def __init__(
        self,
        records: Sequence[Record],
        *,
        resolution: int,
        vision_resolution: int,
        vision_mean: Sequence[float],
        vision_std: Sequence[float],
    ):
        self.records = list(records)
        to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        self.vae_transform = v2.Compose(
            [
                v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(resolution),
                *to_float,
                v2.Normalize([0.5] * 3, [0.5] * 3),  # → [-1, 1]
            ]
        )
        self.vision_transform = v2.Compose(
            [
                v2.Resize(
                    (vision_resolution, vision_resolution),
                    interpolation=v2.InterpolationMode.BICUBIC,
                    antialias=True,
                ),
                *to_float,
                v2.Normalize(list(vision_mean), list(vision_std)),
            ]
        )
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        refs = [load_rgb(p) for p in rec.references]
        res = self.resolution
        return {
            "target": self.vae_transform(load_rgb(rec.target)),
            "source": self.vae_transform(load_rgb(rec.source)) if rec.source else torch.zeros(3, res, res),
            "has_source": rec.source is not None,
            "ref_pixels": [self.vision_transform(r) for r in refs],
            "ref_vae": [self.vae_transform(r) for r in refs],
            "instruction": rec.instruction,
            "task": rec.task.value,
        }


def collate(samples: list[dict]) -> dict:
    """Stack a batch; references padded to the batch's largest count M with ``ref_mask`` [B, M]."""
    batch = len(samples)
    m = max(len(s["ref_pixels"]) for s in samples)
    out = {
        "target": torch.stack([s["target"] for s in samples]),
        "source": torch.stack([s["source"] for s in samples]),
        "has_source": torch.tensor([s["has_source"] for s in samples]),
        "instruction": [s["instruction"] for s in samples],
        "task": [s["task"] for s in samples],
        "ref_mask": torch.zeros(batch, m, dtype=torch.bool),
    }
    for key in ("ref_pixels", "ref_vae"):
        shape = next((s[key][0].shape for s in samples if s[key]), None)
        padded = torch.zeros(batch, m, *(shape or (3, 1, 1)))
        for b, s in enumerate(samples):
            for j, img in enumerate(s[key]):
                padded[b, j] = img
        out[key] = padded
    for b, s in enumerate(samples):
        out["ref_mask"][b, : len(s["ref_pixels"])] = True
    return out

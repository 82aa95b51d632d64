"""The image transforms a model is trained with, shared by the data pipeline and the sampler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from mige_lightning.prompt import Task

RESIZES = ("project", "authors")


@dataclass
class Transforms:
    """The image transforms for one model: VAE path (resize short side + center-crop, → [-1, 1]) and
    the vision tower's own resize (to its square input, as BLIP-2's processor) and normalisation.

    ``resize``: ``project`` resizes with bicubic everywhere; ``authors`` as the authors' inference
    scripts on the VAE path: bilinear (torchvision's default) before the centre crop, and a
    subject-driven generation's references letterboxed — longer side to ``resolution`` (bicubic),
    centred on black — instead of centre-cropped (``vae_reference``). The vision tower's resize
    is the same in both (theirs is BLIP-2's, bicubic to the square)."""

    resolution: int
    vision_resolution: int
    vision_mean: Sequence[float]
    vision_std: Sequence[float]
    resize: str = "project"

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise ValueError(f"model.image_resize: {self.resize!r}; choose one of {RESIZES}")
        bicubic = v2.InterpolationMode.BICUBIC
        vae_mode = v2.InterpolationMode.BILINEAR if self.resize == "authors" else bicubic
        to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        # in two halves: the shards of ``optimize-data`` store the first half's (uint8) output and
        # apply the second when streamed, which gives the same tensor as the whole
        self.vae_resize = v2.Compose(
            [
                v2.Resize(self.resolution, interpolation=vae_mode, antialias=True),
                v2.CenterCrop(self.resolution),
            ]
        )
        self.vae_finish = v2.Compose([*to_float, v2.Normalize([0.5] * 3, [0.5] * 3)])
        self.vae = v2.Compose([*self.vae_resize.transforms, *self.vae_finish.transforms])
        # longer side to the resolution, then a centre "crop" larger than the image pads it with 0
        self.vae_letterbox = v2.Compose(
            [
                v2.Resize(None, max_size=self.resolution, interpolation=bicubic, antialias=True),
                v2.CenterCrop(self.resolution),
                *self.vae_finish.transforms,
            ]
        )
        self.vit_resize = v2.Resize(
            (self.vision_resolution, self.vision_resolution), interpolation=bicubic, antialias=True
        )
        self.vit_normalize = v2.Normalize(list(self.vision_mean), list(self.vision_std))
        self.vit_finish = v2.Compose([*to_float, self.vit_normalize])
        self.vit = v2.Compose([self.vit_resize, *self.vit_finish.transforms])

    def vae_reference(self, task: Task | str) -> v2.Compose:
        """The VAE-path transform of ``task``'s reference images: ``vae``, or with ``resize:
        authors`` the letterbox for subject-driven generation (the authors' subject script)."""
        if self.resize == "authors" and Task.parse(task) is Task.SUBJECT:
            return self.vae_letterbox
        return self.vae

"""The frozen autoencoder between pixels ([-1, 1]) and the latents the DiT works on.

Both classes share one small interface (``encode`` / ``decode`` / ``latent_channels`` /
``downsample_factor``) so the model and the data pipeline never branch on which one is used.
``PixelAutoencoder`` is the identity: the offline CPU demo trains in pixel space because no
pretrained VAE can be downloaded here and a random VAE's latents are meaningless to look at.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from mige_lightning.sources import resolve_source


class _Frozen(nn.Module):
    """Frozen image encoder: no gradients, and ``.train()`` never takes it out of eval mode."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # noqa: ARG002 — frozen modules stay in eval mode
        return super().train(False)


class KLAutoencoder(_Frozen):
    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.freeze()

    def identity(self) -> str:
        """Hash of config and weights: what a latent cache is keyed by (a stale cache is detected)."""
        h = hashlib.sha256(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.vae.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled mean and std of q(z | x): what a latent cache stores (sampled at load time)."""
        dist = self.vae.encode(pixels).latent_dist
        return dist.mean * self.scaling_factor, dist.std * self.scaling_factor

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None):
        dist = self.vae.encode(pixels).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return z * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample


class PixelAutoencoder(_Frozen):
    """Identity 'autoencoder': latents are the pixels themselves."""

    latent_channels = 3
    downsample_factor = 1
    scaling_factor = 1.0

    def __init__(self):
        super().__init__()
        self.freeze()

    def identity(self) -> str:
        return "pixel-identity"

    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pixels, torch.zeros_like(pixels)

    def encode(self, pixels: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None):
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def build_autoencoder(
    config: dict[str, Any], *, source: str | None = None, subfolder: str | None = None
) -> KLAutoencoder | PixelAutoencoder:
    """From a pretrained source (hub id or local dir, optional subfolder) or ``{"kind": …, **kwargs}``."""
    kwargs = dict(config)
    kind = kwargs.pop("kind", "kl")
    if source is not None:
        src = resolve_source(source, key="model.pretrained.vae")
        return KLAutoencoder(AutoencoderKL.from_pretrained(src, subfolder=subfolder))
    if kind == "pixel":
        return PixelAutoencoder()
    if kind != "kl":
        raise ValueError(
            f"model.overrides.vae.kind: unknown autoencoder kind {kind!r}; expected 'kl' or 'pixel'"
        )
    return KLAutoencoder(AutoencoderKL(**kwargs))

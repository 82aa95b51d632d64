"""The conditional DiT: diffusers' PixArt-α transformer with the conditional input on its channels.

Input channels = noisy latent ⊕ conditional input (source latent or zeros); output channels =
the prediction (ε, v or x₀: the run's ``prediction_type``; PixArt's is ε) ⊕ learned-variance
interpolation (PixArt's learned sigma). A 4-channel pretrained PixArt is
widened by ``widen_patch_embedding``: its weights go to the first channels, the new ones start at
zero, so the widened model computes exactly what the pretrained one did while the conditional
input is zero.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtTransformer2DModel
from torch import nn

from mige_lightning.sources import resolve_source


def build_dit(
    config: dict[str, Any],
    *,
    latent_channels: int,
    sample_size: int,
    caption_channels: int,
    source: str | None = None,
    subfolder: str | None = None,
    weights: bool = True,
    conditional_input: bool = True,
) -> PixArtTransformer2DModel:
    """weights=False: a pretrained source's architecture only (its config), for a skeleton build.
    conditional_input=False: the plain text-to-image DiT (noisy latent in, no source channels), as
    PixArt is before MIGE widens it."""
    in_channels = (2 if conditional_input else 1) * latent_channels
    out_channels = 2 * latent_channels
    if source is not None:
        src = resolve_source(source, key="model.pretrained.dit")
        if weights:
            dit = PixArtTransformer2DModel.from_pretrained(src, subfolder=subfolder)
        else:
            dit = PixArtTransformer2DModel.from_config(
                PixArtTransformer2DModel.load_config(src, subfolder=subfolder)
            )
        if dit.config.caption_channels != caption_channels:
            raise ValueError(
                f"model.pretrained.dit: '{source}' expects {dit.config.caption_channels}-d captions "
                f"but the text encoder gives {caption_channels}-d"
            )
        if dit.config.out_channels != out_channels:
            raise ValueError(
                f"model.pretrained.dit: '{source}' has {dit.config.out_channels} output channels; "
                f"learned sigma on {latent_channels}-channel latents needs {out_channels}"
            )
        if dit.config.in_channels < in_channels:
            widen_patch_embedding(dit, in_channels)
        return dit
    kwargs = dict(config)
    inner_dim = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
    kwargs.setdefault("cross_attention_dim", inner_dim)
    kwargs.setdefault("use_additional_conditions", False)
    return PixArtTransformer2DModel(
        **kwargs,
        in_channels=in_channels,
        out_channels=out_channels,
        sample_size=sample_size,
        caption_channels=caption_channels,
    )


@torch.no_grad()
def widen_patch_embedding(dit: PixArtTransformer2DModel, in_channels: int) -> None:
    """Give the patch embedding ``in_channels`` inputs: old weights copied, new channels zero."""
    old = dit.pos_embed.proj
    if in_channels < old.in_channels:
        raise ValueError(
            f"cannot narrow the patch embedding from {old.in_channels} to {in_channels} channels"
        )
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        bias=old.bias is not None,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, : old.in_channels].copy_(old.weight)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    dit.pos_embed.proj = new
    dit.register_to_config(in_channels=in_channels)


def patch_tokens(
    dit: PixArtTransformer2DModel, latents: torch.Tensor, *, position: bool = True
) -> torch.Tensor:
    """Reference latents [N, C, h, w] → the DiT's own patch tokens [N, L, D] (zero-padded channels),
    with its sin-cos position table added, or without (``position=False``: the patch projection
    only, as the authors' release feeds the fusion module)."""
    pad = dit.config.in_channels - latents.shape[1]
    if pad > 0:
        latents = torch.cat([latents, latents.new_zeros(latents.shape[0], pad, *latents.shape[2:])], dim=1)
    if position:
        return dit.pos_embed(latents)
    embed = dit.pos_embed
    tokens = embed.proj(latents).flatten(2).transpose(1, 2)  # [N, L, D]
    return embed.norm(tokens) if embed.layer_norm else tokens

"""What MIGE adds between its pretrained parts, as one savable diffusers model.

Learned Q-Former queries, the feature fusion, the projection into T5's embedding space and the
fixed null condition (in PixArt's ``y_embedding`` slot, but a fresh draw, as the authors' — not
PixArt's trained one) live together here so that the whole model saves
and loads with ``save_pretrained`` / ``from_pretrained`` like every other component.
"""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from mige_lightning.models.fusion import FeatureFusion


def null_caption(length: int, text_dim: int) -> torch.Tensor:
    """The fixed random null caption [L, D] a model starts with (seed 0, scale 1/sqrt(D)); drawn on
    the CPU whatever the default device (a meta-device build gets the same values)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(length, text_dim, generator=gen, device="cpu") / math.sqrt(text_dim)


class ConditionAdapter(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        num_query_tokens: int = 32,
        query_dim: int = 768,
        visual_dim: int = 1152,
        text_dim: int = 4096,
        num_heads: int = 8,
        null_length: int = 256,
        init_std: float = 0.02,
        fusion_query_bias: bool = True,
        fusion_init: str = "authors",
        reference_latent_scaling: bool = True,
        fusion_position_embedding: bool = True,
        null_condition_length: str = "full",
    ):
        """The last three describe the inputs the fusion module and the DiT see (``MIGEConfig``
        documents them); kept in this config so a saved pipeline computes what its model was
        trained with."""
        super().__init__()
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, query_dim) * init_std)  # [1, Q, Dq]
        self.fusion = FeatureFusion(
            query_dim, visual_dim, num_heads=num_heads, query_bias=fusion_query_bias, init=fusion_init
        )
        self.projection = nn.Linear(query_dim, text_dim)
        # fixed random null caption, drawn fresh as the authors do (their y_embedding is not PixArt's);
        # replaced by the checkpoint's (or model.pretrained.null_embedding) when one is given
        self.register_buffer("null_condition", null_caption(null_length, text_dim))  # persistent

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The learned queries' draw (the fusion and projection reset themselves); the null
        condition is a fixed buffer, not a weight."""
        self.query_tokens.normal_(0.0, self.config.init_std)

"""Representation alignment (REPA, Yu et al. 2024): a training aid for a DiT.

The hidden tokens after one early transformer block, passed through a small MLP, are pulled towards
a frozen image encoder's per-patch features of the *clean* image (negative cosine similarity), so
the trunk learns what is where from the encoder instead of from the denoising loss alone. Only the
training loss changes: the projector is not part of the DiT and is not saved with it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class RepresentationAlignment(nn.Module):
    """Projector (``width`` → ``target_dim``, REPA's three-layer SiLU MLP) and the alignment loss."""

    def __init__(self, width: int, target_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * width
        self.projector = nn.Sequential(
            nn.Linear(width, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, target_dim),
        )

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, D] on a square grid; targets [B, N, E] on a square grid (N ≤ L, the DiT's
        grid a multiple of the target's): 1 − mean cosine similarity after average-pooling the
        projected tokens onto the target's grid."""
        z = self.projector(tokens)
        side, target_side = math.isqrt(z.shape[1]), math.isqrt(targets.shape[1])
        if side * side != z.shape[1] or target_side * target_side != targets.shape[1]:
            raise ValueError(
                f"representation alignment needs square token grids, got {z.shape[1]} and {targets.shape[1]} tokens"
            )
        if side % target_side:
            raise ValueError(
                f"representation alignment: a {side}×{side} token grid does not pool onto the "
                f"encoder's {target_side}×{target_side} patches"
            )
        if side != target_side:
            grid = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], side, side)
            z = F.avg_pool2d(grid, side // target_side).flatten(2).transpose(1, 2)
        return 1 - F.cosine_similarity(z.float(), targets.float(), dim=-1).mean()


@contextmanager
def block_output(blocks: nn.ModuleList, depth: int):
    """Capture the output of ``blocks[depth - 1]`` (the hidden tokens after ``depth`` blocks) while
    the context is open: yields a dict whose ``"tokens"`` is set by each forward pass."""
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"representation alignment depth {depth}: the DiT has {len(blocks)} blocks")
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        captured["tokens"] = output[0] if isinstance(output, tuple) else output

    handle = blocks[depth - 1].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()

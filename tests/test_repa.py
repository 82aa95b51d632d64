"""Representation alignment (REPA) as a DiT training aid: which tokens it reads, how it pools them
onto the encoder's patches, the loss it gives, and that it trains the DiT's early blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mige_lightning.models.repa import RepresentationAlignment, block_output


def test_block_output_captures_the_chosen_block_and_lets_go():
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    x = torch.randn(2, 4)
    with block_output(blocks, 2) as captured:
        h = x
        for block in blocks:
            h = block(h)
    torch.testing.assert_close(captured["tokens"], blocks[1](blocks[0](x)))
    assert all(not b._forward_hooks for b in blocks)  # the hook is removed with the context
    with pytest.raises(ValueError, match="depth 4: the DiT has 3 blocks"):
        with block_output(blocks, 4):
            pass


def test_alignment_pools_tokens_onto_the_encoder_grid():
    """With an identity projector, targets equal to the 2×2 means of a 4×4 token grid (computed
    here cell by cell) give loss 0; their negatives give 2; a non-dividing grid is refused."""
    torch.manual_seed(0)
    align = RepresentationAlignment(3, 3)
    align.projector = nn.Identity()
    tokens = torch.randn(2, 16, 3)
    grid = tokens.reshape(2, 4, 4, 3)
    targets = torch.stack(
        [grid[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(dim=(1, 2)) for r in range(2) for c in range(2)],
        dim=1,
    )
    assert align(tokens, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert align(tokens, -targets).item() == pytest.approx(2.0, abs=1e-6)
    assert align(tokens, tokens).item() == pytest.approx(0.0, abs=1e-6)  # same grid: no pooling
    with pytest.raises(ValueError, match="does not pool onto"):
        align(torch.randn(1, 25, 3), targets[:1])

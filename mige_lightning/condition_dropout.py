"""Per-sample condition dropout that makes 2-/3-way classifier-free guidance possible.

One uniform draw ``u`` per sample: ``u < p_c`` drops the multimodal condition, the next ``p_i``
drops the conditional input, the next ``p_b`` drops both; the rest keep everything.
"""

from __future__ import annotations

import torch


def draw_condition_dropout(
    batch: int,
    *,
    p_condition: float = 0.05,
    p_input: float = 0.05,
    p_both: float = 0.05,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (drop_condition, drop_input), each a [batch] bool tensor."""
    if min(p_condition, p_input, p_both) < 0 or p_condition + p_input + p_both > 1:
        raise ValueError(
            f"dropout probabilities must be >= 0 and sum to <= 1, got {p_condition}, {p_input}, {p_both}"
        )
    u = torch.rand(batch, generator=generator, device=device)
    only_condition = u < p_condition
    only_input = (u >= p_condition) & (u < p_condition + p_input)
    both = (u >= p_condition + p_input) & (u < p_condition + p_input + p_both)
    return only_condition | both, only_input | both

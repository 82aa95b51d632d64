"""Feature fusion (paper §3.2.1): semantic Q-Former tokens attend to VAE patch tokens."""

from __future__ import annotations

import torch
from torch import nn

INIT_STD = 0.02  # the authors' FFM._init_weights: trunc_normal_(std=.02), zero biases
FUSION_INITS = ("authors", "pytorch")  # MIGEConfig.fusion_init


class FeatureFusion(nn.Module):
    """``out = LN(f_s + W_o · MHA(LN(W_q f_s), LN(MLP_k f_v), LN(MLP_v f_v)))``.

    ``W_o`` is zero-initialised, so at initialisation the module is ``LN(f_s)``: fusion starts as
    the identity (up to its LayerNorm) and the pretrained Q-Former semantics pass through unchanged
    until training learns to mix in visual detail.

    Initialisation is the authors' (``FFM._init_weights``, applied again after their model's own
    init): every ``nn.Linear`` inside — ``W_q``, both layers of the k/v MLPs and the attention's
    output projection — gets ``trunc_normal_(std=0.02)`` weights (PyTorch's default cut at ±2, not
    ±2σ) and zero biases; LayerNorms ones/zeros; the attention's packed in-projection keeps
    ``nn.MultiheadAttention``'s xavier-uniform weight and zero bias (it is no ``nn.Linear``); and
    ``W_o`` ends up zero. ``init="pytorch"`` keeps ``nn.Linear``'s own draws (``W_o`` still zero).
    """

    def __init__(
        self,
        semantic_dim: int,
        visual_dim: int,
        *,
        num_heads: int = 8,
        eps: float = 1e-6,
        query_bias: bool = True,
        init: str = "authors",
    ):
        super().__init__()
        if init not in FUSION_INITS:
            raise ValueError(f"fusion_init: {init!r}; choose one of {FUSION_INITS}")
        self.init = init
        self.q_proj = nn.Linear(semantic_dim, semantic_dim, bias=query_bias)  # authors: no bias
        self.k_mlp = self._mlp(visual_dim, semantic_dim)
        self.v_mlp = self._mlp(visual_dim, semantic_dim)
        self.q_norm = nn.LayerNorm(semantic_dim, eps=eps)
        self.k_norm = nn.LayerNorm(semantic_dim, eps=eps)
        self.v_norm = nn.LayerNorm(semantic_dim, eps=eps)
        self.attn = nn.MultiheadAttention(semantic_dim, num_heads, batch_first=True)
        self.out_proj = nn.Linear(semantic_dim, semantic_dim)
        self.out_norm = nn.LayerNorm(semantic_dim, eps=eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """This module's own rule, run after its layers reset themselves (``models/init.py`` visits
        children first): the authors' truncated normal for every linear inside, then the zero
        output projection."""
        for module in self.modules() if self.init == "authors" else ():
            if isinstance(module, nn.Linear):  # the MHA's out_proj too (an nn.Linear subclass)
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    @staticmethod
    def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, semantic: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """semantic: [N, Q, Ds] Q-Former tokens; visual: [N, L, Dv] patch tokens → [N, Q, Ds]."""
        q = self.q_norm(self.q_proj(semantic))  # [N, Q, Ds]
        k = self.k_norm(self.k_mlp(visual))  # [N, L, Ds]
        v = self.v_norm(self.v_mlp(visual))  # [N, L, Ds]
        attended, _ = self.attn(q, k, v, need_weights=False)  # [N, Q, Ds]
        return self.out_norm(semantic + self.out_proj(attended))

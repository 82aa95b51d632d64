"""Every attention in the step runs through ``scaled_dot_product_attention`` (``mige_lightning/attention.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mige_lightning.attention import attention_calls
from mige_lightning.module import MIGELightningModule
from tests.helpers.batches import make_batch

GROUPS = {
    "dit.transformer_blocks.*.attn1",  # DiT self-attention
    "dit.transformer_blocks.*.attn2",  # DiT cross-attention to the condition
    "encoder.t5.encoder.block.*.layer.*.SelfAttention",
    "encoder.qformer.encoder.layer.*.attention.attention",
    "encoder.qformer.encoder.layer.*.crossattention.attention",
    "encoder.vision.encoder.layers.*.self_attn",
    "encoder.adapter.fusion.attn",
}


def _calls(train: bool, *, eager_t5: bool = False) -> dict[str, dict]:
    warnings.filterwarnings("ignore", message="You are trying to `self.log")
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", warmup_steps=1)
    module.configure_model()
    module.train(train)
    if eager_t5:
        module.model.encoder.t5.config._attn_implementation = "eager"
    batch = make_batch(module.config, [1, 2], seed=0)
    with torch.set_grad_enabled(train), attention_calls(module.model) as calls:
        module.training_step(batch, 0)
    return {row["group"]: row for row in calls.table()}


def test_sampling_runs_every_attention_fused():
    rows = _calls(train=False)
    assert GROUPS <= rows.keys()
    for group, row in rows.items():
        assert row["sdpa"] > 0 and row["math"] == 0 and row["softmax"] == 0, (group, row)


def test_training_calls_sdpa_everywhere_and_falls_back_only_where_the_cpu_kernel_cannot():
    """On a CPU the fused kernel takes neither attention dropout (Q-Former, T5 in train mode) nor a
    float mask that needs a gradient (T5's learned position bias): SDPA runs its math path there."""
    rows = _calls(train=True)
    assert GROUPS <= rows.keys()
    assert not any(row["softmax"] for row in rows.values())  # nothing hand-written
    fallback = {g for g, row in rows.items() if row["math"]}
    assert fallback == {g for g in GROUPS if g.startswith(("encoder.t5.", "encoder.qformer."))}


def test_a_hand_written_attention_is_caught():
    rows = _calls(train=False, eager_t5=True)
    t5 = rows["encoder.t5.encoder.block.*.layer.*.SelfAttention"]
    assert t5["softmax"] > 0 and t5["sdpa"] == 0


@pytest.mark.parametrize(
    "op",
    [
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
    ],
)
def test_cuda_kernels_count_as_fused(op):
    from mige_lightning.attention import FUSED

    assert FUSED.match(op) and not FUSED.match("_safe_softmax")

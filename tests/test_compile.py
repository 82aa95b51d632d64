"""``model.compile_dit``: each DiT block compiled in place computes the step the eager one does."""

from __future__ import annotations

import warnings

import pytest
import torch

from mige_lightning.module import MIGELightningModule
from tests.helpers.batches import make_batch


def _step(compile_dit: bool):
    warnings.filterwarnings("ignore", message="You are trying to `self.log")
    torch.manual_seed(0)
    module = MIGELightningModule(
        "tiny", warmup_steps=1, p_drop_condition=0, p_drop_input=0, p_drop_both=0, compile_dit=compile_dit
    )
    module.configure_model()
    module.model.eval()  # no dropout: the two runs draw the same noise and nothing else
    batch = make_batch(module.config, [1, 2], seed=0)
    torch.manual_seed(1)
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return module, loss.detach(), grads


@pytest.mark.slow
def test_compiled_dit_blocks_give_the_eager_loss_and_gradients():
    compiled, loss_c, grads_c = _step(True)
    assert all(
        hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
        for b in compiled.model.dit.transformer_blocks
    )
    # names (and so checkpoints) unchanged by the in-place compile
    eager, loss_e, grads_e = _step(False)
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)

"""With gradient accumulation (K micro-batches per optimiser step) the EMA updates once per
optimiser step, not K times."""

from __future__ import annotations

import torch

from callbacks.ema import EMA
from tests.helpers.training import LinearModule, bare_trainer


def test_ema_updates_once_per_optimiser_step_under_accumulation(tmp_path):
    torch.manual_seed(0)
    ema = EMA(decay=0.5, warmup=False)
    module = LinearModule()
    trainer = bare_trainer(tmp_path, max_steps=4, accumulate_grad_batches=3, callbacks=[ema])
    trainer.fit(module)
    assert trainer.global_step == 4
    assert ema.num_updates == 4  # was 12: one per micro-batch, i.e. an effective decay of 0.5³

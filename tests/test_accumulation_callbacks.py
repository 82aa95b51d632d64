"""With gradient accumulation (K micro-batches per optimiser step) the EMA updates once per
optimiser step and validation sampling runs once per trigger, not K times."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from callbacks.ema import EMA
from callbacks.validation_sampling import ValidationSampling
from tests.conftest import LinearModule, bare_trainer


def test_ema_updates_once_per_optimiser_step_under_accumulation(tmp_path):
    torch.manual_seed(0)
    ema = EMA(decay=0.5, warmup=False)
    module = LinearModule()
    trainer = bare_trainer(tmp_path, max_steps=4, accumulate_grad_batches=3, callbacks=[ema])
    trainer.fit(module)
    assert trainer.global_step == 4
    assert ema.num_updates == 4  # was 12: one per micro-batch, i.e. an effective decay of 0.5³


def test_validation_sampling_runs_once_per_trigger_under_accumulation():
    callback = ValidationSampling(every_n_steps=2)
    runs = []
    callback.run = lambda trainer, pl_module: runs.append(trainer.global_step)
    trainer = SimpleNamespace(global_step=0)
    callback.on_train_start(trainer, None)
    # 2 micro-batches per optimiser step: the step count seen at each batch's end
    for step in [0, 1, 1, 2, 2, 3, 3, 4]:
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert runs == [2, 4]  # was [0, 2, 2, 4]

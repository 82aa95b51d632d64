"""The LightningModule: optimiser contents, warm-up, checkpoint metadata and reload."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mige_lightning.module import MIGELightningModule
from mige_lightning.prompt import PROMPT_VERSION
from tests.helpers.batches import make_batch
from tests.helpers.training import bare_trainer


def test_optimiser_holds_exactly_the_trainable_parameters_with_spec_defaults():
    module = MIGELightningModule("tiny")
    module.configure_model()
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = list(module.model.encoder.vision.parameters()) + list(module.model.autoencoder.parameters())
    assert params and not any(id(p) in params for p in frozen)
    expected = {id(p) for p in module.model.parameters() if p.requires_grad}
    assert params == expected
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["eps"]) == (3e-2, 1e-10)
    lrs = []
    for _ in range(1500):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and abs(lrs[500] - 0.5e-5) < 1e-12 and lrs[1000] == lrs[1499] == 1e-5  # linear warm-up


def test_checkpoint_round_trip_restores_weights_and_records_prompt_version(tmp_path):
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    batch = make_batch(module.config, [1, 2])
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["mige"]["prompt_version"] == PROMPT_VERSION
    restored = MIGELightningModule.load_from_checkpoint(path)
    a, b = module.model.state_dict(), restored.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt["mige"]["prompt_version"] = PROMPT_VERSION + 1
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="prompt version"):
        MIGELightningModule.load_from_checkpoint(path)


def test_condition_dropout_substitutes_null_condition_and_zero_input():
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", overrides={"vae": {"kind": "pixel"}})  # deterministic encoding
    module.configure_model()
    module.model.eval()
    batch = make_batch(module.config, [1, 2, 1])
    batch["has_source"][:] = True
    drop_c = torch.tensor([True, False, False])
    drop_i = torch.tensor([False, True, False])
    x0, cond_input, cond, mask = module.encode_batch(batch, drop_condition=drop_c, drop_input=drop_i)
    _, full_input, full_cond, full_mask = module.encode_batch(batch)
    null = module.model.null_condition
    assert torch.equal(cond[0, : null.shape[0]], null) and mask[0].sum() == null.shape[0]
    assert torch.equal(cond_input[1], torch.zeros_like(cond_input[1]))  # dropped input → zeros
    assert not torch.equal(full_input[1], torch.zeros_like(full_input[1]))
    n = int(full_mask[1].sum())
    assert torch.allclose(cond[1, :n], full_cond[1, :n], atol=1e-5)  # kept condition unchanged
    assert torch.equal(cond_input[0], full_input[0]) and torch.equal(cond_input[2], full_input[2])


def test_samples_per_task_are_logged_per_epoch(tmp_path):
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", warmup_steps=1)
    batch = make_batch(module.config, [1, 2, 0, 1])  # tasks: subject_edit, subject, subject, subject_edit
    loader = torch.utils.data.DataLoader([batch, batch], batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=loader)
    m = trainer.callback_metrics
    assert (
        m["train/samples_subject"] == 4
        and m["train/samples_subject_edit"] == 4
        and m["train/samples_edit"] == 0
    )


def test_ranks_draw_different_noise_after_the_same_seed():
    from types import SimpleNamespace

    module = MIGELightningModule("tiny")

    def draws(world_size: int, rank: int) -> torch.Tensor:
        L.seed_everything(0, verbose=False)  # Lightning seeds every rank with the same seed
        module._trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
        module.on_train_start()
        return torch.rand(4)

    single = draws(1, 0)
    L.seed_everything(0, verbose=False)
    assert torch.equal(single, torch.rand(4))  # one process: the seed is left as configured
    assert not torch.equal(draws(2, 0), draws(2, 1))  # ranks no longer share timesteps / noise
    assert torch.equal(draws(2, 1), draws(2, 1))  # still deterministic per rank


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_after_the_limit(tmp_path, caplog):
    """A NaN loss or NaN gradients: the step is skipped (weights and EMA unchanged, no NaN ever
    written), counted, and max_nonfinite_steps in a row stop the run with an error."""
    import logging

    from callbacks.ema import EMA

    torch.manual_seed(0)
    module = MIGELightningModule("tiny", warmup_steps=1, max_nonfinite_steps=3)
    batch = make_batch(module.config, [1, 2, 0, 1])
    steps, poison = [], {2: "loss", 3: "grad", 5: "loss", 6: "loss", 7: "grad"}

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})
            self.idx = batch_idx
            if poison.get(batch_idx) == "loss":
                batch["target"] = batch["target"] * float("nan")

        def on_after_backward(self, trainer, pl_module):
            if poison.get(self.idx) == "grad":
                next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = float("inf")

    loader = torch.utils.data.DataLoader([dict(batch) for _ in range(20)], batch_size=None)
    ema = EMA(decay=0.9)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Poison(), ema],
        default_root_dir=tmp_path,
    )
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(FloatingPointError, match=r"3 in a row, the limit is 3"),
    ):
        trainer.fit(module, train_dataloaders=loader)
    assert len(steps) == 8  # batches 0..7 started; the run stopped at the third bad step in a row
    after = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    for i in (2, 3):  # skipped: the weights entering the next batch are the ones it started with
        assert all(torch.equal(steps[i][n], steps[i + 1][n]) for n in after), i
    assert not all(torch.equal(steps[4][n], steps[5][n]) for n in after)  # batch 4 trained
    assert all(torch.isfinite(p).all() for p in after.values())
    assert all(torch.isfinite(t).all() for t in ema.shadow.values())
    assert "non-finite loss" in caplog.text and "non-finite gradients" in caplog.text
    assert "(2 in a row, the limit is 3)" in caplog.text


@pytest.mark.parametrize(("schedule", "last_lr"), [("constant", 1e-3), ("cosine", 0.0)])
def test_learning_rate_schedule_after_the_warm_up(schedule, last_lr, tmp_path):
    """constant keeps the rate after the warm-up; cosine reaches 0 at the run's last optimiser step
    (counted by the Trainer: max_steps here, accumulation included)."""
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", lr=1e-3, warmup_steps=2, lr_schedule=schedule)
    batch = make_batch(module.config, [1, 1])
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = bare_trainer(tmp_path, max_steps=6, accumulate_grad_batches=2, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 12, batch_size=None))
    per_step = seen[::2]  # one value per optimiser step (two micro-batches each)
    assert per_step[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # linear warm-up over 2 steps
    assert scheduler_lr(trainer) == pytest.approx(last_lr, abs=1e-12)
    if schedule == "cosine":
        assert per_step[2] > per_step[3] > per_step[4] > per_step[5] > 0.0


def scheduler_lr(trainer) -> float:
    """The rate the scheduler sets after the run's last optimiser step."""
    return trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]


def test_an_unknown_learning_rate_schedule_is_refused():
    with pytest.raises(ValueError, match="model.lr_schedule: 'linear'"):
        MIGELightningModule("tiny", lr_schedule="linear")

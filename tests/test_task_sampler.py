"""Task-balanced sampling: ratios per rank, disjoint rank streams, determinism, exact mid-epoch resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.task_sampler import DEFAULT_WEIGHTS, TaskBalancedSampler
from datamodules.training_data import TrainingDataModule
from mige_world.synthetic import generate

POOLS = {  # deliberately unbalanced pool sizes: the ratios must come from the weights, not the data
    "subject": list(range(0, 9000)),
    "edit": list(range(9000, 9600)),
    "subject_edit/add": list(range(9600, 9900)),
    "subject_edit/replace": list(range(9900, 12000)),
}
POOL_OF = {i: k for k, v in POOLS.items() for i in v}


def test_ratios_within_two_percent_on_each_rank_and_streams_disjoint():
    streams = []
    for rank in range(2):
        s = TaskBalancedSampler(POOLS, DEFAULT_WEIGHTS, num_samples=20_000, num_replicas=2, rank=rank, seed=7)
        stream = list(s)
        assert len(stream) == 20_000
        counts = {k: 0 for k in POOLS}
        for i in stream:
            counts[POOL_OF[i]] += 1
        for key, weight in DEFAULT_WEIGHTS.items():
            assert abs(counts[key] / 20_000 - weight) < 0.02, (rank, key, counts[key])
        streams.append(set(stream))
    assert not streams[0] & streams[1]  # no sample is ever drawn by both ranks


def test_stream_is_a_function_of_seed_and_epoch():
    a = TaskBalancedSampler(POOLS, DEFAULT_WEIGHTS, num_samples=500, seed=1)
    b = TaskBalancedSampler(POOLS, DEFAULT_WEIGHTS, num_samples=500, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)
    assert list(TaskBalancedSampler(POOLS, DEFAULT_WEIGHTS, num_samples=500, seed=2)) != list(b)


def test_sampler_state_resumes_at_the_next_sample():
    s = TaskBalancedSampler(POOLS, DEFAULT_WEIGHTS, num_samples=300, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.advance(123)
    restored = TaskBalancedSampler(POOLS, DEFAULT_WEIGHTS, num_samples=300, seed=3)
    restored.load_state_dict(s.state_dict())
    restored.set_epoch(2)  # Lightning calls this again on resume: same epoch keeps the position
    assert list(restored) == full[123:]
    restored.set_epoch(3)
    assert len(list(restored)) == 300


def test_pool_without_weight_or_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no weight for pool\(s\) \['subject_edit'\]"):
        TaskBalancedSampler({"subject": [0], "subject_edit": [1]}, {"subject": 1.0})
    with pytest.raises(ValueError, match="pool 'edit' has weight 0.5 but 1 record"):
        TaskBalancedSampler({"subject": [0, 1], "edit": [2]}, {"subject": 0.5, "edit": 0.5}, num_replicas=2)


class Recorder(L.LightningModule):
    """Records which samples each training step consumed."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return self.layer(torch.ones(1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _dm(world_root, workers):
    dm = TrainingDataModule(
        synthetic={"root": str(world_root), "num_samples": 48, "size": 16},
        batch_size=4,
        num_workers=workers,
        seed=5,
        check_images=False,
    )
    dm.connect(
        resolution=16, vision_resolution=8, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3, max_images=4
    )
    return dm


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_resume_mid_epoch_continues_with_the_next_sample(tmp_path, workers):
    generate(tmp_path / "world", num_samples=48, size=16)
    kw = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    full = Recorder()
    L.Trainer(max_steps=16, **kw).fit(full, datamodule=_dm(tmp_path / "world", workers))  # 10 steps/epoch
    assert len(full.seen) == 16
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=7, save_top_k=-1)
    first = Recorder()
    L.Trainer(max_steps=7, callbacks=[ckpt], **kw).fit(first, datamodule=_dm(tmp_path / "world", workers))
    resumed = Recorder()
    L.Trainer(
        max_steps=16,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=7, save_top_k=-1)],
        **kw,
    ).fit(
        resumed,
        datamodule=_dm(tmp_path / "world", workers),
        ckpt_path=str(tmp_path / "ck" / "epoch=0-step=7.ckpt"),
    )
    assert first.seen == full.seen[:7]
    assert resumed.seen == full.seen[7:]  # mid-epoch resume, then into the next epoch
    assert len(full.seen[10]) == 4 and full.seen[10:] != full.seen[:6]  # epoch 2 draws a new stream


class LossRecorder(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((trainer.global_step, batch["index"].tolist(), float(outputs["loss"])))


def _fit_tiny_mige(world: Path, root: Path, max_steps: int, ckpt_path: str | None = None) -> list:
    from callbacks.ema import EMA
    from mige_lightning.module import MIGELightningModule

    L.seed_everything(0)
    rec = LossRecorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        limit_val_batches=0,  # training only: the exact-resume check compares training losses
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[
            rec,
            EMA(decay=0.9),
            ModelCheckpoint(dirpath=root / "ck", every_n_train_steps=10, save_top_k=-1),
        ],
    )
    dm = TrainingDataModule(
        synthetic={"root": str(world), "num_samples": 48, "size": 16},
        batch_size=4,
        seed=5,
        check_images=False,
    )
    trainer.fit(MIGELightningModule("tiny", warmup_steps=2, lr=1e-3), datamodule=dm, ckpt_path=ckpt_path)
    return rec.rows


@pytest.mark.slow
def test_resume_from_the_last_step_of_an_epoch_repeats_the_next_epoch_exactly(tmp_path):
    """Every demo checkpoint is taken on an epoch's last step. The resumed run must continue with
    the same samples and the same losses (noise, timesteps, dropout) as the uninterrupted one: the
    loader's worker-seed draw at an epoch's start must not come from the global generator."""
    world = tmp_path / "world"
    generate(world, num_samples=48, size=16)  # 10 steps per epoch at batch 4
    full = _fit_tiny_mige(world, tmp_path / "full", 20)
    _fit_tiny_mige(world, tmp_path / "first", 10)
    resumed = _fit_tiny_mige(world, tmp_path / "resumed", 20, str(tmp_path / "first/ck/epoch=0-step=10.ckpt"))
    assert [r[:2] for r in resumed] == [r[:2] for r in full[10:]]  # same samples
    assert [r[2] for r in resumed] == [r[2] for r in full[10:]]  # bitwise the same losses

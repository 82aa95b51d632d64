"""MFU reporting: FLOPs counted on the real first step, the peak, and what reaches the logger."""

from __future__ import annotations

import csv

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.flop_counter import FlopCounterMode

from callbacks.throughput import MFUMonitor
from datamodules.training_data import TrainingDataModule
from mige_lightning.flops import PEAK_FLOPS, measured_matmul_flops, peak_flops
from mige_lightning.module import MIGELightningModule
from mige_world.synthetic import generate
from tests.helpers.batches import make_batch


def test_mfu_monitor_counts_the_real_step_and_logs_throughput_and_mfu(tmp_path):
    generate(tmp_path / "world", num_samples=24, size=16)
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", p_drop_condition=0, p_drop_input=0, p_drop_both=0, warmup_steps=1)
    monitor = MFUMonitor(peak_flops=1e12, window_size=2)
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="m"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,  # the training throughput only
        callbacks=[monitor],
    )
    data = TrainingDataModule(
        synthetic={"root": str(tmp_path / "world"), "num_samples": 24, "size": 16},
        batch_size=4,
        check_images=False,
    )
    trainer.fit(module, datamodule=data)

    # the count equals FlopCounterMode around the same first batch's training step + backward,
    # run again outside the Trainer on a fresh copy of the model and data
    torch.manual_seed(0)
    fresh = MIGELightningModule("tiny", p_drop_condition=0, p_drop_input=0, p_drop_both=0, warmup_steps=1)
    fresh.configure_model()
    again = TrainingDataModule(
        synthetic={"root": str(tmp_path / "world"), "num_samples": 24, "size": 16},
        batch_size=4,
        check_images=False,
    )
    fresh.connect_datamodule(again)
    again.setup("fit")
    batch = next(iter(again.train_dataloader()))
    with FlopCounterMode(display=False) as counter:
        fresh.training_step(batch, 0).backward()
    assert monitor.flops_per_batch == counter.get_total_flops() > 0
    assert module.flops_per_batch == monitor.flops_per_batch

    rows = list(csv.DictReader(open(tmp_path / "m" / "version_0" / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    for key in ("train/device/samples_per_sec", "train/device/items_per_sec", "train/device/mfu"):
        assert key in logged, sorted(logged)
    mfu = [float(r["train/device/mfu"]) for r in rows if r.get("train/device/mfu")]
    flops_rate = [float(r["train/device/flops_per_sec"]) for r in rows if r.get("train/device/flops_per_sec")]
    assert all(m > 0 for m in mfu)
    assert abs(mfu[-1] - flops_rate[-1] / 1e12) < 1e-9  # MFU = achieved FLOP/s / the given peak
    items = [float(r["train/device/items_per_sec"]) for r in rows if r.get("train/device/items_per_sec")]
    samples = [
        float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")
    ]
    # tokens per sample: the target's DiT patches, (16 px / VAE factor 2 / patch 2)² = 16
    assert abs(items[-1] / samples[-1] - 16) < 1e-6


def test_peak_is_measured_on_cpu_and_looked_up_for_known_gpus(monkeypatch):
    cpu = peak_flops(torch.device("cpu"), torch.float32)
    assert cpu is not None and cpu > 1e8
    assert measured_matmul_flops(size=256, seconds=0.05) > 1e7
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == PEAK_FLOPS["h200"][torch.bfloat16]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) is None


def test_step_flops_scale_with_the_batch():
    """Counted, not guessed: twice the batch, twice the matrix-product FLOPs (within the parts
    that do not depend on the batch, e.g. the null condition)."""
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", p_drop_condition=0, p_drop_input=0, p_drop_both=0)
    module.configure_model()
    counts = []
    for n in (2, 4):
        batch = make_batch(module.config, [1] * n)
        with FlopCounterMode(display=False) as counter:
            module.training_step(batch, 0).backward()
        counts.append(counter.get_total_flops())
    assert 1.9 < counts[1] / counts[0] < 2.1

"""Throughput and MFU in training: Lightning's ``ThroughputMonitor`` with the FLOPs of a real step.

Logged keys (Lightning's names, per ``log_every_n_steps``): ``train/device/batches_per_sec``,
``train/device/samples_per_sec``, ``train/device/items_per_sec`` (DiT tokens: latent patches of
the target), ``train/device/flops_per_sec``, ``train/device/mfu``, and the ``train/`` totals over
all ranks. The FLOPs of one batch are counted on this rank while the first training batch
actually runs (forward, backward; ``mige_lightning/flops.py``) and set as the module's
``flops_per_batch``, which ``ThroughputMonitor`` reads. The peak: ``peak_flops`` when given, else
the device's dense peak for the compute dtype (bf16 under ``model.fsdp_mixed_precision`` or a
bf16 trainer precision), else on a CPU the matrix-product throughput measured at start.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from mige_lightning.flops import StepFlops, peak_flops


def _batch_size(batch) -> int:
    """Training batches are dicts of columns; predict / test batches are lists of requests."""
    return len(batch["task"]) if isinstance(batch, dict) else len(batch)


class MFUMonitor(ThroughputMonitor):
    """Args:
    peak_flops: the device's peak FLOP/s for MFU (default: looked up, or measured on a CPU).
    window_size, separator: as ``ThroughputMonitor``.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 100, separator: str = "/"):
        super().__init__(
            batch_size_fn=_batch_size, length_fn=self._tokens, window_size=window_size, separator=separator
        )
        self.peak = peak_flops
        self._counter = StepFlops()
        self._tokens_per_sample = 1
        self.flops_per_batch: int | None = None

    def _tokens(self, batch) -> int:
        return _batch_size(batch) * self._tokens_per_sample

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        dtype = torch.bfloat16 if _computes_in_bf16(trainer, pl_module) else torch.float32
        if self.peak is None:
            self.peak = peak_flops(trainer.strategy.root_device, dtype)
        self.available_flops = self.peak
        for running in list(self._throughputs):  # Lightning built them with its own peak
            self._throughputs[running] = Throughput(
                available_flops=self.peak, world_size=trainer.world_size, **self.kwargs
            )
        rank_zero_info(
            f"MFUMonitor: peak {self.peak / 1e12:.1f} TFLOP/s ({dtype})"
            if self.peak
            else "MFUMonitor: no peak known"
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = getattr(pl_module, "model", None)  # built after setup (configure_model)
        if self.flops_per_batch is None and model is not None:
            patch = model.dit.config.patch_size
            self._tokens_per_sample = (
                pl_module.config.resolution // model.autoencoder.downsample_factor // patch
            ) ** 2
        if self.flops_per_batch is None and not self._counter.running:
            self._counter.start()  # the first batch's forward and backward

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter.running:
            self.flops_per_batch = self._counter.stop()
            pl_module.flops_per_batch = self.flops_per_batch  # what ThroughputMonitor reads
            rank_zero_info(f"MFUMonitor: {self.flops_per_batch / 1e9:.2f} GFLOP per batch on this rank")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._counter.running:
            self._counter.stop()


def _computes_in_bf16(trainer, pl_module) -> bool:
    precision = str(getattr(trainer, "precision", ""))
    return "bf16" in precision or bool(getattr(pl_module.hparams, "fsdp_mixed_precision", False))

"""FLOPs of a real training step and the peak they are compared against (MFU).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` while a step actually runs
(matrix products, convolutions and attention, forward and backward) — not a formula. With
activation checkpointing the recomputed forward is counted too, so the ratio is then the hardware
FLOPs utilisation (HFU); without it, model FLOPs utilisation (MFU).

The peak is dense bf16 (or the compute dtype's) throughput of the device: a config value when
given, else Lightning's table (``get_available_flops``), else this module's small table for
chips Lightning does not name as they report themselves (``NVIDIA H200``). On a CPU it is the
matrix-product throughput measured on this machine (``measured_matmul_flops``).
"""

from __future__ import annotations

import time
import warnings

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.flop_counter import FlopCounterMode

# dense (no sparsity) tensor-core peak per GPU, FLOP/s, from the vendors' data sheets (SXM parts)
PEAK_FLOPS: dict[str, dict[torch.dtype, float]] = {
    "h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 494.7e12},
    "h100": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 494.7e12},
    "a100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},
}


def measured_matmul_flops(
    dtype: torch.dtype = torch.float32, *, size: int = 1024, seconds: float = 0.5
) -> float:
    """FLOP/s this machine's CPU reaches on square matrix products (the CPU's practical peak)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak for ``dtype`` (FLOP/s), or None when unknown."""
    if device.type == "cpu":
        return measured_matmul_flops(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    if device.type != "cuda":
        return None
    with warnings.catch_warnings():  # "FLOPs not found for 'NVIDIA H200'": our table has it
        warnings.simplefilter("ignore")
        known = get_available_flops(device, dtype)
    if known:
        return float(known)
    name = torch.cuda.get_device_name(device).lower()
    for chip, table in PEAK_FLOPS.items():
        if chip in name and dtype in table:
            return table[dtype]
    return None


class StepFlops:
    """Count the FLOPs of whatever runs between ``start()`` and ``stop()`` on this rank."""

    def __init__(self):
        self._mode: FlopCounterMode | None = None
        self.total: int | None = None

    def start(self) -> None:
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def stop(self) -> int:
        if self._mode is None:
            raise RuntimeError("StepFlops.stop() without start()")
        self._mode.__exit__(None, None, None)
        self.total = int(self._mode.get_total_flops())
        self._mode = None
        return self.total

    @property
    def running(self) -> bool:
        return self._mode is not None

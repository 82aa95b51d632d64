"""Process-group plumbing for the multi-process tests: a free port, and spawn with a deadline."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args, *, nprocs: int, timeout: float) -> None:
    """``torch.multiprocessing.spawn`` with a deadline (a deadlock fails the test, never hangs it)."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs} processes still running after {timeout} s")

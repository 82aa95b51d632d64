"""Helpers for ``tests/test_streaming.py``.

``python -m tests.helpers.streaming``: a local S3-compatible server (moto's, in memory) on
127.0.0.1 with a port the OS chooses; prints the port, serves until its stdin closes. The tests
run it as a subprocess, so no server thread is ever forked into a loader worker.

``StepLog``: a callback for ``fit`` subprocesses: each rank appends one JSON line per training
batch (global step, loss, sample indices) to ``<out>/rank<r>.jsonl``, flushed, so the rows of a
run killed with SIGKILL are on disk. With ``stall_at``, rank 0 writes ``<out>/stalled`` after that
step's row and then waits (for the test to kill the run there: a checkpoint before it exists).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning as L


class StepLog(L.Callback):
    def __init__(self, out: str, stall_at: int | None = None):
        self.out, self.stall_at = Path(out), stall_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "loss": float(loss), "index": batch["index"].tolist()}
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / f"rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.stall_at is not None and trainer.global_step == self.stall_at and trainer.is_global_zero:
            (self.out / "stalled").write_text(str(trainer.global_step))
            time.sleep(600)  # killed here by the test


def read_rows(directory: Path, rank: int) -> list[dict]:
    path = directory / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def serve() -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()  # until the test closes our stdin
    server.stop()


if __name__ == "__main__":
    serve()

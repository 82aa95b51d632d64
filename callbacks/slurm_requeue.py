"""Requeue a SLURM job on its pre-emption signal, after a checkpoint taken between two steps.

Logged keys: none. Writes ``<trainer.default_root_dir>/hpc_ckpt_<n>.ckpt`` (Lightning's HPC
checkpoint name, so ``fit`` under SLURM resumes from it by itself) and calls
``scontrol requeue <job id>``.

Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves from inside the signal
handler, wherever each rank happens to be: under FSDP the ranks can be in different collectives
(a deadlock) and the checkpoint can cut a step in half (no exact resume). This callback only
notes the signal; after the next optimiser step all ranks agree that one of them got it, save
together, request the requeue and stop. ``python -m mige_lightning fit`` adds it under SLURM;
``scripts/slurm/train.sbatch`` asks for the signal with ``--signal=SIGUSR1@90``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID`` (the id survives a requeue)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def next_hpc_checkpoint(directory: str | Path) -> Path:
    """``hpc_ckpt_<n+1>.ckpt`` after the highest ``n`` in ``directory`` (files or sharded folders)."""
    numbers = [
        int(m.group(1))
        for p in Path(directory).glob("hpc_ckpt_*.ckpt")
        if (m := re.match(r"hpc_ckpt_(\d+)", p.name))
    ]
    return Path(directory) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class SLURMRequeue(L.Callback):
    """Args:
    signum: the pre-emption signal; default: the ``SLURMEnvironment``'s ``requeue_signal`` (SIGUSR1).
    requeue: call ``scontrol requeue`` after the checkpoint (False: only checkpoint and stop).
    """

    def __init__(self, signum: int | None = None, *, requeue: bool = True):
        self.signum, self.requeue = signum, requeue
        self.signalled = False
        self.checkpoint_path: Path | None = None
        self._armed = False
        self._previous = None  # the handler this callback replaced
        self._last_step = -1

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 — signal handler signature
        self.signalled = True  # acted on between steps, see on_train_batch_end

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not SLURMEnvironment.detect():
            return
        env = getattr(trainer.strategy, "cluster_environment", None)  # none for a single device
        default = env.requeue_signal if isinstance(env, SLURMEnvironment) else None
        self.signum = self.signum or default or signal.SIGUSR1
        self.signalled = False
        # registered before the Trainer's own handlers, which then leave this signal alone
        self._previous = signal.signal(self.signum, self._on_signal)
        self._armed = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # only right after an optimiser step: mid-accumulation gradients are not in a checkpoint
        if not self._armed or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        # one collective per step: any rank may have got the signal first
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.checkpoint_path = next_hpc_checkpoint(trainer.default_root_dir)
        rank_zero_info(f"pre-emption signal: saving {self.checkpoint_path} at step {trainer.global_step}")
        trainer.save_checkpoint(self.checkpoint_path)  # every rank; returns after a barrier
        if trainer.is_global_zero and self.requeue:
            job_id = slurm_job_id()
            result = subprocess.run(["scontrol", "requeue", str(job_id)], check=False)
            if result.returncode:
                log.warning("scontrol requeue %s failed with exit code %d", job_id, result.returncode)
            else:
                rank_zero_info(f"requeued SLURM job {job_id}")
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._armed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._armed, self._previous = False, None

"""Checkpoint between two steps when the job is told to stop: requeue it on SLURM's pre-emption
signal, exit non-zero on SIGTERM.

Logged keys: none. Writes ``<trainer.default_root_dir>/hpc_ckpt_<n>.ckpt`` (Lightning's HPC
checkpoint name, so ``fit`` under SLURM resumes from it by itself, and ``--ckpt_path last`` finds
it anywhere) and, for the pre-emption signal (SIGUSR1 under SLURM), calls
``scontrol requeue <job id>``. For SIGTERM (``scancel``, a job's end, a container stop, ``kill``)
the run stops after that checkpoint and ``python -m mige_lightning fit`` exits with 143
(128 + SIGTERM) on every rank, so a scheduler sees it did not finish.

Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves from inside the signal
handler, wherever each rank happens to be: under FSDP the ranks can be in different collectives
(a deadlock) and the checkpoint can cut a step in half (no exact resume). Its SIGTERM handler
broadcasts from inside the handler, so a SIGTERM that reaches one rank of several hangs them all.
This callback only notes the signal; after the next optimiser step all ranks agree that one of
them got it (one small all-reduce per step), save together, request the requeue or record the
exit code, and stop. ``python -m mige_lightning fit`` adds it to every run;
``scripts/slurm/train.sbatch`` asks for the pre-emption signal with ``--signal=SIGUSR1@90``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch
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


NONE, TERMINATE, REQUEUE = 0, 1, 2  # what a rank was told; the highest over the ranks wins


class PreemptionCheckpoint(L.Callback):
    """Args:
    signum: the pre-emption signal, answered only under SLURM; default: the ``SLURMEnvironment``'s
        ``requeue_signal`` (SIGUSR1).
    requeue: call ``scontrol requeue`` after its checkpoint (False: only checkpoint and stop).
    terminate: answer SIGTERM too, in any environment: checkpoint, stop, ``exit_code`` 143.
    """

    def __init__(self, signum: int | None = None, *, requeue: bool = True, terminate: bool = True):
        self.signum, self.requeue, self.terminate = signum, requeue, terminate
        self.received = NONE
        self.checkpoint_path: Path | None = None
        self.exit_code: int | None = None  # 143 after a SIGTERM checkpoint: the CLI exits with it
        self._requeue_armed = False
        self._previous: dict[int, object] = {}  # the handlers this callback replaced
        self._last_step = -1

    def _on_requeue_signal(self, signum, frame) -> None:  # noqa: ARG002 — signal handler signature
        self.received = max(self.received, REQUEUE)  # acted on between steps, see on_train_batch_end

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self.received = max(self.received, TERMINATE)

    def _arm(self, signum: int, handler) -> None:
        previous = signal.signal(signum, handler)
        self._previous.setdefault(signum, previous)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.received, self.exit_code = NONE, None
        if SLURMEnvironment.detect():
            env = getattr(trainer.strategy, "cluster_environment", None)  # none for a single device
            default = env.requeue_signal if isinstance(env, SLURMEnvironment) else None
            self.signum = self.signum or default or signal.SIGUSR1
            # registered before the Trainer's own handlers, which then leave this signal alone
            self._arm(self.signum, self._on_requeue_signal)
            self._requeue_armed = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if self.terminate:  # after the Trainer registered its own SIGTERM handler: replace it
            self._arm(signal.SIGTERM, self._on_sigterm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # only right after an optimiser step: mid-accumulation gradients are not in a checkpoint
        if not (self._requeue_armed or self.terminate) or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        # one collective per step: any rank may have got a signal first
        code = int(
            trainer.strategy.reduce(torch.tensor(self.received, device=pl_module.device), reduce_op="max")
        )
        if code == NONE:
            return
        self.checkpoint_path = next_hpc_checkpoint(trainer.default_root_dir)
        what = "pre-emption signal" if code == REQUEUE else "SIGTERM"
        rank_zero_info(f"{what}: saving {self.checkpoint_path} at step {trainer.global_step}")
        trainer.save_checkpoint(self.checkpoint_path)  # every rank; returns after a barrier
        if code == REQUEUE and trainer.is_global_zero and self.requeue:
            job_id = slurm_job_id()
            result = subprocess.run(["scontrol", "requeue", str(job_id)], check=False)
            if result.returncode:
                log.warning("scontrol requeue %s failed with exit code %d", job_id, result.returncode)
            else:
                rank_zero_info(f"requeued SLURM job {job_id}")
        if code == TERMINATE:
            self.exit_code = 128 + signal.SIGTERM
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        ours = (self._on_requeue_signal, self._on_sigterm)
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) in ours:  # not already put back by the Trainer's teardown
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous, self._requeue_armed = {}, False


SLURMRequeue = PreemptionCheckpoint  # the name configs and scripts used before SIGTERM was handled

"""SLURM glue for ``fit``: one run directory per job, kept across requeues, and resume from the
newest checkpoint in it.

Under SLURM (``SLURMEnvironment.detect()``) the TensorBoard run directory is
``<save_dir>/<name>/slurm_<job id>/`` instead of the next ``version_<n>`` — a requeued job keeps
its id, so its events, ``config.yaml`` and ``checkpoints/`` continue in the same place — and the
Trainer's ``default_root_dir`` (where ``hpc_ckpt_<n>.ckpt`` pre-emption checkpoints go) is that
directory too. A start without ``--ckpt_path`` resumes from the checkpoint with the highest step
among ``hpc_ckpt_*.ckpt`` and the ``last*.ckpt`` of each ``ModelCheckpoint``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment

from callbacks.slurm_requeue import slurm_job_id
from mige_lightning.checkpoint_files import UnreadableCheckpoint
from mige_lightning.checkpoint_state import load_checkpoint_file

log = logging.getLogger(__name__)


def job_run_version() -> str | None:
    """``slurm_<job id>`` under SLURM, else None."""
    job = slurm_job_id() if SLURMEnvironment.detect() else None
    return f"slurm_{job}" if job else None


def logger_init_args(trainer_config):
    """The parsed logger's ``init_args`` (``None`` without a configured logger)."""
    logger = trainer_config.get("logger")
    return logger.get("init_args") if hasattr(logger, "get") and logger.get("init_args") else None


def logger_run_root(args) -> Path:
    """``<save_dir>/<name>``: the folder holding a run's versions."""
    return Path(args.get("save_dir") or ".") / (args.get("name") or "")


def version_folder(version) -> str:
    """The folder name TensorBoardLogger gives a version: ``version_<n>`` for an int, else as is."""
    return version if isinstance(version, str) else f"version_{version}"


def use_job_run_dir(trainer_config) -> str | None:
    """Fix the TensorBoard logger's version and the Trainer's ``default_root_dir`` to the job's run
    directory (in the parsed ``trainer`` config, before instantiation); returns it, or None."""
    version = job_run_version()
    logger = trainer_config.get("logger")
    if version is None or not logger or isinstance(logger, (bool, list)):
        return None
    if not str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return None
    args = logger.init_args
    if args.get("version") is None:
        args.version = version
    run_dir = str(logger_run_root(args) / version_folder(args.version))
    if trainer_config.get("default_root_dir") is None:
        trainer_config.default_root_dir = run_dir
    return run_dir


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint (file, or sharded folder with ``meta.pt``) was saved at."""
    source = path / "meta.pt" if path.is_dir() else path
    if path.is_dir() and not source.is_file():  # a sharded save cut short before its metadata
        raise UnreadableCheckpoint(path, "a directory without meta.pt: not a sharded checkpoint folder")
    return int(load_checkpoint_file(source, mmap=not path.is_dir())["global_step"])


def newest_checkpoint(candidates: Iterable[Path]) -> Path | None:
    """The candidate with the highest step (ties: a pre-emption checkpoint, then the newer file);
    None without candidates. Unreadable ones are skipped and named in the log — but when there are
    candidates and none can be read, the run would start over from step 0: an error naming each."""
    ranked, unreadable = [], []
    for path in candidates:
        try:
            step = checkpoint_step(path)
        except Exception as e:  # a checkpoint cut short by the job's end: skip it, say so
            log.warning("ignoring unreadable checkpoint %s: %s", path, e)
            unreadable.append(f"{path}: {e}" if str(path) not in str(e) else str(e))
            continue
        ranked.append(((step, path.name.startswith("hpc_ckpt_"), path.stat().st_mtime), path))
    if not ranked and unreadable:
        raise RuntimeError(
            f"resume: {len(unreadable)} checkpoint(s) found but none can be read, so the run would "
            "start over from step 0; fix or remove them, or give --ckpt_path:\n- " + "\n- ".join(unreadable)
        )
    return max(ranked, key=lambda r: r[0])[1] if ranked else None


def resume_candidates(trainer) -> list[Path]:
    """Pre-emption checkpoints in ``default_root_dir`` and every ``ModelCheckpoint``'s ``last*.ckpt``."""
    found = list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    for callback in trainer.checkpoint_callbacks:
        directory = getattr(callback, "dirpath", None)
        if directory is None and trainer.log_dir is not None:
            directory = Path(trainer.log_dir) / "checkpoints"
        if directory is not None:
            found += Path(directory).glob("last*.ckpt")
    return found

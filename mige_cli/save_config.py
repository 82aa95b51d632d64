"""Where a run's parsed config is saved: ``config.yaml`` in the run's own folder, never the
current directory.

LightningCLI's ``SaveConfigCallback`` writes into ``trainer.log_dir``; without a logger (the
predict and benchmark configs have none) that is the current directory, and with ``overwrite``
every ``predict`` replaced whatever ``config.yaml`` was there. Here:

- ``predict``: beside ``predictions.jsonl``, in the ``PredictionWriter``'s ``output_dir``; ``test``:
  beside ``results.json``, in the ``BenchmarkReport``'s ``output_dir``;
- otherwise, with a logger: the run's version folder (``runs/<name>/version_<n>/``), as before (a
  resumed run, SLURM restarts included, writes its config there again);
- otherwise (``fit`` / ``validate`` without a logger, a path without its writer): not saved, and
  the log says so.

An output folder's ``config.yaml`` that no run wrote (its first line is not the ``#
lightning.pytorch==…`` header runs write) is the user's: the run stops at setup, before the
model is built, naming it, unless that folder's callback has ``overwrite: true``.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from callbacks.benchmark_report import BenchmarkReport

HEADER = "# lightning.pytorch=="  # the first line of every config a LightningCLI run saves


def output_callback(trainer, stage: str):
    """The callback whose ``output_dir`` holds this stage's results, if any."""
    kind = {"predict": BasePredictionWriter, "test": BenchmarkReport}.get(stage)
    if kind is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, kind) and hasattr(c, "output_dir")), None)


def written_by_a_run(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(HEADER)
    except OSError:
        return False


class SaveRunConfig(SaveConfigCallback):
    _target: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        callback = output_callback(trainer, stage)
        if callback is None:
            if trainer.logger is not None:
                return super().setup(trainer, pl_module, stage)  # the run's version folder
            rank_zero_info(
                f"{stage} without a logger or an output folder: its config is not saved (it would "
                "land in the current directory)"
            )
            self.already_saved = True
            return
        target = Path(callback.output_dir) / self.config_filename
        if target.exists() and not getattr(callback, "overwrite", False):
            if target.is_dir() or not written_by_a_run(target):
                raise FileExistsError(
                    f"{target} exists and was not written by a run: {stage} saves its config there; "
                    f"move it, choose another output_dir, or set overwrite: true on the "
                    f"{type(callback).__name__}"
                )
        self._target = target

    def _write(self, trainer) -> None:
        if self._target is None or self.already_saved:
            return
        if trainer.is_global_zero:  # after the output callback's own checks (it comes first)
            self._target.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, self._target, skip_unset=False, overwrite=True, multifile=self.multifile
            )
            rank_zero_info(f"config saved to {self._target}")
        self.already_saved = True

    def on_predict_start(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._write(trainer)

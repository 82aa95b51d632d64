"""Writes ``predict`` results: one PNG per request and a ``predictions.jsonl`` of what was made how.

Logged keys: none. Files: ``<output_dir>/<id>.png`` and ``<output_dir>/predictions.jsonl`` (one
line per image: id, task, instruction, inputs, file, seed, steps, scales, scheduler, prompt, and
``warnings`` when the instruction was not seen whole); with several ranks each writes
``predictions.rank<r>.jsonl``. Nothing already there is replaced unless ``overwrite`` is set: a
folder holding an earlier run's log, or a file named like one of this run's images, stops the run
before anything is written. Each image is written beside its name and moved into place, so a
failed write (a full disk) leaves no truncated PNG, and the error names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader


def _planned_ids(trainer) -> list[str]:
    """The request ids this run will write (the request data module's datasets), if known."""
    loaders = getattr(trainer, "predict_dataloaders", None)  # one loader, a sequence or a dict
    if loaders is None:
        return []
    if isinstance(loaders, DataLoader):
        loaders = [loaders]
    elif isinstance(loaders, dict):
        loaders = list(loaders.values())
    ids = []
    for loader in loaders:
        for request in getattr(loader.dataset, "requests", []):
            if hasattr(request, "id"):
                ids.append(request.id)
    return ids


class PredictionWriter(BasePredictionWriter):
    def __init__(self, output_dir: str = "predictions", overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite

    def _log_path(self, trainer) -> Path:
        name = (
            "predictions.jsonl" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.jsonl"
        )
        return self.output_dir / name

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise NotADirectoryError(f"output_dir {self.output_dir} exists and is not a folder")
        earlier = sorted(self.output_dir.glob("predictions*.jsonl")) if self.output_dir.is_dir() else []
        if earlier and not self.overwrite:
            # decided alike on every rank (same folder), before any rank writes
            raise FileExistsError(
                f"{self.output_dir} holds an earlier predict run ({', '.join(p.name for p in earlier)}, "
                f"{len(list(self.output_dir.glob('*.png')))} image(s)); choose another output_dir or set "
                "overwrite: true on the PredictionWriter (--trainer.callbacks.init_args.overwrite=true)"
            )
        taken = [i for i in _planned_ids(trainer) if (self.output_dir / f"{i}.png").exists()]
        if taken and not self.overwrite:
            raise FileExistsError(
                f"{self.output_dir} already holds {len(taken)} file(s) this run would write "
                f"({', '.join(f'{i}.png' for i in taken[:5])}{', …' if len(taken) > 5 else ''}); choose "
                "another output_dir, move them, or set overwrite: true on the PredictionWriter"
            )
        if trainer.world_size > 1:
            trainer.strategy.barrier()  # every rank has looked before rank 0's log file appears
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._log_path(trainer).write_text("")  # one file per run

    def _save(self, image, path: Path, origin: str) -> None:
        """Write beside ``path`` and move into place: a failed write leaves nothing half-written."""
        if path.exists() and not self.overwrite:  # a request data module's ids were checked at start
            raise FileExistsError(f"{origin}: {path} exists; set overwrite: true to replace it")
        partial = path.with_name(f".{path.name}.partial")
        try:
            image.save(partial, format="PNG")
            os.replace(partial, path)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise OSError(err.errno, f"{origin}: could not write {path}: {err.strerror or err}") from err

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        """``batch``: the request data module's items (``spec``: the request as read);
        ``prediction``: ``predict_step``'s ``Generated`` per item, in the batch's order."""
        with self._log_path(trainer).open("a") as log:
            for item, generated in zip(batch, prediction, strict=True):
                r = item.spec
                path = self.output_dir / f"{r.id}.png"
                if path.resolve().parent != self.output_dir.resolve():  # ids are checked on reading
                    raise ValueError(f"{r.origin}: id {r.id!r} would write outside {self.output_dir}")
                self._save(generated.image, path, r.origin)
                entry = {
                    "id": r.id,
                    "file": path.name,
                    "instruction": r.instruction,
                    "images": [str(p) for p in r.references],
                    "source": str(r.source) if r.source else None,
                    "request": r.origin,
                    **({"warnings": list(r.warnings)} if r.warnings else {}),
                    **generated.settings,
                }
                log.write(json.dumps(entry) + "\n")
                log.flush()

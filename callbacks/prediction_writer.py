"""Writes ``predict`` results: one PNG per request and a ``predictions.jsonl`` of what was made how.

Logged keys: none. Files: ``<output_dir>/<id>.png`` and ``<output_dir>/predictions.jsonl`` (one
line per image: id, task, instruction, inputs, file, seed, steps, scales, scheduler, prompt);
with several ranks each writes ``predictions.rank<r>.jsonl``. A folder that already holds an
earlier run's results is refused unless ``overwrite`` is set: a re-run never destroys them silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter


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
        earlier = sorted(self.output_dir.glob("predictions*.jsonl")) if self.output_dir.is_dir() else []
        if earlier and not self.overwrite:
            # decided alike on every rank (same folder), before any rank writes
            raise FileExistsError(
                f"{self.output_dir} holds an earlier predict run ({', '.join(p.name for p in earlier)}, "
                f"{len(list(self.output_dir.glob('*.png')))} image(s)); choose another output_dir or set "
                "overwrite: true on the PredictionWriter (--trainer.callbacks.init_args.overwrite=true)"
            )
        if trainer.world_size > 1:
            trainer.strategy.barrier()  # every rank has looked before rank 0's log file appears
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._log_path(trainer).write_text("")  # one file per run

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        with self._log_path(trainer).open("a") as log:
            for item in prediction:
                r = item["request"]
                path = self.output_dir / f"{r['id']}.png"
                if path.resolve().parent != self.output_dir.resolve():  # ids are checked on reading
                    raise ValueError(f"{r['origin']}: id {r['id']!r} would write outside {self.output_dir}")
                item["image"].save(path)
                entry = {
                    "id": r["id"],
                    "file": path.name,
                    "instruction": r["instruction"],
                    "images": r["images"],
                    "source": r["source"],
                    "request": r["origin"],
                    **item["settings"],
                }
                log.write(json.dumps(entry) + "\n")

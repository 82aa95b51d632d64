"""Writes a ``test`` run's benchmark results: per-sample CSV, results JSON and a Markdown table.

What it reads is what the module hands every callback: each batch's ``test_step`` outputs
(``{"ids", "images", "rows", "ema"}``: the generated images and per-sample scores) and the figures
the module logs at the end (``test/<metric>``, ``test/baseline/<metric>``, on the synthetic world
``test[/baseline]/<task or task/kind>/{scene_acc,element_acc}``). It writes (rank 0; rows gathered
from every rank) ``<output_dir>/per_sample.csv``, ``results.json``, ``results.md`` (paper column
order; rows: MIGE, the copy-the-input baseline and, where the paper reports the benchmark, the
paper's numbers), and with ``save_images`` each rank's generated images.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import torch

from mige_lightning.evaluation import tables_from_logged
from mige_lightning.metrics import COLUMN_NAMES

PAPER_COLUMNS = {
    "emu_edit": ["DINO", "CLIP-I", "CLIP-T", "CLIPdir", "L1", "L2"],
    "magicbrush": ["DINO", "CLIP-I", "CLIP-T", "CLIPdir", "L1", "L2"],
    "dreambench": ["DINO", "CLIP-I", "CLIP-T"],
    "migebench": ["DINO", "CLIP-I", "CLIP-T"],
}
PAPER_RESULTS = {  # paper Tables 1–2
    "emu_edit": {"DINO": 0.832, "CLIP-I": 0.865, "CLIP-T": 0.306, "CLIPdir": 0.114, "L1": 0.088, "L2": 0.027},
    "magicbrush": {
        "DINO": 0.889,
        "CLIP-I": 0.905,
        "CLIP-T": 0.306,
        "CLIPdir": 0.119,
        "L1": 0.055,
        "L2": 0.013,
    },
    "dreambench": {"DINO": 0.744, "CLIP-I": 0.830, "CLIP-T": 0.293},
}
EXTRA_NAMES = {
    "subject_dino": "subject DINO",
    "subject_clip_i": "subject CLIP-I",
    "l1_outside": "L1 outside mask",
    "l2_outside": "L2 outside mask",
    "dino_inside": "DINO inside mask",
    "clip_i_inside": "CLIP-I inside mask",
}


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


class BenchmarkReport(L.Callback):
    def __init__(self, output_dir: str = "eval", benchmark: str | None = None, save_images: bool = False):
        self.output_dir = Path(output_dir)
        self.benchmark = benchmark
        self.save_images = save_images
        self._rows: list[dict] = []
        self._ema: set[bool] = set()

    def on_test_start(self, trainer, pl_module) -> None:
        self._rows, self._ema = [], set()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._rows += outputs["rows"]
        self._ema.add(bool(outputs["ema"]))
        if self.save_images:
            (self.output_dir / "images").mkdir(parents=True, exist_ok=True)
            for item_id, image in zip(outputs["ids"], outputs["images"], strict=True):
                image.save(self.output_dir / "images" / f"{item_id}.png")

    def on_test_end(self, trainer, pl_module) -> None:
        rows = self._rows
        if trainer.world_size > 1:  # every rank's rows, for the CSV (a collective: every rank calls it)
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if trainer.global_rank != 0:
            return
        name = self.benchmark or getattr(trainer.datamodule, "name", None) or "benchmark"
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        results = tables_from_logged(logged, rows)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with (self.output_dir / "per_sample.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        settings = {k: pl_module.hparams.get(k) for k in pl_module.RUNTIME_OPTIONS}
        settings["ema"] = self._ema.pop() if len(self._ema) == 1 else None  # EMA weights really used
        (self.output_dir / "results.json").write_text(
            json.dumps(
                {"benchmark": name, "samples": len(rows), "settings": settings, **results},
                indent=2,
                default=str,
            )
        )
        columns = PAPER_COLUMNS.get(name) or [c for c in COLUMN_NAMES.values() if c in results["MIGE"]]
        lines = [
            f"# {name} ({len(rows)} samples)",
            "",
            "| | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for label in ("MIGE", "copy-the-input baseline"):
            lines.append(f"| {label} | " + " | ".join(_fmt(results[label].get(c)) for c in columns) + " |")
        if name in PAPER_RESULTS:
            lines.append(
                "| paper (MIGE) | " + " | ".join(_fmt(PAPER_RESULTS[name].get(c)) for c in columns) + " |"
            )
        if results.get("scenes"):  # synthetic world: the pixel judge per task and kind
            from mige_lightning.scene_judge import format_table

            lines += ["", "## Scene judge (scene / element accuracy)", "", format_table(results["scenes"])]
        if results["extras"]:
            lines += ["", "| extra | value |", "|---|---|"]
            lines += [f"| {EXTRA_NAMES.get(k, k)} | {_fmt(v)} |" for k, v in results["extras"].items()]
        (self.output_dir / "results.md").write_text("\n".join(lines) + "\n")

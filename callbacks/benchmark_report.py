"""Writes a ``test`` run's benchmark results: per-sample CSV, results JSON and a Markdown table.

What it reads is what the module hands every callback: each batch's ``test_step`` outputs
(``{"generated", "rows", "ema"}``: the generated images and per-sample scores) and, at the end,
the module's typed ``benchmark_result`` (``mige_lightning.evaluation.BenchmarkResult``). It writes (rank 0; rows gathered
from every rank) ``<output_dir>/per_sample.csv``, ``results.json``, ``results.md`` (paper column
order; rows: MIGE, the copy-the-input baseline and, where the paper reports the benchmark, the
paper's numbers), and with ``save_images`` each rank's generated images.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch

from mige_lightning.evaluation import BASELINE, format_table
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
            for g in outputs["generated"]:
                g.image.save(self.output_dir / "images" / f"{g.request.id}.png")

    def on_test_end(self, trainer, pl_module) -> None:
        rows = self._rows
        if trainer.world_size > 1:  # every rank's rows, for the CSV (a collective: every rank calls it)
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if trainer.global_rank != 0:
            return
        name = self.benchmark or getattr(trainer.datamodule, "name", None) or "benchmark"
        results = pl_module.benchmark_result.tables()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with (self.output_dir / "per_sample.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        settings = {k: pl_module.hparams.get(k) for k in pl_module.RUNTIME_OPTIONS}
        settings["ema"] = self._ema.pop() if len(self._ema) == 1 else None  # EMA weights really used
        # how it was sampled and scored (model.protocol, mige_lightning/protocol.py) and how the
        # references the model saw were prepared: stated in both files' headers
        protocol = getattr(pl_module, "protocol", None)
        prep = getattr(trainer.datamodule, "reference_prep", None)  # None: references as shipped
        if protocol is not None and prep is not None:  # DreamBench: the data's own choice, if it made one
            protocol = replace(protocol, reference_prep=prep)
        (self.output_dir / "results.json").write_text(
            json.dumps(
                {
                    "benchmark": name,
                    "samples": len(rows),
                    "protocol": protocol.as_dict() if protocol is not None else None,
                    "reference_prep": prep or "as shipped",
                    "settings": settings,
                    **results,
                },
                indent=2,
                default=str,
            )
        )
        columns = PAPER_COLUMNS.get(name) or [c for c in COLUMN_NAMES.values() if c in results["MIGE"]]
        named = "unknown" if protocol is None else protocol.name
        if protocol is not None and protocol.changed():
            named += f" (changed: {', '.join(protocol.changed())})"
        lines = [
            f"# {name} ({len(rows)} samples; protocol: {named}; reference preparation: {prep or 'as shipped'})",
            "",
            "| | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for label in ("MIGE", BASELINE):
            lines.append(f"| {label} | " + " | ".join(_fmt(results[label].get(c)) for c in columns) + " |")
        if name in PAPER_RESULTS:
            lines.append(
                "| paper (MIGE) | " + " | ".join(_fmt(PAPER_RESULTS[name].get(c)) for c in columns) + " |"
            )
        if results.get("scenes"):  # synthetic world: the pixel judge per task and kind
            lines += ["", "## Scene judge (scene / element accuracy)", "", format_table(results["scenes"])]
        if results["extras"]:
            lines += ["", "| extra | value |", "|---|---|"]
            lines += [f"| {EXTRA_NAMES.get(k, k)} | {_fmt(v)} |" for k, v in results["extras"].items()]
        if protocol is not None:  # its parts (the references' preparation is in the title)
            parts = {k: v for k, v in protocol.as_dict().items() if k not in ("name", "reference_prep")}
            lines += ["", f"Protocol {protocol.name}: " + ", ".join(f"{k} {v}" for k, v in parts.items())]
        (self.output_dir / "results.md").write_text("\n".join(lines) + "\n")

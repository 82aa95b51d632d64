"""The demo's learning curve: held-out scene / element accuracy per task against wall time.

    .venv/bin/python -m bench.learning_curve --minutes 30 --every 250

Trains ``configs/demo.yaml`` (or the ``--config`` files given, composed in order) unchanged
except for the stopping rule (``--minutes`` of wall time instead of the demo's step count) and the
validation cadence (every ``--every`` steps, on every held-out request, task defaults, EMA
weights), then prints one Markdown row per validation:
step, minutes since start (training + validations so far), and scene / element accuracy per task,
with the copy-the-input baseline. Run it on a quiet machine: the times are the figure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
TASKS = ("subject", "edit", "subject_edit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config",
        action="append",
        help="configs/demo.yaml unless given; repeat to compose overlays, e.g. "
        "--config configs/demo.yaml --config configs/experiments/subject_only.yaml",
    )
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--runs", default="runs/curve")
    args = ap.parse_args()
    h, m = divmod(int(args.minutes * 60), 3600)
    callbacks = (
        "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}, "
        "{class_path: callbacks.ema.EMA, init_args: {decay: 0.995}}, "
        "{class_path: callbacks.validation_metrics.ValidationMetrics, init_args: {log_images: false}}]"
    )
    cmd = [
        sys.executable,
        "-m",
        "mige_lightning",
        "fit",
        *(arg for path in args.config or ["configs/demo.yaml"] for arg in ("--config", path)),
        "--trainer.max_steps=-1",
        f"--trainer.max_time=00:{h:02d}:{m // 60:02d}:{m % 60:02d}",
        f"--trainer.callbacks={callbacks}",
        f"--trainer.val_check_interval={args.every}",
        f"--trainer.logger.init_args.save_dir={args.runs}",
        "--trainer.enable_progress_bar=false",
    ]
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    run = max((REPO / args.runs).glob("*/version_*"), key=lambda p: p.stat().st_mtime)
    ea = EventAccumulator(str(run))
    ea.Reload()
    rows: dict[int, dict] = {}
    for tag in ea.Tags()["scalars"]:
        if tag.startswith("val/") and tag.endswith("_acc"):
            for e in ea.Scalars(tag):
                rows.setdefault(e.step, {})[tag] = (e.value, e.wall_time)
    base = {}
    for tag in ea.Tags()["scalars"]:
        if tag.startswith("val_baseline/") and tag.endswith("_acc"):
            base[tag.removeprefix("val_baseline/")] = ea.Scalars(tag)[0].value
    head = "| step | minutes | " + " | ".join(f"{t} scene / element" for t in TASKS) + " |"
    print(f"run: {run}\n\n{head}\n|---|---|" + "---|" * len(TASKS))
    for step in sorted(rows):
        r = rows[step]
        minutes = (min(v[1] for v in r.values()) - start) / 60
        cells = [
            f"{r.get(f'val/{t}/scene_acc', (float('nan'),))[0]:.2f} / {r.get(f'val/{t}/element_acc', (float('nan'),))[0]:.2f}"
            for t in TASKS
        ]
        print(f"| {step} | {minutes:.1f} | " + " | ".join(cells) + " |")
    if base:
        cells = [
            f"{base.get(f'{t}/scene_acc', float('nan')):.2f} / {base.get(f'{t}/element_acc', float('nan')):.2f}"
            for t in TASKS
        ]
        print("| copy-the-input baseline | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

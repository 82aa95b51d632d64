"""Mutual enhancement in miniature: does joint training help each task, as the paper claims?

    .venv/bin/python -m bench.replicate_mutual            # = make replicate-mutual
    .venv/bin/python -m bench.replicate_mutual --seeds 0 --settings joint edit_only   # a subset

Trains the demo model on one synthetic world in four settings with the same optimiser steps and
batch size (``configs/demo.yaml`` + ``configs/experiments/mutual.yaml`` + one of):
(a) ``joint``: every task at the demo's ratios; (b) ``subject_only``; (c) ``edit_only``;
(d) ``subject_and_edit``: no subject_edit data. Each setting with every seed (model init, noise and
data order; the world and the pretrained components every run starts from are the same), then samples every held-out request of every task with the
run's EMA weights and the demo's task defaults and reads the images back with the pixel judge.
Writes ``docs/RESULTS.md`` (mean ± half-range over seeds; the copy-the-input baseline row) and
``runs/mutual/results.json`` (every run's numbers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mige_cli.judge_synthetic import judge_checkpoint

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {
    "joint": "(a) joint",
    "subject_only": "(b) subject only",
    "edit_only": "(c) edit only",
    "subject_and_edit": "(d) subject + edit, no subject_edit",
}
TASKS = ("subject", "edit", "subject_edit")


def configs(setting: str) -> list[str]:
    return ["configs/demo.yaml", "configs/experiments/mutual.yaml", f"configs/experiments/{setting}.yaml"]


def train(setting: str, seed: int, runs: Path) -> tuple[Path, float]:
    name = f"{setting}_seed{seed}"
    args = [sys.executable, "-m", "mige_lightning", "fit"]
    for c in configs(setting):
        args += ["--config", c]
    args += [
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={runs}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_progress_bar=false",
    ]
    shutil.rmtree(runs / name, ignore_errors=True)  # this script's own earlier run of the setting
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return runs / name / "version_0" / "checkpoints" / "last.ckpt", time.perf_counter() - start


def cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.2f} ± {half:.2f}"


def write_results(results: dict, baseline: dict, meta: dict, path: Path) -> str:
    head = "| setting | " + " | ".join(f"{t} scene" for t in TASKS) + " | "
    head += " | ".join(f"{t} element" for t in TASKS) + " |"
    lines = [head, "|---|" + "---|" * (2 * len(TASKS))]
    for setting, runs in results.items():
        row = [cell([r[t]["scene_acc"] for r in runs]) for t in TASKS]
        row += [cell([r[t]["element_acc"] for r in runs]) for t in TASKS]
        lines.append(f"| {SETTINGS[setting]} | " + " | ".join(row) + " |")
    row = [f"{baseline[t]['scene_acc']:.2f}" for t in TASKS] + [
        f"{baseline[t]['element_acc']:.2f}" for t in TASKS
    ]
    lines.append("| copy-the-input baseline | " + " | ".join(row) + " |")
    table = "\n".join(lines)
    text = path.read_text() if path.is_file() else ""
    start, end = "<!-- replicate-mutual:start -->", "<!-- replicate-mutual:end -->"
    block = (
        f"{start}\n_Written by `make replicate-mutual` on {meta['date']} ({meta['seeds']} seeds per setting, "
        f"{meta['max_steps']} steps × batch {meta['batch_size']}, held-out requests: "
        f"{', '.join(f'{n} {t}' for t, n in meta['heldout'].items())}; "
        f"{meta['minutes']:.0f} min on this machine). Mean ± half-range over seeds._\n\n{table}\n{end}"
    )
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/mutual")
    ap.add_argument("--results", default="docs/RESULTS.md")
    args = ap.parse_args()
    runs = (REPO / args.runs).resolve()
    merged: dict = {}
    for c in configs("joint")[:2]:
        for section, values in (yaml.safe_load((REPO / c).read_text()) or {}).items():
            if isinstance(values, dict):
                merged.setdefault(section, {}).update(values)
    world = REPO / merged["data"]["synthetic"]["root"]
    start = time.perf_counter()
    results: dict[str, list] = {}
    every: dict = {}
    baseline = None
    for setting in args.settings:
        for seed in args.seeds:
            ckpt, seconds = train(setting, seed, runs)
            judged = judge_checkpoint(ckpt, world)
            baseline = judged["baseline"]
            results.setdefault(setting, []).append(judged["model"])
            every[f"{setting}/seed{seed}"] = {"train_s": seconds, **judged}
            scores = " ".join(f"{t} {judged['model'][t]['scene_acc']:.2f}" for t in TASKS)
            print(f"{setting} seed {seed}: {seconds:.0f} s, scene accuracy {scores}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "results.json").write_text(json.dumps(every, indent=2))
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "seeds": len(args.seeds),
        "max_steps": merged["trainer"]["max_steps"],
        "batch_size": merged["data"]["batch_size"],
        "heldout": {t: baseline[t]["n"] for t in TASKS},
        "minutes": minutes,
    }
    table = write_results(results, baseline, meta, REPO / args.results)
    print(table)


if __name__ == "__main__":
    main()

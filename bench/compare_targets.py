"""Which prediction target learns fastest on the demo? Same model, data, seed and steps; only
``prediction_type`` / ``snr_gamma`` differ.

    .venv/bin/python -m bench.compare_targets --steps 400

Trains the model section of ``configs/demo.yaml`` for ``--steps`` optimiser steps on the demo's
world (batch 32, AdamW, gradient clipping 1.0, no EMA), then samples the first 24 held-out
requests of each task with the demo's task defaults and judges them from pixels. Prints one
Markdown row per variant: scene / element accuracy per task (equal steps, so equal compute: the
variants cost the same per step).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import yaml

from datamodules.training_data import TrainingDataModule
from mige_cli.judge_synthetic import judge_module
from mige_lightning.module import MIGELightningModule

REPO = Path(__file__).resolve().parents[1]

warnings.filterwarnings("ignore", message="You are trying to `self.log")  # no Trainer here, by design
VARIANTS = {
    "epsilon": {"prediction_type": "epsilon", "snr_gamma": None},
    "v_prediction": {"prediction_type": "v_prediction", "snr_gamma": None},
    "v_prediction + min-SNR-5": {"prediction_type": "v_prediction", "snr_gamma": 5.0},
    "sample": {"prediction_type": "sample", "snr_gamma": None},
}
TASKS = ("subject", "edit", "subject_edit")


def run(variant: dict, *, steps: int, per_task: int, demo: dict) -> dict:
    torch.manual_seed(0)
    model_cfg = {**demo["model"], **variant}
    module = MIGELightningModule(**model_cfg)
    module.configure_model()
    module.model.train()
    data_cfg = demo["data"]
    data = TrainingDataModule(
        synthetic=data_cfg["synthetic"],
        batch_size=data_cfg["batch_size"],
        task_weights=data_cfg["task_weights"],
    )
    data.prepare_data()
    data.setup("fit")
    module.connect_datamodule(data)
    opt = module.configure_optimizers()
    optimizer, schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    batches = iter(data.train_dataloader())
    for step in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(data.train_dataloader())
            batch = next(batches)
        module.training_step(batch, step).backward()
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return judge_module(module, data_cfg["synthetic"]["root"], per_task=per_task)["model"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--per-task", type=int, default=24)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    print(
        f"{args.steps} steps × batch {demo['data']['batch_size']}, {args.per_task} held-out requests per task"
    )
    print("| target | " + " | ".join(f"{t} scene / element" for t in TASKS) + " |")
    print("|---|" + "---|" * len(TASKS))
    for name in args.variants:
        scores = run(VARIANTS[name], steps=args.steps, per_task=args.per_task, demo=demo)
        cells = [f"{scores[t]['scene_acc']:.2f} / {scores[t]['element_acc']:.2f}" for t in TASKS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

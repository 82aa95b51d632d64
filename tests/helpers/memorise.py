"""The memorisation test's model (``tests/test_memorise.py``), also trained by
``bench/memorise_seeds.py``: the demo's model trained on four samples until it memorises them,
and the samples it gives back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from datamodules.training_data import TrainingDataModule
from mige_lightning.images import load_rgb
from mige_lightning.module import MIGELightningModule
from mige_world.scene_judge import load_truth
from mige_world.synthetic import generate
from tests.helpers.training import bare_trainer

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
# 600 steps held the bound for some training-noise streams but not all: worst L1 over the three
# schedulers 0.076 / 0.036 / 0.032 for three streams (seeds 0 / 1 / 2 of this fixture's generator,
# ddim and euler worst); at 900 steps 0.043 / 0.038 / see docs/BENCHMARKS.md ("Memorisation")
STEPS = 900


def train_memoriser(root: Path, run_dir: Path, *, steps: int = STEPS, seed: int = 0):
    """The demo's model trained on four samples (one per kind) for ``steps`` steps; ``seed`` sets
    the training noise stream. Returns the module (eval) and the training split's truth."""
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    model_cfg = dict(demo["model"])
    model_cfg.update(lr=1e-3, warmup_steps=10)
    model_cfg["pretrained"] = {**model_cfg["pretrained"], "t5": None}
    model_cfg["overrides"] = {**model_cfg["overrides"], "train_text_encoder": True}
    # 8 samples, 4 of them the training split: one per kind (subject, edit, add, replace)
    generate(root, num_samples=8, size=SIZE, seed=3, heldout_fraction=0.5)
    torch.manual_seed(seed)
    module = MIGELightningModule(**model_cfg)
    data = TrainingDataModule(
        synthetic={"root": str(root), "num_samples": 8, "size": SIZE, "seed": 3, "heldout_fraction": 0.5},
        batch_size=4,
        task_weights={"subject": 0.25, "edit": 0.25, "subject_edit/add": 0.25, "subject_edit/replace": 0.25},
    )
    trainer = bare_trainer(
        run_dir,
        max_steps=steps,
        gradient_clip_val=1.0,
        limit_val_batches=0,  # trains only: the held-out half is sampled after training
    )
    trainer.fit(module, datamodule=data)
    module.model.eval()
    return module, load_truth(root, "train")


def sample_back(module, truth, scheduler: str):
    """Each memorised sample generated again: (key, sample, image, L1 to its target)."""
    pipe = module.pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)
    for key, sample in truth.items():
        out = pipe(
            sample.instruction,
            task=sample.task,
            images=[load_rgb(p) for p in sample.references],
            source=load_rgb(sample.source) if sample.source else None,
            seed=0,
        )
        image = out.images[0]
        target = np.asarray(load_rgb(sample.target), dtype=np.float64) / 255
        yield key, sample, image, float(np.abs(np.asarray(image, dtype=np.float64) / 255 - target).mean())

"""Helpers for the FSDP / SLURM tests: the environment and config overlay for
``python -m mige_lightning fit`` subprocesses, and a probe callback those runs carry.

``Probe``: rank 0 writes ``<out>/start.pt`` (the gathered weights at fit start, and the eager
``build_mige(config, seed=0)`` weights for the same config); each rank writes ``<out>/rank<r>.json``: per training batch the global step, the loss and the
sample indices; the sizes of its parameter shards; the optimiser's parameters. Rank 0 also writes
``<out>/ema.pt`` (the full EMA weights, gathered) and, with ``sample=True``, ``<out>/latents.pt``:
one image sampled by the sharded model at the end of fit (every rank runs the pipeline).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import PIL.Image
import torch
import yaml
from torch.distributed.tensor import DTensor

from callbacks.ema import EMA
from mige_lightning.models import build_mige

REPO = Path(__file__).resolve().parents[2]
# tiny preset with its KL autoencoder (frozen, replicated under FSDP) at 16 px, fp32 for exact checks
BASE_ARGS = [
    "--config",
    str(REPO / "configs/demo.yaml"),
    "--config",
    str(REPO / "configs/trainer/fsdp.yaml"),
]
CPU_ARGS = ["--trainer.accelerator=cpu", "--model.fsdp_mixed_precision=false"]
# the overlay's model.overrides / model.pretrained / data.synthetic are meant whole (the tiny preset's
# shapes, no pretrained part but the tokenizer, the overlay's world): a config file's dict merges
# into the demo's key by key (mige_cli/config_overlays.py), so the demo's are cleared first
CLEAR_DEMO_DICTS = ["--model.overrides=null", "--model.pretrained=null", "--data.synthetic=null"]


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment without SLURM variables, importable ``tests``, one thread per
    process (two gloo ranks on two cores: more threads only contend)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("MASTER_PORT", None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.update(extra)
    return env


def fit_command(overlay: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mige_lightning",
        "fit",
        *BASE_ARGS,
        *CLEAR_DEMO_DICTS,
        "--config",
        str(overlay),
        *CPU_ARGS,
        *extra,
    ]


def write_overlay(
    path: Path, *, world: Path, probe: Path, sample: bool = False, every: int, **trainer
) -> Path:
    """A config overlay for the demo + FSDP configs: tiny model at 16 px with its KL autoencoder,
    a small synthetic world, checkpoints every ``every`` steps, EMA and the probe."""
    config = {
        "trainer": {
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "every_n_train_steps": every, "save_top_k": -1},
                },
                {"class_path": "callbacks.ema.EMA", "init_args": {"decay": 0.9}},
                {
                    "class_path": "tests.helpers.fsdp_probe.Probe",
                    "init_args": {"out": str(probe), "sample": sample},
                },
            ],
            **trainer,
        },
        "data": {
            "synthetic": {"root": str(world), "num_samples": 48, "size": 16, "seed": 0},
            "batch_size": 2,
            "check_images": False,
        },
        # the demo's word tokenizer, its T5 from scratch (not the one make demo pre-trains)
        "model": {
            "overrides": {"resolution": 16},
            "pretrained": {"tokenizer": "words", "t5": None},
            "warmup_steps": 2,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


SAMPLE = {
    "instruction": "replace the ball in the picture with <imagehere>",
    "task": "subject_edit",
    "num_inference_steps": 3,
    "seed": 7,
}


def sample_images(size: int) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A fixed reference and source image."""
    gen = torch.Generator().manual_seed(0)
    ref, src = (torch.rand(size, size, 3, generator=gen).mul(255).byte().numpy() for _ in range(2))
    return PIL.Image.fromarray(ref), PIL.Image.fromarray(src)


def sample(pl_module) -> torch.Tensor:
    pipe = pl_module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    ref, src = sample_images(pl_module.config.resolution)
    out = pipe(
        SAMPLE["instruction"],
        task=SAMPLE["task"],
        images=[ref],
        source=src,
        num_inference_steps=SAMPLE["num_inference_steps"],
        seed=SAMPLE["seed"],
        output_type="latent",
    )
    return out.images.detach().cpu()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


class Probe(L.Callback):
    def __init__(self, out: str, *, sample: bool = False):
        self.out, self.sample = Path(out), sample
        self.rows: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        # the weights the sharded start produced (before any step), gathered; with the model config
        start = {n: _full(t) for n, t in pl_module.model.state_dict().items()}  # a collective for DTensors
        if trainer.is_global_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            # and what one process builds eagerly for the same config and the run's seed (0): tensors
            # only, so the test reads both without unpickling objects
            eager = build_mige(pl_module.config, seed=0).state_dict()
            torch.save({"state": start, "eager": eager}, self.out / "start.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.rows.append({"step": trainer.global_step, "loss": float(loss), "index": batch["index"].tolist()})

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        params = dict(pl_module.named_parameters())
        trainable = {n: p for n, p in params.items() if p.requires_grad}
        local = {
            n: (p.to_local().numel() if isinstance(p, DTensor) else p.numel()) for n, p in params.items()
        }
        optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        info = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "rows": self.rows,
            "trainable_total": sum(p.numel() for p in trainable.values()),
            "trainable_local": sum(local[n] for n in trainable),
            "sharded": sorted(n for n, p in params.items() if isinstance(p, DTensor)),
            "not_sharded": sorted(n for n, p in params.items() if not isinstance(p, DTensor)),
            "frozen_sharded": sorted(
                n for n, p in params.items() if isinstance(p, DTensor) and not p.requires_grad
            ),
            "optimised": sorted(n for n, p in params.items() if id(p) in optimised),
            "trainable": sorted(trainable),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
        ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
        if ema is not None:
            full = {n: _full(t) for n, t in ema.shadow.items()}  # a collective for DTensors
            if trainer.is_global_zero:
                torch.save(full, self.out / "ema.pt")
        if self.sample:
            pl_module.model.eval()
            with torch.no_grad():
                latents = sample(pl_module)
            if trainer.is_global_zero:
                torch.save(latents, self.out / "latents.pt")


class ValidationProbe(L.Callback):
    """After the validation epoch: each rank's own count of scored records per
    task (its L1 metric's local state; ``compute`` syncs only a copy) and the values logged.
    ``clip_cfg``: a folder of open_clip model configs to register in this process (the tiny saved
    CLIP of ``tests/helpers/metric_backbones.py``), before the validation callback builds its metrics."""

    def __init__(self, out: str, clip_cfg: str | None = None):
        self.out = Path(out)
        if clip_cfg:
            import open_clip

            open_clip.add_model_config(clip_cfg)

    def on_validation_end(self, trainer, pl_module) -> None:  # the epoch's values are logged by now
        from callbacks.validation_metrics import ValidationMetrics

        metrics = next(c for c in trainer.callbacks if isinstance(c, ValidationMetrics)).metrics
        info = {
            "counts": {task.value: int(m["l1"].count) for task, m in metrics.items()},
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")},
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))

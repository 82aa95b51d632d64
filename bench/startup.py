"""Host memory and start-up time of an FSDP2 run: every rank builds the whole model, then shards it
(``model.meta_init: false``) vs the meta-device start (``true``, the default) (issue 12 benchmark).

    .venv/bin/python -m bench.startup [--preset mid] [--ranks 1 2] [--gpus 8]

1. Measured: ``python -m mige_lightning fit`` on CPU (gloo, one thread per rank) with the
   ``--preset`` model whose T5, BLIP-2, PixArt DiT and VAE are random components saved to a temp
   dir the way their hub checkpoints are laid out (so both paths read real files), a 16-scene
   synthetic world, batch 1, one optimiser step. A callback (``StartupProbe``) records per rank:
   the peak RSS before the model is built (Lightning's ``setup``: imports, data), after it is
   built and sharded (``on_fit_start``), after the first optimiser step, and the wall time from
   process launch to that step.
2. Computed for ``xl`` at ``--gpus`` ranks, from the model built on the meta device: what each
   path must hold on the host at its peak during the build (fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MB = 1024**2


def _status() -> dict[str, float]:
    """This process's resident memory now and its peak since the last ``_reset_peak`` (MiB)."""
    fields = dict(re.findall(r"(VmHWM|VmRSS):\s+(\d+) kB", Path("/proc/self/status").read_text()))
    return {"rss_mb": int(fields["VmRSS"]) / 1024, "peak_mb": int(fields["VmHWM"]) / 1024}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


class StartupProbe(L.Callback):
    """Writes ``<out>/rank<r>.json``: resident memory before the build, the build's peak and what
    stays after it, the first step's peak (the kernel's high-water mark, reset between phases)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.row: dict = {}

    def setup(self, trainer, pl_module, stage) -> None:  # before configure_model
        self.row["before_build"] = _status()
        _reset_peak()

    def on_fit_start(self, trainer, pl_module) -> None:  # model built, sharded, optimiser made
        self.row["built"] = _status()  # peak = the build's peak
        self.row["built_s"] = time.time() - float(os.environ["STARTUP_T0"])
        _reset_peak()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "first_step" in self.row:
            return
        self.row["first_step"] = _status()
        self.row["first_step_s"] = time.time() - float(os.environ["STARTUP_T0"])
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.row))


def _config(root: Path, preset: str, sources: dict, ranks: int, meta_init: bool, out: Path) -> Path:
    from mige_lightning.models import get_config

    resolution = get_config(preset).resolution
    config = {
        "seed_everything": 0,
        "model": {"preset": preset, "pretrained": sources, "meta_init": meta_init, "warmup_steps": 1},
        "trainer": {
            "accelerator": "cpu",
            "devices": ranks,
            "max_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "strategy": {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": ranks, "tensor_parallel_size": 1},
            },
            "callbacks": [{"class_path": "bench.startup.StartupProbe", "init_args": {"out": str(out)}}],
        },
        "data": {
            "synthetic": {"root": str(root / "world"), "num_samples": 16, "size": resolution, "seed": 0},
            "batch_size": 1,
        },
    }
    path = root / f"startup_{ranks}_{meta_init}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure(root: Path, preset: str, sources: dict, ranks: int, meta_init: bool) -> list[dict]:
    out = root / f"probe_{ranks}_{meta_init}"
    config = _config(root, preset, sources, ranks, meta_init, out)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        STARTUP_T0=repr(time.time()),
    )
    cmd = [sys.executable, "-m", "mige_lightning", "fit", "--config", str(config)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def unit_sizes(preset: str) -> dict[str, float]:
    """fp32 bytes (MiB): the whole model, the sharded part, the largest FSDP unit, the replicated
    autoencoder — from the model built on the meta device."""
    from mige_lightning.models import build_mige, get_config
    from mige_lightning.sharding import fsdp_units

    sources = {"t5": None, "blip2": None, "dit": None, "vae": None, "tokenizer": "byte"}
    with torch.device("meta"):
        model = build_mige(get_config(preset, pretrained=sources))
    seen: set[int] = set()
    units = []
    for unit in fsdp_units(model):
        own = [p for p in unit.parameters() if id(p) not in seen]
        if unit is model:
            own = [p for p in own if all(p is not q for q in model.autoencoder.parameters())]
        seen.update(id(p) for p in own)
        units.append(sum(4 * p.numel() for p in own) / MB)
    vae = sum(4 * p.numel() for p in model.autoencoder.parameters()) / MB
    return {"model": sum(units) + vae, "sharded": sum(units), "largest_unit": max(units), "vae": vae}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpus", type=int, default=8, help="ranks for the computed xl row")
    parser.add_argument("--meta-init", type=int, nargs="+", default=[0, 1], help="0: before, 1: new")
    args = parser.parse_args()

    from mige_lightning.models import get_config
    from tests.helpers.pretrained_parts import save_components

    sizes = unit_sizes(args.preset)
    print(
        f"## {args.preset}: whole model {sizes['model']:.0f} MiB fp32 (sharded part {sizes['sharded']:.0f} MiB, "
        f"largest FSDP unit {sizes['largest_unit']:.1f} MiB, autoencoder {sizes['vae']:.1f} MiB replicated)\n"
    )
    print(
        "| ranks | path | rank | RSS before build (MiB) | build peak − before (MiB) | held after build − before (MiB) "
        "| bound: sharded/N + largest unit + VAE (MiB) | first step peak (MiB) | launch → built (s) | launch → first step (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = save_components(root / "parts", get_config(args.preset))
        for ranks in args.ranks:
            bound = sizes["sharded"] / ranks + sizes["largest_unit"] + sizes["vae"]
            for meta_init in map(bool, args.meta_init):
                path = "meta device (new)" if meta_init else "whole model per rank (before)"
                for r, row in enumerate(measure(root, args.preset, sources, ranks, meta_init)):
                    before = row["before_build"]["rss_mb"]
                    print(
                        f"| {ranks} | {path} | {r} | {before:.0f} | {row['built']['peak_mb'] - before:.0f} "
                        f"| {row['built']['rss_mb'] - before:.0f} | {bound:.0f} | {row['first_step']['peak_mb']:.0f} "
                        f"| {row['built_s']:.1f} | {row['first_step_s']:.1f} |",
                        flush=True,
                    )

    xl = unit_sizes("xl")
    n = args.gpus
    gb = 1024
    print(f"\n## xl at {n} ranks, host memory each rank needs for the build (fp32, GiB)\n")
    print(
        f"- whole model: {xl['model'] / gb:.2f} GiB (sharded part {xl['sharded'] / gb:.2f}, autoencoder {xl['vae'] / gb:.2f})"
    )
    print(f"- largest FSDP unit: {xl['largest_unit'] / gb:.2f} GiB")
    print(
        f"- before (whole model per rank, then shard): ≥ {xl['model'] / gb:.2f} GiB per rank, "
        f"{n * xl['model'] / gb:.0f} GiB on an {n}-GPU node"
    )
    per_rank = xl["sharded"] / n + xl["largest_unit"] + xl["vae"]
    print(
        f"- meta device (new): sharded/N + largest unit + autoencoder = {xl['sharded'] / gb:.2f}/{n} + "
        f"{xl['largest_unit'] / gb:.2f} + {xl['vae'] / gb:.2f} = {per_rank / gb:.2f} GiB per rank "
        f"({n * per_rank / gb:.0f} GiB per node), plus the fixed overhead measured above; on GPUs the "
        "shards move to the device as each unit is sharded, so the host keeps about one unit"
    )


if __name__ == "__main__":
    main()

"""Train-step time and peak memory on CPU for the tiny and mid presets (issue 2 benchmark).

    .venv/bin/python bench/train_step.py [--presets tiny mid] [--steps 10] [--batch 4]

One "step" = encode the batch (VAE, ViT, Q-Former, fusion, T5), DiT forward, hybrid loss,
backward and an AdamW update. Peak memory is the process's max RSS growth over the run
(ru_maxrss), which on CPU includes parameters, optimiser state and activations.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mige_lightning.module import MIGELightningModule  # noqa: E402
from tests.conftest import make_batch  # noqa: E402

warnings.filterwarnings("ignore", message="You are trying to `self.log")  # no Trainer here, by design


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench(preset: str, *, steps: int, batch: int, images: int) -> dict:
    torch.manual_seed(0)
    before = rss_mb()
    module = MIGELightningModule(preset, p_drop_condition=0, p_drop_input=0, p_drop_both=0, warmup_steps=1)
    module.configure_model()
    module.model.train()
    opt = module.configure_optimizers()["optimizer"]
    data = make_batch(module.config, [images] * batch)
    trainable = sum(p.numel() for p in module.trainable_parameters())
    total = sum(p.numel() for p in module.model.parameters())
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = module.training_step(data, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return {
        "preset": preset,
        "params_total_M": total / 1e6,
        "params_trainable_M": trainable / 1e6,
        "resolution": module.config.resolution,
        "batch": batch,
        "refs_per_sample": images,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "peak_rss_growth_MB": rss_mb() - before,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--images", type=int, default=2, help="reference images per sample")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        "| preset | params (trainable / total) | res | batch | refs | step s (median / min) | peak RSS growth |"
    )
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        r = bench(preset, steps=args.steps, batch=args.batch, images=args.images)
        print(
            f"| {r['preset']} | {r['params_trainable_M']:.2f} M / {r['params_total_M']:.2f} M | {r['resolution']} "
            f"| {r['batch']} | {r['refs_per_sample']} | {r['step_s_median']:.3f} / {r['step_s_min']:.3f} "
            f"| {r['peak_rss_growth_MB']:.0f} MB |",
            flush=True,
        )


if __name__ == "__main__":
    main()

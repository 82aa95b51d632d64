"""Sampling cost on CPU: seconds per image per task, and the overhead of batched guidance.

    .venv/bin/python -m bench.sample [--presets tiny mid] [--repeats 3]

Per task, one image with the task's default steps and scales (the authors': 50 steps 2-way for
subject, 60 steps 3-way for edit / subject_edit), DPM-Solver++, batch_invariant mode, after a
warm-up image. Guidance overhead: one 3-way guided step for B samples (``guided_prediction``: the
three branches as one forward at 3B plus the combination) against one plain model forward at
batch 3B with the same inputs; target ≤ 1.1×. Branch skipping: an edit image at the authors'
scales (guidance_scale 5, image_guidance_scale 1: the unconditional branch has weight 0 and is not
run) and at both scales 1 (the conditional branch alone) against the same call with
image_guidance_scale = 1 + 1e-6, which runs all three
branches for the same result.

    .venv/bin/python -m bench.sample --presets mid --only-branches     # the branch-skipping rows only
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
import PIL.Image
import torch

from mige_lightning.models import build_mige, get_config
from mige_lightning.pipeline import TASK_DEFAULTS, MIGEPipeline
from mige_lightning.prompt import Task

REQUESTS = {
    Task.SUBJECT: dict(instruction="a <imagehere> on the beach", images=1, source=False),
    Task.EDIT: dict(instruction="make <imagehere> look like winter", images=1, source=True),
    Task.SUBJECT_EDIT: dict(
        instruction="replace the dog in <imagehere> with <imagehere>", images=2, source=True
    ),
}


def image(seed: int, size: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def branches(pipe, res: int, repeats: int) -> None:
    """Edit, 60 steps: guidance branches skipped (image_guidance_scale 1) vs all three run (1 + 1e-6)."""
    req = REQUESTS[Task.EDIT]
    imgs, src = [image(0, res)], image(9, res)
    rows = []
    for scale in (5.0, 1.0):
        call = partial(pipe, req["instruction"], task=Task.EDIT, images=imgs, source=src, output_type="latent",
                       num_inference_steps=60, guidance_scale=scale)  # fmt: skip
        skipped = timed(partial(call, image_guidance_scale=1.0), repeats)
        full = timed(partial(call, image_guidance_scale=1.0 + 1e-6), repeats)
        rows.append((scale, skipped, full))
    print("| edit, 60 steps | branches run | s / image | all 3 branches | speed-up |")
    print("|---|---|---|---|---|")
    for scale, skipped, full in rows:
        n = 2 if scale != 1.0 else 1
        print(
            f"| guidance_scale {scale:g}, image_guidance_scale 1 | {n} | {skipped:.3f} | {full:.3f} | {full / skipped:.2f}× |"
        )


def bench(preset: str, repeats: int, batch: int, only_branches: bool = False) -> None:
    cfg = get_config(preset)
    torch.manual_seed(0)
    model = build_mige(cfg).eval()
    pipe = MIGEPipeline.from_mige(
        model, resolution=cfg.resolution, vision_mean=cfg.vision_mean, vision_std=cfg.vision_std
    )
    pipe.set_progress_bar_config(disable=True)
    res = cfg.resolution
    if only_branches:
        print(f"\n{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {res} px")
        branches(pipe, res, repeats)
        return
    per_task = {}
    for task, req in REQUESTS.items():
        imgs = [image(i, res) for i in range(req["images"])]
        src = image(9, res) if req["source"] else None
        one = partial(pipe, req["instruction"], task=task, images=imgs, source=src, output_type="latent")
        per_task[task] = timed(one, repeats)
    print(f"\n{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {res} px")
    print("| task | steps | guidance | s / image |")
    print("|---|---|---|---|")
    for task, sec in per_task.items():
        d = TASK_DEFAULTS[task]
        kind = "2-way" if task is Task.SUBJECT else "3-way"
        print(f"| {task.value} | {d['num_inference_steps']} | {kind} | {sec:.3f} |")

    # guidance overhead: guided step for B samples vs plain forward at 3B
    size = res // model.autoencoder.downsample_factor
    c = model.latent_channels
    lat = torch.randn(batch, c, size, size)
    t = torch.full((batch,), 500)
    cond = torch.randn(batch, cfg.max_length, model.encoder.t5.config.d_model)
    mask = torch.ones(batch, cfg.max_length, dtype=torch.long)
    src = torch.randn_like(lat)
    with torch.no_grad():
        guided = timed(
            lambda: pipe.guided_prediction(
                lat,
                t,
                cond=cond,
                cond_mask=mask,
                cond_input=src,
                guidance_scale=5.0,
                image_guidance_scale=1.5,  # 1 would skip the unconditional branch
            ),
            repeats * 3,
        )
        plain = timed(
            lambda: model(
                lat.repeat(3, 1, 1, 1),
                t.repeat(3),
                cond=cond.repeat(3, 1, 1),
                cond_mask=mask.repeat(3, 1),
                cond_input=src.repeat(3, 1, 1, 1),
            ),
            repeats * 3,
        )
    print(
        f"3-way guided step, B={batch}: {guided * 1e3:.1f} ms; plain forward at 3B={3 * batch}: "
        f"{plain * 1e3:.1f} ms; ratio {guided / plain:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only-branches", action="store_true", help="only the guidance branch-skipping rows")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for preset in args.presets:
        bench(preset, args.repeats, args.batch, args.only_branches)


if __name__ == "__main__":
    main()

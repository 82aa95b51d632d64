"""Convert a tiny checkpoint in the authors' layout, load it on a device, sample one edit.

    python -m bench.authors_tiny_gpu --device cuda --out /tmp/authors_tiny

The checkpoint is random (the real one is 13 GB and cannot be fetched here): what this shows is
the path — authors' names → ``convert-authors`` → ``model.init_weights`` → the pipeline with the
authors' behaviour switches — running on the device, and that it computes there what it computes
on the CPU (same seed, fp32; the GPU's reduced-precision matmuls make a small relative difference,
amplified by 60 guided steps of a random model whose latents grow large).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import PIL.Image
import torch
import yaml

from mige_lightning.authors_checkpoint import convert_authors
from mige_lightning.models import build_mige, get_config
from mige_lightning.models.weights import load_weights
from mige_lightning.pipeline import MIGEPipeline, make_scheduler
from tests.helpers.authors import authors_tiny_state


def sample(model_args: dict, device: str) -> tuple[torch.Tensor, PIL.Image.Image, float]:
    config = get_config(model_args["preset"], model_args["overrides"], model_args["pretrained"])
    model = build_mige(config)
    load_weights(model, model_args["init_weights"])
    model = model.to(device).eval()
    pipe = MIGEPipeline.from_mige(
        model,
        resolution=config.resolution,
        vision_mean=config.vision_mean,
        vision_std=config.vision_std,
        scheduler=make_scheduler("dpm++"),
        prompt_style=model_args["prompt_style"],
    )
    source = PIL.Image.new("RGB", (16, 16), (200, 30, 30))
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = pipe("make the background blue <imagehere>", task="edit", images=[source], source=source, seed=0)
    if device == "cuda":
        torch.cuda.synchronize()
    return out.latents.float().cpu(), out.images[0], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="/tmp/authors_tiny")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "model.pth"
    torch.save({"state_dict": authors_tiny_state()}, src)
    report = convert_authors(src, out / "converted", preset="tiny", tokenizer="byte", vae=None)
    print(
        "converted:", report["source_tensors"], "→", report["written_tensors"], "tensors;", report["by_rule"]
    )
    model_args = yaml.safe_load((out / "converted" / "config.yaml").read_text())["model"]
    torch.manual_seed(0)
    cpu_latents, _, cpu_s = sample(model_args, "cpu")
    torch.manual_seed(0)
    dev_latents, image, dev_s = sample(model_args, args.device)
    image.save(out / "edit.png")
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {
        "device": name,
        "steps": 60,
        "guidance": "edit defaults: s_y 5, s_s 1 (2 branches)",
        "seconds_device": round(dev_s, 3),
        "seconds_cpu": round(cpu_s, 3),
        "latents_max_abs_diff_device_vs_cpu": float((dev_latents - cpu_latents).abs().max()),
        "latents_abs_mean": float(cpu_latents.abs().mean()),
        "latents_max_abs_diff_relative_to_max": float(
            (dev_latents - cpu_latents).abs().max() / cpu_latents.abs().max()
        ),
        "finite": bool(torch.isfinite(dev_latents).all()),
    }
    print(json.dumps(result, indent=1))
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

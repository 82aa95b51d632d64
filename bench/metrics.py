"""Metric throughput on CPU with real-size backbones (random weights: speed does not depend on them).

    .venv/bin/python -m bench.metrics [--images 32] [--size 512]

DINO on a ViT-S/16 (``facebook/dino-vits16``'s architecture), CLIP-I / CLIP-T on open_clip
``ViT-B-32``, L1 / L2 — each including its protocol preprocessing (resize + center-crop + normalise
from 512 px PIL images), pairs of images per sample.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import PIL.Image
import torch
from transformers import ViTConfig, ViTModel

from mige_lightning import metrics as M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    import open_clip

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    a = [
        PIL.Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    b = [
        PIL.Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    captions = ["a photo of a dog wearing a red hat on the beach"] * args.images
    dino = M.DinoEmbedder(
        ViTModel(
            ViTConfig(
                hidden_size=384,
                num_hidden_layers=12,
                num_attention_heads=6,
                intermediate_size=1536,
                patch_size=16,
                image_size=224,
            ),
            add_pooling_layer=False,
        )
    )
    clip = M.ClipEmbedder(
        open_clip.create_model("ViT-B-32", pretrained=None), open_clip.get_tokenizer("ViT-B-32")
    )
    metrics = {
        "DINO (ViT-S/16)": (M.DINOScore(dino), (a, b)),
        "CLIP-I (ViT-B/32)": (M.CLIPImageScore(clip), (a, b)),
        "CLIP-T (ViT-B/32)": (M.CLIPTextScore(clip), (a, captions)),
        "L1": (M.L1Distance(), (a, b)),
        "L2": (M.L2Distance(), (a, b)),
    }
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.images} samples at {args.size} px"
    )
    print("| metric | samples/s |")
    print("|---|---|")
    for name, (metric, inputs) in metrics.items():
        metric.update(*(x[:2] for x in inputs))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, args.images, 8):
            metric.update(*(x[i : i + 8] for x in inputs))
        print(f"| {name} | {args.images / (time.perf_counter() - t0):.1f} |", flush=True)


if __name__ == "__main__":
    main()

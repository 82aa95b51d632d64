"""Data-loading throughput at 512 px, with and without the latent cache (issue 3 benchmark).

    .venv/bin/python -m bench.dataloader [--samples 200] [--workers 2] [--batches 40]

Builds a synthetic world at 512 px, caches it with an f/8 KL autoencoder (the ``mid`` preset's,
random weights — latents have the paper's 4 × 64 × 64 shape), then times the training
DataLoader (task-balanced sampler, batch 8) over the same records both ways. The pixel path
decodes, resizes and crops every image (VAE encoding would still be left for the GPU); the cached
path reads memory-mapped moments and samples latents, plus the stored 224-px ViT inputs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from datamodules.latent_cache import build_cache
from datamodules.training_data import TrainingDataModule
from mige_lightning.models import build_mige, get_config
from mige_world.synthetic import generate


def throughput(loader, batches: int) -> float:
    """Samples per second over ``batches`` batches of ``loader`` (restarted when it runs out),
    after 3 warm-up batches (worker start, first chunk reads and decodes, first memmap touches)."""
    it = iter(loader)
    for _ in range(3):
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["task"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()
    config = get_config("mid", overrides={"resolution": args.resolution})
    torch.manual_seed(0)
    ae = build_mige(config).autoencoder
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        generate(root / "world", num_samples=args.samples, size=args.resolution, seed=0)
        print(f"world: {args.samples} samples at {args.resolution} px in {time.perf_counter() - t0:.1f} s")

        def datamodule(cache: bool) -> TrainingDataModule:
            dm = TrainingDataModule(
                synthetic={"root": str(root / "world")},
                batch_size=8,
                num_workers=args.workers,
                latent_cache=str(root / "latents") if cache else None,
                samples_per_epoch=10_000,
            )
            dm.connect(
                resolution=config.resolution,
                vision_resolution=config.vision_resolution,
                vision_mean=config.vision_mean,
                vision_std=config.vision_std,
                max_images=4,
                vae_identity=ae.identity(),
            )
            dm.validated_records()
            return dm

        dm = datamodule(cache=False)
        t = dm.transforms
        t0 = time.perf_counter()
        build_cache(
            dm.records,
            root / "latents",
            encode_moments=ae.encode_moments,
            vae_identity=ae.identity(),
            vae_transform=t.vae,
            vit_transform=t.vit_resize,
            resolution=t.resolution,
            vision_resolution=t.vision_resolution,
        )
        print(f"cache-latents: {time.perf_counter() - t0:.1f} s")
        plain = throughput(dm.train_dataloader(), args.batches)
        cached = throughput(datamodule(cache=True).train_dataloader(), args.batches)
    print(f"| path | samples/s ({args.workers} workers, batch 8, {args.resolution} px) |")
    print("|---|---|")
    print(f"| images (decode + resize + crop) | {plain:.1f} |")
    print(f"| latent cache | {cached:.1f} |")
    print(f"speed-up: {cached / plain:.1f}x")


if __name__ == "__main__":
    main()

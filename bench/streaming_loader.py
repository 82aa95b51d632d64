"""Training-data throughput per loader worker: file loader vs litdata shards (images, latents),
and the task mix of the shard mixer over 20,000 samples on 2 ranks (issue 28 benchmark).

    .venv/bin/python -m bench.streaming_loader [--samples 200] [--batches 40] [--resolution 512]

Builds a synthetic world at ``--resolution`` px and keeps the records with exactly 2 reference
images (subject, subject_edit add / replace; the edit records have one). Then times, in one
process (``num_workers=0``: what one loader worker delivers), batches of 8 from:

- the file loader (``MIGEDataset``: decode every image file, resize, crop);
- shards with images (``optimize-data``'s layout, JPEG q95 and PNG: decode our bytes, no resize);
- shards with latents (the autoencoder's moments stored; latents sampled, only the vision tower's
  224-px references decoded). The autoencoder is the ``mid`` preset's f/8 KL one with random
  weights (the real SD VAE is not available offline): the latents have the paper's 4 × 64 × 64
  shape at 512 px, so the bytes read per sample are the paper's.

The shards are read from a local folder (the page cache: the figure is the loader's CPU cost,
not a network's). Also: the largest deviation of the mixer's pool shares from the paper's weights
over 20,000 samples on 2 ranks (its pool-choice stream, no images), and how many loader workers an
8-GPU node needs at the ``xl`` step time measured (1.25 s per batch of 8 on one H200).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from bench.dataloader import throughput
from datamodules.latent_cache import build_cache
from datamodules.records import read_manifest
from datamodules.shard_writer import write_shards
from datamodules.streaming import PoolMixer
from datamodules.task_sampler import DEFAULT_WEIGHTS, pool_probabilities
from datamodules.training_data import TrainingDataModule
from mige_lightning.models import build_mige, get_config
from mige_world.synthetic import generate, manifest_specs

BATCH = 8
XL_STEP_S, GPUS_PER_NODE = 1.25, 8  # docs/BENCHMARKS.md: xl, batch 8 per GPU, one H200
WEIGHTS = {"subject": 0.5, "subject_edit/add": 0.25, "subject_edit/replace": 0.25}  # the 2-reference pools


def two_reference_manifests(world: Path, out: Path) -> list[dict]:
    """The world's training manifests, each cut to its records with exactly 2 references."""
    specs = []
    for spec in manifest_specs(world, "train"):
        entries = json.loads(Path(spec["path"]).read_text())
        kept = [e for e in entries if len(e.get("entity_path") or []) == 2]
        if kept:
            path = out / Path(spec["path"]).name
            path.write_text(json.dumps(kept))
            specs.append({"path": str(path), "task": spec["task"], "base": str(world)})
    return specs


def mix_deviation(samples: int = 20_000, ranks: int = 2) -> float:
    """Largest |share − weight| of the mixer's pools over ``samples`` on ``ranks`` ranks."""
    keys, probs = pool_probabilities(DEFAULT_WEIGHTS)

    class Pool:  # a pool's loader, without images: numbered items naming their pool
        def __init__(self, key):
            self.key = key

        def __iter__(self):
            return iter(
                {
                    "index": i,
                    "has_source": False,
                    "instruction": self.key,
                    "task": "subject",
                    "ref_pixels": [],
                }
                for i in range(1000)
            )

        def state_dict(self):
            return {}

    counts: Counter = Counter()
    for rank in range(ranks):
        mixer = PoolMixer(
            [Pool(k) for k in keys],
            keys,
            probs,
            batch_size=BATCH,
            samples_per_epoch=samples // ranks,
            seed=0,
            rank=rank,
            world_size=ranks,
            shards_id="bench",
        )
        for batch in mixer:
            counts.update(batch["instruction"])
    total = sum(counts.values())
    return max(abs(counts[k] / total - DEFAULT_WEIGHTS[k]) for k in keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200, help="world size (about 2/3 have 2 references)")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--optimize-workers", type=int, default=2)
    args = ap.parse_args()
    config = get_config("mid", overrides={"resolution": args.resolution})
    torch.manual_seed(0)
    ae = build_mige(config).autoencoder
    settings = dict(
        resolution=config.resolution,
        vision_resolution=config.vision_resolution,
        vision_mean=config.vision_mean,
        vision_std=config.vision_std,
        max_images=4,
        vae_identity=ae.identity(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        generate(root / "world", num_samples=args.samples, size=args.resolution, seed=0)
        specs = two_reference_manifests(root / "world", root)
        records = [r for s in specs for r in read_manifest(s["path"], task=s["task"], base=s["base"])[0]]
        print(
            f"world: {len(records)} records with 2 references at {args.resolution} px ({time.perf_counter() - t0:.0f} s)"
        )

        def datamodule(**kw) -> TrainingDataModule:
            dm = TrainingDataModule(
                manifests=specs if "streaming" not in kw else None,
                batch_size=BATCH,
                num_workers=0,
                task_weights=WEIGHTS,
                samples_per_epoch=10_000,
                **kw,
            )
            dm.connect(**settings)
            return dm

        files = datamodule()
        files.validated_records()
        t = files.transforms
        rates = {"file loader (decode, resize, crop)": throughput(files.train_dataloader(), args.batches)}
        cache = build_cache(
            files.records,
            root / "latents",
            encode_moments=ae.encode_moments,
            vae_identity=ae.identity(),
            vae_transform=t.vae,
            vit_transform=t.vit_resize,
            resolution=t.resolution,
            vision_resolution=t.vision_resolution,
        )
        variants = [
            ("shards, images (JPEG q95)", "jpeg", dict(image_format="jpeg")),
            ("shards, images (PNG)", "png", dict(image_format="png")),
            (
                "shards, latents (+ JPEG refs for the vision tower)",
                "latents",
                dict(image_format="jpeg", latent_cache=str(cache), vae_identity=ae.identity()),
            ),
        ]
        for name, folder, kw in variants:
            out = root / "shards" / folder
            t0 = time.perf_counter()
            write_shards(files.records, str(out), transforms=t, workers=args.optimize_workers, **kw)
            size = sum(p.stat().st_size for p in out.rglob("*.bin")) / len(files.records) / 1024
            print(f"optimize-data ({name}): {time.perf_counter() - t0:.0f} s, {size:.0f} KiB per record")
            dm = datamodule(streaming={"input_dir": str(out)})
            dm.setup("fit")
            rates[name] = throughput(dm.train_dataloader(), args.batches)
        deviation = mix_deviation()
    need = GPUS_PER_NODE * BATCH / XL_STEP_S
    base = rates["file loader (decode, resize, crop)"]
    print(
        f"\n| loader ({args.resolution} px, 2 references, batch {BATCH}, one process) | samples/s per worker | vs file loader | workers per 8-GPU node at xl |"
    )
    print("|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.1f}× | {need / rate:.1f} |")
    print(f"\nan 8-GPU node at xl ({XL_STEP_S} s per batch of {BATCH} per GPU) consumes {need:.1f} samples/s")
    print(
        f"task mix over 20,000 samples on 2 ranks: largest deviation from the weights {deviation:.4f} (target ≤ 0.01)"
    )


if __name__ == "__main__":
    main()

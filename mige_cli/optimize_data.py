"""``python -m mige_lightning optimize-data --config <fit config> --output DIR|s3://bucket/prefix``:
the training records as streamable shards, one litdata dataset per task pool.

    python -m mige_lightning optimize-data --config configs/demo.yaml --output shards/demo \\
        [--storage-options '{"endpoint_url": …}'] [--image-format jpeg|png] [--jpeg-quality 95] \\
        [--latents] [--workers N] [--chunk-bytes 64MB] [--start-method spawn|fork] [--overwrite]

Uses the same config as ``fit``: its data section's manifests (``base`` included) are read and
checked exactly as ``fit`` checks them (``data.on_bad_record``: ``error`` stops with every bad
record as ``file:line: record N: reason`` before anything is written; ``skip`` drops them, counted
in ``settings.json``); the model gives the resolution, the vision tower's input and, with
``--latents``, the frozen autoencoder whose moments are stored (from ``data.latent_cache`` when it
holds a cache for this autoencoder, else encoded here into a temporary one). Train on the result
with ``data.streaming: {input_dir: <output>}`` (``datamodules/streaming.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from datamodules.latent_cache import LatentCache, StaleCacheError, build_cache, missing_from_cache
from datamodules.shard_writer import (
    CHUNK_BYTES,
    DEFAULT_IMAGE_FORMAT,
    JPEG_QUALITY,
    bad_record_summary,
    check_output,
    write_shards,
)
from datamodules.streaming import IMAGE_FORMATS
from datamodules.training_data import TrainingDataModule
from mige_cli.cli import CLI_CLASSES
from mige_cli.export import _ModelOnlyCLI
from mige_lightning.module import MIGELightningModule

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mige_lightning optimize-data",
        description="Write the training records as litdata shards, one dataset per task pool. Other "
        "arguments (--config …, --data.…, --model.…) are fit's.",
    )
    parser.add_argument("--output", required=True, help="folder or s3://bucket/prefix")
    parser.add_argument(
        "--storage-options",
        default="{}",
        help='JSON passed to the S3 client (litdata\'s and ours), e.g. {"endpoint_url": "http://…"}',
    )
    parser.add_argument("--image-format", default=DEFAULT_IMAGE_FORMAT, choices=IMAGE_FORMATS)
    parser.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY)
    parser.add_argument("--latents", action="store_true", help="store the autoencoder's moments too")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="litdata optimize worker processes (default: one per CPU)",
    )
    parser.add_argument("--chunk-bytes", default=CHUNK_BYTES, help="chunk size (litdata), e.g. 64MB")
    parser.add_argument(
        "--start-method",
        default="spawn",
        choices=("spawn", "fork"),
        help="how the workers start (litdata's default, spawn; fork starts faster on small data)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        args.storage_options = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        parser.error(f"--storage-options: not JSON ({e.msg}): {args.storage_options}")
    if not isinstance(args.storage_options, dict):
        parser.error(f"--storage-options: expected a JSON object, got {args.storage_options}")
    if args.workers < 1:
        parser.error(f"--workers: expected at least 1, got {args.workers}")
    return args, rest


REDACTED = "<storage options not recorded>"


def redacted(argv: list[str]) -> list[str]:
    """The command for settings.json without storage options (they may hold credentials)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            out.append(REDACTED)
            skip = False
        elif arg == "--storage-options":
            out.append(arg)
            skip = True
        elif arg.startswith("--storage-options=") or "storage_options" in arg:
            out.append(f"{arg.split('=', 1)[0]}={REDACTED}")
        else:
            out.append(arg)
    return out


def redacted_data_config(data: dict | None) -> dict | None:
    """fit's data section for settings.json; ``streaming.storage_options``' values left out."""
    if not data:
        return data
    data = json.loads(json.dumps(data, default=str))
    streaming = (data.get("init_args") or data).get("streaming")
    if isinstance(streaming, dict) and streaming.get("storage_options"):
        streaming["storage_options"] = dict.fromkeys(streaming["storage_options"], REDACTED)
    return data


def latent_cache_for(
    module: MIGELightningModule, datamodule: TrainingDataModule, records, scratch: Path
) -> tuple[str, str]:
    """(cache directory, VAE identity): ``data.latent_cache``'s cache for this autoencoder when it
    holds every image, else one encoded now under ``scratch``."""
    autoencoder = module.model.autoencoder
    identity = autoencoder.identity()
    t = datamodule.transforms
    if datamodule.latent_cache:
        cache = LatentCache.find(
            datamodule.latent_cache,
            vae_identity=identity,
            resolution=t.resolution,
            vision_resolution=t.vision_resolution,
        )
        if cache is not None:
            missing = missing_from_cache(cache, records)
            if missing:
                raise StaleCacheError(
                    f"latent cache {cache.directory} lacks {len(missing)} image(s), e.g. {missing[:3]}; "
                    "rerun `python -m mige_lightning cache-latents`"
                )
            print(f"optimize-data: latents from the latent cache {cache.directory}")
            return str(cache.directory), identity
    print(f"optimize-data: encoding {len(records)} record(s)' images with the autoencoder")
    directory = build_cache(
        records,
        scratch,
        encode_moments=autoencoder.encode_moments,
        vae_identity=identity,
        vae_transform=t.vae,
        vit_transform=t.vit_resize,
        resolution=t.resolution,
        vision_resolution=t.vision_resolution,
    )
    return str(directory), identity


def optimize_data(argv: list[str]) -> dict:
    args, rest = parse_args(argv)
    check_output(args.output, overwrite=args.overwrite, storage_options=args.storage_options)
    with warnings.catch_warnings():  # LightningCLI warns when args and sys.argv both exist
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ModelOnlyCLI(**CLI_CLASSES, args=rest, run=False)
    module, datamodule = cli.model, cli.datamodule
    if not isinstance(datamodule, TrainingDataModule):
        raise ValueError(
            f"optimize-data needs fit's data module (TrainingDataModule), got {type(datamodule).__name__}"
        )
    if args.latents:
        module.configure_model()  # the autoencoder
        module.connect_datamodule(datamodule)  # as fit does
    else:  # the model's settings without building it
        c = module.config
        datamodule.connect(
            resolution=c.resolution,
            vision_resolution=c.vision_resolution,
            vision_mean=c.vision_mean,
            vision_std=c.vision_std,
            max_images=c.max_images,
        )
    datamodule.prepare_data()
    records = datamodule.validated_records()  # fit's checks and reporting (error or skip mode)
    data_config = cli.config.get("data")
    data_config = data_config.as_dict() if hasattr(data_config, "as_dict") else data_config
    extra = {
        "command": ["python", "-m", "mige_lightning", "optimize-data", *redacted(argv)],
        "data_config": redacted_data_config(data_config),
        "bad_records": bad_record_summary(datamodule.bad_records),
        "on_bad_record": datamodule.on_bad_record,
    }
    with tempfile.TemporaryDirectory(prefix="mige-optimize-latents-") as scratch:
        cache, identity = (None, None)
        if args.latents:
            cache, identity = latent_cache_for(module, datamodule, records, Path(scratch))
        settings = write_shards(
            records,
            args.output,
            transforms=datamodule.transforms,
            image_format=args.image_format,
            jpeg_quality=args.jpeg_quality,
            latent_cache=cache,
            vae_identity=identity,
            workers=args.workers,
            overwrite=args.overwrite,
            storage_options=args.storage_options,
            chunk_bytes=args.chunk_bytes,
            start_method=args.start_method,
            settings=extra,
        )
    pools = ", ".join(f"{p}: {info['count']}" for p, info in settings["pools"].items())
    bad = settings["bad_records"]["total"]
    print(
        f"optimize-data: wrote {args.output} ({len(records)} record(s); {pools}; "
        f"{bad} bad record(s) skipped; {args.image_format}{', latents' if args.latents else ''})",
        file=sys.stdout,
    )
    return settings

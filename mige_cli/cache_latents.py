"""``python -m mige_lightning cache-latents --config …``: encode every image once with the frozen VAE.

Uses the same config as ``fit`` (model + data); writes under ``data.latent_cache``. The data
module then reads latents from there instead of decoding and encoding images every step.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from datamodules.latent_cache import build_cache
from datamodules.training_data import TrainingDataModule
from mige_cli.cli import MIGECLI, run_cli
from mige_lightning.module import MIGELightningModule

log = logging.getLogger(__name__)


def cache_latents(
    module: MIGELightningModule, datamodule: TrainingDataModule, *, batch_size: int = 16
) -> Path:
    if not datamodule.latent_cache:
        raise ValueError("data.latent_cache: set the directory the cache should be written to")
    module.configure_model()
    module.connect_datamodule(datamodule)
    datamodule.prepare_data()
    records = datamodule.validated_records()
    t = datamodule.transforms
    autoencoder = module.model.autoencoder
    directory = build_cache(
        records,
        datamodule.latent_cache,
        encode_moments=autoencoder.encode_moments,
        vae_identity=autoencoder.identity(),
        vae_transform=t.vae,
        vit_transform=t.vit_resize,
        resolution=t.resolution,
        vision_resolution=t.vision_resolution,
        batch_size=batch_size,
    )
    print(f"latent cache written: {directory} ({len(records)} records)")
    return directory


def main(argv: list[str]) -> MIGECLI:
    """fit's config (model + data) → every image encoded once into ``data.latent_cache``."""
    with warnings.catch_warnings():  # LightningCLI warns when args and sys.argv both exist
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = run_cli(argv, run=False)
    cache_latents(cli.model, cli.datamodule)
    return cli

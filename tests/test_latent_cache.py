"""Latent cache: same tensors as the pixel path, keyed by VAE identity + resolution, stale caches caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.dataset import MIGEDataset
from datamodules.latent_cache import LatentCache, StaleCacheError, build_cache
from datamodules.records import read_manifest
from mige_cli.main import main
from mige_lightning.models import build_mige, get_config
from mige_lightning.transforms import Transforms
from mige_world.synthetic import generate
from tests.helpers.training import FROM_SCRATCH

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    specs = generate(root / "world", num_samples=16, size=16, seed=0)
    records = [r for s in specs["train"] for r in read_manifest(s["path"], task=s["task"])[0]]
    torch.manual_seed(0)
    model = build_mige(get_config("tiny")).eval()  # KL autoencoder, f/2, 16 px
    t = Transforms(16, 32, (0.5,) * 3, (0.25,) * 3)
    ae = model.autoencoder
    directory = build_cache(
        records,
        root / "latents",
        encode_moments=ae.encode_moments,
        vae_identity=ae.identity(),
        vae_transform=t.vae,
        vit_transform=t.vit_resize,
        resolution=16,
        vision_resolution=32,
    )
    return root, records, model, t, directory


def test_cached_items_match_the_pixel_path(setup):
    root, records, model, t, directory = setup
    ae = model.autoencoder
    cache = LatentCache.find(
        root / "latents", vae_identity=ae.identity(), resolution=16, vision_resolution=32
    )
    assert cache is not None and cache.directory == directory
    plain, cached = MIGEDataset(records, t), MIGEDataset(records, t, cache=cache)
    idx = next(i for i, r in enumerate(records) if len(r.references) == 2)
    a, b = plain[idx], cached[idx]
    mean, std = ae.encode_moments(a["target"][None])
    m = torch.from_numpy(
        cache.moments[cache.latent_rows[str(records[idx].target.resolve())]].astype("float32")
    )
    assert torch.allclose(m[0], mean[0], atol=2e-3) and torch.allclose(
        m[1], std[0], atol=2e-3
    )  # float16 storage
    assert b["target_latent"].shape == mean.shape[1:]
    assert not torch.equal(cached[idx]["target_latent"], cached[idx]["target_latent"])  # sampled at load time
    for pa, pb in zip(a["ref_pixels"], b["ref_pixels"], strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)  # the ViT input is the same either way
    assert len(b["ref_latent"]) == 2 and "target" not in b


def test_other_vae_or_resolution_is_detected_as_stale(setup):
    root, records, model, t, _ = setup
    with pytest.raises(StaleCacheError, match="is stale.*rerun `python -m mige_lightning cache-latents`"):
        LatentCache.find(root / "latents", vae_identity="another-vae", resolution=16, vision_resolution=32)
    with pytest.raises(StaleCacheError, match="is stale"):
        LatentCache.find(
            root / "latents", vae_identity=model.autoencoder.identity(), resolution=32, vision_resolution=32
        )
    assert LatentCache.find(root / "empty", vae_identity="x", resolution=16, vision_resolution=32) is None
    other = build_mige(get_config("tiny")).autoencoder  # same config, other random weights
    assert other.identity() != model.autoencoder.identity()


@pytest.mark.slow
def test_cache_latents_command_then_training_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [
        "--config",
        str(REPO / "configs/demo.yaml"),
        *FROM_SCRATCH,
        f"--data.synthetic={{root: {tmp_path}/w, num_samples: 24, size: 32}}",
        f"--data.latent_cache={tmp_path}/latents",
        "--data.batch_size=4",
    ]
    main(["cache-latents", *base])
    metas = list((tmp_path / "latents").glob("*/meta.json"))
    assert len(metas) == 1
    cli = main(
        [*base, "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.callbacks=[]"], run=False
    )
    batches = []
    cli.model.training_step = (
        lambda orig: lambda batch, batch_idx: (batches.append(batch), orig(batch, batch_idx))[1]
    )(cli.model.training_step)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(batches) == 2 and "target_latent" in batches[0] and "target" not in batches[0]
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_an_interrupted_rebuild_leaves_the_old_cache_whole_and_incomplete_caches_are_refused(setup, tmp_path):
    """A rebuild killed halfway used to leave the old meta.json beside half-written arrays (806 of
    838 rows zero, used silently). Now the old cache stays as it was, and a cache whose files
    disagree is refused on opening."""
    import json
    import shutil

    import numpy as np

    root, records, model, t, directory = setup
    ae = model.autoencoder
    copy = tmp_path / "latents" / directory.name
    shutil.copytree(directory, copy)
    before = np.array(LatentCache(copy).moments)
    calls = []

    def dies_halfway(pixels):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C, or the job's end
        return ae.encode_moments(pixels)

    with pytest.raises(KeyboardInterrupt):
        build_cache(
            records,
            tmp_path / "latents",
            encode_moments=dies_halfway,
            vae_identity=ae.identity(),
            vae_transform=t.vae,
            vit_transform=t.vit_resize,
            resolution=16,
            vision_resolution=32,
            batch_size=4,
        )
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == [directory.name]  # no debris
    after = LatentCache(copy)
    assert np.array_equal(np.array(after.moments), before) and np.abs(before).sum(axis=(1, 2, 3, 4)).min() > 0

    index = json.loads((copy / "index.json").read_text())
    index["latents"].pop(next(iter(index["latents"])))
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(StaleCacheError, match=r"is incomplete: meta.json says \d+ images, index.json \d+"):
        LatentCache(copy)

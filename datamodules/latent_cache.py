"""Latent cache: every image's VAE moments (mean, std) and every reference's ViT-size pixels,
encoded once and stored as memory-mappable ``.npy`` files.

Layout: ``<cache root>/<key>/{meta.json, index.json, moments.npy, vit.npy}``. The key hashes the
VAE's identity (config + weights) and the resolutions, so a cache made with another VAE or size is
never used by mistake: finding only such caches is an error that says what they were made for.
Latents are *sampled* at load time from the stored moments (z = mean + std · ε), as the authors do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from datamodules.records import Record
from mige_lightning.images import load_rgb

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def cache_key(*, vae_identity: str, resolution: int, vision_resolution: int) -> str:
    text = json.dumps([CACHE_VERSION, vae_identity, resolution, vision_resolution])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StaleCacheError(RuntimeError):
    pass


def sample_moments(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A latent from stored moments [2, C, h, w] (mean, std; any float dtype): mean + std · ε."""
    m = moments.float()
    mean, std = m[0], m[1]
    return mean + std * torch.randn(mean.shape, generator=generator)


class LatentCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        index = json.loads((self.directory / "index.json").read_text())
        self.latent_rows: dict[str, int] = index["latents"]
        self.vit_rows: dict[str, int] = index["vit"]
        self.moments = np.load(self.directory / "moments.npy", mmap_mode="r")  # [N, 2, C, h, w] float16
        self.vit = np.load(self.directory / "vit.npy", mmap_mode="r")  # [R, Hv, Wv, 3] uint8
        counts = {
            "images": (self.meta.get("images"), len(self.latent_rows), self.moments.shape[0]),
            "references": (self.meta.get("references"), len(self.vit_rows), self.vit.shape[0]),
        }
        for what, (meta_n, index_n, rows) in counts.items():
            if not meta_n == index_n == rows:
                raise StaleCacheError(
                    f"latent cache {self.directory} is incomplete: meta.json says {meta_n} {what}, "
                    f"index.json {index_n}, the array {rows} rows; rebuild it with "
                    "`python -m mige_lightning cache-latents`"
                )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.moments.shape[2:])

    @classmethod
    def find(
        cls, root: str | Path, *, vae_identity: str, resolution: int, vision_resolution: int
    ) -> LatentCache | None:
        """The cache for this VAE and these sizes under ``root``; ``None`` if ``root`` holds no cache;
        ``StaleCacheError`` if it holds only caches made for something else."""
        root = Path(root)
        key = cache_key(vae_identity=vae_identity, resolution=resolution, vision_resolution=vision_resolution)
        if (root / key / "meta.json").is_file():
            return cls(root / key)
        others = sorted(root.glob("*/meta.json")) if root.is_dir() else []
        if others:
            made_for = "; ".join(
                f"{m.parent.name}: VAE {json.loads(m.read_text())['vae_identity'][:12]}…, "
                f"{json.loads(m.read_text())['resolution']} px"
                for m in others
            )
            raise StaleCacheError(
                f"latent cache {root} is stale: it holds [{made_for}] but the model needs VAE "
                f"{vae_identity[:12]}…, {resolution} px (key {key}); rerun `python -m mige_lightning cache-latents`"
            )
        return None

    def _row(self, rows: dict[str, int], path: Path, what: str) -> int:
        try:
            return rows[str(Path(path).resolve())]
        except KeyError:
            raise StaleCacheError(
                f"{path} is not in the latent cache {self.directory} ({what}); rerun `python -m mige_lightning cache-latents`"
            ) from None

    def sample_latent(self, path: Path, generator: torch.Generator | None = None) -> torch.Tensor:
        m = torch.from_numpy(
            np.array(self.moments[self._row(self.latent_rows, path, "latents")], dtype=np.float32)
        )
        return sample_moments(m, generator)

    def vit_pixels(self, path: Path) -> torch.Tensor:
        """[3, Hv, Wv] float in [0, 1] (before the vision tower's normalisation)."""
        arr = np.array(self.vit[self._row(self.vit_rows, path, "reference pixels")])
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def build_cache(
    records: Iterable[Record],
    root: str | Path,
    *,
    encode_moments: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    vae_identity: str,
    vae_transform: Callable,
    vit_transform: Callable,
    resolution: int,
    vision_resolution: int,
    batch_size: int = 16,
) -> Path:
    """Encode every image of ``records`` once; returns the cache directory."""
    records = list(records)
    key = cache_key(vae_identity=vae_identity, resolution=resolution, vision_resolution=vision_resolution)
    final = Path(root) / key
    # built in a fresh folder and moved into place when complete: an interrupted (re)build never
    # leaves a half-written cache where a complete one is expected, nor touches the old one
    directory = final.with_name(f"{key}.building-{os.getpid()}")
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    try:
        _write_cache(
            directory,
            records,
            encode_moments=encode_moments,
            vae_identity=vae_identity,
            vae_transform=vae_transform,
            vit_transform=vit_transform,
            resolution=resolution,
            vision_resolution=vision_resolution,
            batch_size=batch_size,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    old = final.with_name(f"{key}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)  # two renames: the old cache is only removed once the new one is in place
    directory.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def _write_cache(
    directory: Path,
    records: list[Record],
    *,
    encode_moments,
    vae_identity: str,
    vae_transform: Callable,
    vit_transform: Callable,
    resolution: int,
    vision_resolution: int,
    batch_size: int,
) -> None:
    images = sorted({str(p.resolve()) for r in records for p in r.files})
    refs = sorted({str(p.resolve()) for r in records for p in r.references})
    moments = None
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = torch.stack([vae_transform(load_rgb(p)) for p in chunk])
        with torch.no_grad():
            mean, std = encode_moments(pixels)
        if moments is None:
            moments = np.lib.format.open_memmap(
                directory / "moments.npy",
                mode="w+",
                dtype=np.float16,
                shape=(len(images), 2, *mean.shape[1:]),
            )
        moments[start : start + len(chunk), 0] = mean.float().cpu().numpy()
        moments[start : start + len(chunk), 1] = std.float().cpu().numpy()
        log.info("cached %d / %d images", min(start + batch_size, len(images)), len(images))
    if moments is not None:
        moments.flush()
    vit = np.lib.format.open_memmap(
        directory / "vit.npy",
        mode="w+",
        dtype=np.uint8,
        shape=(len(refs), vision_resolution, vision_resolution, 3),
    )
    for row, p in enumerate(refs):
        vit[row] = np.asarray(vit_transform(load_rgb(p)))
    vit.flush()
    (directory / "index.json").write_text(
        json.dumps(
            {"latents": {p: i for i, p in enumerate(images)}, "vit": {p: i for i, p in enumerate(refs)}}
        )
    )
    # meta last: its presence marks a complete cache
    (directory / "meta.json").write_text(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "vae_identity": vae_identity,
                "resolution": resolution,
                "vision_resolution": vision_resolution,
                "images": len(images),
                "references": len(refs),
            }
        )
    )


def missing_from_cache(cache: LatentCache, records: Iterable[Record]) -> list[str]:
    """Images of ``records`` the cache does not hold (new data since it was built)."""
    out = []
    for r in records:
        for p in r.files:
            if str(p.resolve()) not in cache.latent_rows:
                out.append(f"{r.origin}: {p}")
        for p in r.references:
            if str(p.resolve()) not in cache.vit_rows:
                out.append(f"{r.origin}: {p} (reference pixels)")
    return out

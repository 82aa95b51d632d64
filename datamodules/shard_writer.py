"""Write validated training records as litdata shards, one dataset per task pool (the layout and
item format: ``datamodules/streaming.py``).

Images are resized and cropped exactly as the training transforms do (``Transforms.vae_resize`` /
``vit_resize``) and stored as PNG (lossless: streamed batches equal the file loader's) or JPEG
(``jpeg_quality``; the default, ``JPEG_QUALITY``: about 4× smaller and 4× faster to decode at
512 px than PNG, 36–40 dB PSNR on photos — measured in the closing note of issue 28). With
latents, each image's autoencoder moments come from a latent cache (``build_cache``), stored as it
stores them. ``optimize`` (litdata) runs the items in worker processes and writes the chunks.

A local output is written into a sibling folder and moved into place once complete, its
``settings.json`` last; an S3 output gets ``settings.json`` last, its completion marker (the
reader refuses a prefix without one). An output that is not empty is refused unless ``overwrite``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.latent_cache import LatentCache
from datamodules.records import Problem, Record
from datamodules.streaming import (
    FORMAT_VERSION,
    IMAGE_FORMATS,
    SETTINGS_FILE,
    allow_plain_http,
    is_s3,
    join,
    pool_dirname,
    s3_client,
    s3_keys,
    split_s3,
)
from mige_lightning.images import load_rgb
from mige_lightning.prompt import PROMPT_VERSION
from mige_lightning.transforms import Transforms

log = logging.getLogger(__name__)
DEFAULT_IMAGE_FORMAT = "jpeg"
JPEG_QUALITY = 95
CHUNK_BYTES = "64MB"
LISTED_BAD_RECORDS = 1000  # settings.json lists this many skipped records (all are counted)


def encode_image(img: Image.Image, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, "PNG")
    elif image_format == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    else:
        raise ValueError(f"image format: expected one of {IMAGE_FORMATS}, got {image_format!r}")
    return buf.getvalue()


class MakeItem:
    """``optimize``'s function: the position of a record in ``records`` → its stored item."""

    def __init__(
        self,
        records: Sequence[Record],
        indices: Sequence[int],
        transforms: Transforms,
        *,
        image_format: str,
        jpeg_quality: int,
        slots: int,
        latent_cache: str | None,
        storage_options: Mapping[str, Any] | None = None,
    ):
        self.records, self.indices, self.t = list(records), list(indices), transforms
        self.image_format, self.jpeg_quality, self.slots = image_format, jpeg_quality, slots
        self.latent_cache = latent_cache
        self.storage_options = dict(storage_options or {})
        self._cache: LatentCache | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None  # memory maps are opened again in each worker
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        allow_plain_http(self.storage_options)  # spawned workers: their own litdata import

    def _encode(self, img: Image.Image) -> bytes:
        return encode_image(img, self.image_format, self.jpeg_quality)

    def _moments(self, path: Path | None, shape: tuple[int, ...]) -> np.ndarray:
        if path is None:
            return np.zeros(shape, dtype=np.float16)
        cache = self._cache
        return np.array(cache.moments[cache._row(cache.latent_rows, path, "latents")], dtype=np.float16)

    def __call__(self, position: int) -> dict[str, Any]:
        rec = self.records[position]
        try:
            return self._item(rec, self.indices[position])
        except Exception as e:
            raise RuntimeError(f"{rec.origin}: {type(e).__name__}: {e}") from e

    def _item(self, rec: Record, index: int) -> dict[str, Any]:
        meta = {
            "index": index,
            "task": rec.task.value,
            "subtask": rec.subtask,
            "instruction": rec.instruction,
            "origin": rec.origin,
            "has_source": rec.source is not None,
            "references": len(rec.references),
            "target_path": str(rec.target),
            "reference_paths": [str(p) for p in rec.references],
            "source_path": str(rec.source) if rec.source else None,
        }
        if len(rec.references) > self.slots:
            raise ValueError(f"{len(rec.references)} references but {self.slots} slots")
        refs = [load_rgb(p) for p in rec.references]
        item: dict[str, Any] = {
            "meta": json.dumps(meta).encode(),
            "target": self._encode(self.t.vae_resize(load_rgb(rec.target))),
            "source": self._encode(self.t.vae_resize(load_rgb(rec.source))) if rec.source else b"",
        }
        for j in range(self.slots):
            item[f"ref_vae_{j}"] = self._encode(self.t.vae_resize(refs[j])) if j < len(refs) else b""
            item[f"ref_vit_{j}"] = self._encode(self.t.vit_resize(refs[j])) if j < len(refs) else b""
        if self.latent_cache is not None:
            if self._cache is None:
                self._cache = LatentCache(self.latent_cache)
            shape = (2, *self._cache.latent_shape)
            item["target_moments"] = self._moments(rec.target, shape)
            item["source_moments"] = self._moments(rec.source, shape)
            ref_moments = np.zeros((self.slots, *shape), dtype=np.float16)
            for j, p in enumerate(rec.references):
                ref_moments[j] = self._moments(p, shape)
            item["ref_moments"] = ref_moments
        return item


# ------------------------------------------------------------------------------------- output
def check_output(output: str, *, overwrite: bool, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse an output that is not empty (unless ``overwrite``): before anything is built."""
    if is_s3(output):
        split_s3(output)
        allow_plain_http(storage_options)
        keys = s3_keys(output, storage_options, limit=3)
        if keys and not overwrite:
            raise FileExistsError(
                f"--output {output} is not empty (e.g. {keys}); pass --overwrite to replace its contents"
            )
        return
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--output {output} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"--output {output} is not empty; pass --overwrite to replace it")


@contextmanager
def optimizer_cache_folders():
    """litdata's staging folders (``DATA_OPTIMIZER_CACHE_FOLDER`` / ``…_DATA_CACHE_FOLDER``, read
    when ``optimize`` runs; shared ``/tmp/chunks`` and ``/tmp/data`` by default): a private
    temporary folder unless the user set them."""
    names = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    if all(os.environ.get(n) for n in names):
        yield
        return
    saved = {n: os.environ.get(n) for n in names}
    with tempfile.TemporaryDirectory(prefix="mige-optimize-") as tmp:
        for n in names:
            if not saved[n]:
                os.environ[n] = str(Path(tmp, n.lower()))
        try:
            yield
        finally:
            for n, v in saved.items():
                if v is None:
                    os.environ.pop(n, None)
                else:
                    os.environ[n] = v


def bad_record_summary(problems: Sequence[Problem]) -> dict[str, Any]:
    return {
        "total": len(problems),
        "by_reason": dict(Counter(p.kind for p in problems).most_common()),
        "listed": [str(p) for p in problems[:LISTED_BAD_RECORDS]],
    }


def write_shards(
    records: Sequence[Record],
    output: str,
    *,
    transforms: Transforms,
    image_format: str = DEFAULT_IMAGE_FORMAT,
    jpeg_quality: int = JPEG_QUALITY,
    latent_cache: str | None = None,
    vae_identity: str | None = None,
    workers: int = 1,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    chunk_bytes: str | int = CHUNK_BYTES,
    start_method: str = "spawn",
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``records`` (validated) under ``output``; returns the settings written.

    ``latent_cache``: a latent cache directory holding every image (stored with the items);
    ``settings``: more entries for ``settings.json`` (the command, the data config, bad records).
    """
    from litdata import optimize

    if not records:
        raise ValueError("no training records to write: data.manifests / data.synthetic give none")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format: expected one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"JPEG quality: expected 1..100, got {jpeg_quality}")
    check_output(output, overwrite=overwrite, storage_options=storage_options)
    pools: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        pools[rec.pool].append(i)
    slots = max(1, max((len(r.references) for r in records), default=0))
    latent_shape = list(LatentCache(latent_cache).latent_shape) if latent_cache else None
    if is_s3(output):
        stage = output
        if overwrite:  # settings.json first: a run cut short from here on leaves no completion marker
            bucket, prefix = split_s3(output)
            client = s3_client(storage_options)
            client.delete_object(Bucket=bucket, Key=f"{prefix}/{SETTINGS_FILE}".lstrip("/"))
            keys = s3_keys(output, storage_options)
            for start in range(0, len(keys), 1000):  # the most one request deletes
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    else:
        final = Path(output).resolve()
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            log.warning("%s: left by an interrupted optimize-data (never read); remove it", stale)
        stage_path = final.with_name(f".{final.name}.partial-{os.getpid()}")
        if stage_path.exists():
            shutil.rmtree(stage_path)
        stage_path.mkdir()
        stage = str(stage_path)
    try:
        with optimizer_cache_folders():
            for pool in sorted(pools):
                indices = pools[pool]
                target = join(stage, pool_dirname(pool))
                log.info("pool %s: %d record(s) → %s", pool, len(indices), join(output, pool_dirname(pool)))
                print(
                    f"optimize-data: pool {pool}: {len(indices)} record(s), {min(workers, len(indices))} worker(s)"
                )
                optimize(
                    fn=MakeItem(
                        [records[i] for i in indices],
                        indices,
                        transforms,
                        image_format=image_format,
                        jpeg_quality=jpeg_quality,
                        slots=slots,
                        latent_cache=latent_cache,
                        storage_options=storage_options,
                    ),
                    inputs=list(range(len(indices))),
                    output_dir=target,
                    num_workers=max(1, min(workers, len(indices))),
                    chunk_bytes=chunk_bytes,
                    start_method=start_method,
                    storage_options=dict(storage_options or {}),
                )
        written = {
            "format_version": FORMAT_VERSION,
            "shards_id": uuid.uuid4().hex,
            "prompt_version": PROMPT_VERSION,
            "resolution": transforms.resolution,
            "vision_resolution": transforms.vision_resolution,
            "vision_mean": list(transforms.vision_mean),
            "vision_std": list(transforms.vision_std),
            "image_format": image_format,
            "jpeg_quality": jpeg_quality if image_format == "jpeg" else None,
            "reference_slots": slots,
            "latents": latent_cache is not None,
            "vae_identity": vae_identity if latent_cache is not None else None,
            "latent_shape": latent_shape,
            "pools": {pool: {"dir": pool_dirname(pool), "count": len(pools[pool])} for pool in sorted(pools)},
            **dict(settings or {}),
        }
        text = json.dumps(written, indent=2)
        if is_s3(output):  # last: the completion marker
            bucket, prefix = split_s3(output)
            s3_client(storage_options).put_object(
                Bucket=bucket, Key=f"{prefix}/{SETTINGS_FILE}".lstrip("/"), Body=text.encode()
            )
        else:
            (Path(stage) / SETTINGS_FILE).write_text(text)
    except BaseException:
        if not is_s3(output):
            shutil.rmtree(stage, ignore_errors=True)
        raise
    if not is_s3(output):
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)  # the old output is removed only once the new one is in place
        Path(stage).rename(final)
        if old.exists():
            shutil.rmtree(old)
    return written

"""Training data as streamable shards (litdata): what ``optimize-data`` writes, read from a local
folder or an ``s3://bucket/prefix``, mixed across task pools and resumable mid-epoch.

Layout of a shard set (``mige_cli/optimize_data.py`` writes it, ``datamodules/shard_writer.py``):
one litdata dataset per task pool, in a folder named after the pool (``subject``, ``edit``,
``subject_edit-add``, ``subject_edit-replace``: ``/`` becomes ``-``), and ``settings.json`` at the
root, written last: its presence marks a complete set, and it says what the shards were made for
(resolution, vision resolution, image format, latents and the autoencoder's identity, prompt
contract and format version, pools and their counts, bad records, command, data config).

One item per record: ``meta`` (UTF-8 JSON: index, task, subtask, instruction, origin, has_source,
reference count, image paths), ``target`` / ``source`` (PNG or JPEG bytes of the VAE path's
resized and cropped image; ``b""`` for no source), ``ref_vae_<j>`` / ``ref_vit_<j>`` for every one
of ``reference_slots`` slots (the VAE path's crop and the vision tower's resize; ``b""`` past the
record's count), and with latents ``target_moments`` / ``source_moments`` [2, C, h, w] and
``ref_moments`` [slots, 2, C, h, w]: float16 mean and std, as the latent cache stores them.
Text goes in as bytes we decode ourselves (litdata stores a ``str`` that names an existing file as
that file's content) and lists are avoided (litdata stores a list as one JSON leaf).

Training (``data.streaming``, ``TrainingDataModule``): ``PoolMixer`` draws each sample's pool from
the same pool-choice stream as ``TaskBalancedSampler`` (``pool_choices``: a function of seed,
epoch and rank) and takes the next item of that pool's ``StreamingDataLoader`` (a litdata
``StreamingDataset`` shuffled with ``data.seed``, split between ranks by litdata); a pool that runs
out starts its next pass (it streams for ever). The mixer is sized (Lightning does not read a batch
ahead) and stateful: Lightning's checkpoint carries every rank's step and pool loader states, so a
resumed run continues with the same samples and the same latent noise. ``CombinedStreamingDataset``
is not used: its resume with loader workers repeats samples.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.dataset import collate
from datamodules.latent_cache import sample_moments
from datamodules.task_sampler import check_pool_weights, pool_choices, pool_probabilities
from mige_lightning.images import decode_rgb
from mige_lightning.prompt import PROMPT_VERSION
from mige_lightning.transforms import Transforms

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
IMAGE_FORMATS = ("jpeg", "png")
# what an item of ours serializes to; shards holding anything else (litdata's ``pickle`` format
# would run code when read) are refused before a chunk is opened
ITEM_DATA_FORMATS = ("bytes", "numpy")
STREAMING_KEYS = ("input_dir", "storage_options", "cache_dir")
INCOMPLETE = (
    "incomplete shards: no settings.json — an interrupted optimize-data? run it again with --overwrite"
)


class ShardsError(ValueError):
    """Shards that are incomplete, damaged or made for another model, data or format."""


def pool_dirname(pool: str) -> str:
    """The folder of a pool's dataset: ``subject_edit/add`` → ``subject_edit-add``."""
    return pool.replace("/", "-")


# ------------------------------------------------------------------------------------ locations
def is_s3(url: str | Path) -> bool:
    return str(url).startswith("s3://")


def join(url: str | Path, *parts: str) -> str:
    if is_s3(url):
        return "/".join([str(url).rstrip("/"), *parts])
    return str(Path(url, *parts))


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix``)."""
    bucket, _, prefix = str(url).removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"'{url}': expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def allow_plain_http(storage_options: Mapping[str, Any] | None) -> None:
    """Let litdata read from an ``http://`` S3 endpoint (a local server without TLS).

    litdata downloads chunks through obstore, which refuses plain-http endpoints whatever
    ``AWS_ALLOW_HTTP`` says, and litdata 0.2.76 has no option for it: its private obstore client
    options get ``allow_http``. Only for an http:// endpoint (``storage_options.endpoint_url`` or
    ``AWS_ENDPOINT_URL``); loader workers forked afterwards inherit it. A litdata that renames the
    attribute fails here, loudly (``tests/test_streaming.py`` checks it), not later as a refused scheme.
    """
    endpoint = str((storage_options or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL", ""))
    if not endpoint.startswith("http://"):
        return
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if not isinstance(options, dict):
        raise RuntimeError(
            "litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS is gone (litdata upgraded?): "
            f"datamodules/streaming.py cannot allow the http:// endpoint {endpoint}; find litdata's "
            "new way to let obstore use plain http"
        )
    options["allow_http"] = True


def s3_client(storage_options: Mapping[str, Any] | None):
    """A boto3 S3 client with the same options litdata gets (endpoint, credentials, region)."""
    import boto3

    return boto3.client("s3", **dict(storage_options or {}))


def read_text(url: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """A small file's text, local or on S3; None when it does not exist."""
    if not is_s3(url):
        path = Path(url)
        return path.read_text() if path.is_file() else None
    bucket, key = split_s3(url)
    client = s3_client(storage_options)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except client.exceptions.NoSuchKey:
        return None


def s3_keys(
    url: str, storage_options: Mapping[str, Any] | None = None, *, limit: int | None = None
) -> list[str]:
    """The keys under an ``s3://bucket/prefix`` (the prefix taken as a folder)."""
    bucket, prefix = split_s3(url)
    client = s3_client(storage_options)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
    ):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
        if limit is not None and len(keys) >= limit:
            return keys[:limit]
    return keys


# ------------------------------------------------------------------------------------- settings
def check_settings(settings: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Every ``expected`` key as in ``settings``, or an error naming the key and both values."""
    for key, want in expected.items():
        got = settings.get(key)
        if got != want:
            raise ShardsError(
                f"{where}: the shards were made for {key}={got!r}, this run needs {key}={want!r}; "
                "run optimize-data again with this model and data (or point data.streaming.input_dir "
                "at shards made for them)"
            )


def read_settings(input_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``settings.json`` of a complete shard set of this format and prompt contract."""
    where = join(input_dir, SETTINGS_FILE)
    text = read_text(where, storage_options)
    if text is None:
        raise ShardsError(f"{input_dir}: {INCOMPLETE}")
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardsError(
            f"{where}: not valid JSON (line {e.lineno}: {e.msg}); run optimize-data again with --overwrite"
        ) from None
    if not isinstance(settings, dict):
        raise ShardsError(f"{where}: expected a JSON object, got {type(settings).__name__}")
    check_settings(settings, {"format_version": FORMAT_VERSION, "prompt_version": PROMPT_VERSION}, where)
    return settings


def check_pool_index(input_dir: str, pool: str, info: Mapping[str, Any], storage_options=None) -> None:
    """A pool's litdata ``index.json``: present, only our item formats, as many items as settings say."""
    where = join(input_dir, info["dir"], "index.json")
    text = read_text(where, storage_options)
    if text is None:
        raise ShardsError(
            f"{where}: missing (pool '{pool}'): damaged shards; run optimize-data again with --overwrite"
        )
    index = json.loads(text)
    formats = index["config"]["data_format"]
    odd = sorted({f for f in formats if f not in ITEM_DATA_FORMATS})
    if odd:
        raise ShardsError(
            f"{where}: items stored as {odd}; shards written by optimize-data hold only "
            f"{list(ITEM_DATA_FORMATS)} (refused: a pickled item runs code when read)"
        )
    count = sum(int(chunk["chunk_size"]) for chunk in index["chunks"])
    if count != info["count"]:
        raise ShardsError(
            f"{where}: {count} item(s) but settings.json says {info['count']} for pool '{pool}': "
            "damaged shards; run optimize-data again with --overwrite"
        )


def check_streaming_spec(spec: Any) -> dict[str, Any]:
    """``data.streaming``: ``{input_dir, storage_options, cache_dir}``; a typo'd key is an error."""
    if not isinstance(spec, Mapping) or not spec.get("input_dir"):
        raise ValueError(
            f"data.streaming: expected {{input_dir: DIR or s3://bucket/prefix, storage_options: {{…}}, "
            f"cache_dir: …}}, got {spec!r}"
        )
    unknown = sorted(set(spec) - set(STREAMING_KEYS))
    if unknown:
        raise ValueError(f"data.streaming: unknown key(s) {unknown}; expected some of {list(STREAMING_KEYS)}")
    options = spec.get("storage_options") or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"data.streaming.storage_options: expected a mapping, got {options!r}")
    return {
        "input_dir": str(spec["input_dir"]),
        "storage_options": dict(options),
        "cache_dir": spec.get("cache_dir"),
    }


@dataclass
class Shards:
    """An opened shard set: where it is and its (checked) settings."""

    input_dir: str
    storage_options: dict[str, Any]
    cache_dir: str | None
    settings: dict[str, Any]

    @classmethod
    def open(cls, spec: Mapping[str, Any]) -> Shards:
        spec = check_streaming_spec(spec)
        allow_plain_http(spec["storage_options"])
        settings = read_settings(spec["input_dir"], spec["storage_options"])
        for pool, info in settings["pools"].items():
            check_pool_index(spec["input_dir"], pool, info, spec["storage_options"])
        return cls(spec["input_dir"], spec["storage_options"], spec["cache_dir"], settings)

    @property
    def where(self) -> str:
        return join(self.input_dir, SETTINGS_FILE)

    @property
    def pool_sizes(self) -> dict[str, int]:
        return {pool: int(info["count"]) for pool, info in self.settings["pools"].items()}

    @property
    def latents(self) -> bool:
        return bool(self.settings["latents"])

    def check_model(self, *, resolution: int, vision_resolution: int, vae_identity: str | None) -> None:
        """Refuse shards made for another image size or (with latents) another autoencoder."""
        expected: dict[str, Any] = {"resolution": resolution, "vision_resolution": vision_resolution}
        if self.latents:
            expected["vae_identity"] = vae_identity
        check_settings(self.settings, expected, self.where)


# ---------------------------------------------------------------------------------------- items
def decode_image(data: bytes | memoryview, name: str):
    """Our PNG / JPEG bytes → RGB PIL image (through the one image reader's checks)."""
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as img:
        return decode_rgb(img, name)


class DecodeItem:
    """A stored item → what ``MIGEDataset`` gives for the same record (run in the loader workers
    as the ``StreamingDataset``'s transform). With latents, the moments are passed on under
    ``moments`` and sampled by the mixer, whose position in the stream seeds the noise."""

    def __init__(self, transforms: Transforms, *, latents: bool):
        self.t = transforms
        self.latents = latents

    def __call__(self, item: dict) -> dict:
        meta = json.loads(bytes(item["meta"]))
        n, origin = meta["references"], meta["origin"]
        out: dict[str, Any] = {
            "index": meta["index"],
            "has_source": meta["has_source"],
            "instruction": meta["instruction"],
            "task": meta["task"],
        }
        vit = [decode_image(item[f"ref_vit_{j}"], f"{origin}: reference {j}") for j in range(n)]
        out["ref_pixels"] = [self.t.vit_finish(img) for img in vit]
        if self.latents:
            out["moments"] = {
                "target": torch.from_numpy(np.asarray(item["target_moments"])),
                "source": torch.from_numpy(np.asarray(item["source_moments"]))
                if meta["has_source"]
                else None,
                "references": [torch.from_numpy(np.asarray(item["ref_moments"][j])) for j in range(n)],
            }
            return out
        res = self.t.resolution
        out["target"] = self.t.vae_finish(decode_image(item["target"], f"{origin}: target"))
        out["source"] = (
            self.t.vae_finish(decode_image(item["source"], f"{origin}: source"))
            if meta["has_source"]
            else torch.zeros(3, res, res)
        )
        out["ref_vae"] = [
            self.t.vae_finish(decode_image(item[f"ref_vae_{j}"], f"{origin}: reference {j}"))
            for j in range(n)
        ]
        return out


def first_item(items: list) -> Any:
    """A pool loader's collate: batches of one, passed on as the item itself."""
    return items[0]


def latent_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The noise seed of the sample at ``position`` of a rank's epoch (the same after a resume)."""
    return int(
        np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


def sample_latents(item: dict, generator: torch.Generator) -> dict:
    """Replace ``moments`` by latents sampled from them (z = mean + std · ε), as the latent cache
    path does; no source: zeros."""
    m = item.pop("moments")
    item["target_latent"] = sample_moments(m["target"], generator)
    item["source_latent"] = (
        sample_moments(m["source"], generator)
        if m["source"] is not None
        else torch.zeros(m["target"].shape[1:])
    )
    item["ref_latent"] = [sample_moments(r, generator) for r in m["references"]]
    return item


# ---------------------------------------------------------------------------------------- mixer
def gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, index = global rank (a collective: every rank must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class PoolMixer:
    """Training batches from one stream per pool, pools drawn per sample (see the module doc).

    ``len()``: steps per epoch (``samples_per_epoch // batch_size``), so Lightning fetches no batch
    ahead of the one it trains on and a checkpoint's state is exactly where the run stands.
    ``state_dict`` gathers every rank's step and pool loader states (Lightning saves rank 0's
    dict); ``load_state_dict`` restores this rank's.
    """

    def __init__(
        self,
        loaders: Sequence,
        keys: Sequence[str],
        probs: np.ndarray,
        *,
        batch_size: int,
        samples_per_epoch: int,
        seed: int,
        rank: int,
        world_size: int,
        shards_id: str,
    ):
        self.loaders, self.keys, self.probs = list(loaders), list(keys), probs
        self.batch_size, self.samples_per_epoch = batch_size, samples_per_epoch
        self.seed, self.rank, self.world_size, self.shards_id = seed, rank, world_size, shards_id
        self.steps = samples_per_epoch // batch_size
        if self.steps < 1:
            raise ValueError(
                f"data.samples_per_epoch={samples_per_epoch} is less than one batch of {batch_size}"
            )
        self.epoch, self.step = -1, 0
        self._iterators: list | None = None
        self._restored = False

    def __len__(self) -> int:
        return self.steps

    def _next(self, p: int) -> dict:
        try:
            return next(self._iterators[p])
        except StopIteration:  # this pool's pass is over: start the next (reshuffled by litdata)
            self._iterators[p] = iter(self.loaders[p])
        try:
            return next(self._iterators[p])
        except StopIteration:
            raise ShardsError(
                f"pool '{self.keys[p]}' gives rank {self.rank} of {self.world_size} no samples"
            ) from None

    def __iter__(self):
        if not self._restored or self.step >= self.steps:
            self.epoch, self.step = self.epoch + 1, 0
        self._restored = False
        if self._iterators is None:  # once: kept across epochs (a pass ends when a pool runs out)
            self._iterators = [iter(loader) for loader in self.loaders]
        choices = pool_choices(
            self.probs, seed=self.seed, epoch=self.epoch, rank=self.rank, num_samples=self.samples_per_epoch
        )
        while self.step < self.steps:
            start = self.step * self.batch_size
            samples = []
            for position in range(start, start + self.batch_size):
                item = self._next(int(choices[position]))
                if "moments" in item:
                    gen = torch.Generator().manual_seed(
                        latent_seed(self.seed, self.epoch, self.rank, position)
                    )
                    item = sample_latents(item, gen)
                samples.append(item)
            self.step += 1
            yield collate(samples)

    def _settings(self) -> dict[str, Any]:
        """What a saved state must have been made with to resume here (checked on loading)."""
        return {
            "shards_id": self.shards_id,
            "seed": self.seed,
            "samples_per_epoch": self.samples_per_epoch,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "pools": list(self.keys),
            "weights": [float(p) for p in self.probs],
        }

    def state_dict(self) -> dict[str, Any]:
        local = {
            "rank": self.rank,
            "epoch": self.epoch,
            "step": self.step,
            "pools": {key: loader.state_dict() for key, loader in zip(self.keys, self.loaders, strict=True)},
        }
        return {**self._settings(), "ranks": gather_objects(local)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if "ranks" not in state:
            raise ValueError(
                f"the checkpoint's training-data state {sorted(state)} is not the streaming loader's "
                "(made with data.manifests / data.synthetic?): resuming mid-epoch needs the same data source"
            )
        mine = self._settings()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(
                    f"the checkpoint's streaming state is for {key}={state.get(key)!r}, this run has "
                    f"{key}={value!r}: resuming mid-epoch needs the same shards, data.seed, "
                    "data.samples_per_epoch, data.batch_size, data.task_weights and number of ranks"
                )
        local = state["ranks"][self.rank]
        self.epoch, self.step = int(local["epoch"]), int(local["step"])
        for key, loader in zip(self.keys, self.loaders, strict=True):
            loader.load_state_dict(local["pools"][key])
        self._restored = True


def allot_workers(num_workers: int, probs: Sequence[float]) -> list[int]:
    """Loader workers per pool: ``num_workers`` shared by the pools' weights, at least one each."""
    if num_workers <= 0:
        return [0] * len(probs)
    return [max(1, round(num_workers * float(p))) for p in probs]


def streaming_loader(
    shards: Shards,
    *,
    transforms: Transforms,
    task_weights: Mapping[str, float],
    batch_size: int,
    num_workers: int,
    samples_per_epoch: int | None,
    seed: int,
    rank: int,
    world_size: int,
) -> PoolMixer:
    """The training loader over ``shards`` for this rank (build it after the process group exists:
    litdata splits each pool between the ranks torch.distributed reports)."""
    from litdata import StreamingDataLoader, StreamingDataset

    sizes = shards.pool_sizes
    active = check_pool_weights(sizes, task_weights, world_size)
    keys, probs = pool_probabilities(active)
    decode = DecodeItem(transforms, latents=shards.latents)
    allow_plain_http(shards.storage_options)
    loaders = []
    for key, workers in zip(keys, allot_workers(num_workers, probs), strict=True):
        dataset = StreamingDataset(
            join(shards.input_dir, shards.settings["pools"][key]["dir"]),
            cache_dir=shards.cache_dir,
            storage_options=shards.storage_options,
            shuffle=True,
            seed=seed,
            transform=decode,
        )
        if dataset.distributed_env.world_size != world_size:
            raise RuntimeError(
                f"litdata sees {dataset.distributed_env.world_size} rank(s), the trainer {world_size}: "
                "build the streaming loader after the process group exists (train_dataloader)"
            )
        loaders.append(
            StreamingDataLoader(
                dataset,
                batch_size=1,
                num_workers=workers,
                collate_fn=first_item,
                # its own generator: each (re)start of a pool's pass draws a seed for the workers,
                # from the global generator it would shift the training step's noise after a resume
                generator=torch.Generator().manual_seed(seed),
            )
        )
    total = sum(sizes[k] for k in keys)
    return PoolMixer(
        loaders,
        keys,
        probs,
        batch_size=batch_size,
        samples_per_epoch=samples_per_epoch or total // world_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shards_id=shards.settings["shards_id"],
    )

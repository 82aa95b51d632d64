"""Streamable shards: ``optimize-data`` writes one litdata dataset per task pool from the records
``fit`` checks (bad records reported and skipped as ``fit`` does), an interrupted run leaves
nothing trusted, training (``data.streaming``) refuses shards made for another model, gives the
file loader's batches, mixes the pools at their weights with disjoint ranks, and a fit from
``s3://`` (moto's server on 127.0.0.1, started here) killed with SIGKILL resumes with the same next
samples and losses, on 1 and 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from datamodules.dataset import MIGEDataset, collate
from datamodules.latent_cache import LatentCache
from datamodules.records import ManifestError
from datamodules.shard_writer import MakeItem, write_shards
from datamodules.streaming import (
    INCOMPLETE,
    PoolMixer,
    Shards,
    ShardsError,
    allow_plain_http,
    latent_seed,
    s3_client,
    streaming_loader,
)
from datamodules.task_sampler import DEFAULT_WEIGHTS, TaskBalancedSampler, pool_probabilities
from datamodules.training_data import TrainingDataModule
from mige_cli.main import main
from mige_lightning.transforms import Transforms
from tests.helpers.fsdp_probe import cli_env
from tests.helpers.streaming import read_rows
from tests.helpers.training import FROM_SCRATCH

REPO = Path(__file__).resolve().parents[1]
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
MODEL = ["--config", str(REPO / "configs/demo.yaml"), *FROM_SCRATCH]
FAST = ["--workers", "2", "--start-method", "fork", "--chunk-bytes", "4KB"]  # several chunks per pool


def world_args(world: Path) -> list[str]:
    """A world of 40 scenes at 32 px (36 training records, 9 per pool), keys set one by one."""
    return [f"--data.synthetic.root={world}", "--data.synthetic.num_samples=40", "--data.synthetic.size=32"]


@pytest.fixture(autouse=True)
def optimizer_caches(tmp_path, monkeypatch):
    """litdata's optimize staging folders: per test (the defaults, /tmp/chunks and /tmp/data, are shared)."""
    monkeypatch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(tmp_path / "optimizer_cache"))
    monkeypatch.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(tmp_path / "optimizer_data"))


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server in a subprocess on 127.0.0.1 (a port the OS picks): the storage options."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.streaming"],
        cwd=REPO,
        env=cli_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        yield {"endpoint_url": f"http://127.0.0.1:{port}", **CREDENTIALS}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def new_bucket(options: dict) -> str:
    name = f"mige-{uuid.uuid4().hex[:12]}"
    s3_client(options).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny synthetic world (36 training records, 9 per pool) and its PNG shards, made by the command."""
    root = tmp_path_factory.mktemp("streaming")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(root / "optimizer_cache"))
        mp.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(root / "optimizer_data"))
        settings = main(
            ["optimize-data", *MODEL, *world_args(root / "world"), "--output", str(root / "shards")]
            + ["--image-format", "png", *FAST]
        )
    return SimpleNamespace(root=root, world=root / "world", shards=root / "shards", settings=settings)


def transforms_of(settings: dict) -> Transforms:
    return Transforms(
        settings["resolution"], settings["vision_resolution"], settings["vision_mean"], settings["vision_std"]
    )


def records_of(world: Path) -> list:
    dm = TrainingDataModule(synthetic={"root": str(world)})
    dm.connect(
        resolution=32, vision_resolution=32, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3, max_images=4
    )
    return dm.validated_records()


def assert_same_batch(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


# ----------------------------------------------------------------------------------- writing
def test_optimize_data_writes_one_dataset_per_pool_with_settings(demo):
    s = demo.settings
    assert s["pools"] == {
        "edit": {"dir": "edit", "count": 9},
        "subject": {"dir": "subject", "count": 9},
        "subject_edit/add": {"dir": "subject_edit-add", "count": 9},
        "subject_edit/replace": {"dir": "subject_edit-replace", "count": 9},
    }
    assert json.loads((demo.shards / "settings.json").read_text()) == s
    assert s["resolution"] == 32 and s["image_format"] == "png" and s["latents"] is False
    assert s["prompt_version"] == 1 and s["format_version"] == 1 and s["bad_records"]["total"] == 0
    assert s["command"][:4] == ["python", "-m", "mige_lightning", "optimize-data"]
    assert s["data_config"]["init_args"]["synthetic"]["root"] == str(demo.world)
    for info in s["pools"].values():
        index = json.loads((demo.shards / info["dir"] / "index.json").read_text())
        assert len(index["chunks"]) > 1  # 4 KB chunks; written by 2 workers
        assert set(index["config"]["data_format"]) == {"bytes"}
    assert not list(demo.root.glob(".shards.*"))  # the staging folder was moved into place


def test_streamed_batches_equal_the_file_loaders(demo):
    """PNG shards: every batch the mixer gives equals, key by key (values, dtypes, shapes), the
    file loader's batch of the same records (MIGEDataset + collate)."""
    records = records_of(demo.world)
    t = transforms_of(demo.settings)
    files = MIGEDataset(records, t)
    mixer = streaming_loader(
        Shards.open({"input_dir": str(demo.shards)}),
        transforms=t,
        task_weights=DEFAULT_WEIGHTS,
        batch_size=6,
        num_workers=0,
        samples_per_epoch=36,
        seed=0,
        rank=0,
        world_size=1,
    )
    seen = []
    for batch in mixer:
        assert_same_batch(batch, collate([files[i] for i in batch["index"].tolist()]))
        seen += batch["index"].tolist()
    assert len(seen) == 36 and {records[i].pool for i in seen} == set(DEFAULT_WEIGHTS)


def test_validation_reads_the_held_out_split_as_without_shards(demo):
    """``data.streaming`` replaces the training batches only: the held-out batches Lightning's
    validation loop gets are the same records and images as without shards."""
    batches = []
    for streaming in (None, {"input_dir": str(demo.shards)}):
        dm = TrainingDataModule(synthetic={"root": str(demo.world)}, streaming=streaming)
        dm.connect(
            resolution=32, vision_resolution=32, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3, max_images=4
        )
        dm.setup("fit")
        batches.append(list(dm.val_dataloader()))
    plain, streamed = batches
    assert len(plain) == len(streamed) > 0
    for a, b in zip(plain, streamed, strict=True):
        assert [row.record for row in a] == [row.record for row in b]
        for x, y in zip(a, b, strict=True):
            assert x.request.instruction == y.request.instruction and x.scored == y.scored
            # PIL images compare by mode, size and pixels
            assert x.request.references == y.request.references and x.request.source == y.request.source
            assert x.target == y.target


def _items_by_index(directory: Path, settings: dict) -> dict[int, dict]:
    from litdata import StreamingDataset

    out = {}
    for info in settings["pools"].values():
        for item in StreamingDataset(str(directory / info["dir"])):
            out[json.loads(bytes(item["meta"]))["index"]] = item
    return out


def test_latents_are_the_latent_caches_moments_and_their_noise_a_function_of_the_position(tmp_path):
    """``--latents`` with the tiny preset's KL autoencoder: the moments stored are the latent
    cache's (``data.latent_cache`` reused, or one encoded on the spot: the same values), and the
    streamed latents are mean + std · ε with ε seeded by the sample's position in the stream."""
    tiny = [
        *MODEL,
        "--model.overrides=null",
        "--model.overrides.resolution=16",
        *world_args(tmp_path / "world"),
    ]
    fresh = main(["optimize-data", *tiny, "--output", str(tmp_path / "fresh"), "--latents", *FAST])
    cache_args = [*tiny, f"--data.latent_cache={tmp_path}/latents"]
    main(["cache-latents", *cache_args])
    reused = main(["optimize-data", *cache_args, "--output", str(tmp_path / "reused"), "--latents", *FAST])
    assert fresh["latents"] and fresh["image_format"] == "jpeg" and fresh["resolution"] == 16
    assert fresh["vae_identity"] == reused["vae_identity"] != "pixel-identity"
    cache = LatentCache(next((tmp_path / "latents").glob("*/meta.json")).parent)
    assert cache.meta["vae_identity"] == fresh["vae_identity"]
    items, again = _items_by_index(tmp_path / "reused", reused), _items_by_index(tmp_path / "fresh", fresh)
    records = records_of(tmp_path / "world")
    for index, item in items.items():
        rec = records[index]
        assert np.array_equal(
            item["target_moments"], cache.moments[cache.latent_rows[str(rec.target.resolve())]]
        )
        refs = [cache.moments[cache.latent_rows[str(p.resolve())]] for p in rec.references]
        assert np.array_equal(item["ref_moments"][: len(refs)], np.stack(refs))
        assert not item["ref_moments"][len(refs) :].any()  # empty slots
        for key in ("target_moments", "source_moments", "ref_moments"):
            assert np.array_equal(item[key], again[index][key]), key

    def batches(settings, directory, seed):
        mixer = streaming_loader(
            Shards.open({"input_dir": str(directory)}),
            transforms=transforms_of(settings),
            task_weights=DEFAULT_WEIGHTS,
            batch_size=4,
            num_workers=0,
            samples_per_epoch=8,
            seed=seed,
            rank=0,
            world_size=1,
        )
        return list(mixer)

    first = batches(reused, tmp_path / "reused", seed=3)
    assert {"target_latent", "source_latent", "ref_latent", "ref_pixels", "ref_mask"} <= first[0].keys()
    assert "target" not in first[0] and "ref_vae" not in first[0]
    for step, batch in enumerate(first):
        for j, index in enumerate(batch["index"].tolist()):
            gen = torch.Generator().manual_seed(latent_seed(3, 0, 0, step * 4 + j))
            moments = torch.from_numpy(items[index]["target_moments"]).float()
            expected = moments[0] + moments[1] * torch.randn(moments[0].shape, generator=gen)
            assert torch.equal(batch["target_latent"][j], expected)
    assert tuple(first[0]["target_latent"].shape[1:]) == cache.latent_shape
    assert first[0]["target_latent"].std() > 0


def _authors_dataset(root: Path) -> tuple[list[dict], Path, int]:
    """The authors' format (``image`` / ``entity_path`` / ``source_path`` / ``multi_prompt``, no task
    field, paths relative to the dataset root given as ``base``), one manifest per pool, 4 records
    each; the subject manifest's third record names an image that does not exist."""
    data = root / "dataset"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def image(name: str) -> str:
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(data / "images" / name)
        return f"images/{name}"

    pools = {
        "subject": lambda i: {
            "image": image(f"s{i}.jpg"),
            "entity_path": [image(f"s{i}_a.jpg"), image(f"s{i}_b.jpg")],
            "multi_prompt": "a <imagehere> next to a <imagehere> on a table",
            "source_path": [],
        },
        "edit": lambda i: {
            "image": image(f"e{i}.jpg"),
            "entity_path": [image(f"e{i}_src.jpg")],
            "multi_prompt": "make the sky in <imagehere> red",
            "source_path": [f"images/e{i}_src.jpg"],
        },
        "add": lambda i: {
            "image": image(f"a{i}.jpg"),
            "entity_path": [image(f"a{i}_src.jpg"), image(f"a{i}_obj.jpg")],
            "multi_prompt": "add <imagehere> to <imagehere>",
            "source_path": [f"images/a{i}_src.jpg"],
        },
        "replace": lambda i: {
            "image": image(f"r{i}.jpg"),
            "entity_path": [image(f"r{i}_src.jpg"), image(f"r{i}_obj.jpg")],
            "multi_prompt": "replace the cup in <imagehere> with <imagehere>",
            "source_path": [f"images/r{i}_src.jpg"],
        },
    }
    specs = []
    for name, make in pools.items():
        records = [make(i) for i in range(4)]
        if name == "subject":
            records[2]["image"] = "images/missing.jpg"
        manifest = data / f"{name}.json"
        manifest.write_text(json.dumps(records, indent=4))
        task, subtask = ("subject_edit", name) if name in ("add", "replace") else (name, None)
        specs.append({"path": str(manifest), "task": task, "subtask": subtask, "base": str(data)})
    starts = [
        n for n, text in enumerate((data / "subject.json").read_text().splitlines(), 1) if text == "    {"
    ]
    return specs, data / "subject.json", starts[2]  # the third record's first line


def test_an_authors_manifest_with_a_bad_record_is_reported_by_file_and_line_and_skipped_when_asked(tmp_path):
    specs, manifest, line = _authors_dataset(tmp_path)
    overlay = tmp_path / "authors.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"manifests": specs}}))
    args = ["optimize-data", *MODEL, "--data.synthetic=null", "--config", str(overlay), *FAST]
    out = tmp_path / "shards"
    with pytest.raises(ManifestError) as error:  # error mode (the demo's): every bad record, nothing written
        main([*args, "--output", str(out)])
    assert f"{manifest}:{line}: record 3: missing file {manifest.parent}/images/missing.jpg" in str(
        error.value
    )
    assert "1 bad record(s) (set data.on_bad_record: skip to drop them)" in str(error.value)
    assert not out.exists() and not list(tmp_path.glob(".shards*"))
    settings = main([*args, "--data.on_bad_record=skip", "--output", str(out)])
    assert settings["pools"]["subject"]["count"] == 3 and settings["pools"]["edit"]["count"] == 4
    assert settings["bad_records"]["total"] == 1 and settings["bad_records"]["by_reason"] == {
        "missing file": 1
    }
    assert settings["bad_records"]["listed"][0].startswith(f"{manifest}:{line}: record 3: missing file")
    assert settings["on_bad_record"] == "skip"
    shards = Shards.open({"input_dir": str(out)})
    assert shards.pool_sizes == {"edit": 4, "subject": 3, "subject_edit/add": 4, "subject_edit/replace": 4}


class _Fails(MakeItem):
    def _item(self, rec, index):
        if index == 20:  # in the third pool (pools are written in sorted order)
            raise OSError("disk went away")
        return super()._item(rec, index)


def test_an_interrupted_optimize_leaves_nothing_a_later_run_would_trust(demo, tmp_path, s3, monkeypatch):
    import datamodules.shard_writer as writer

    records = records_of(demo.world)
    t = transforms_of(demo.settings)
    monkeypatch.setattr(writer, "MakeItem", _Fails)  # forked workers inherit it
    kw = dict(transforms=t, image_format="png", workers=1, start_method="fork", chunk_bytes="4KB")
    out = tmp_path / "local"
    with pytest.raises(RuntimeError, match="record .*OSError: disk went away"):
        write_shards(records, str(out), **kw)
    assert not out.exists() and not list(tmp_path.glob(".local*"))  # the staging folder is gone too
    url = f"s3://{new_bucket(s3)}/shards"
    with pytest.raises(RuntimeError, match="disk went away"):
        write_shards(records, url, storage_options=s3, **kw)
    with pytest.raises(ShardsError) as error:
        Shards.open({"input_dir": url, "storage_options": s3})
    assert str(error.value) == f"{url}: {INCOMPLETE}"
    monkeypatch.undo()
    monkeypatch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(tmp_path / "optimizer_cache2"))
    monkeypatch.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(tmp_path / "optimizer_data2"))
    with pytest.raises(FileExistsError, match="is not empty.*--overwrite"):
        write_shards(records, url, storage_options=s3, **kw)
    write_shards(records, url, storage_options=s3, overwrite=True, **kw)
    assert Shards.open({"input_dir": url, "storage_options": s3}).pool_sizes["edit"] == 9


def test_shards_made_for_another_model_or_contract_are_refused_naming_the_key(demo, tmp_path):
    def variant(name: str, **changes) -> Path:
        copy = tmp_path / name
        shutil.copytree(demo.shards, copy)
        settings = json.loads((copy / "settings.json").read_text())
        (copy / "settings.json").write_text(json.dumps({**settings, **changes}))
        return copy

    def training(input_dir: Path, vae_identity: str | None = None) -> None:
        dm = TrainingDataModule(streaming={"input_dir": str(input_dir)})
        dm.setup("fit")
        dm.connect(
            resolution=32,
            vision_resolution=demo.settings["vision_resolution"],
            vision_mean=(0.5,) * 3,
            vision_std=(0.5,) * 3,
            max_images=4,
            vae_identity=vae_identity,
        )
        dm.train_dataloader()

    training(demo.shards)  # as made: accepted
    cases = {
        "resolution": (
            variant("res", resolution=64),
            "the shards were made for resolution=64, this run needs resolution=32",
        ),
        "prompt": (
            variant("prompt", prompt_version=0),
            "made for prompt_version=0, this run needs prompt_version=1",
        ),
        "format": (
            variant("format", format_version=99),
            "made for format_version=99, this run needs format_version=1",
        ),
        "vae": (
            variant("vae", latents=True, vae_identity="another-autoencoder"),
            "made for vae_identity='another-autoencoder', this run needs vae_identity='this-one'",
        ),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(ShardsError) as error:
            training(path, vae_identity="this-one")
        assert message in str(error.value) and str(path / "settings.json") in str(error.value), name
    (missing := variant("missing")).joinpath("settings.json").unlink()
    with pytest.raises(ShardsError, match="incomplete shards: no settings.json .* --overwrite"):
        training(missing)
    pickled = variant("pickled")
    index = json.loads((pickled / "edit" / "index.json").read_text())
    index["config"]["data_format"][0] = "pickle"
    (pickled / "edit" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardsError, match=r"edit/index.json: items stored as \['pickle'\]"):
        training(pickled)
    unweighted = TrainingDataModule(streaming={"input_dir": str(demo.shards)}, task_weights={"subject": 1.0})
    with pytest.raises(
        ManifestError, match=r"no weight for pool\(s\) \['edit', 'subject_edit/add', 'subject_edit/"
    ):
        unweighted.setup("fit")  # before the model is built, as for manifests


def test_the_http_endpoint_switch_still_exists_in_litdata(monkeypatch):
    """obstore refuses http:// endpoints; ``allow_plain_http`` sets a private litdata attribute.
    A litdata that renames it must fail here (and in the function, loudly), not as a refused scheme."""
    from litdata.streaming import downloader

    assert isinstance(downloader._OBSTORE_CLIENT_OPTIONS, dict)
    monkeypatch.setattr(downloader, "_OBSTORE_CLIENT_OPTIONS", {})
    allow_plain_http({"endpoint_url": "https://s3.example.com"})
    assert downloader._OBSTORE_CLIENT_OPTIONS == {}  # only for plain http
    allow_plain_http({"endpoint_url": "http://127.0.0.1:9000"})
    assert downloader._OBSTORE_CLIENT_OPTIONS == {"allow_http": True}
    monkeypatch.delattr(downloader, "_OBSTORE_CLIENT_OPTIONS")
    with pytest.raises(RuntimeError, match="_OBSTORE_CLIENT_OPTIONS is gone"):
        allow_plain_http({"endpoint_url": "http://127.0.0.1:9000"})


# ------------------------------------------------------------------------------------- mixing
class _PoolStream:
    """Stands in for a pool's StreamingDataLoader: numbered items of one pool, passes of ``size``."""

    def __init__(self, pool: str, size: int):
        self.pool, self.size = pool, size

    def __iter__(self):
        return iter(
            {"index": i, "has_source": False, "instruction": self.pool, "task": "subject", "ref_pixels": []}
            for i in range(self.size)
        )

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _mixer(rank: int = 0, world_size: int = 1, seed: int = 0, samples: int = 10_000) -> PoolMixer:
    keys, probs = pool_probabilities(DEFAULT_WEIGHTS)
    return PoolMixer(
        [_PoolStream(k, 7) for k in keys],
        keys,
        probs,
        batch_size=8,
        samples_per_epoch=samples,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shards_id="x",
    )


def test_a_streaming_state_for_other_settings_or_another_loader_is_refused_naming_the_key():
    state = _mixer(seed=0).state_dict()
    with pytest.raises(ValueError, match="streaming state is for seed=0, this run has seed=1"):
        _mixer(seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="state is for world_size=1, this run has world_size=2"):
        _mixer(rank=1, world_size=2).load_state_dict(state)
    file_loader_state = {"epoch": 0, "consumed": 16, "seed": 0, "num_samples": 100}
    with pytest.raises(ValueError, match=r"is not the streaming loader's \(made with data.manifests"):
        _mixer().load_state_dict(file_loader_state)
    # and the reverse: the file loader's sampler given a streaming checkpoint's state
    sampler = TaskBalancedSampler(
        {"subject": list(range(8)), "edit": list(range(8, 16))},
        DEFAULT_WEIGHTS | {"subject_edit/add": 0, "subject_edit/replace": 0},
        seed=0,
    )
    with pytest.raises(ValueError, match=r"is not the task sampler's \(made with data.streaming"):
        sampler.load_state_dict(state)


def test_the_pool_mix_is_within_001_of_the_weights_over_20000_samples_on_2_ranks():
    keys, _ = pool_probabilities(DEFAULT_WEIGHTS)
    counts = dict.fromkeys(keys, 0)
    for rank in range(2):
        for batch in _mixer(rank=rank, world_size=2):
            for pool in batch["instruction"]:
                counts[pool] += 1
    deviation = max(abs(counts[k] / 20_000 - DEFAULT_WEIGHTS[k]) for k in keys)
    print(f"pool mix over 20,000 samples on 2 ranks: {counts}, largest deviation {deviation:.4f}")
    assert sum(counts.values()) == 20_000 and deviation <= 0.01


def test_each_rank_streams_a_disjoint_share_of_every_pool(demo, monkeypatch):
    """litdata splits each pool between the ranks (here told by WORLD_SIZE / GLOBAL_RANK): one pass
    of every pool on rank 0 and on rank 1 share no record, and together cover the pool."""
    t = transforms_of(demo.settings)
    passes = {}
    for rank in range(2):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        mixer = streaming_loader(
            Shards.open({"input_dir": str(demo.shards)}),
            transforms=t,
            task_weights=DEFAULT_WEIGHTS,
            batch_size=2,
            num_workers=0,
            samples_per_epoch=8,
            seed=0,
            rank=rank,
            world_size=2,
        )
        passes[rank] = {
            key: {item["index"] for item in loader}
            for key, loader in zip(mixer.keys, mixer.loaders, strict=True)
        }
    for key in passes[0]:
        assert passes[0][key] and passes[1][key] and not passes[0][key] & passes[1][key], key
        assert len(passes[0][key] | passes[1][key]) >= 8  # 9 records: drop_last leaves one out


# -------------------------------------------------------------------------------- exact resume
class _SeenIndices(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return (self.w - batch["target"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_resume_from_an_epochs_last_step_continues_with_the_next_epoch(demo, tmp_path):
    """A checkpoint on the last step of an epoch (4 steps per epoch here): the resumed run's next
    batches are the uninterrupted run's, across two more epochs (loader workers on)."""

    def fit(ckpt_path: str | None = None) -> list[list[int]]:
        dm = TrainingDataModule(
            streaming={"input_dir": str(demo.shards)},
            batch_size=4,
            samples_per_epoch=16,
            seed=1,
            num_workers=1,
        )
        dm.connect(
            resolution=32,
            vision_resolution=demo.settings["vision_resolution"],
            vision_mean=(0.5,) * 3,
            vision_std=(0.5,) * 3,
        )
        module = _SeenIndices()
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
        trainer = L.Trainer(
            max_steps=12,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[checkpoints],
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module.seen

    full = fit()
    resumed = fit(str(tmp_path / "ck" / "epoch=0-step=4.ckpt"))
    assert len(full) == 12 and resumed == full[4:]
    assert full[4:8] != full[:4]  # the next epoch draws other pools and samples


def _fit_overlay(
    path: Path, *, url: str, s3: dict, cache: Path, log: Path, stall_at: int | None, workers: int
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_steps": 12,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "limit_val_batches": 0,
                    "callbacks": [
                        {
                            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {
                                "save_last": True,
                                "every_n_train_steps": 3,
                                "save_top_k": -1,
                            },
                        },
                        {
                            "class_path": "tests.helpers.streaming.StepLog",
                            "init_args": {"out": str(log), "stall_at": stall_at},
                        },
                    ],
                },
                "data": {
                    # 4 steps per epoch: the checkpoint at step 6 is mid-epoch, the resumed run
                    # crosses the boundary at step 8
                    "streaming": {"input_dir": url, "storage_options": s3, "cache_dir": str(cache)},
                    "batch_size": 4,
                    "samples_per_epoch": 16,
                    "num_workers": workers,
                },
                "model": {"warmup_steps": 2},
            }
        )
    )
    return path


def _fit(overlay: Path, cwd: Path, log: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "mige_lightning", "fit", *MODEL, "--data.synthetic=null"]
    command += ["--config", str(overlay), *extra]
    with log.open("w") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill_then_resume(root: Path, s3: dict, *, ranks: int, workers: int) -> None:
    url = f"s3://{new_bucket(s3)}/demo"
    settings = main(
        ["optimize-data", *MODEL, *world_args(root / "world"), "--output", url]
        + ["--storage-options", json.dumps(s3), "--image-format", "png", *FAST]
    )
    assert "testing" not in json.dumps(settings)  # the credentials are not recorded
    extra = [f"--trainer.devices={ranks}"] + (["--trainer.strategy=ddp"] if ranks > 1 else [])
    killed_log, resumed_log = root / "killed_steps", root / "resumed_steps"
    overlay = _fit_overlay(
        root / "killed.yaml",
        url=url,
        s3=s3,
        cache=root / "cache",
        log=killed_log,
        stall_at=9,
        workers=workers,
    )
    proc = _fit(overlay, root, root / "killed.log", *extra)
    deadline = time.time() + 400
    while not (killed_log / "stalled").exists():
        assert proc.poll() is None, (root / "killed.log").read_text()[-4000:]
        assert time.time() < deadline, (root / "killed.log").read_text()[-4000:]
        time.sleep(0.2)
    time.sleep(0.5)  # the other rank reaches its step too
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9, every rank
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert (root / "runs/demo/version_0/checkpoints/last.ckpt").is_file()  # the demo's logger folder
    overlay = _fit_overlay(
        root / "resumed.yaml",
        url=url,
        s3=s3,
        cache=root / "cache",
        log=resumed_log,
        stall_at=None,
        workers=workers,
    )
    proc = _fit(overlay, root, root / "resumed.log", *extra, "--ckpt_path=last")
    assert proc.wait(timeout=400) == 0, (root / "resumed.log").read_text()[-4000:]
    for rank in range(ranks):
        killed, resumed = read_rows(killed_log, rank), read_rows(resumed_log, rank)
        assert [r["step"] for r in killed] == list(range(1, 10))  # up to the stall
        assert [r["step"] for r in resumed] == list(range(7, 13))  # from the step-6 checkpoint
        for got, want in zip(resumed[:3], killed[6:9], strict=True):  # steps 7, 8, 9
            assert got["index"] == want["index"], (rank, got, want)  # the same next samples
            assert abs(got["loss"] - want["loss"]) <= 1e-6, (rank, got, want)  # the same losses
        assert len({round(r["loss"], 6) for r in killed}) > 1
    if ranks == 2:  # the ranks train on different samples
        assert read_rows(killed_log, 0)[0]["index"] != read_rows(killed_log, 1)[0]["index"]


@pytest.mark.slow
def test_a_fit_from_s3_killed_with_sigkill_resumes_exactly(tmp_path, s3):
    _kill_then_resume(tmp_path, s3, ranks=1, workers=2)


@pytest.mark.slow
def test_a_two_rank_fit_from_s3_killed_with_sigkill_resumes_exactly_on_both_ranks(tmp_path, s3):
    _kill_then_resume(tmp_path, s3, ranks=2, workers=0)

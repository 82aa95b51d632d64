"""The training data module (``fit`` / ``validate``): manifests → validated records →
task-balanced, resumable batches; held-out records → Lightning's validation loop.

The model late-binds its image sizes, reference limit and VAE identity through ``connect()``
(called from the LightningModule's ``configure_model``), so data and model cannot disagree.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from datamodules.base import MIGEDataModule
from datamodules.dataset import MIGEDataset, collate
from datamodules.heldout import HeldOutBatches, RankLocalSampler, shard_heldout
from datamodules.latent_cache import LatentCache, StaleCacheError, missing_from_cache
from datamodules.records import ManifestError, Problem, Record, read_manifest
from datamodules.streaming import Shards, check_streaming_spec, streaming_loader
from datamodules.task_sampler import DEFAULT_WEIGHTS, TaskBalancedSampler, check_pool_weights
from datamodules.validation import check_records, resolve_problems
from mige_lightning.generate import SamplingBatch
from mige_lightning.transforms import Transforms
from mige_world.synthetic import DEFAULT_WORLD_ROOT

log = logging.getLogger(__name__)


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning checkpoints (its ``_Stateful`` protocol): the state is the task
    sampler's position, counted from batches that reached the training step, so prefetching by
    Lightning or by worker processes does not shift where a resumed run continues."""

    def __init__(self, *args, **kwargs):
        # its own generator: starting an epoch's iterator draws a seed for the workers, and from
        # the global generator that draw would fall after a checkpoint taken on an epoch's last
        # step in the uninterrupted run but before the restored RNG state in the resumed one
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if isinstance(self.sampler, TaskBalancedSampler):  # worker seeds: a function of (seed, epoch)
            self.generator.manual_seed(self.sampler.seed * 1_000_003 + self.sampler.epoch)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        # Lightning swaps in a SequentialSampler for overfit_batches: nothing to resume then
        return self.sampler.state_dict() if isinstance(self.sampler, TaskBalancedSampler) else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and isinstance(self.sampler, TaskBalancedSampler):
            self.sampler.load_state_dict(state)


MANIFEST_SPEC_KEYS = ("path", "task", "subtask", "base")


def check_manifest_spec(spec: Any, index: int, *, key: str = "data.manifests") -> dict[str, Any]:
    """One ``{path, task, subtask, base}`` entry: a typo'd key (``bas:``) is an error, not ignored."""
    if not isinstance(spec, dict) or not spec.get("path"):
        raise ValueError(f"{key}[{index}]: expected {{path: …, task: …, subtask: …, base: …}}, got {spec!r}")
    unknown = sorted(set(spec) - set(MANIFEST_SPEC_KEYS))
    if unknown:
        raise ValueError(
            f"{key}[{index}]: unknown key(s) {unknown}; expected some of {list(MANIFEST_SPEC_KEYS)}"
        )
    if spec.get("base") is not None and not Path(str(spec["base"])).expanduser().is_dir():
        raise FileNotFoundError(f"{key}[{index}].base: folder '{spec['base']}' does not exist")
    return dict(spec)


class TrainingDataModule(MIGEDataModule):
    """Args:
    manifests: ``[{path: edit.json, task: edit, subtask: null, base: null}, …]``; ``task`` may
        instead come from each record's ``task`` field; ``base``: the folder the manifest's relative
        paths resolve against (e.g. the dataset root, as the authors' files are written), default
        the manifest's own folder; images must stay inside it (or inside ``root`` when given).
    synthetic: ``{root: data/demo, num_samples: 320, size: 32, seed: 0}`` — generate the synthetic
        world on first use and train on its ``train`` split. A later config file's ``synthetic`` is
        merged into the earlier one key by key (logged: ``mige_cli/config_overlays.py``).
    root: data root every image path must stay inside; default: each manifest's ``base``.
    task_weights: sampling weight per pool (``subject``, ``edit``, ``subject_edit/add``,
        ``subject_edit/replace``; ``subject_edit`` for records without a subtask). A distribution,
        given whole: a later config file's weights replace the earlier ones, and a warning names the
        pools they leave out (give those weight 0 to leave them out on purpose).
    samples_per_epoch: per rank; default: all records / world size.
    seed: the sampler's seed (the stream is a function of seed, epoch and rank).
    on_bad_record: ``error`` (one report of every bad record) or ``skip`` (drop, log counts).
    check_images: decode every image during validation (catches truncated files up front); false
        skips the decode only: every image must still be a regular file (missing ones are bad records).
    latent_cache: directory of latent caches (``cache-latents``); used when it holds one for this VAE.
    streaming: ``{input_dir: DIR or s3://bucket/prefix, storage_options: {endpoint_url: …}, cache_dir: …}``
        — train on the shards ``optimize-data`` wrote (``datamodules/streaming.py``) instead of
        ``manifests`` / ``synthetic``'s train split (``manifests`` may then be empty;
        ``latent_cache`` is not used: the shards carry their latents). Shards made for another
        resolution, autoencoder (latents), prompt contract or format are refused. The pools are
        mixed at ``task_weights`` by the sampler's pool-choice stream; ``num_workers`` is shared
        between the pools' loaders by weight (at least one each). Validation is unchanged. A later
        config file's ``streaming`` is merged into the earlier one key by key.
    val_manifests: held-out records for Lightning's validation loop (sampled in the module's
        ``validation_step``, scored by ``callbacks.validation_metrics.ValidationMetrics``); with
        ``synthetic``, its ``heldout`` split is added. When and how much: ``trainer.val_check_interval``
        / ``check_val_every_n_epoch`` / ``limit_val_batches``.
    val_per_task: the first this-many held-out records of each task (null: all).
    val_batch_size: held-out requests sampled together (one task per batch).
    """

    def __init__(
        self,
        manifests: list[dict[str, Any]] | None = None,
        *,
        synthetic: dict[str, Any] | None = None,
        root: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        task_weights: dict[str, float] | None = None,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        on_bad_record: str = "error",
        check_images: bool = True,
        latent_cache: str | None = None,
        streaming: dict[str, Any] | None = None,
        val_manifests: list[dict[str, Any]] | None = None,
        val_per_task: int | None = None,
        val_batch_size: int = 8,
        resolution: int | None = None,
        vision_resolution: int | None = None,
        vision_mean: tuple[float, float, float] | None = None,
        vision_std: tuple[float, float, float] | None = None,
    ):
        super().__init__(num_workers=num_workers)
        if not manifests and not synthetic and not streaming:
            raise ValueError(
                "data: give `manifests` or `synthetic` to train on, or `streaming` (shards from "
                "optimize-data) (predict: data.class_path datamodules.RequestDataModule; test: "
                "datamodules.BenchmarkDataModule)"
            )
        self.manifests = [check_manifest_spec(spec, i) for i, spec in enumerate(manifests or [])]
        self.synthetic = dict(synthetic) if synthetic else None
        self.root = root
        self.batch_size = batch_size
        self.task_weights = dict(task_weights or DEFAULT_WEIGHTS)
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.on_bad_record = on_bad_record
        self.check_images = check_images
        self.latent_cache = latent_cache
        self.streaming = check_streaming_spec(streaming) if streaming else None
        self.shards: Shards | None = None  # opened in setup
        self.bad_records: list[Problem] = []  # what validated_records dropped (skip mode)
        self.val_manifests = [
            check_manifest_spec(spec, i, key="data.val_manifests")
            for i, spec in enumerate(val_manifests or [])
        ]
        self.val_per_task = val_per_task
        self.val_batch_size = val_batch_size
        self.resolution = resolution
        self.vision_resolution = vision_resolution
        self.vision_mean = vision_mean
        self.vision_std = vision_std
        self.records: list[Record] = []
        self._parse_problems: list[Problem] = []
        self._validated = False
        self.sampler: TaskBalancedSampler | None = None

    # ------------------------------------------------------------------------------- wiring
    def connect(
        self, *, resolution: int, vision_resolution: int, vision_mean, vision_std, **settings
    ) -> None:
        """Late-bind the model's settings; an explicit conflicting image size is an error."""
        for name, value in (("resolution", resolution), ("vision_resolution", vision_resolution)):
            mine = getattr(self, name)
            if mine is not None and mine != value:
                raise ValueError(f"data.{name}={mine} but the model needs {value}")
            setattr(self, name, value)
        self.vision_mean = self.vision_mean or tuple(vision_mean)
        self.vision_std = self.vision_std or tuple(vision_std)
        super().connect(**settings)

    def manifest_specs(self) -> list[dict[str, Any]]:
        specs = list(self.manifests)
        if self.synthetic:
            from mige_world.synthetic import manifest_specs

            specs += manifest_specs(self.synthetic.get("root", DEFAULT_WORLD_ROOT), "train")
        return specs

    @property
    def transforms(self) -> Transforms:
        if self.resolution is None or self.vision_resolution is None:
            raise RuntimeError("data.resolution is unset: call connect() (the MIGE module does) or set it")
        return Transforms(self.resolution, self.vision_resolution, self.vision_mean, self.vision_std)

    # ------------------------------------------------------------------------------- stages
    def prepare_data(self) -> None:
        if self.synthetic:
            from mige_world.synthetic import generate

            spec = dict(self.synthetic)
            root = Path(spec.pop("root", DEFAULT_WORLD_ROOT))
            if not (root / "world.json").is_file():
                generate(root, **spec)

    def setup(self, stage: str | None = None) -> None:
        if self.streaming is not None:  # training batches from shards: no manifest is read for them
            if self.shards is None and stage in (None, "fit"):  # validate needs only the held-out records
                self.shards = Shards.open(self.streaming)  # complete, this format and prompt contract
                if stage == "fit":
                    self.check_pools()
            return
        if self.records or self._parse_problems:
            return
        self._read_manifests()
        if stage == "fit":
            # pools vs. weights now, from the parsed records: Lightning builds the model
            # (configure_model) after setup, and at paper size that takes minutes
            self.check_pools()

    def _read_manifests(self) -> None:
        if self.records or self._parse_problems:
            return
        for spec in self.manifest_specs():
            records, problems = read_manifest(
                spec["path"], task=spec.get("task"), subtask=spec.get("subtask"), base=spec.get("base")
            )
            self.records.extend(records)
            self._parse_problems.extend(problems)

    def check_pools(self) -> None:
        """Every pool the records fall into has a weight, every weighted pool has records
        (the sampler checks again after bad records are dropped)."""
        sizes: dict[str, int] = defaultdict(int)
        for rec in self.records:
            sizes[rec.pool] += 1
        if self.shards is not None:
            sizes = defaultdict(int, self.shards.pool_sizes)
        world = self.trainer.world_size if self.trainer is not None else 1
        try:
            check_pool_weights(sizes, self.task_weights, world)
        except ValueError as e:
            raise ManifestError(f"{e} (pools found: {dict(sizes)}){self._unpooled()}") from None

    def _unpooled(self) -> str:
        """The records that reached no pool because they are bad, for the pool check's message:
        those without a task first (the authors' files have no ``task`` field: the manifest's
        ``task`` in ``data.manifests`` gives it; nothing guesses it)."""
        no_task = [p for p in self._parse_problems if p.kind == "missing task"]
        others = Counter(p.kind for p in self._parse_problems if p.kind != "missing task")
        parts = []
        if no_task:
            specs = [
                f"data.manifests[{i}].task"
                for i, spec in enumerate(self.manifests)
                if any(p.origin.startswith(f"{Path(spec['path'])}:") for p in no_task)
            ]
            parts.append(
                f"{len(no_task)} record(s) have no 'task' field and no task in data.manifests, e.g. "
                f"{', '.join(p.origin for p in no_task[:3])}: give {' / '.join(specs) or 'the manifest its task'} "
                "(`inspect-manifest` shows each record's task by its shape)"
            )
        if others:
            kinds = ", ".join(f"{kind}: {n}" for kind, n in others.most_common())
            parts.append(f"{sum(others.values())} other bad record(s) ({kinds})")
        return "".join(f"; {part}" for part in parts)

    def validated_records(self) -> list[Record]:
        """Every record checked once (paths, reference count, images); bad ones reported or skipped."""
        if self._validated:
            return self.records
        self._read_manifests()
        good, problems = [], list(self._parse_problems)
        by_manifest: dict[str, list[Record]] = defaultdict(list)
        for rec in self.records:
            by_manifest[rec.manifest].append(rec)
        for records in by_manifest.values():
            root = Path(self.root) if self.root else Path(records[0].base)
            ok, bad = check_records(
                records, root=root, max_images=self.max_images, check_images=self.check_images
            )
            good += ok
            problems += bad
        self.records = resolve_problems(good, problems, on_bad_record=self.on_bad_record)
        self.bad_records = problems
        self._validated = True
        return self.records

    def output_judge(self):
        """The synthetic world's pixel judge of held-out outputs (validation scores with it); None
        without ``synthetic``."""
        if not self.synthetic:
            return None
        from mige_world.scene_judge import SceneJudge

        return SceneJudge(self.synthetic.get("root", DEFAULT_WORLD_ROOT), "heldout")

    def val_records(self) -> list[Record]:
        """Held-out records (``val_manifests`` + the synthetic world's held-out split); bad ones are an error."""
        specs = list(self.val_manifests)
        if self.synthetic:
            from mige_world.synthetic import manifest_specs

            specs += manifest_specs(self.synthetic.get("root", DEFAULT_WORLD_ROOT), "heldout")
        records, problems = [], []
        for spec in specs:
            recs, probs = read_manifest(
                spec["path"], task=spec.get("task"), subtask=spec.get("subtask"), base=spec.get("base")
            )
            records += recs
            problems += probs
        return resolve_problems(records, problems, on_bad_record=self.on_bad_record) if problems else records

    def _cache(self) -> LatentCache | None:
        if self.latent_cache is None:
            return None
        if self.vae_identity is None:
            raise RuntimeError(
                "data.latent_cache is set but the model's VAE identity is unknown: call connect()"
            )
        cache = LatentCache.find(
            self.latent_cache,
            vae_identity=self.vae_identity,
            resolution=self.resolution,
            vision_resolution=self.vision_resolution,
        )
        if cache is None:
            log.warning("no latent cache in %s yet: encoding images on the fly", self.latent_cache)
            return None
        missing = missing_from_cache(cache, self.records)
        if missing:
            raise StaleCacheError(
                f"latent cache {cache.directory} lacks {len(missing)} image(s), e.g. {missing[:3]}; "
                "rerun `python -m mige_lightning cache-latents`"
            )
        return cache

    def train_dataloader(self) -> DataLoader:
        if self.streaming is not None:
            return self._streaming_loader()
        records = self.validated_records()
        pools: dict[str, list[int]] = defaultdict(list)
        for i, rec in enumerate(records):
            pools[rec.pool].append(i)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        try:
            self.sampler = TaskBalancedSampler(
                pools,
                self.task_weights,
                num_samples=self.samples_per_epoch,
                num_replicas=world,
                rank=rank,
                seed=self.seed,
            )
        except ValueError as e:
            raise ManifestError(f"{e} (pools found: { {k: len(v) for k, v in pools.items()} })") from None
        return ResumableDataLoader(
            MIGEDataset(records, self.transforms, cache=self._cache()),
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )

    @property
    def streams_latents(self) -> bool:
        """Whether the training shards carry latents (the model then hands over its VAE identity)."""
        return self.shards is not None and self.shards.latents

    def _streaming_loader(self):
        """The training batches from ``data.streaming``'s shards (``datamodules/streaming.py``)."""
        self.setup()
        t = self.transforms
        self.shards.check_model(
            resolution=t.resolution, vision_resolution=t.vision_resolution, vae_identity=self.vae_identity
        )
        slots = self.shards.settings["reference_slots"]
        if self.max_images is not None and slots > self.max_images:
            raise ValueError(
                f"{self.shards.where}: the shards hold up to {slots} reference image(s) per record; "
                f"the model allows {self.max_images}"
            )
        self.check_pools()  # the pools' sizes against data.task_weights and the world size
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return streaming_loader(
            self.shards,
            transforms=t,
            task_weights=self.task_weights,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            samples_per_epoch=self.samples_per_epoch,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )

    def val_dataloader(self) -> DataLoader | list:
        """This rank's held-out batches (``datamodules/heldout.py``); none without held-out records."""
        records = self.val_records()
        if not records:
            return []
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        batches = shard_heldout(
            records, world=world, rank=rank, batch_size=self.val_batch_size, per_task=self.val_per_task
        )
        return DataLoader(
            HeldOutBatches(batches),
            batch_size=None,
            sampler=RankLocalSampler(len(batches)),
            collate_fn=SamplingBatch,
        )

    # ---------------------------------------------------------------------------- resumption
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # called for the batch the training step is about to consume (not for prefetched ones)
        if self.sampler is not None and self.trainer is not None and self.trainer.training:
            self.sampler.advance(len(batch["task"]))
        return batch

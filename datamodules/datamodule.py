"""LightningDataModule over one or more manifests (optionally generating the synthetic world)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from datamodules.dataset import MIGEDataset, collate
from datamodules.records import Record, read_manifest


class MIGEDataModule(L.LightningDataModule):
    """Args:
    manifests: ``[{path: edit.json, task: edit}, …]``; ``task`` is optional when records carry one.
    synthetic: ``{root: data/demo, num_samples: 300, size: 32, seed: 0}`` — generate that world on
        first use and read its manifest (used by the demo).
    resolution / vision_resolution / vision_mean / vision_std: left ``None``, they are set by the
        model through ``connect()`` so data and model cannot disagree.
    """

    def __init__(
        self,
        manifests: list[dict[str, Any]] | None = None,
        *,
        synthetic: dict[str, Any] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        resolution: int | None = None,
        vision_resolution: int | None = None,
        vision_mean: tuple[float, float, float] | None = None,
        vision_std: tuple[float, float, float] | None = None,
    ):
        super().__init__()
        if not manifests and not synthetic:
            raise ValueError("data: give `manifests` or `synthetic`")
        self.manifests = list(manifests or [])
        self.synthetic = synthetic
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.resolution = resolution
        self.vision_resolution = vision_resolution
        self.vision_mean = vision_mean
        self.vision_std = vision_std
        self.records: list[Record] = []

    def connect(self, *, resolution: int, vision_resolution: int, vision_mean, vision_std) -> None:
        """Late-bind the model's image sizes (litgpt-style); an explicit conflicting value is an error."""
        for name, value in (("resolution", resolution), ("vision_resolution", vision_resolution)):
            mine = getattr(self, name)
            if mine is not None and mine != value:
                raise ValueError(f"data.{name}={mine} but the model needs {value}")
            setattr(self, name, value)
        self.vision_mean = self.vision_mean or tuple(vision_mean)
        self.vision_std = self.vision_std or tuple(vision_std)

    def prepare_data(self) -> None:
        if self.synthetic:
            from datamodules.synthetic import generate

            spec = dict(self.synthetic)
            root = Path(spec.pop("root", "data/demo"))
            if not (root / "train.jsonl").is_file():
                generate(root, **spec)

    def _manifest_specs(self) -> list[dict[str, Any]]:
        specs = list(self.manifests)
        if self.synthetic:
            specs.append({"path": str(Path(self.synthetic.get("root", "data/demo")) / "train.jsonl")})
        return specs

    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        for spec in self._manifest_specs():
            self.records.extend(read_manifest(spec["path"], task=spec.get("task")))

    def train_dataloader(self) -> DataLoader:
        if self.resolution is None or self.vision_resolution is None:
            raise RuntimeError("data.resolution is unset: call connect() (the MIGE module does) or set it")
        dataset = MIGEDataset(
            self.records,
            resolution=self.resolution,
            vision_resolution=self.vision_resolution,
            vision_mean=self.vision_mean,
            vision_std=self.vision_std,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            drop_last=len(dataset) >= self.batch_size,
        )

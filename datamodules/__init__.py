"""The data layer: one data module per path (``datamodules/base.py``), chosen by ``data.class_path``."""

from datamodules.base import MIGEDataModule
from datamodules.benchmarks import BenchmarkDataModule
from datamodules.requests import RequestDataModule
from datamodules.training_data import TrainingDataModule

__all__ = ["BenchmarkDataModule", "MIGEDataModule", "RequestDataModule", "TrainingDataModule"]

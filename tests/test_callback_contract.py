"""Every callback in ``callbacks/`` keeps one contract: it is built from its YAML form (the CLI's
``trainer.callbacks`` entry), survives a second ``fit`` with the same instance, and does its work
as often per optimiser step with ``accumulate_grad_batches`` 2 as with 1 (the same samples per
step: half the batch, twice the micro-batches)."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import lightning as L
import pytest
import torch

import callbacks
from callbacks.ema import EMA
from mige_cli.main import main
from tests.helpers.training import FROM_SCRATCH, LinearModule, bare_trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # optimiser steps per fit; validation every 2 of them


def _all_callbacks() -> dict[str, type]:
    found = {}
    for info in pkgutil.iter_modules(callbacks.__path__):
        module = importlib.import_module(f"callbacks.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            # defined there, under its own name (not an alias such as SLURMRequeue)
            if issubclass(cls, L.Callback) and cls.__module__ == module.__name__ and cls.__name__ == name:
                found[f"callbacks.{info.name}.{name}"] = cls
    return found


def _counting(obj, method: str) -> list:
    calls = []
    original = getattr(obj, method)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, method, wrapped)
    return calls


# class path → (init_args of its YAML form, its work: a method whose calls are counted, or a
# function of the instance). Work a callback does not do during fit counts as 0.
CONTRACT = {
    "callbacks.ema.EMA": ({"decay": 0.9}, lambda cb: cb.num_updates),
    "callbacks.throughput.MFUMonitor": ({}, "_compute"),  # one throughput / MFU log
    "callbacks.validation_metrics.ValidationMetrics": ({"log_images": False}, "on_validation_epoch_end"),
    "callbacks.slurm_requeue.PreemptionCheckpoint": ({}, lambda cb: int(cb.checkpoint_path is not None)),
    "callbacks.prediction_writer.PredictionWriter": ({"output_dir": "predictions"}, "write_on_batch_end"),
    "callbacks.benchmark_report.BenchmarkReport": ({"output_dir": "eval"}, "on_test_epoch_end"),
}


WORKS_IN_FIT = {
    "callbacks.ema.EMA",
    "callbacks.throughput.MFUMonitor",
    "callbacks.validation_metrics.ValidationMetrics",
}


def test_every_callback_has_a_contract_entry():
    assert set(_all_callbacks()) == set(CONTRACT)


def _fit_twice(tmp_path, monkeypatch, class_path: str, accumulate: int) -> list[int]:
    """Two fits (STEPS, then STEPS more) with the same instance; its work after each."""
    tmp_path.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    init_args, work_of = CONTRACT[class_path]
    entry = [{"class_path": class_path, "init_args": init_args}]
    cli = main(
        [
            "--config",
            str(REPO / "configs/demo.yaml"),
            *FROM_SCRATCH,
            f"--trainer.callbacks={json.dumps(entry)}",
            f"--trainer.max_steps={STEPS}",
            f"--trainer.accumulate_grad_batches={accumulate}",
            f"--trainer.val_check_interval={2 * accumulate}",  # training batches: every 2 steps
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--data.batch_size={4 // accumulate}",
            "--model.overrides={resolution: 16}",  # the tiny preset at 16 px (its KL autoencoder)
            f"--data.synthetic={{root: {tmp_path.parent}/world, num_samples: 64, size: 16, seed: 0}}",
            "--data.val_per_task=1",
            "--model.eval_num_inference_steps=2",
            "--model.warmup_steps=1",
        ],
        run=False,
    )
    callback = next(
        c for c in cli.trainer.callbacks if type(c).__module__ + "." + type(c).__name__ == class_path
    )
    if isinstance(work_of, str):
        calls = _counting(callback, work_of)
        work = lambda: len(calls)  # noqa: E731
    else:
        work = lambda: work_of(callback)  # noqa: E731
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    first = work()
    cli.trainer.fit_loop.epoch_loop.max_steps = 2 * STEPS  # the same instance through fit start / end again
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 * STEPS
    return [first, work()]


@pytest.mark.slow
@pytest.mark.parametrize("class_path", sorted(CONTRACT))
def test_callback_contract(tmp_path, monkeypatch, class_path):
    one = _fit_twice(tmp_path / "k1", monkeypatch, class_path, 1)
    two = _fit_twice(tmp_path / "k2", monkeypatch, class_path, 2)
    assert one == two, f"{class_path}: work after each fit {one} with accumulation 1, {two} with 2"
    if class_path in WORKS_IN_FIT:  # and it did work, in both fits
        assert 0 < one[0] < one[1], one


def test_ema_weights_are_the_same_after_the_same_optimiser_steps(tmp_path):
    """Half the batch and 2 micro-batches per step: the same gradients (Lightning averages the
    micro-batch losses), so the same EMA — with the update once per optimiser step, not per batch."""
    shadows = []
    for accumulate, batch in ((1, 4), (2, 2)):
        torch.manual_seed(0)
        module = LinearModule()
        module.train_dataloader = lambda b=batch: torch.utils.data.DataLoader(
            torch.linspace(-1, 1, 64)[:, None], batch_size=b
        )
        ema = EMA(decay=0.5, warmup=False)
        bare_trainer(tmp_path, max_steps=6, accumulate_grad_batches=accumulate, callbacks=[ema]).fit(module)
        assert ema.num_updates == 6
        shadows.append(ema.shadow)
    for name in shadows[0]:
        torch.testing.assert_close(shadows[0][name], shadows[1][name], rtol=1e-6, atol=1e-7)

"""Validation through Lightning's loop: held-out batches shared out so every rank runs the same
forwards and every record is scored once (``datamodules/heldout.py``), metrics logged through
``pl_module.log`` (so ``ModelCheckpoint`` can monitor them), on any number of ranks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from datamodules.heldout import shard_heldout
from datamodules.records import Record
from mige_cli.main import main
from mige_lightning.prompt import Task
from tests.conftest import FROM_SCRATCH
from tests.fsdp_probe import cli_env, fit_command

REPO = Path(__file__).resolve().parents[1]


def _record(task: Task, i: int) -> Record:
    return Record(
        task=task,
        target=Path(f"{task.value}{i}.png"),
        instruction=f"{task.value} {i}",
        references=(),
        source=None,
        origin=f"m.json:{i + 1}: record {i + 1}",
    )


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("counts", [(1, 1, 1), (0, 7, 2), (4, 0, 9)])
def test_each_record_is_scored_once_and_ranks_run_the_same_batches(world, counts):
    records = [_record(t, i) for t, n in zip(Task, counts, strict=True) for i in range(n)]
    shards = [shard_heldout(records, world=world, rank=r, batch_size=2) for r in range(world)]
    shapes = [[(b[0].record.task, len(b)) for b in batches] for batches in shards]
    assert all(s == shapes[0] for s in shapes)  # same tasks, batches and sizes on every rank
    assert all(len({it.record.task for it in b}) == 1 for batches in shards for b in batches)
    scored = [it.record for batches in shards for b in batches for it in b if it.scored]
    assert sorted(scored, key=id) == sorted(records, key=id) and len(set(map(id, scored))) == len(records)


@pytest.mark.slow
def test_two_ranks_with_one_heldout_record_per_task_score_each_once(tmp_path):
    """Rank 1 has no record of its own; it runs the padding forwards and scores nothing. (Before
    Lightning's loop, the callback's ``metric.update([], [])`` crashed on ``torch.stack([])``.)"""
    probe = tmp_path / "probe"
    overlay = {
        "trainer": {
            "max_steps": 2,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "callbacks.ema.EMA", "init_args": {"decay": 0.9}},
                {"class_path": "callbacks.validation_metrics.ValidationMetrics"},
                {"class_path": "tests.fsdp_probe.ValidationProbe", "init_args": {"out": str(probe)}},
            ],
        },
        "data": {
            "synthetic": {"root": str(tmp_path / "world"), "num_samples": 48, "size": 16, "seed": 0},
            "batch_size": 2,
            "check_images": False,
            "val_per_task": 1,
        },
        "model": {
            "overrides": {"resolution": 16},
            "pretrained": {"tokenizer": "words", "t5": None},  # a from-scratch T5, as tests/fsdp_probe.py
            "warmup_steps": 1,
            "eval_num_inference_steps": 2,
        },
    }
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    with (tmp_path / "log").open("w") as out:
        proc = subprocess.run(
            fit_command(path), cwd=tmp_path, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, timeout=400
        )
    assert proc.returncode == 0, (tmp_path / "log").read_text()[-4000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    for task in ("subject", "edit", "subject_edit"):
        # each rank's own count of scored records; summed, exactly the one record of the task
        assert ranks[0]["counts"][task] + ranks[1]["counts"][task] == 1
        assert ranks[1]["counts"][task] == 0  # rank 1 had none of its own
        values = [r["logged"][f"val/{task}/l1"] for r in ranks]
        assert values[0] == values[1] and 0 < values[0] < 1  # the same synced value on both ranks
        assert f"val/{task}/scene_acc" in ranks[0]["logged"]


@pytest.mark.slow
def test_checkpoint_keeps_the_best_by_val_edit_l1_under_accumulation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "monitor": "val/edit/l1",
                "mode": "min",
                "save_top_k": 1,
                "filename": "best-{step}",
            },
        },
        {"class_path": "callbacks.ema.EMA", "init_args": {"decay": 0.9}},
        {"class_path": "callbacks.validation_metrics.ValidationMetrics", "init_args": {"log_images": False}},
    ]
    cli = main(
        [
            "--config",
            str(REPO / "configs/demo.yaml"),
            *FROM_SCRATCH,
            "--trainer.max_steps=6",
            "--trainer.accumulate_grad_batches=2",
            "--trainer.val_check_interval=4",  # training batches: every 2 optimiser steps
            f"--trainer.callbacks={json.dumps(callbacks)}",
            "--trainer.enable_progress_bar=false",
            "--model.eval_num_inference_steps=2",
            "--model.warmup_steps=1",
            f"--data.synthetic={{root: {tmp_path}/world, num_samples: 64, size: 32, seed: 0}}",
            "--data.val_per_task=2",
            "--data.batch_size=2",  # 31 batches per epoch: no epoch end inside the run
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    values = [e.value for e in sorted(events.Scalars("val/edit/l1"), key=lambda e: e.step)]
    assert len(values) == 3  # after optimiser steps 2, 4 and 6 (batches 4, 8, 12)
    ckpt = cli.trainer.checkpoint_callback
    best = min(range(3), key=values.__getitem__)
    best_step = 2 * (best + 1)
    assert float(ckpt.best_model_score) == pytest.approx(values[best])
    assert Path(ckpt.best_model_path).name == f"best-step={best_step}.ckpt"
    # `validate` on that checkpoint: the same loop, the checkpoint's EMA weights, the same value
    results = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt.best_model_path)
    assert results[0]["val/edit/l1"] == pytest.approx(values[best], rel=1e-5)
    assert "step" not in results[0]  # the x-axis value is logged in fit only
    assert [p.name for p in Path(ckpt.dirpath).glob("*.ckpt")] == [f"best-step={best_step}.ckpt"]

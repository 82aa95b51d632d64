"""Validation through Lightning's loop: held-out batches shared out so every rank runs the same
forwards and every record is scored once (``datamodules/heldout.py``), metrics logged through
``pl_module.log`` (so ``ModelCheckpoint`` can monitor them), on any number of ranks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from datamodules.heldout import shard_heldout
from datamodules.records import Record
from mige_cli.main import main
from mige_lightning.images import load_rgb
from mige_lightning.prompt import Task
from tests.helpers.fsdp_probe import cli_env, fit_command
from tests.helpers.training import FROM_SCRATCH

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


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    from tests.helpers.metric_backbones import save_tiny_backbones

    return save_tiny_backbones(tmp_path_factory.mktemp("backbones"))


def test_validation_logs_clip_t_and_clip_dir_where_records_carry_captions(tmp_path, backbones):
    """CLIP-T and CLIPdir in the validation loop: logged for a task whose held-out records carry
    captions, absent for one whose records carry none, and equal to ``test``'s values (the
    benchmark evaluator) on the same images and captions — identical captions skipped by both."""
    from callbacks.validation_metrics import ValidationMetrics
    from datamodules.benchmarks import EvalItem
    from datamodules.heldout import HeldOutBatches, HeldOutItem
    from mige_lightning.evaluation import BenchmarkEvaluator

    def image(name, seed):
        path = tmp_path / name
        rng = np.random.default_rng(seed)
        PIL.Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        return path

    def rec(task, i, captions=(None, None), source=True):
        src = image(f"{task.value}{i}_src.png", 100 + i) if source else None
        return Record(
            task=task,
            target=image(f"{task.value}{i}.png", i),
            instruction=f"{task.value} {i}",
            references=(),
            source=src,
            origin=f"m.json:{i + 1}: record {i + 1}",
            input_caption=captions[0],
            output_caption=captions[1],
        )

    edits = [
        rec(Task.EDIT, 0, ("a red circle", "a blue circle")),
        rec(Task.EDIT, 1, ("a green square", "a green square")),  # no change described: skipped
        rec(Task.EDIT, 2, ("a pink background", "a large red circle on a pink background")),
        rec(Task.EDIT, 3),  # no captions: none of the caption metrics
    ]
    subject = [rec(Task.SUBJECT, 4, source=False)]  # no captions anywhere in this task
    subject_edit = [rec(Task.SUBJECT_EDIT, 5, (None, "a red circle and a blue square"))]  # no input
    padding = HeldOutItem(edits[0], 0, False)  # a copy that keeps ranks in step: never scored
    batches = HeldOutBatches(
        [
            [HeldOutItem(r, i, True) for i, r in enumerate(edits[:3])],
            [HeldOutItem(edits[3], 3, True), padding],
            [HeldOutItem(subject[0], 0, True)],
            [HeldOutItem(subject_edit[0], 0, True)],
        ]
    )
    outputs = {r.target: image(f"out{i}.png", 200 + i) for i, r in enumerate(edits + subject + subject_edit)}

    logged = {}
    pl_module = SimpleNamespace(
        hparams=SimpleNamespace(eval_metrics=backbones_cfg(backbones)),
        device=torch.device("cpu"),
        log=lambda name, value, **_: logged.__setitem__(name, value),
    )
    trainer = SimpleNamespace(
        datamodule=None, sanity_checking=False, is_global_zero=True, state=SimpleNamespace(fn="validate")
    )
    callback = ValidationMetrics(log_images=False)
    callback.setup(trainer, pl_module, "validate")
    callback.on_validation_epoch_start(trainer, pl_module)
    for i in range(len(batches)):
        batch = batches[i]
        generated = [SimpleNamespace(image=load_rgb(outputs[row.record.target])) for row in batch]
        callback.on_validation_batch_end(trainer, pl_module, generated, batch, i)
    callback.on_validation_epoch_end(trainer, pl_module)

    for task in ("edit", "subject", "subject_edit"):
        assert {f"val/{task}/{k}" for k in ("dino", "clip_i", "l1", "l2")} <= set(logged)
    assert {"val/edit/clip_t", "val/edit/clip_dir", "val/subject_edit/clip_t"} <= set(logged)
    assert not {"val/subject/clip_t", "val/subject/clip_dir", "val/subject_edit/clip_dir"} & set(logged)

    # test's path on the same images and captions, the items as the benchmark loaders write them
    # (Emu Edit: no CLIP-T caption where the two captions are the same)
    def scored(records, captions):
        evaluator = BenchmarkEvaluator(**backbones_cfg(backbones))
        items = [
            EvalItem(
                id=str(i),
                task=r.task,
                instruction=r.instruction,
                references=(),
                source=str(r.source) if r.source else None,
                reference=str(r.target),
                caption=c,
                input_caption=r.input_caption,
                output_caption=r.output_caption,
            )
            for i, (r, c) in enumerate(zip(records, captions, strict=True))
        ]
        evaluator.update(
            [load_rgb(outputs[r.target]) for r in records],
            items,
            [
                {"reference": load_rgb(r.target), "source": load_rgb(r.source) if r.source else None}
                for r in records
            ],
        )
        return {k: m.compute().item() for k, m in evaluator.model_metrics.items() if m.count > 0}

    edit = scored(edits, ["a blue circle", None, "a large red circle on a pink background", None])
    assert edit["clip_dir"] == pytest.approx(logged["val/edit/clip_dir"], abs=1e-6)
    assert edit["clip_t"] == pytest.approx(logged["val/edit/clip_t"], abs=1e-6)
    assert edit["l1"] == pytest.approx(logged["val/edit/l1"], abs=1e-6)
    assert (
        callback.metrics[Task.EDIT]["clip_t"].count == 2
        and callback.metrics[Task.EDIT]["clip_dir"].count == 2
    )
    other = scored(subject_edit, ["a red circle and a blue square"])
    assert other["clip_t"] == pytest.approx(logged["val/subject_edit/clip_t"], abs=1e-6)


def backbones_cfg(backbones: dict) -> dict:
    return {k: backbones[k] for k in ("dino", "clip_model", "clip_pretrained")}


@pytest.mark.slow
def test_two_ranks_with_one_heldout_record_per_task_score_each_once(tmp_path, backbones):
    """Rank 1 has no record of its own; it runs the padding forwards and scores nothing. (Before
    Lightning's loop, the callback's ``metric.update([], [])`` crashed on ``torch.stack([])``.)
    With tiny saved backbones, all six metrics: the world's held-out records carry captions."""
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
                {
                    "class_path": "tests.helpers.fsdp_probe.ValidationProbe",
                    "init_args": {"out": str(probe), "clip_cfg": backbones["clip_cfg"]},
                },
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
            "pretrained": {"tokenizer": "words", "t5": None},  # a from-scratch T5, as helpers/fsdp_probe.py
            "warmup_steps": 1,
            "eval_num_inference_steps": 2,
            "eval_metrics": backbones_cfg(backbones),
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
        # all six (CLIPdir needs a source: not for subject-driven generation), synced
        names = ("dino", "clip_i", "clip_t", "l1", "l2") + (("clip_dir",) if task != "subject" else ())
        for name in names:
            values = [r["logged"].get(f"val/{task}/{name}") for r in ranks]
            assert values[0] is not None and values[0] == values[1], (task, name, values)
        assert f"val/{task}/scene_acc" in ranks[0]["logged"]
    assert "val/subject/clip_dir" not in ranks[0]["logged"]


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

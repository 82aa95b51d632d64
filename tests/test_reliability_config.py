"""Configs and runs that used to change something silently: a dict in a config overlay dropping
the keys it did not name, ``fit --ckpt_path`` replacing the options given with the checkpoint's,
``predict`` overwriting a ``config.yaml`` in the current directory, and ``judge-synthetic``
scoring a partial predict run as if it were whole."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mige_cli.main import main
from tests.helpers.training import FROM_SCRATCH

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _parsed(monkeypatch, *args):
    """The parsed config (of the subcommand, if one is given): nothing instantiated or run."""
    from mige_cli.cli import MIGECLI

    built = []
    monkeypatch.setattr(MIGECLI, "instantiate_classes", lambda self: built.append(1))
    monkeypatch.setattr(MIGECLI, "_run_subcommand", lambda self, subcommand: None)
    args = [str(a) for a in args]
    sub = args[0] if args[0] in SUBCOMMANDS else None
    cli = main(args, run=sub is not None)
    return cli.config[sub] if sub else cli.config


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_dict_in_a_config_overlay_changes_only_the_keys_it_names(tmp_path, monkeypatch, caplog):
    """`--config demo.yaml --config overlay.yaml` with `model: {overrides: {resolution: 16}}` used
    to drop every other key of the demo's overrides (pixel autoencoder, patch size, T5 sizes…) and
    build another model. Now the overlay's dict is merged into the demo's, key by key (nested dicts
    too), and the log says what it changed."""
    demo = yaml.safe_load(DEMO.read_text())
    world = str(tmp_path / "world")
    overlay = _write(
        tmp_path / "overlay.yaml",
        {
            "model": {
                "overrides": {"resolution": 16, "dit": {"num_layers": 2}},
                "task_defaults": {"edit": {"guidance_scale": 2.0}},
            },
            "data": {"synthetic": {"root": world}},
        },
    )
    with caplog.at_level(logging.INFO):
        cfg = _parsed(monkeypatch, "--config", DEMO, "--config", overlay, *FROM_SCRATCH)
    overrides = copy.deepcopy(demo["model"]["overrides"])
    overrides["resolution"] = 16
    overrides["dit"]["num_layers"] = 2
    assert cfg.model.overrides == overrides
    task_defaults = copy.deepcopy(demo["model"]["task_defaults"])
    task_defaults["edit"]["guidance_scale"] = 2.0
    assert cfg.model.task_defaults == task_defaults
    assert cfg.data.init_args.synthetic == {**demo["data"]["synthetic"], "root": world}
    assert cfg.data.init_args.task_weights == demo["data"]["task_weights"]  # not named: kept
    # the decision is logged, naming the file, the key and each change
    assert f"{overlay}: model.overrides" in caplog.text
    assert "resolution: 32 → 16" in caplog.text and "dit.num_layers: 4 → 2" in caplog.text
    # a dotted key on the command line changes that key only, however deep
    cfg = _parsed(monkeypatch, "--config", DEMO, *FROM_SCRATCH, "--model.overrides.dit.num_layers=2")
    assert cfg.model.overrides == {**demo["model"]["overrides"], "dit": overrides["dit"]}
    # to replace a dict whole: null before the overlay
    cfg = _parsed(monkeypatch, "--config", DEMO, "--model.overrides=null", "--config", overlay, *FROM_SCRATCH)
    assert cfg.model.overrides == {"resolution": 16, "dit": {"num_layers": 2}, "train_text_encoder": True}


def test_timestep_sampling_merges_within_its_scheme_and_is_replaced_by_another(tmp_path, monkeypatch):
    """A scheme's arguments belong to it: an overlay naming the same (or no) scheme changes its
    arguments; one naming another scheme replaces the whole spec."""
    logit = _write(
        tmp_path / "logit.yaml",
        {"model": {"timestep_sampling": {"scheme": "logit_normal", "logit_mean": 1.0, "logit_std": 1.0}}},
    )
    mean = _write(tmp_path / "mean.yaml", {"model": {"timestep_sampling": {"logit_mean": 0.5}}})
    mode = _write(
        tmp_path / "mode.yaml", {"model": {"timestep_sampling": {"scheme": "mode", "mode_scale": 1.29}}}
    )
    cfg = _parsed(monkeypatch, "--config", DEMO, "--config", logit, "--config", mean, *FROM_SCRATCH)
    assert cfg.model.timestep_sampling == {"scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 1.0}
    cfg = _parsed(monkeypatch, "--config", DEMO, "--config", logit, "--config", mode, *FROM_SCRATCH)
    assert cfg.model.timestep_sampling == {"scheme": "mode", "mode_scale": 1.29}


def test_a_dict_that_replaces_the_earlier_one_names_the_keys_it_drops(tmp_path, monkeypatch):
    """Task weights are a distribution: an overlay's weights replace the earlier ones whole, and a
    warning names the pools that lost their weight. A whole dict typed on the command line is the
    value the user means (dotted keys change single keys): it replaces too, and says so."""
    weights = _write(tmp_path / "weights.yaml", {"data": {"task_weights": {"subject": 1.0, "edit": 0.0}}})
    with pytest.warns(
        UserWarning, match=r"data\.task_weights.*dropp.*'subject_edit/add', 'subject_edit/replace'"
    ):
        cfg = _parsed(monkeypatch, "--config", DEMO, "--config", weights, *FROM_SCRATCH)
    assert cfg.data.init_args.task_weights == {"subject": 1.0, "edit": 0.0}
    with pytest.warns(UserWarning, match=r"--model\.overrides.*dropp.*'dit'.*'vae'"):
        cfg = _parsed(monkeypatch, "--config", DEMO, *FROM_SCRATCH, "--model.overrides={resolution: 16}")
    assert cfg.model.overrides == {"resolution": 16}


def _checkpoint(monkeypatch, path: Path, *args) -> Path:
    """A checkpoint file whose saved hyper-parameters are those fit would save for this config."""
    import lightning as L

    hparams = _parsed(monkeypatch, *args).model.as_dict()
    ckpt = {
        "epoch": 0,
        "global_step": 7,
        "pytorch-lightning_version": L.__version__,
        "state_dict": {},
        "hyper_parameters": {**hparams, "_instantiator": "lightning.pytorch.cli.instantiate_module"},
    }
    torch.save(ckpt, path)
    return path


def test_fit_resume_refuses_options_that_differ_from_the_checkpoint(tmp_path, monkeypatch):
    """`fit --ckpt_path X --model.lr 0.5` trained at the checkpoint's lr, and a changed
    architecture was replaced by the checkpoint's, without a word. A resumed run continues the
    checkpoint's run: a different recipe or architecture is refused before anything is built,
    naming each key with both values; sampling and engineering options given are applied."""
    monkeypatch.chdir(tmp_path)
    config = ["--config", DEMO, *FROM_SCRATCH, "--trainer.logger=false"]
    ckpt = _checkpoint(monkeypatch, tmp_path / "run.ckpt", *config)
    with pytest.raises(ValueError) as err:
        _parsed(
            monkeypatch,
            "fit",
            *config,
            "--model.lr=0.5",
            "--model.overrides.dit.num_layers=2",
            "--ckpt_path",
            ckpt,
        )
    message = str(err.value)
    assert str(ckpt) in message
    assert "model.lr: the checkpoint's 0.0003, given 0.5" in message
    assert "model.overrides.dit.num_layers: the checkpoint's 4, given 2" in message
    assert "model.init_weights" in message  # how to start a new run from it instead
    # the same config resumes silently; sampling / engineering options given are the ones used
    cfg = _parsed(
        monkeypatch,
        "fit",
        *config,
        "--model.sampler=ddim",
        "--model.gradient_checkpointing=true",
        "--ckpt_path",
        ckpt,
    )
    assert cfg.model.sampler == "ddim" and cfg.model.gradient_checkpointing is True
    assert cfg.model.lr == 3e-4
    # a sharded checkpoint (a folder, whose hyper-parameters LightningCLI does not read) alike
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    torch.save({"global_step": 7, "hyper_parameters": hparams}, sharded / "meta.pt")
    with pytest.raises(ValueError, match=r"model\.lr: the checkpoint's 0\.0003, given 0\.5"):
        _parsed(monkeypatch, "fit", *config, "--model.lr=0.5", "--ckpt_path", sharded)
    assert _parsed(monkeypatch, "fit", *config, "--ckpt_path", sharded).model.lr == 3e-4


def test_predict_writes_its_config_beside_its_predictions_never_into_the_cwd(tmp_path, monkeypatch):
    """LightningCLI saved (and, with overwrite, replaced) `config.yaml` in the current directory on
    every predict run. It now goes into the writer's output_dir, and a config.yaml there that no
    run wrote is not replaced unless the writer's `overwrite` is set."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine: true\n")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "ref.png")
    request = {"id": "a", "task": "subject", "instruction": "a <imagehere>", "images": ["ref.png"]}
    (tmp_path / "req.jsonl").write_text(json.dumps({**request, "num_inference_steps": 1}) + "\n")

    def predict(out: Path, *extra: str):
        main(
            [
                "predict",
                "--config",
                str(DEMO),
                "--config",
                str(REPO / "configs/predict/demo.yaml"),
                *FROM_SCRATCH,
                "--data.requests=req.jsonl",
                f"--trainer.callbacks.init_args.output_dir={out}",
                "--trainer.enable_progress_bar=false",
                *extra,
            ]
        )

    predict(tmp_path / "out")
    assert (tmp_path / "config.yaml").read_text() == "mine: true\n"
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["data"]["class_path"] == "datamodules.RequestDataModule"
    assert (tmp_path / "out" / "predictions.jsonl").is_file()
    # a folder holding a config.yaml of the user's: refused before anything is written
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("mine: true\n")
    with pytest.raises(FileExistsError, match=rf"{mine / 'config.yaml'}.*overwrite"):
        predict(mine, "--trainer.callbacks.init_args.overwrite=false")
    assert (mine / "config.yaml").read_text() == "mine: true\n"
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"]


def test_judging_a_partial_predict_run_fails_unless_allowed(tmp_path, capsys):
    """16 predictions of 120 held-out requests were judged as n = 16 with rc 0 and no word about the
    104 missing. Now it is an error naming how many and which, unless --allow-missing, when the
    table is printed with the counts and a warning names the missing ones."""
    from mige_world.scene_judge import load_truth
    from mige_world.synthetic import generate

    world, predictions = tmp_path / "w", tmp_path / "p"
    generate(world, num_samples=8, size=32)
    truth = load_truth(world)
    first = next(iter(truth))
    predictions.mkdir()
    shutil.copy(truth[first].target, predictions / f"{first}.png")
    (predictions / "predictions.jsonl").write_text(json.dumps({"id": first, "file": f"{first}.png"}) + "\n")
    missing = [i for i in truth if i != first]
    args = ["judge-synthetic", "--world", str(world), "--predictions", str(predictions)]
    with pytest.raises(ValueError, match=rf"{len(missing)} of {len(truth)} held-out requests .*{missing[0]}"):
        main(args)
    assert not (predictions / "judge.json").exists()
    with pytest.warns(UserWarning, match=rf"{len(missing)} of {len(truth)} held-out requests"):
        table = main([*args, "--allow-missing"])
    assert sum(row["n"] for group, row in table["model"].items() if "/" not in group) == 1  # per task
    assert f"1 of {len(truth)} held-out requests" in capsys.readouterr().out
    judged = json.loads((predictions / "judge.json").read_text())
    assert judged["samples"] == 1 and judged["missing"] == len(missing)

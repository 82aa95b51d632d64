"""Every shipped YAML parses against the real signatures and runs a training step; bad configs fail
at start-up naming the key or path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mige_cli.main import main
from tests.helpers.training import FROM_SCRATCH

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))
OVERLAYS = [p for p in CONFIGS if p.parent.name == "debug"]
PREDICT_OVERLAYS = [p for p in CONFIGS if p.parent.name == "predict"]  # exercised in test_predict.py
TRAINER_OVERLAYS = [p for p in CONFIGS if p.parent.name == "trainer"]  # 2-process runs in test_fsdp.py
# overlays on the demo: the synthetic benchmark (test_synthetic_eval.py) and the replication settings
DEMO_OVERLAYS = [REPO / "configs/eval/synthetic.yaml"]
# benchmark overlays on configs/eval/base.yaml
EVAL_OVERLAYS = [
    p for p in CONFIGS if p.parent.name == "eval" and p.name not in ("base.yaml", "synthetic.yaml")
]
EXPERIMENTS = [p for p in CONFIGS if p.parent.name == "experiments" and p.name != "mutual.yaml"]
MAIN_CONFIGS = [
    p
    for p in CONFIGS
    if p not in OVERLAYS + PREDICT_OVERLAYS + TRAINER_OVERLAYS + DEMO_OVERLAYS + EXPERIMENTS + EVAL_OVERLAYS
    and p.parent.name != "experiments"
    and p != REPO / "configs/eval/base.yaml"  # not alone: under each benchmark overlay (CONFIG_SETS)
]
CPU_STEP = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.max_steps=1",
    "--trainer.limit_train_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1",
]


def _data_swap(tmp_path) -> list[str]:
    # paper configs point at real data and pretrained weights that are not on a CI machine
    return [
        "--data.manifests=null",
        f"--data.synthetic={{root: {tmp_path}/world, num_samples: 8, size: 32}}",
        "--data.batch_size=4",
        "--data.num_workers=0",
    ]


def _fit(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main([*args], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def test_configs_are_found():
    assert any(p.name == "demo.yaml" for p in MAIN_CONFIGS) and OVERLAYS


CONFIG_SETS = [[p] for p in MAIN_CONFIGS] + [[REPO / "configs/eval/base.yaml", p] for p in EVAL_OVERLAYS]


@pytest.mark.parametrize(
    "configs", CONFIG_SETS, ids=lambda ps: " + ".join(str(p.relative_to(REPO / "configs")) for p in ps)
)
def test_config_parses_and_runs_one_step(configs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the files as shipped (only the device moved to CPU): every key is type-checked and the
    # model's start-up validation (preset, overrides, pretrained paths) runs
    config_args = [a for p in configs for a in ("--config", str(p))]
    # the demo world's shipped components, where the config's relative paths point
    (tmp_path / "mige_world").symlink_to(REPO / "mige_world")
    parsed = main([*config_args, *CPU_STEP[:3]], run=False)
    raw = {}
    for p in configs:  # what the composed files say (later files win per top-level key section)
        for section, values in yaml.safe_load(p.read_text()).items():
            raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    assert parsed.model.hparams.preset == raw["model"]["preset"]
    if len(configs) > 1:  # a benchmark overlay: its report and benchmark on the base's model
        name = yaml.safe_load(configs[-1].read_text())["data"]["init_args"]["benchmark"]["name"]
        assert type(parsed.datamodule).__name__ == "BenchmarkDataModule"
        assert parsed.datamodule.benchmark["name"] == name
        reports = [c for c in parsed.trainer.callbacks if type(c).__name__ == "BenchmarkReport"]
        assert len(reports) == 1 and reports[0].benchmark == name
        assert parsed.model.hparams.eval_metrics["clip_model"] == "ViT-B-32-quickgelu"
    args = [*config_args, *CPU_STEP]
    if len(configs) > 1:
        # a benchmark data module has nothing to train on: the step trains the overlay's model on the
        # synthetic world (tests/test_benchmarks.py runs `test` with each overlay)
        args.append("--data=datamodules.TrainingDataModule")
    if raw["model"]["preset"] != "tiny":
        # the step itself runs at tiny size: same recipe, no downloads
        args += [
            "--model.preset=tiny",
            "--model.pretrained={t5: null, blip2: null, dit: null, vae: null, tokenizer: byte}",
            "--model.gradient_checkpointing=false",
            *_data_swap(tmp_path),
        ]
    if "strategy" in raw.get("trainer", {}):  # sharded over 4 GPUs as shipped: one CPU process here
        args += ["--trainer.strategy=auto", "--model.fsdp_mixed_precision=false"]
    cli = _fit(args, tmp_path, monkeypatch)
    assert cli.trainer.global_step == 1
    assert math.isfinite(cli.trainer.callback_metrics["train/loss"].item())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_debug_overlays_compose_with_the_demo(overlay, tmp_path, monkeypatch):
    args = [
        "--config",
        str(REPO / "configs/demo.yaml"),
        "--config",
        str(overlay),
        *FROM_SCRATCH,
        *CPU_STEP,
        *_data_swap(tmp_path),
    ]
    cli = _fit(args, tmp_path, monkeypatch)
    assert cli.trainer.global_step >= 1


@pytest.mark.parametrize("setting", EXPERIMENTS, ids=lambda p: p.stem)
def test_replication_settings_compose_with_the_demo(setting, tmp_path, monkeypatch):
    """Each mutual-enhancement setting trains on exactly its tasks, with the shared schedule."""
    args = [
        "--config",
        str(REPO / "configs/demo.yaml"),
        "--config",
        str(REPO / "configs/experiments/mutual.yaml"),
        "--config",
        str(setting),
        *FROM_SCRATCH,
        *CPU_STEP,
        # 36 training scenes: every pool of a single-task setting still fills a batch of 8
        f"--data.synthetic={{root: {tmp_path}/world, num_samples: 40, size: 32}}",
        "--data.batch_size=8",
    ]
    cli = _fit(args, tmp_path, monkeypatch)
    assert cli.trainer.global_step == 1
    weights = yaml.safe_load(setting.read_text())["data"]["task_weights"]
    drawn = {k.split("/")[0] for k, w in weights.items() if w > 0}
    seen = {
        t
        for t in ("subject", "edit", "subject_edit")
        if cli.trainer.logged_metrics.get(f"train/loss_{t}") is not None
    }
    assert seen <= drawn and seen


@pytest.mark.slow
def test_demo_trains_and_leaves_events_and_checkpoint(tmp_path, monkeypatch):
    args = [
        "--config",
        str(REPO / "configs/demo.yaml"),
        *FROM_SCRATCH,
        "--trainer.max_steps=8",
        "--trainer.log_every_n_steps=2",
        # Lightning's validation loop every 4 batches, 2 sampler steps
        "--trainer.val_check_interval=4",
        "--model.eval_num_inference_steps=2",
        f"--data.synthetic={{root: {tmp_path}/world, num_samples: 64, size: 32, seed: 0}}",
    ]
    cli = _fit(args, tmp_path, monkeypatch)
    run_dir = Path(cli.trainer.log_dir).resolve()
    assert run_dir.is_relative_to(tmp_path / "runs" / "demo")
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    logged = cli.trainer.callback_metrics
    assert {"train/loss", "train/loss_subject", "train/loss_edit", "train/loss_subject_edit"} <= set(logged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for task in ("subject", "edit", "subject_edit"):
        judged = {f"val/{task}/{k}" for k in ("l1", "l2", "scene_acc", "element_acc")}
        assert judged <= scalars
        assert f"val/{task}/grid" in events.Tags()["images"]
        assert [e.step for e in events.Scalars(f"val/{task}/l1")] == [4, 8]
        assert [e.step for e in events.Scalars(f"val/{task}/scene_acc")] == [4, 8]
        # the copy-the-input baseline, once
        baseline = [e.value for e in events.Scalars(f"val_baseline/{task}/element_acc")]
        assert len(baseline) == 1 and 0 <= baseline[0] < 1
        if task != "subject":  # an edit changes something and keeps something: copying is partly right
            assert events.Scalars(f"val_baseline/{task}/scene_acc")[0].value == 0.0
            assert baseline[0] > 0
    # and per kind of sample: both subject_edit kinds are held out, and some of the edit kinds
    assert {f"val/subject_edit/{k}/scene_acc" for k in ("add", "replace")} <= scalars
    edit_kinds = {t.split("/")[2] for t in scalars if t.startswith("val/edit/") and t.count("/") == 3}
    assert edit_kinds and edit_kinds <= {"recolour", "remove", "move", "background"}
    assert not any(
        "dino" in t or "clip" in t for t in events.Tags()["scalars"]
    )  # offline: disabled, not random
    # a second run gets its own directory
    cli2 = _fit(args, tmp_path, monkeypatch)
    assert Path(cli2.trainer.log_dir).resolve() != run_dir


def test_unknown_preset_fails_at_startup_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"model\.preset: unknown preset 'huge'"):
        main(["--config", str(REPO / "configs/demo.yaml"), "--model.preset=huge"], run=False)


def test_missing_local_pretrained_path_fails_at_startup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mige_world").symlink_to(REPO / "mige_world")  # the shipped world components
    with pytest.raises(
        FileNotFoundError, match=r"model\.pretrained\.t5: local pretrained path '/no/such/t5'"
    ):
        main(["--config", str(REPO / "configs/demo.yaml"), "--model.pretrained={t5: /no/such/t5}"], run=False)
    # a world component that is not there: the error says which command makes it
    with pytest.raises(
        FileNotFoundError,
        match=r"'/no/such/dit' does not exist; .* `python -m mige_lightning pretrain-world",
    ):
        main(["--config", str(REPO / "configs/demo.yaml"), "--model.pretrained.dit=/no/such/dit"], run=False)


def test_malformed_yaml_value_names_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    text = (REPO / "configs/demo.yaml").read_text()
    assert "\n  lr: 3.0e-4" in text
    bad.write_text(text.replace("\n  lr: 3.0e-4", "\n  lr: fast"))
    with pytest.raises(SystemExit):
        main(["--config", str(bad)], run=False)
    err = capsys.readouterr().err
    assert "model.lr" in err and "fast" in err


def test_paper_config_runs_sharded_by_itself_with_covered_pools(tmp_path, monkeypatch):
    """configs/mige_xl.yaml alone: FSDP2 over its 4 GPUs (plain DDP would need ~88 GB per GPU), the
    authors' effective learning rate, and manifests whose pools the task weights cover."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from datamodules.task_sampler import check_pool_weights

    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(REPO / "configs/mige_xl.yaml"), "--trainer.accelerator=cpu"], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy.resolved_data_parallel_size() == cli.trainer.num_devices * cli.trainer.num_nodes == 4
    assert cli.trainer.precision == "32-true" and cli.model.hparams.fsdp_mixed_precision
    assert cli.model.hparams.lr == pytest.approx(1e-5 * math.sqrt(32 / 256), rel=1e-3)
    pools = {
        f"{m['task']}/{m['subtask']}" if m.get("subtask") else m["task"]: 1 for m in cli.datamodule.manifests
    }
    check_pool_weights(pools, cli.datamodule.task_weights)  # raises on a pool without a weight


@pytest.mark.parametrize(
    ("configs", "args", "world"),
    [
        (["configs/mige_xl.yaml"], ["--trainer.devices=8"], 8),
        (["configs/mige_xl.yaml", "configs/trainer/fsdp.yaml"], ["--trainer.devices=8"], 8),
        (
            ["configs/mige_xl.yaml", "configs/trainer/fsdp.yaml"],
            ["--trainer.devices=4", "--trainer.num_nodes=2"],
            8,
        ),
        (["configs/mige_xl.yaml", "configs/trainer/fsdp.yaml"], [], 2),  # the overlay's devices: 2
    ],
)
def test_data_parallel_size_follows_the_world_size(tmp_path, monkeypatch, configs, args, world):
    """With tensor parallelism 1 the FSDP2 group is every rank: one override (devices / nodes)
    moves it, and the device mesh Lightning builds covers the whole world (its own "auto" would
    give the number of nodes, and a fixed size in the config would refuse the new world)."""
    from unittest import mock

    from lightning.pytorch.strategies import ModelParallelStrategy

    monkeypatch.chdir(tmp_path)
    config_args = [a for c in configs for a in ("--config", str(REPO / c))]
    cli = main([*config_args, "--trainer.accelerator=cpu", *args], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy.num_nodes * strategy.num_processes == world
    strategy._lightning_module = cli.model  # what the trainer attaches before setting up
    with (
        mock.patch.object(strategy, "_setup_distributed"),
        mock.patch("lightning.pytorch.strategies.model_parallel._setup_device_mesh") as mesh,
    ):
        strategy.setup_environment()
    dp, tp, world_size = mesh.call_args.args[:3]
    assert (dp, tp) == (world, 1) and dp * tp == world


def test_pools_without_a_weight_fail_before_the_model_is_built(tmp_path, monkeypatch):
    """A subject_edit manifest without a subtask makes a `subject_edit` pool that the default
    weights (add / replace) do not cover: the run must stop in the data module's setup, before
    configure_model builds the networks (minutes at paper size), naming the pool."""
    from datamodules.records import ManifestError
    from mige_lightning.module import MIGELightningModule
    from mige_world.synthetic import generate

    world = tmp_path / "world"
    generate(world, num_samples=8, size=32, seed=0)
    # the authors' layout: subject_edit records carry no subtask
    records = json.loads((world / "train_subject_edit.json").read_text())
    (world / "mixed.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "subtask"} for r in records])
    )
    built = []
    monkeypatch.setattr(MIGELightningModule, "configure_model", lambda self: built.append(1))
    args = [
        "--config",
        str(REPO / "configs/demo.yaml"),
        *FROM_SCRATCH,
        *CPU_STEP,
        "--data.synthetic=null",
        f"--data.manifests=[{{path: {world}/train_subject.json, task: subject}}, "
        f"{{path: {world}/train_edit.json, task: edit}}, "
        f"{{path: {world}/mixed.json, task: subject_edit}}]",
        "--data.task_weights=null",
        "--trainer.callbacks=[]",
    ]
    with pytest.raises(ManifestError, match=r"no weight for pool\(s\) \['subject_edit'\]"):
        _fit(args, tmp_path, monkeypatch)
    assert built == []


def test_command_line_sampling_options_win_over_the_checkpoints(tmp_path, monkeypatch):
    """With --ckpt_path, LightningCLI restores the checkpoint's hyper-parameters; the sampling
    options given on the command line must still be the ones used (and recorded)."""
    import lightning as L
    import torch
    from PIL import Image

    from mige_lightning.module import MIGELightningModule
    from tests.helpers.batches import make_batch

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", sampler="dpm++", predict_seed=0, warmup_steps=1)
    batch = make_batch(module.config, [1])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "ref.png")
    (tmp_path / "req.jsonl").write_text(
        json.dumps(
            {
                "id": "a",
                "task": "subject",
                "instruction": "a <imagehere>",
                "images": ["ref.png"],
                "num_inference_steps": 2,
            }
        )
        + "\n"
    )
    out = tmp_path / "out"
    main(
        [
            "predict",
            "--model.sampler=ddim",
            "--model.predict_seed=100",
            "--data=datamodules.RequestDataModule",
            f"--data.requests={tmp_path}/req.jsonl",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.callbacks+=callbacks.prediction_writer.PredictionWriter",
            f"--trainer.callbacks.output_dir={out}",
            "--ckpt_path",
            str(ckpt),
        ]
    )
    entry = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert entry["scheduler"] == "DDIMScheduler" and entry["seed"] == 100


@pytest.mark.parametrize(
    ("subcommand", "serves"),
    [("predict", "datamodules.RequestDataModule"), ("test", "datamodules.BenchmarkDataModule")],
)
def test_a_path_given_the_training_data_module_says_which_one_serves_it(subcommand, serves, monkeypatch):
    """predict / test on fit's config alone (no overlay naming their data module): a clear error
    before anything is built, naming the data module and the configs that set it."""
    from mige_cli.cli import MIGECLI

    built = []
    monkeypatch.setattr(MIGECLI, "instantiate_classes", lambda self: built.append(1))
    with pytest.raises(
        ValueError, match=rf"`{subcommand}` needs a data module with .*Give data.class_path: {serves}"
    ):
        main([subcommand, "--config", str(REPO / "configs/demo.yaml"), "--trainer.logger=false"])
    assert built == []


def test_each_path_gets_its_own_data_module_with_only_its_arguments():
    """The overlays switch the data module; a training argument does not reach the others."""
    from datamodules import BenchmarkDataModule, RequestDataModule, TrainingDataModule

    def data_of(*configs):
        args = [a for c in configs for a in ("--config", str(REPO / c))]
        return main([*args, *FROM_SCRATCH, "--trainer.logger=false"], run=False).datamodule

    fit = data_of("configs/demo.yaml")
    predict = data_of("configs/demo.yaml", "configs/predict/demo.yaml")
    test = data_of("configs/demo.yaml", "configs/eval/synthetic.yaml")
    assert type(fit) is TrainingDataModule and fit.batch_size == 16 and fit.synthetic
    assert type(predict) is RequestDataModule and predict.batch_size == 8
    assert predict.requests == "data/demo/heldout_requests.jsonl"
    assert type(test) is BenchmarkDataModule and test.benchmark["name"] == "synthetic"
    for module in (predict, test):
        assert not hasattr(module, "synthetic") and not hasattr(module, "task_weights")
    with pytest.raises(ValueError, match="give `manifests` or `synthetic`"):
        TrainingDataModule()

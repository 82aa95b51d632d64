"""FSDP2 through the CLI, 2 CPU processes (gloo): ``configs/trainer/fsdp.yaml`` on the demo config
writes sharded checkpoints, each rank holds half the trainable weights, a resume from a mid-epoch
checkpoint repeats the uninterrupted run's losses and EMA exactly, and ``export`` consolidates a
sharded checkpoint into one safetensors file that samples the sharded model's image."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from mige_cli.export import load_exported
from mige_cli.main import main
from mige_lightning.checkpoint_state import EMA_PREFIX, SHARDED_EMA_KEY
from tests.helpers.fsdp_probe import CLEAR_DEMO_DICTS, REPO, cli_env, fit_command, sample, write_overlay

STEPS, EVERY = 8, 4  # optimiser steps; checkpoint every 4 (mid-epoch: 10 batches per epoch per rank)
FIT = dict(max_steps=STEPS, accumulate_grad_batches=2)  # 16 batches: the run crosses an epoch


def run_fit(cmd: list[str], cwd: Path, log: Path) -> None:
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, timeout=400)
    assert proc.returncode == 0, log.read_text()[-4000:]


def read_probe(directory: Path) -> list[dict]:
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 8-step run (sampling at its end) and a run resumed from its step-4 checkpoint."""
    root = tmp_path_factory.mktemp("fsdp")
    world = root / "world"
    full = write_overlay(
        root / "full.yaml", world=world, probe=root / "probe_full", sample=True, every=EVERY, **FIT
    )
    run_fit(fit_command(full), root, root / "full.log")
    ckpt_dir = root / "runs/demo/version_0/checkpoints"
    resumed = write_overlay(
        root / "resumed.yaml", world=world, probe=root / "probe_resumed", every=EVERY, **FIT
    )
    run_fit(
        fit_command(resumed, f"--ckpt_path={ckpt_dir / 'epoch=0-step=4.ckpt'}"), root, root / "resumed.log"
    )
    return SimpleNamespace(
        root=root,
        ckpt_dir=ckpt_dir,
        full=read_probe(root / "probe_full"),
        resumed=read_probe(root / "probe_resumed"),
        resumed_log=(root / "resumed.log").read_text(),
        overlay=full,
    )


@pytest.mark.slow
def test_fsdp_fit_writes_sharded_checkpoints_and_each_rank_holds_half(runs):
    for name in ("epoch=0-step=4.ckpt", "last.ckpt"):
        ckpt = runs.ckpt_dir / name
        assert ckpt.is_dir(), name  # a folder of shards, not one file
        assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    meta = torch.load(runs.ckpt_dir / "epoch=0-step=4.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == 4 and len(meta["rng_states"]) == 2  # every rank's generators
    assert "ema" not in meta and meta[SHARDED_EMA_KEY]  # EMA saved as shards, not gathered on rank 0

    total = runs.full[0]["trainable_total"]
    assert total == runs.full[1]["trainable_total"] > 100_000
    assert sum(r["trainable_local"] for r in runs.full) == total
    for rank in runs.full:
        assert abs(rank["trainable_local"] / total - 0.5) < 0.02
        assert rank["optimised"] == rank["trainable"]  # AdamW holds exactly the trainable shards
        assert rank["frozen_sharded"] and all(
            n.startswith("model.encoder.vision.") for n in rank["frozen_sharded"]
        )
        assert rank["not_sharded"] and all(n.startswith("model.autoencoder.") for n in rank["not_sharded"])
        assert set(rank["sharded"]) >= set(rank["trainable"])


@pytest.mark.slow
def test_the_cli_starts_fsdp_from_the_meta_device_with_the_eager_builds_weights(runs):
    """``model.meta_init`` (the default): what each rank materialised and drew, gathered, is
    exactly ``build_mige(config, seed)`` for the run's seed (``seed_everything: 0``)."""
    start = torch.load(runs.root / "probe_full" / "start.pt", weights_only=True)
    eager = start["eager"]
    assert start["state"].keys() == eager.keys()
    different = [k for k in eager if not torch.equal(start["state"][k], eager[k])]
    assert not different, different[:10]


@pytest.mark.slow
def test_resume_from_a_mid_epoch_sharded_checkpoint_repeats_the_losses(runs):
    assert "Restored all states from the checkpoint" in runs.resumed_log
    for full, resumed in zip(runs.full, runs.resumed, strict=True):
        after = full["rows"][-len(resumed["rows"]) :]
        assert len(resumed["rows"]) == 2 * (STEPS - EVERY)  # micro-batches after the checkpoint
        assert [r["step"] for r in resumed["rows"]][:2] == [EVERY, EVERY + 1]
        assert [r["index"] for r in resumed["rows"]] == [r["index"] for r in after]  # the next samples
        for got, want in zip(resumed["rows"], after, strict=True):
            assert abs(got["loss"] - want["loss"]) <= 1e-6, (got, want)
        assert len({round(r["loss"], 6) for r in after}) > 1  # losses that differ step to step
    ema_full, ema_resumed = (torch.load(runs.root / p / "ema.pt") for p in ("probe_full", "probe_resumed"))
    assert ema_full.keys() == ema_resumed.keys()
    for name in ema_full:
        torch.testing.assert_close(ema_resumed[name], ema_full[name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_export_writes_one_safetensors_that_samples_the_sharded_models_image(runs, monkeypatch):
    monkeypatch.chdir(runs.root)
    last = runs.ckpt_dir / "last.ckpt"
    model_args = [
        "--config",
        str(REPO / "configs/demo.yaml"),
        *CLEAR_DEMO_DICTS,
        "--config",
        str(runs.overlay),
    ]
    raw = runs.root / "export_raw"
    main(["export", *model_args, f"--ckpt_path={last}", f"--output={raw}", "--weights=raw"])
    assert sorted(p.name for p in raw.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((raw / "config.json").read_text())
    assert config["weights"] == "raw" and config["global_step"] == STEPS
    with safe_open(raw / "model.safetensors", framework="pt") as f:
        assert not any(k.startswith(EMA_PREFIX) for k in f.keys())

    module = load_exported(raw)
    assert not any(hasattr(p, "to_local") for p in module.parameters())  # plain tensors, one device
    with torch.no_grad():
        latents = sample(module)
    sharded = torch.load(runs.root / "probe_full" / "latents.pt")
    torch.testing.assert_close(latents, sharded, rtol=0, atol=1e-5)

    ema = runs.root / "export_ema"
    main(["export", *model_args, f"--ckpt_path={last}", f"--output={ema}"])  # auto: EMA when present
    assert json.loads((ema / "config.json").read_text())["weights"] == "ema"
    params = dict(load_exported(ema).named_parameters())
    ema_full = torch.load(runs.root / "probe_full" / "ema.pt")
    assert ema_full.keys() <= params.keys()
    for name, value in ema_full.items():
        torch.testing.assert_close(params[name].detach(), value, rtol=0, atol=0)
    assert not torch.equal(
        params["model.dit.proj_out.weight"], dict(module.named_parameters())["model.dit.proj_out.weight"]
    )


@pytest.mark.slow
def test_export_of_a_different_architecture_names_the_field(runs, monkeypatch):
    monkeypatch.chdir(runs.root)
    args = ["--config", str(REPO / "configs/demo.yaml"), *CLEAR_DEMO_DICTS, "--config", str(runs.overlay)]
    with pytest.raises(ValueError, match=r"model\.dit: the config builds"):
        main(
            [
                "export",
                *args,
                "--model.overrides={resolution: 16, dit: {num_layers: 3}}",
                f"--ckpt_path={runs.ckpt_dir / 'last.ckpt'}",
                f"--output={runs.root / 'bad'}",
            ]
        )
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path: '.*nothing' is neither"):
        main(["export", *args, f"--ckpt_path={runs.root / 'nothing'}", f"--output={runs.root / 'bad'}"])


def test_fsdp_overlay_parses_onto_the_paper_config(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import ModelParallelStrategy

    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "--config",
            str(REPO / "configs/mige_xl.yaml"),
            "--config",
            str(REPO / "configs/trainer/fsdp.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.devices=4",
            "--trainer.strategy.init_args.data_parallel_size=4",  # what scripts/slurm/train.sbatch passes
        ],
        run=False,
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)
    assert cli.trainer.precision == "32-true"  # bf16 comes from FSDP2's policy, not autocast
    assert cli.model.hparams.fsdp_mixed_precision and cli.model.hparams.gradient_checkpointing

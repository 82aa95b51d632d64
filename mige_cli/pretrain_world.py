"""``python -m mige_lightning pretrain-world --config …``: the synthetic world's pretrained
components (``mige_world/pretrain.py`` says what each stage makes and how it is measured).

    python -m mige_lightning pretrain-world --config configs/demo.yaml    # make pretrain-world

Takes ``fit``'s config (any number of ``--config`` files and ``--section.key=value`` overrides,
parsed by the same LightningCLI parser, without building the model: it would refuse the
components this command has yet to write); the world is generated first when it is missing, by
the training data module's own ``prepare_data``, as ``fit`` would.
"""

from __future__ import annotations

import argparse
from typing import Any

import mige_world.pretrain as world_pretrain
from datamodules.training_data import TrainingDataModule
from mige_cli.cli import CLI_CLASSES, MIGECLI
from mige_world.pretrain import STAGES, pretrain_world


class _ParsedConfig(MIGECLI):
    """The LightningCLI's parsing (config files, overrides, interpolation) without building the
    model: the model would refuse a ``model.pretrained.t5`` that this command has yet to write."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def fit_config(cli_args: list[str]) -> dict[str, Any]:
    """``fit``'s parsed config (model and data sections) as plain dicts."""
    cli = _ParsedConfig(**CLI_CLASSES, args=cli_args, run=False)
    config = cli.config.as_dict()
    data = config.get("data") or {}
    return {"model": config["model"], "data": data.get("init_args", data)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mige_lightning pretrain-world",
        description=world_pretrain.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other argument (--config FILE, --model.*, --data.*) is fit's.",
    )
    ap.add_argument("--stages", default=",".join(STAGES), help="which stages to (re)make: t5,bridge,dit")
    ap.add_argument("--force", action="store_true", help="re-make the chosen stages even when up to date")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=50, help="optimiser steps of linear LR warm-up")
    ap.add_argument(
        "--log-dir", default="runs", help="TensorBoard and checkpoints: <log-dir>/pretrain_world/<stage>"
    )
    ap.add_argument("--accelerator", default="cpu", choices=("cpu", "auto"))
    ap.add_argument("--t5-steps", type=int, default=400)
    ap.add_argument("--t5-batch", type=int, default=64)
    ap.add_argument("--t5-lr", type=float, default=1e-3)
    ap.add_argument("--t5-mask", type=float, default=0.25, help="probability that a word is masked")
    ap.add_argument("--t5-decoder-layers", type=int, default=1)
    ap.add_argument("--bridge-steps", type=int, default=2000)
    ap.add_argument("--bridge-batch", type=int, default=64)
    ap.add_argument("--bridge-lr", type=float, default=1e-3)
    ap.add_argument(
        "--bridge-align-weight", type=float, default=1.0, help="weight of the T5-output alignment term"
    )
    ap.add_argument(
        "--bridge-reference-share",
        type=float,
        default=0.05,
        help="references shown alone, as a share of the other pairs",
    )
    ap.add_argument("--bridge-val-every", type=int, default=1000)
    ap.add_argument("--dit-steps", type=int, default=5200)
    ap.add_argument("--dit-batch", type=int, default=16)
    ap.add_argument("--dit-lr", type=float, default=1e-3)
    ap.add_argument("--dit-p-uncond", type=float, default=0.1, help="probability that a caption is dropped")
    ap.add_argument("--dit-val-every", type=int, default=2600)
    ap.add_argument("--dit-precision", default="bf16-mixed", help="Lightning precision of the DiT stage")
    ap.add_argument(
        "--dit-ema",
        type=float,
        default=0.0,
        help="EMA decay of the DiT's weights (Lightning's EMAWeightAveraging), validated and saved; 0: off",
    )
    ap.add_argument(
        "--dit-lr-schedule",
        default="constant",
        choices=("constant", "cosine"),
        help="after the warm-up: hold the rate, or a half cosine down to 0 at the last step",
    )
    ap.add_argument(
        "--dit-repa-weight",
        type=float,
        default=0.5,
        help="representation alignment (REPA) of early DiT tokens to the bridge's frozen vision tower; 0: off",
    )
    ap.add_argument(
        "--dit-repa-depth", type=int, default=1, help="align the tokens after this many DiT blocks"
    )
    ap.add_argument(
        "--dit-repa-until",
        type=int,
        default=None,
        help="stop aligning after this many steps (default: never)",
    )
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(argv or [])
    args, cli_args = build_parser().parse_known_args(argv)
    config = fit_config(cli_args)
    world = config["data"].get("synthetic")
    if world:
        TrainingDataModule(synthetic=dict(world)).prepare_data()  # generates the world when missing
    return pretrain_world(args, config, argv)

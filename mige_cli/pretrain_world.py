"""``python -m mige_lightning pretrain-world --config …``: the synthetic world's pretrained
components (``mige_world/pretrain.py`` says what each stage makes and how it is measured).

    python -m mige_lightning pretrain-world --config configs/demo.yaml    # make pretrain-world

Takes ``fit``'s config (any number of ``--config`` files and ``--section.key=value`` overrides,
parsed by the same LightningCLI parser, without building the model: it would refuse the
components this command has yet to write); the world is generated first when it is missing, by
the training data module's own ``prepare_data``, as ``fit`` would.
"""

from __future__ import annotations

from typing import Any

from datamodules.training_data import TrainingDataModule
from mige_cli.cli import CLI_CLASSES, MIGECLI
from mige_world.pretrain import build_parser, pretrain_world


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(argv or [])
    args, cli_args = build_parser().parse_known_args(argv)
    config = fit_config(cli_args)
    world = config["data"].get("synthetic")
    if world:
        TrainingDataModule(synthetic=dict(world)).prepare_data()  # generates the world when missing
    return pretrain_world(args, config, argv)

"""``python -m mige_lightning {fit,validate,test,predict,cache-latents} --config …`` through LightningCLI.

The omegaconf parser mode makes ``${…}`` interpolation work across sections of one YAML. Unless
a config says otherwise, every run logs to TensorBoard under ``runs/<name>/version_<n>/`` and
checkpoints into that same run directory (one directory per run, config saved beside it).
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from datamodules.datamodule import MIGEDataModule
from mige_lightning.module import MIGELightningModule

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "mige"},
    },
    "callbacks": [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 1000},
        },
        {
            "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
            "init_args": {"logging_interval": "step"},
        },
    ],
}


class MIGECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # parser defaults (not Trainer defaults): a config's own logger / callbacks replace them
        parser.set_defaults({f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()})


def main(args: list[str] | None = None, *, run: bool = True) -> MIGECLI:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["cache-latents"]:
        # an extra subcommand with fit's config: build model + data, encode every image once
        from mige_lightning.cache_latents import cache_latents

        with warnings.catch_warnings():  # LightningCLI warns when args and sys.argv both exist
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = _cli(argv[1:], run=False)
        cache_latents(cli.model, cli.datamodule)
        return cli
    return _cli(args, run=run)


def _cli(args: list[str] | None, *, run: bool) -> MIGECLI:
    return MIGECLI(
        MIGELightningModule,
        MIGEDataModule,
        subclass_mode_data=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )

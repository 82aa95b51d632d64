"""``python -m mige_lightning {fit,validate,test,predict} …``: the LightningCLI (``mige_cli/main.py``
dispatches the other subcommands).

The omegaconf parser mode makes ``${…}`` interpolation work across sections of one YAML. Unless
a config says otherwise, every run logs to TensorBoard under ``runs/<name>/version_<n>/`` and
checkpoints into that same run directory (one directory per run, config saved beside it).

Under SLURM, ``fit`` uses ``runs/<name>/slurm_<job id>/`` instead, resumes from the newest
checkpoint there when no ``--ckpt_path`` is given, and requeues on the pre-emption signal. Every
``fit`` gets the ``PreemptionCheckpoint`` callback (checkpoint after the step on SIGTERM, then exit
143; under SLURM also checkpoint + ``scontrol requeue`` on SIGUSR1): see ``callbacks/slurm_requeue.py``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_registry import _is_registry
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from callbacks.slurm_requeue import PreemptionCheckpoint
from datamodules.base import MIGEDataModule
from mige_cli import config_overlays, resume
from mige_cli.save_config import SaveRunConfig
from mige_cli.slurm import (
    logger_init_args,
    logger_run_root,
    newest_checkpoint,
    resume_candidates,
    use_job_run_dir,
    version_folder,
)
from mige_lightning.checkpoint_files import check_lightning_checkpoint, use_atomic_checkpoint_io
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
        {"class_path": "callbacks.throughput.MFUMonitor"},  # samples / tokens / FLOP per s, MFU
        # scores Lightning's validation loop (held-out requests sampled in validation_step)
        {"class_path": "callbacks.validation_metrics.ValidationMetrics"},
    ],
}

# the data module of each path (``data.class_path``; fit's default when a config gives none) and
# the dataloader it has to provide
TRAINING_DATA = "datamodules.TrainingDataModule"
DATA_FOR = {
    "fit": ("train_dataloader", TRAINING_DATA),
    "validate": ("val_dataloader", TRAINING_DATA),
    "predict": ("predict_dataloader", "datamodules.RequestDataModule (e.g. configs/predict/demo.yaml)"),
    "test": ("test_dataloader", "datamodules.BenchmarkDataModule (configs/eval/<benchmark>.yaml)"),
}


def check_data_for(subcommand: str, class_path: str) -> None:
    """A data module without the subcommand's dataloader: say which one serves it, before any build."""
    method, serves = DATA_FOR[subcommand]
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if getattr(cls, method) is getattr(L.LightningDataModule, method):
        raise ValueError(
            f"`{subcommand}` needs a data module with {method}(); data.class_path is {class_path}. "
            f"Give data.class_path: {serves}"
        )


# sampling / evaluation settings (MIGELightningModule.RUNTIME_OPTIONS): a value given on the
# command line or in a config file wins over the one saved in a --ckpt_path checkpoint
# (LightningCLI alone would replace it with the saved one)
RUNTIME_OPTIONS = MIGELightningModule.RUNTIME_OPTIONS


def refuse_taken_version(fit_config) -> None:
    """A new ``fit`` (no ``--ckpt_path``) given an explicit logger version whose folder already
    holds a run would mix its events and checkpoints into that run's: refuse it."""
    args = logger_init_args(fit_config["trainer"])
    if args is None:
        return
    run = logger_run_root(args)
    for entry in (run.parent, run):  # TensorBoard's save_dir and the run's folder must be folders
        if entry.exists() and not entry.is_dir():
            raise NotADirectoryError(f"{entry} is a file, where the logger keeps the run's folders")
    if args.get("version") is None and run.is_dir():  # the logger numbers folders, skipping files
        if stray := sorted(p.name for p in run.glob("version_*") if not p.is_dir()):
            raise NotADirectoryError(
                f"{run} holds file(s) named like run versions ({', '.join(stray[:5])}); the logger's next "
                "version folder could collide with them: move them or set the logger's version"
            )
    if args.get("version") is None or fit_config.get("ckpt_path"):
        return
    folder = run / version_folder(args.version)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, where logger version {args.version!r} would write")
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} already holds a run (logger version {args.version!r}): resume it with "
            "--ckpt_path last, choose another version, or remove the folder"
        )


def last_checkpoint_of_run(trainer_config) -> Path:
    """The newest (highest step) ``last*.ckpt`` / ``hpc_ckpt_*`` of any version of the run the
    trainer's logger names (``<save_dir>/<name>/*/``); an error saying where it looked if none."""
    args = logger_init_args(trainer_config)
    if args is None:
        raise FileNotFoundError(
            "--ckpt_path last: the run has no logger directory to look in; give the checkpoint's path"
        )
    run = logger_run_root(args)
    candidates = [*run.glob("*/checkpoints/last*.ckpt"), *run.glob("*/hpc_ckpt_*.ckpt")]
    found = newest_checkpoint(candidates)
    if found is None:
        raise FileNotFoundError(
            f"--ckpt_path last: no last*.ckpt or hpc_ckpt_*.ckpt in any version of {run} "
            f"(looked in {run}/*/checkpoints/ and {run}/*/); give the checkpoint's path"
        )
    return found


def _plain(value):
    """Namespaces / tuples → plain dicts / lists, so a config value compares with a default."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


class MIGECLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        if not sub or not self.config[sub].get("ckpt_path"):
            return super()._parse_ckpt_path()
        if self.config[sub]["ckpt_path"] == "last":  # Lightning looks only in the new run's folder
            self.config[sub]["ckpt_path"] = str(last_checkpoint_of_run(self.config[sub]["trainer"]))
            rank_zero_info(f"--ckpt_path last: {self.config[sub]['ckpt_path']}")
        ckpt_path = self.config[sub]["ckpt_path"]
        if ckpt_path not in ("best", "hpc") and not _is_registry(ckpt_path):  # Lightning resolves those
            check_lightning_checkpoint(ckpt_path)  # a file / folder it can read, before any build
        defaults = {
            name: p.default for name, p in inspect.signature(MIGELightningModule.__init__).parameters.items()
        }
        model = self.config[sub]["model"]
        given = {
            k: model[k] for k in RUNTIME_OPTIONS if k in model and _plain(model[k]) != _plain(defaults[k])
        }
        given_config = _plain(model)  # fit: compared with the checkpoint's below
        super()._parse_ckpt_path()  # the checkpoint's hyper-parameters: its architecture and recipe
        for key, value in given.items():
            self.config[sub]["model"][key] = value
        if sub == "fit":  # a resumed run continues the checkpoint's (mige_cli/resume.py)
            resume.check_resume(self.config[sub], given_config, getattr(self, "given_model_keys", set()))

    def parse_arguments(self, parser, args) -> None:
        # the model options named in config files / on the command line (a resume compares them)
        argv = sys.argv[1:] if args is None else args
        self.given_model_keys = resume.given_model_keys(argv) if isinstance(argv, (list, tuple)) else set()
        super().parse_arguments(parser, args)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer.strategy)  # a failed write never replaces a good checkpoint
        return trainer

    def add_arguments_to_parser(self, parser) -> None:
        # a dict option in a later config file merges into / replaces the earlier one, per option
        # and logged (mige_cli/config_overlays.py)
        config_overlays.install(parser)
        # parser defaults (not Trainer defaults): a config's own logger / callbacks replace them
        parser.set_defaults({f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()})
        # a config whose data section has no class_path (fit's): the training data module
        parser.set_defaults({"data": {"class_path": TRAINING_DATA}})

    def before_instantiate_classes(self) -> None:
        if self.subcommand in DATA_FOR:
            check_data_for(self.subcommand, self.config[self.subcommand]["data"]["class_path"])
        if self.subcommand == "fit":  # under SLURM: runs/<name>/slurm_<job id>/, kept across requeues
            if use_job_run_dir(self.config["fit"]["trainer"]) is None:
                refuse_taken_version(self.config["fit"])
        if self.subcommand in ("fit", "validate"):  # components pre-trained for another world: refuse
            from mige_world.pretrain import check_components

            section = self.config[self.subcommand]
            data = _plain(section["data"])
            check_components(
                _plain(section["model"].get("pretrained")) or {},
                (data.get("init_args") or data).get("synthetic"),
            )

    def before_fit(self) -> None:
        # SIGTERM (and SLURM's pre-emption signal): checkpoint after the step, on every rank together
        if not any(isinstance(c, PreemptionCheckpoint) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PreemptionCheckpoint())
        if not SLURMEnvironment.detect():
            return
        if self.config_init["fit"].get("ckpt_path") is None:  # a requeued job continues where it stopped
            path = newest_checkpoint(resume_candidates(self.trainer))
            if path is not None:
                rank_zero_info(f"SLURM job restart: resuming from {path}")
                self.config_init["fit"]["ckpt_path"] = str(path)

    def after_fit(self) -> None:
        # every rank leaves together: no rank exits while another still has collective work in
        # flight (a rank torn down mid-collective aborted once at exit after a requeue)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        # stopped by SIGTERM after its checkpoint: exit like a terminated process (143), not 0
        for callback in self.trainer.callbacks:
            if isinstance(callback, PreemptionCheckpoint) and callback.exit_code is not None:
                rank_zero_info(f"stopped by SIGTERM; resume with --ckpt_path {callback.checkpoint_path}")
                sys.exit(callback.exit_code)


# the module, any of the data modules (``data.class_path``; TRAINING_DATA by default), omegaconf
# interpolation across sections
CLI_CLASSES = {
    "model_class": MIGELightningModule,
    "datamodule_class": MIGEDataModule,
    "subclass_mode_data": True,
    "parser_kwargs": {"parser_mode": "omegaconf"},
}


class _Built(Exception):
    def __init__(self, parser):
        super().__init__("parser built")
        self.parser = parser


def cli_parser(subcommand: str | None = None):
    """The LightningCLI's parser of ``subcommand`` (fit / validate / test / predict), or with None
    the parser of fit's config without a subcommand (what ``cache-latents``, ``export``,
    ``optimize-data`` and ``pretrain-world`` read their remaining arguments with): built, nothing
    parsed, nothing run."""

    class _ParserOnly(MIGECLI):
        def parse_arguments(self, parser, args) -> None:
            raise _Built(self._parser(subcommand))

    try:
        _ParserOnly(**CLI_CLASSES, args=[], run=subcommand is not None)
    except _Built as built:
        return built.parser
    raise AssertionError("LightningCLI parsed arguments without calling parse_arguments")


def run_cli(args: list[str] | None = None, *, run: bool = True) -> MIGECLI:
    """LightningCLI over the module and the data modules (``fit`` / ``validate`` / ``test`` / ``predict``)."""
    # config.yaml: in the run's folder (the logger's, predict's / test's output_dir), never the
    # current directory (mige_cli/save_config.py)
    return MIGECLI(
        **CLI_CLASSES,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )

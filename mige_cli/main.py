"""``python -m mige_lightning <subcommand> …``: every command-line entry point, dispatched here.

``fit`` / ``validate`` / ``test`` / ``predict`` go to the LightningCLI (``mige_cli/cli.py``); every
other subcommand to its own module of this package, which holds its parser (``SUBCOMMANDS``).
``python -m mige_lightning --help`` lists them all. This package is the top layer: the only code
that imports both the data modules and the callbacks (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any

PROG = "python -m mige_lightning"


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its line in ``--help``, and where its code and parser are.

    ``run`` and ``parser`` are ``module:function`` in this package; both ``None`` for the
    LightningCLI's own subcommands. ``fit_config``: the arguments its own parser leaves are
    fit's config (``--config`` files, ``--model.…``, ``--data.…``), read by the LightningCLI's parser."""

    summary: str
    run: str | None = None
    parser: str | None = None
    fit_config: bool = False

    @property
    def lightning(self) -> bool:
        return self.run is None


SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand("train (--ckpt_path: resume a run)"),
    "validate": Subcommand("one pass of fit's validation: the held-out requests sampled and scored"),
    "test": Subcommand("score a checkpoint on a benchmark (configs/eval/<benchmark>.yaml)"),
    "predict": Subcommand("generate images for a request file (configs/predict/demo.yaml)"),
    "cache-latents": Subcommand(
        "encode every training image once with the frozen autoencoder into data.latent_cache",
        "mige_cli.cache_latents:main",
        fit_config=True,
    ),
    "optimize-data": Subcommand(
        "write fit's training records as litdata shards per task pool (a folder or s3://)",
        "mige_cli.optimize_data:optimize_data",
        "mige_cli.optimize_data:build_parser",
        fit_config=True,
    ),
    "export": Subcommand(
        "a (sharded) training checkpoint → one model.safetensors + config.json",
        "mige_cli.export:export_main",
        "mige_cli.export:build_parser",
        fit_config=True,
    ),
    "convert-authors": Subcommand(
        "the authors' released model.pth → model.safetensors + the config that loads it",
        "mige_cli.convert_authors:main",
        "mige_cli.convert_authors:build_parser",
    ),
    "inspect": Subcommand(
        "summarise the manifests of fit's config: tasks, references, image sizes, problems",
        "mige_cli.inspect_manifests:inspect_main",
        "mige_cli.inspect_manifests:build_config_parser",
    ),
    "inspect-manifest": Subcommand(
        "summarise the manifest files named: tasks (declared and by shape), references, problems",
        "mige_cli.inspect_manifests:inspect_manifest_main",
        "mige_cli.inspect_manifests:build_manifest_parser",
    ),
    "judge-synthetic": Subcommand(
        "judge a predict run on the synthetic world's held-out requests from pixels",
        "mige_cli.judge_synthetic:main",
        "mige_cli.judge_synthetic:build_parser",
    ),
    "pretrain-world": Subcommand(
        "make the synthetic world's pretrained components: T5, vision bridge, text-to-image DiT",
        "mige_cli.pretrain_world:main",
        "mige_cli.pretrain_world:build_parser",
        fit_config=True,
    ),
}


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def own_parser(name: str) -> argparse.ArgumentParser | None:
    """The parser an extra subcommand reads its own options with (None: the LightningCLI's ones,
    or none of its own besides fit's config)."""
    target = SUBCOMMANDS[name].parser
    return _resolve(target)() if target else None


def help_text() -> str:
    width = max(len(n) for n in SUBCOMMANDS) + 2
    lines = [
        f"usage: {PROG} <subcommand> [options]",
        "",
        f"subcommands ({PROG} <subcommand> --help: its options):",
        *(f"  {name:<{width}}{sub.summary}" for name, sub in SUBCOMMANDS.items()),
    ]
    return "\n".join(lines) + "\n"


def main(args: list[str] | None = None, *, run: bool = True) -> Any:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] in (["-h"], ["--help"]):
        print(help_text(), end="")
        return None
    if not argv:
        print(help_text(), end="", file=sys.stderr)
        raise SystemExit(2)
    sub = SUBCOMMANDS.get(argv[0]) if argv else None
    if sub is not None and not sub.lightning:
        return _resolve(sub.run)(argv[1:])
    from mige_cli.cli import run_cli

    return run_cli(args, run=run)

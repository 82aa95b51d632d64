"""``python -m mige_lightning <subcommand> …``: every command-line entry point, dispatched here.

``fit`` / ``validate`` / ``test`` / ``predict`` go to the LightningCLI (``mige_cli/cli.py``);
``cache-latents``, ``optimize-data``, ``export``, ``convert-authors``, ``inspect`` / ``inspect-manifest``,
``judge-synthetic`` and ``pretrain-world`` to their own modules. This package is the top layer: the only code that imports
both the data modules and the callbacks (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

import sys
import warnings

from mige_cli.cli import MIGECLI, run_cli


def main(args: list[str] | None = None, *, run: bool = True) -> MIGECLI:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["cache-latents"]:
        # an extra subcommand with fit's config: build model + data, encode every image once
        from mige_cli.cache_latents import cache_latents

        with warnings.catch_warnings():  # LightningCLI warns when args and sys.argv both exist
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = run_cli(argv[1:], run=False)
        cache_latents(cli.model, cli.datamodule)
        return cli
    if argv[:1] == ["optimize-data"]:
        # fit's config: the training records → litdata shards per task pool (local or s3://)
        from mige_cli.optimize_data import optimize_data

        return optimize_data(argv[1:])
    if argv[:1] == ["judge-synthetic"]:
        # score a predict run on the synthetic world's held-out requests from pixels
        from mige_cli.judge_synthetic import main as judge_main

        return judge_main(argv[1:])
    if argv[:1] == ["pretrain-world"]:
        # the synthetic world's pretrained components: T5, vision bridge, text-to-image DiT
        from mige_cli.pretrain_world import main as world_main

        return world_main(argv[1:])
    if argv[:1] in (["inspect"], ["inspect-manifest"]):
        # what is in a set of manifests: tasks (declared and by shape), references, sizes, problems
        from datamodules.manifest_report import main as inspect_main

        return inspect_main(argv[1:], by_config=argv[0] == "inspect")
    if argv[:1] == ["convert-authors"]:
        # the authors' released model.pth → model.safetensors + the config that loads it
        from mige_lightning.authors_checkpoint import main as convert_main

        return convert_main(argv[1:])
    if argv[:1] == ["export"]:
        # a (sharded) checkpoint → one safetensors file + config, with fit's config for the model
        from mige_cli.export import export_main

        return export_main(argv[1:])
    return run_cli(args, run=run)

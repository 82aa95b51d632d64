"""``python -m mige_lightning inspect`` / ``inspect-manifest``: what is in a set of manifests.

    python -m mige_lightning inspect-manifest data/mige/*.json --base /data/mige
    python -m mige_lightning inspect --config configs/mige_xl.yaml [--json]

``inspect-manifest`` reads the manifest files named; ``inspect`` the manifests (or the synthetic
world's training split) of fit's config. The summary itself is ``datamodules/manifest_report.py``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from datamodules.manifest_report import format_summary, inspect_manifest, specs_from_configs


def build_parser(*, by_config: bool) -> argparse.ArgumentParser:
    """``inspect`` (``by_config``: fit's config files) or ``inspect-manifest`` (manifest files)."""
    prog = "inspect" if by_config else "inspect-manifest"
    parser = argparse.ArgumentParser(
        prog=f"python -m mige_lightning {prog}",
        description="Summarise manifests: tasks (declared and by shape), references, image sizes, "
        "placeholder spellings, problems by reason.",
    )
    if by_config:
        parser.add_argument("--config", action="append", required=True, help="fit's config file(s)")
    else:
        parser.add_argument("manifests", nargs="+", help="manifest files (JSON list or JSONL)")
        parser.add_argument("--base", default=None, help="folder relative paths resolve against")
        parser.add_argument("--task", default=None, help="the task of every record without a 'task' field")
        parser.add_argument("--subtask", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--no-images", action="store_true", help="do not open images (faster)")
    return parser


def build_config_parser() -> argparse.ArgumentParser:
    return build_parser(by_config=True)


def build_manifest_parser() -> argparse.ArgumentParser:
    return build_parser(by_config=False)


def main(argv: list[str], *, by_config: bool) -> list[dict[str, Any]]:
    args = build_parser(by_config=by_config).parse_args(argv)
    if by_config:
        specs = specs_from_configs(args.config)
    else:
        specs = [
            {"path": m, "task": args.task, "subtask": args.subtask, "base": args.base} for m in args.manifests
        ]
    summaries = [
        inspect_manifest(
            s["path"],
            task=s.get("task"),
            subtask=s.get("subtask"),
            base=s.get("base"),
            check_images=not args.no_images,
        )
        for s in specs
    ]
    if args.json:
        print(json.dumps(summaries, indent=2))
    else:
        print("\n\n".join(format_summary(s) for s in summaries))
    return summaries


def inspect_main(argv: list[str]) -> list[dict[str, Any]]:
    """``inspect``: the manifests of fit's config."""
    return main(argv, by_config=True)


def inspect_manifest_main(argv: list[str]) -> list[dict[str, Any]]:
    """``inspect-manifest``: the manifest files named."""
    return main(argv, by_config=False)

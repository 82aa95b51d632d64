"""``python -m mige_lightning convert-authors``: the authors' released ``model.pth`` → our model.

    python -m mige_lightning convert-authors --input model.pth --output converted/mige_authors
    python -m mige_lightning predict --config configs/mige_xl.yaml \\
        --config converted/mige_authors/config.yaml --config my_predict.yaml  # requests + writer

The conversion itself (what is renamed, split or joined, and what is checked) is
``mige_lightning/authors_checkpoint.py``; docs/AUTHORS_CHECKPOINT.md describes the result.
"""

from __future__ import annotations

import argparse
import json

from mige_lightning.authors_checkpoint import convert_authors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mige_lightning convert-authors",
        description="Convert the authors' released MIGE checkpoint (model.pth) into this project's "
        "model: writes model.safetensors, config.yaml (the model: section that loads it) and report.json.",
    )
    parser.add_argument("--input", required=True, help="the authors' checkpoint (model.pth)")
    parser.add_argument("--output", required=True, help="folder to write into")
    parser.add_argument("--preset", default="xl", help="our preset the checkpoint fits (default xl)")
    parser.add_argument("--overrides", default=None, help="JSON: model.overrides for other dimensions")
    parser.add_argument(
        "--tokenizer", default="google/t5-v1_1-xxl", help="tokenizer for the config (the authors': T5 v1.1)"
    )
    parser.add_argument(
        "--vae",
        default="stabilityai/sd-vae-ft-ema",
        help="VAE for the config ('none': the preset's random one)",
    )
    parser.add_argument("--entry", default="state_dict", help="top-level entry holding the weights")
    return parser


def main(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    report = convert_authors(
        args.input,
        args.output,
        preset=args.preset,
        overrides=json.loads(args.overrides) if args.overrides else None,
        tokenizer=None if args.tokenizer == "none" else args.tokenizer,
        vae=None if args.vae == "none" else args.vae,
        key=args.entry,
    )
    print(
        f"converted {report['source_tensors']} tensors of {args.input} into {report['written_tensors']} "
        f"({', '.join(f'{g} {n}' for g, n in report['by_group'].items())}); dropped "
        f"{len(report['dropped'])}: {', '.join(report['dropped'])}"
    )
    check = report["pos_embed_check"]
    if check.get("present"):
        print(f"DiT position table: file vs recomputed, max |diff| = {check.get('max_abs_diff')}")
    print(f"wrote {args.output}/model.safetensors, config.yaml, report.json")
    return report

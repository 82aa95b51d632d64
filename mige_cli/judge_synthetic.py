"""Judge a ``predict`` run on the synthetic world's held-out requests from pixels.

    python -m mige_lightning judge-synthetic --world data/demo --predictions predictions/demo

Reads ``<predictions>/predictions.jsonl`` (ids as in the world's ``heldout_requests.jsonl``), reads
every output image back with the pixel judge (``mige_world/scene_judge.py``), and writes beside
the predictions: ``judge.csv`` (one row per image: what was wrong), ``judge.json`` and
``judge.md`` (scene / element accuracy per task and per edit kind, with the copy-the-input
baseline row) and ``contact_sheet.png`` (per row: source | references | output | target). The
table is also printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import warnings
from pathlib import Path

import torch
from torchvision.transforms import v2
from torchvision.utils import make_grid, save_image

from mige_lightning.evaluation import BASELINE, format_table
from mige_lightning.generate import GenerationRequest
from mige_lightning.images import load_rgb
from mige_lightning.prompt import Task
from mige_world.scene_judge import JudgedSample, SceneJudge, load_truth
from mige_world.synthetic import DEFAULT_WORLD_ROOT


def contact_sheet(samples: list[JudgedSample], outputs: list, path: Path, *, tile: int = 96) -> None:
    """One row per sample: source (blank for subject) | references | output | target."""
    to_t = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((tile, tile), interpolation=v2.InterpolationMode.NEAREST),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    blank = torch.ones(3, tile, tile)
    max_refs = max(len(s.references) for s in samples)
    tiles = []
    for s, out in zip(samples, outputs, strict=True):
        refs = [to_t(load_rgb(p)) for p in s.references]
        tiles += [to_t(load_rgb(s.source)) if s.source else blank]
        tiles += refs + [blank] * (max_refs - len(refs))
        tiles += [to_t(out), to_t(load_rgb(s.target))]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(torch.stack(tiles), nrow=max_refs + 3, padding=2, pad_value=1.0), path)


def judge_predictions(
    world: str | Path,
    predictions: str | Path,
    output_dir: str | Path | None = None,
    *,
    allow_missing: bool = False,
) -> dict:
    """Score a predict run's images against the world's truth; returns the table rows. Every
    held-out request must have its prediction: a partial run is an error naming how many and
    which are missing, unless ``allow_missing`` (then a warning names them, and the tables say
    how many of the held-out requests were judged)."""
    world, predictions = Path(world), Path(predictions)
    output_dir = Path(output_dir) if output_dir else predictions
    truth = load_truth(world, "heldout")
    log = predictions / "predictions.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log}: no predictions log; run `predict` first")
    entries, lines = [], {}
    for n, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry["id"] not in truth:
            raise KeyError(f"{log}:{n}: id {entry['id']!r} is not a held-out request of {world}")
        if entry["id"] in lines:  # judged twice, it would count twice
            raise ValueError(f"{log}:{n}: id {entry['id']!r} again (first on line {lines[entry['id']]})")
        lines[entry["id"]] = n
        entries.append(entry)
    if not entries:
        raise ValueError(f"{log}: no predictions")
    missing = [i for i in truth if i not in lines]
    if missing:
        shown = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
        what = (
            f"{log}: {len(missing)} of {len(truth)} held-out requests of {world} have no prediction ({shown})"
        )
        if not allow_missing:
            raise ValueError(
                f"{what}; run predict on all of {world}/heldout_requests.jsonl, or pass --allow-missing "
                f"to judge the {len(entries)} predicted ones only"
            )
        warnings.warn(
            f"{what}: judging the {len(entries)} predicted ones only (--allow-missing)", stacklevel=2
        )
    samples = [truth[e["id"]] for e in entries]
    outputs = [load_rgb(predictions / e["file"]) for e in entries]
    judge = SceneJudge(world, "heldout")
    verdicts = judge.update(
        outputs, [s.target for s in samples], baselines=[load_rgb(s.input_image) for s in samples]
    )
    rows = [
        {"id": e["id"], "task": s.task, "kind": s.kind, "instruction": s.instruction, **verdict}
        for e, s, verdict in zip(entries, samples, verdicts, strict=True)
    ]
    table = judge.compute()
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "judge.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    counts = {"samples": len(rows), "heldout": len(truth), "missing": len(missing)}
    (output_dir / "judge.json").write_text(json.dumps({**counts, **table}, indent=2))
    text = format_table(table)
    (output_dir / "judge.md").write_text(f"# Synthetic world, held-out ({judged_of(counts)})\n\n{text}\n")
    contact_sheet(samples, outputs, output_dir / "contact_sheet.png")
    return table


def judged_of(counts: dict) -> str:
    """``120 requests`` for a whole run, ``16 of 120 held-out requests judged, 104 without a
    prediction`` for a partial one."""
    if not counts["missing"]:
        return f"{counts['samples']} requests"
    return (
        f"{counts['samples']} of {counts['heldout']} held-out requests judged, "
        f"{counts['missing']} without a prediction"
    )


def heldout_requests(world: str | Path, *, split: str = "heldout", per_task: int | None = None) -> list:
    """A split's samples as generation requests (ids as in ``heldout_requests.jsonl``, numbered
    within their task: the same seeds as validation, ``test`` and ``predict`` give them) →
    ``[(JudgedSample, GenerationRequest)]``; the first ``per_task`` of each task, or all."""
    out = []
    for rid, sample in load_truth(world, split).items():
        if per_task is not None and sample.number >= per_task:
            continue
        request = GenerationRequest(
            id=rid,
            task=Task.parse(sample.task),
            instruction=sample.instruction,
            references=tuple(load_rgb(p) for p in sample.references),
            source=load_rgb(sample.source) if sample.source else None,
            number=sample.number,
            origin=str(sample.target),
        )
        out.append((sample, request))
    return out


@torch.no_grad()
def judge_module(
    module, world: str | Path, *, split: str = "heldout", per_task: int | None = None, chunk: int = 64
) -> dict[str, dict]:
    """Sample a split's requests (the first ``per_task`` of each task, or all) with a module's
    pipeline as it stands (its weights and task defaults) through the module's one sampling path
    (``module.generate``), ``chunk`` requests at a time, and judge the outputs →
    ``{"model": …, "baseline": …}``."""
    module.model.eval()
    pipe = module.pipeline()
    pipe.set_progress_bar_config(disable=True)
    judge = SceneJudge(world, split)
    pairs = heldout_requests(world, split=split, per_task=per_task)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        generated = module.generate(pipe, [r for _, r in part], eval_steps=True)
        judge.update(
            [g.image for g in generated],
            [s.target for s, _ in part],
            baselines=[load_rgb(s.input_image) for s, _ in part],
        )
    table = judge.compute()
    return {"model": table["model"], "baseline": table[BASELINE]}


def judge_checkpoint(
    ckpt_path: str | Path, world: str | Path, *, split: str = "heldout", ema: bool = True
) -> dict:
    """``judge_module`` on a checkpoint, with its EMA weights (an error when it has none, unless
    ``ema=False``)."""
    from mige_lightning.checkpoint_files import check_lightning_checkpoint
    from mige_lightning.module import MIGELightningModule

    check_lightning_checkpoint(ckpt_path, key="ckpt_path")  # unreadable: named, with the reason
    module = MIGELightningModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    if ema and not module.use_ema_weights():
        raise ValueError(
            f"{ckpt_path}: no EMA weights in this checkpoint (pass ema=False to use the raw ones)"
        )
    return judge_module(module, world, split=split)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mige_lightning judge-synthetic", description=__doc__)
    ap.add_argument("--world", default=DEFAULT_WORLD_ROOT, help="the generated world (data.synthetic.root)")
    ap.add_argument("--predictions", default="predictions/demo", help="the predict run's output_dir")
    ap.add_argument("--output", default=None, help="where to write the tables (default: --predictions)")
    ap.add_argument(
        "--allow-missing",
        action="store_true",
        help="judge a partial predict run (default: an error when a held-out request has no prediction)",
    )
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    table = judge_predictions(args.world, args.predictions, args.output, allow_missing=args.allow_missing)
    out = Path(args.output or args.predictions)
    counts = json.loads((out / "judge.json").read_text())
    print(f"Synthetic world, held-out: {judged_of(counts)}")
    print(format_table(table))
    print(f"\nper-image verdicts: {out / 'judge.csv'}\ncontact sheet: {out / 'contact_sheet.png'}")
    return table

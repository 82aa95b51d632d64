"""Benchmark test sets read from local disk in their public layouts.

- ``emu_edit``: ``facebook/emu_edit_test_set`` parquet files (``instruction``, ``image``,
  ``task``, ``input_caption``, ``output_caption``, ``idx``), instruction rewritten as the authors do.
- ``magicbrush``: ``edit_sessions.json`` + ``images/<id>/…`` (+ optional ``global_descriptions.json``);
  reference = ``target`` or ``source``; turns = ``single`` (every turn from its ground-truth input)
  or ``final`` (each session's turns chained on the model's own outputs, last one scored).
- ``dreambench``: ``google/dreambooth`` — ``dataset/<subject>/*`` and
  ``dataset/prompts_and_classes.txt``; one reference image per subject, N images per prompt.
  ``reference_prep`` prepares the image the *model* sees (the metrics always compare with the raw
  photo): ``raw`` feeds the photo; ``mask_file`` feeds the subject cut out on black from
  ``<image stem>_mask.png`` beside it — what the authors fed (segmented subjects, as in their
  training references); or ``package.module:function`` taking (image, path) → image, e.g. a
  segmentation model of your own. Not given, the model's protocol decides (``model.protocol``:
  ``project`` → raw, ``authors`` → mask_file).
- ``migebench``: ``add_bench.json`` / ``replace_bench.json`` with the authors' fields.
- ``synthetic``: a generated synthetic world's held-out split, scored by the pixel scene judge.

Every reader returns ``EvalItem``s; a missing file is an error naming the file and the item.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import PIL.Image
from torch.utils.data import DataLoader

from datamodules.base import MIGEDataModule
from datamodules.records import ManifestError
from mige_lightning.generate import GenerationRequest, SamplingBatch
from mige_lightning.images import decode_rgb, load_rgb
from mige_lightning.metrics import clip_t_caption
from mige_lightning.prompt import Task

log = logging.getLogger(__name__)
ImageRef = str | bytes  # a path, or encoded image bytes (parquet)
EMU_KEYWORDS = ("the image", "this image", "this photo", "the photo", "the picture", "this picture")


@dataclass(frozen=True)
class EvalItem:
    id: str
    task: Task
    instruction: str
    references: tuple[ImageRef, ...]  # fill the placeholders, in order
    source: ImageRef | None  # conditional input (editing); also the copy-the-input baseline
    reference: ImageRef  # what DINO / CLIP-I / L1 / L2 compare the output with
    caption: str | None = None  # CLIP-T text
    input_caption: str | None = None  # CLIPdir
    output_caption: str | None = None
    mask: ImageRef | None = None  # edit region (MIGEBench, MagicBrush)
    subject: ImageRef | None = None  # MIGEBench: the entity whose preservation is scored
    baseline: ImageRef | None = None  # what copy-the-input outputs, when not the source / the reference
    number: int = 0  # its request number: seed model.predict_seed + number (mige_lightning/generate.py)
    followups: tuple[str, ...] = ()  # MagicBrush final-turn: later instructions, chained
    prepare: str = "raw"  # how `references` are prepared for the model (see resolve_reference_prep)
    meta: dict = field(default_factory=dict, compare=False)


def open_image(ref: ImageRef) -> PIL.Image.Image:
    if isinstance(ref, bytes):  # the same checks and EXIF orientation as a file
        with PIL.Image.open(io.BytesIO(ref)) as img:
            return decode_rgb(img, f"<{len(ref)} encoded bytes>")
    return load_rgb(ref)


# ------------------------------------------------------------------ reference preparation
ReferencePrep = Callable[[PIL.Image.Image, str], PIL.Image.Image]


def on_black_from_mask_file(image: PIL.Image.Image, path: str) -> PIL.Image.Image:
    """The subject on black: ``<stem>_mask.png`` beside the image (white = subject) keeps its pixels."""
    mask_path = Path(path).with_name(f"{Path(path).stem}_mask.png")
    if not mask_path.is_file():
        raise ManifestError(
            f"{path}: reference_prep 'mask_file' (model.protocol authors' DreamBench references) needs "
            f"its mask {mask_path}, which is missing; write the subject's mask there (white = subject), "
            "or set data.benchmark.reference_prep to raw or to a segmenter's package.module:function"
        )
    with PIL.Image.open(mask_path) as m:
        mask = m.convert("L")
    if mask.size != image.size:
        raise ManifestError(
            f"{mask_path}: mask is {mask.size[0]}×{mask.size[1]}, its image {image.size[0]}×{image.size[1]}"
        )
    black = PIL.Image.new("RGB", image.size)
    return PIL.Image.composite(image, black, mask.point(lambda v: 255 if v >= 128 else 0))


REFERENCE_PREPS: dict[str, ReferencePrep | None] = {"raw": None, "mask_file": on_black_from_mask_file}


@cache
def resolve_reference_prep(name: str) -> ReferencePrep | None:
    """``raw`` (None: the photo as it is), ``mask_file``, or ``package.module:function``."""
    if name in REFERENCE_PREPS:
        return REFERENCE_PREPS[name]
    if ":" not in name:
        raise ValueError(
            f"data.benchmark.reference_prep: expected one of {sorted(REFERENCE_PREPS)} or "
            f"'package.module:function', got {name!r}"
        )
    module, fn = name.split(":", 1)
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"data.benchmark.reference_prep: cannot import {name!r}: {e}") from e


def _must_exist(path: Path, where: str) -> str:
    if not path.is_file():
        raise ManifestError(f"{where}: missing file {path}")
    return str(path)


# ---------------------------------------------------------------------------------- Emu Edit
def rewrite_emu_instruction(instruction: str, task: str, *, global_tasks=("global",)) -> str:
    """The authors' rewrite: "the/this image/photo/picture" becomes the placeholder; otherwise the
    placeholder is appended, " of <imagehere>" for global edits and " in <imagehere>" for the rest.
    (Upstream writes "of<imagehere>" without a space; BLIP normalisation makes them equivalent
    tokens here apart from that space, which we keep.)"""
    for keyword in EMU_KEYWORDS:
        instruction = re.sub(
            rf"\s*{re.escape(keyword)}\s*", " <imagehere> ", instruction, flags=re.IGNORECASE
        )
    instruction = instruction.strip()
    if "<imagehere>" not in instruction:
        joiner = " of <imagehere>" if task in global_tasks else " in <imagehere>"
        instruction = instruction.rstrip(".") + joiner
    return instruction


def read_emu_edit(root: str | Path, *, split: str = "test", limit: int | None = None) -> list[EvalItem]:
    import pyarrow.parquet as pq

    root = Path(root)
    files = sorted(p for p in root.rglob("*.parquet") if split in p.name or split in p.parent.name)
    if not files:
        raise ManifestError(
            f"{root}: no parquet file for split '{split}' (expected the emu_edit_test_set layout)"
        )
    items = []
    for f in files:
        table = pq.read_table(f)
        missing = {"instruction", "image", "task", "input_caption", "output_caption"} - set(
            table.column_names
        )
        if missing:
            raise ManifestError(f"{f}: missing columns {sorted(missing)}")
        for row_no, row in enumerate(table.to_pylist()):
            image = row["image"]
            data = image.get("bytes") if isinstance(image, dict) else image
            if not data:
                raise ManifestError(f"{f}: row {row_no}: no image bytes")
            items.append(
                EvalItem(
                    id=str(row.get("idx", f"{f.stem}-{row_no}")),
                    task=Task.EDIT,
                    instruction=rewrite_emu_instruction(row["instruction"], row["task"]),
                    references=(data,),
                    source=data,
                    reference=data,  # no ground truth: outputs are compared with the source
                    # rows whose captions are identical describe no change: the authors leave
                    # them out of CLIP-T as well as CLIPdir
                    caption=clip_t_caption(row["input_caption"], row["output_caption"]),
                    input_caption=row["input_caption"],
                    output_caption=row["output_caption"],
                    meta={"emu_task": row["task"]},
                )
            )
    return items[:limit] if limit else items


# -------------------------------------------------------------------------------- MagicBrush
def read_magicbrush(
    root: str | Path, *, reference: str = "target", turns: str = "single", limit: int | None = None
) -> list[EvalItem]:
    if reference not in ("target", "source") or turns not in ("single", "final"):
        raise ValueError(
            f"magicbrush: reference must be target|source and turns single|final, got {reference}, {turns}"
        )
    root = Path(root)
    sessions_file = root / "edit_sessions.json"
    if not sessions_file.is_file():
        raise ManifestError(f"{sessions_file}: missing (expected the MagicBrush test layout)")
    sessions = json.loads(sessions_file.read_text())
    desc_file = root / "global_descriptions.json"
    descriptions = json.loads(desc_file.read_text()) if desc_file.is_file() else {}
    items = []
    for sid, session in sessions.items():
        where = f"{sessions_file}: session {sid}"
        desc = descriptions.get(sid, {})

        def path(name: str, _where=where, _sid=sid) -> str:
            return _must_exist(root / "images" / _sid / name, _where)

        chosen = list(enumerate(session)) if turns == "single" else [(0, session[0])]
        for t, turn in chosen:
            last = session[-1] if turns == "final" else turn
            src, out = path(turn["input"]), path(last["output"])
            items.append(
                EvalItem(
                    id=f"{sid}-{t + 1}" if turns == "single" else f"{sid}-final",
                    task=Task.EDIT,
                    instruction=rewrite_emu_instruction(turn["instruction"], "local"),
                    references=(src,),
                    source=src,
                    reference=out if reference == "target" else src,
                    caption=desc.get(last["output"]),
                    input_caption=desc.get(turn["input"]),
                    output_caption=desc.get(last["output"]),
                    mask=path(last["mask"]) if last.get("mask") else None,
                    followups=tuple(rewrite_emu_instruction(x["instruction"], "local") for x in session[1:])
                    if turns == "final"
                    else (),
                )
            )
    return items[:limit] if limit else items


# -------------------------------------------------------------------------------- DreamBench
_PROMPT_RE = re.compile(r"'(.+?)'\.format\(\s*unique_token\s*,\s*class_token\s*\)")


def parse_dreambench_prompts(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject → class, object prompts, live-subject prompts) from ``prompts_and_classes.txt``."""
    classes, objects, live, section = {}, [], [], None
    for line in text.splitlines():
        s = line.strip()
        low = s.lower()
        if low == "classes":
            section = "classes"
        elif low.startswith("object prompts"):
            section = "object"
        elif low.startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in s and not s.startswith("subject_name"):
            name, cls = (x.strip() for x in s.split(",", 1))
            classes[name] = cls
        elif (m := _PROMPT_RE.search(s)) and section in ("object", "live"):
            (objects if section == "object" else live).append(m.group(1))
    return classes, objects, live


def read_dreambench(
    root: str | Path,
    *,
    images_per_prompt: int = 4,
    live_classes=("dog", "cat"),
    reference_prep: str = "raw",
    limit: int | None = None,
) -> list[EvalItem]:
    resolve_reference_prep(reference_prep)  # a bad name fails here, before any sampling
    root = Path(root)
    dataset = root / "dataset" if (root / "dataset").is_dir() else root
    prompts_file = dataset / "prompts_and_classes.txt"
    if not prompts_file.is_file():
        raise ManifestError(f"{prompts_file}: missing (expected the google/dreambooth layout)")
    classes, objects, live = parse_dreambench_prompts(prompts_file.read_text())
    if not classes or not objects or not live:
        raise ManifestError(f"{prompts_file}: could not read classes and both prompt lists")
    items = []
    for subject, cls in sorted(classes.items()):
        images = sorted(
            p
            for p in (dataset / subject).glob("*")
            if p.suffix.lower() in (".jpg", ".jpeg", ".png") and not p.stem.endswith("_mask")
        )
        if not images:
            raise ManifestError(f"{prompts_file}: subject '{subject}' has no images in {dataset / subject}")
        ref = str(images[0])  # one reference image per subject
        for p_idx, template in enumerate(live if cls in live_classes else objects):
            instruction = re.sub(r"\s+", " ", template.format("<imagehere>", "")).strip()
            caption = re.sub(r"\s+", " ", template.format("", cls)).strip()
            for k in range(images_per_prompt):
                items.append(
                    EvalItem(
                        id=f"{subject}-{p_idx:02d}-{k}",
                        task=Task.SUBJECT,
                        instruction=instruction,
                        references=(ref,),
                        source=None,
                        reference=ref,
                        caption=caption,
                        number=k,
                        prepare=reference_prep,
                        meta={"subject": subject, "class": cls},
                    )
                )
    return items[:limit] if limit else items


# --------------------------------------------------------------------------------- MIGEBench
def _bench_path(value: str, root: Path, where: str) -> str:
    """The authors' files hold absolute '/path/to/MIGEBench/…' paths: re-root them under ``root``."""
    p = Path(value)
    candidates = [p] if p.is_absolute() else [root / p]
    if "MIGEBench/" in value:
        candidates.append(root / value.split("MIGEBench/", 1)[1])
    for c in candidates:
        if c.is_file():
            return str(c)
    raise ManifestError(f"{where}: missing file {value} (looked in {[str(c) for c in candidates]})")


def read_migebench(
    root: str | Path, *, subtasks=("add", "replace"), limit: int | None = None
) -> list[EvalItem]:
    root = Path(root)
    items = []
    for sub in subtasks:
        bench = root / f"{sub}_bench.json"
        if not bench.is_file():
            raise ManifestError(f"{bench}: missing (expected MIGEBench's {sub}_bench.json)")
        for n, rec in enumerate(json.loads(bench.read_text())):
            where = f"{bench}: item {n} (idx {rec.get('idx')})"
            entities = [_bench_path(p, root, where) for p in rec["entity_path"]]
            source = _bench_path(rec["source_path"][0], root, where)
            white = rec.get("entity_path_white") or []
            subject = (
                _bench_path(white[0], root, where) if white else next(e for e in entities if e != source)
            )
            items.append(
                EvalItem(
                    id=f"{sub}-{rec.get('idx', n)}",
                    task=Task.SUBJECT_EDIT,
                    instruction=rec["multi_prompt"],
                    references=tuple(entities),
                    source=source,
                    reference=_bench_path(rec["image"], root, where),
                    caption=rec.get("target_caption"),
                    mask=_bench_path(rec["mask_path"][0], root, where) if rec.get("mask_path") else None,
                    subject=subject,
                    meta={"subtask": sub, "object": rec.get("object")},
                )
            )
    return items[:limit] if limit else items


def read_synthetic(root: str | Path, *, split: str = "heldout", limit: int | None = None) -> list[EvalItem]:
    """A generated synthetic world's split (default: held-out), judged from pixels by the scene
    judge: each item carries its target's scene, its kind and the world's size in ``meta``."""
    from mige_world.scene_judge import load_truth, world_size

    root = Path(root)
    if not (root / "world.json").is_file():
        raise ManifestError(f"{root}: not a generated synthetic world (no world.json)")
    size = world_size(root)
    items = [
        EvalItem(
            id=key,
            task=Task.parse(s.task),
            instruction=s.instruction,
            references=tuple(str(p) for p in s.references),
            source=str(s.source) if s.source else None,
            reference=str(s.target),
            baseline=str(s.input_image),  # subject: the first reference; the target is `reference`
            number=s.number,  # its position among its task's
            meta={"kind": s.kind, "size": size},
        )
        for key, s in load_truth(root, split).items()
    ]
    return items[:limit] if limit else items


READERS = {
    "synthetic": read_synthetic,
    "emu_edit": read_emu_edit,
    "magicbrush": read_magicbrush,
    "dreambench": read_dreambench,
    "migebench": read_migebench,
}


def read_benchmark(spec: dict) -> list[EvalItem]:
    """``{name: emu_edit | magicbrush | dreambench | migebench, root: …, **reader options}``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in READERS:
        raise ValueError(f"data.benchmark.name: unknown benchmark {name!r}; choose one of {sorted(READERS)}")
    return READERS[name](spec.pop("root"), **spec)


@dataclass(frozen=True, eq=False)
class BenchmarkSample:
    """A benchmark item, its images loaded (``images``: what the scorer reads — references as
    prepared for the model, source, reference, mask, subject, baseline) and its generation request."""

    item: EvalItem
    images: dict
    request: GenerationRequest


def load_sample(it: EvalItem) -> BenchmarkSample:
    prep = resolve_reference_prep(it.prepare)
    images = {
        "references": [open_image(r) if prep is None else prep(open_image(r), str(r)) for r in it.references],
        "source": open_image(it.source) if it.source is not None else None,
        "reference": open_image(it.reference),
        "mask": open_image(it.mask) if it.mask is not None else None,
        "subject": open_image(it.subject) if it.subject is not None else None,
        "baseline": open_image(it.baseline) if it.baseline is not None else None,
    }
    request = GenerationRequest(
        id=it.id,
        task=it.task,
        instruction=it.instruction,
        references=tuple(images["references"]),
        source=images["source"],
        number=it.number,
        followups=it.followups,
        origin=it.id,
    )
    return BenchmarkSample(it, images, request)


class BenchmarkDataset:
    def __init__(self, items: list[EvalItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> BenchmarkSample:
        return load_sample(self.items[i])


class BenchmarkDataModule(MIGEDataModule):
    """``test``: one benchmark's items (generated and scored by the module's benchmark run,
    ``mige_lightning/evaluation.py``).

    Args:
        benchmark: ``{name: emu_edit | magicbrush | dreambench | migebench | synthetic, root: …,
            **reader options}``, e.g. ``{name: magicbrush, root: /data/MagicBrush/test, reference:
            target, turns: single}``. A later config file's spec is merged into the earlier one
            while it names the same benchmark; one naming another replaces it whole (logged).
        batch_size: items per batch.
        num_workers: processes decoding the benchmark images.
    """

    def __init__(self, benchmark: dict[str, Any], *, batch_size: int = 8, num_workers: int = 0):
        super().__init__(num_workers=num_workers)
        if not isinstance(benchmark, dict) or not benchmark.get("name"):
            raise ValueError(f"data.benchmark: expected {{name: …, root: …}}, got {benchmark!r}")
        self.benchmark = dict(benchmark)
        self.batch_size = batch_size
        self.protocol_reference_prep = "raw"  # the model's protocol's (use_protocol)

    @property
    def name(self) -> str:
        return self.benchmark["name"]

    def output_judge(self):
        """The synthetic world's pixel judge of the outputs (``test`` scores with it); None for the
        other benchmarks."""
        if self.name != "synthetic":
            return None
        from mige_world.scene_judge import SceneJudge

        return SceneJudge(self.benchmark["root"], self.benchmark.get("split", "heldout"))

    def use_protocol(self, protocol) -> None:
        """The model's sampling and scoring protocol (``mige_lightning/protocol.py``, handed over by
        the module): DreamBench references are prepared as it says unless ``benchmark.reference_prep``
        names a preparation."""
        self.protocol_reference_prep = protocol.reference_prep

    @property
    def reference_prep(self) -> str | None:
        """How DreamBench's reference photos reach the model (the spec's ``reference_prep``, else
        the protocol's); None on the other benchmarks, whose references are used as they ship."""
        if self.name != "dreambench":
            return None
        return self.benchmark.get("reference_prep") or self.protocol_reference_prep

    def test_dataloader(self) -> DataLoader:
        spec = dict(self.benchmark)
        if self.reference_prep is not None:
            spec["reference_prep"] = self.reference_prep
        items = read_benchmark(spec)
        log.info("benchmark %s: %d items", self.name, len(items))
        return DataLoader(
            BenchmarkDataset(items),
            batch_size=self.batch_size,
            collate_fn=SamplingBatch,
            num_workers=self.num_workers,
        )

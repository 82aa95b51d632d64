"""Scoring generated images the way each benchmark's paper table does, plus the copy-the-input
baseline row and edit locality.

For every item: DINO / CLIP-I / L1 / L2 of the output against ``item.reference``; CLIP-T against
``item.caption``; CLIPdir from ``item.source`` → output with the input / output captions. The
same metrics are computed for the *baseline*: the unedited input scored as if it were the output
(the source for editing; the reference image for subject-driven generation, or the item's own
``baseline`` image where the reference is the target, as on the synthetic world), which exposes
inflated editing scores. Where a mask exists: L1 / L2 outside it (output vs source: what should
not change) and DINO / CLIP-I inside it (output vs reference). MIGEBench also scores subject
preservation: the subject cropped from the output (pluggable ``crop_fn``) against the given entity.
"""

from __future__ import annotations

import importlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from torch import nn

from mige_lightning.metrics import (
    COLUMN_NAMES,
    CLIPImageScore,
    DINOScore,
    MeanScore,
    build_metrics,
    update_caption_scores,
)

SCENE_VALUES = ("scene_acc", "element_acc")  # per task / kind, from the synthetic world's judge
BASELINE = "copy-the-input baseline"  # the baseline's row label in every table
CropFn = Callable[[PIL.Image.Image, PIL.Image.Image | None], PIL.Image.Image]


def crop_with_mask(image: PIL.Image.Image, mask: PIL.Image.Image | None) -> PIL.Image.Image:
    """The bounding box of the mask (resized to the image), or the whole image without a mask."""
    if mask is None:
        return image
    m = np.asarray(mask.convert("L").resize(image.size, PIL.Image.NEAREST)) > 127
    if not m.any():
        return image
    ys, xs = np.nonzero(m)
    return image.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))


def crop_with_mask_on_black(image: PIL.Image.Image, mask: PIL.Image.Image | None) -> PIL.Image.Image:
    """``crop_with_mask`` with every pixel outside the mask black: the authors' subject crop (their
    MIGEBench script zeroes all but the segmented subject, then crops its box)."""
    if mask is None:
        return image
    m = np.asarray(mask.convert("L").resize(image.size, PIL.Image.NEAREST)) > 127
    if not m.any():
        return image
    keep = PIL.Image.fromarray(m.astype(np.uint8) * 255, "L")
    on_black = PIL.Image.composite(image.convert("RGB"), PIL.Image.new("RGB", image.size), keep)
    return crop_with_mask(on_black, mask)


CROP_FNS: dict[str, CropFn] = {"mask": crop_with_mask, "mask_black": crop_with_mask_on_black}


def resolve_crop_fn(name: str) -> CropFn:
    """``mask`` (default: the mask's box), ``mask_black`` (the box with the background black, as
    the authors), or ``package.module:function`` — e.g. a Grounded-SAM wrapper taking (image,
    mask) and returning the subject crop."""
    if name in CROP_FNS:
        return CROP_FNS[name]
    if ":" not in name:
        raise ValueError(
            f"model.eval_metrics.crop_fn: expected one of {sorted(CROP_FNS)} or 'package.module:function', "
            f"got {name!r}"
        )
    module, fn = name.split(":", 1)
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.eval_metrics.crop_fn: cannot import {name!r}: {e}") from e


def jpeg_round_trip(image: PIL.Image.Image, quality: int) -> PIL.Image.Image:
    """``image`` written as a JPEG at ``quality`` and read back: what a scorer reading ``.jpg``
    files sees (the authors' inference scripts save ``{idx}.jpg`` at PIL's default, 75)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with PIL.Image.open(buffer) as decoded:
        return decoded.convert("RGB")


class MaskedPixelError(MeanScore):
    """L1 (power 1) or MSE (power 2) over the pixels *outside* the mask, output vs source, [0, 1]."""

    higher_is_better = False

    def __init__(self, power: int, **kwargs):
        super().__init__(**kwargs)
        self.power = power

    def update(self, outputs, sources, masks) -> None:
        values = []
        for out, src, mask in zip(outputs, sources, masks, strict=True):
            o = np.asarray(out.convert("RGB").resize(src.size, PIL.Image.BICUBIC), dtype=np.float64) / 255
            s = np.asarray(src.convert("RGB"), dtype=np.float64) / 255
            keep = np.asarray(mask.convert("L").resize(src.size, PIL.Image.NEAREST)) <= 127
            values.append(float((np.abs(o - s) ** self.power)[keep].mean()) if keep.any() else float("nan"))
        self._accumulate(torch.tensor(values))


class BenchmarkEvaluator(nn.Module):
    """``crop_fn``: the subject crop (``resolve_crop_fn``); ``jpeg_quality``: score each generated
    image after a JPEG round trip at this quality (the authors score their saved ``.jpg`` files:
    75), None = as generated; ``judge``: the data's own judge of outputs, where it has one (the
    synthetic world's pixel judge, ``output_judge()`` of its data module)."""

    def __init__(
        self,
        *,
        dino: str | None,
        clip_model: str,
        clip_pretrained: str | None,
        crop_fn: str = "mask",
        jpeg_quality: int | None = None,
        judge: nn.Module | None = None,
    ):
        super().__init__()
        self.jpeg_quality = jpeg_quality
        self.model_metrics = nn.ModuleDict(
            build_metrics(dino=dino, clip_model=clip_model, clip_pretrained=clip_pretrained)
        )
        self.baseline_metrics = nn.ModuleDict(
            build_metrics(dino=dino, clip_model=clip_model, clip_pretrained=clip_pretrained)
        )
        extra: dict[str, MeanScore] = {"l1_outside": MaskedPixelError(1), "l2_outside": MaskedPixelError(2)}
        for metric in self.model_metrics.values():
            if isinstance(metric, DINOScore):
                extra["dino_inside"] = DINOScore(metric.embedder)
                extra["subject_dino"] = DINOScore(metric.embedder)
            if isinstance(metric, CLIPImageScore):
                extra["clip_i_inside"] = CLIPImageScore(metric.embedder)
                extra["subject_clip_i"] = CLIPImageScore(metric.embedder)
        self.extra_metrics = nn.ModuleDict(extra)
        self.crop = resolve_crop_fn(crop_fn)
        self.judge = judge  # update(outputs, targets) → rows; compute() → {label: groups}

    def _judge(self, outputs, items, baselines) -> dict[str, list]:
        """The data's judge, where it has one: per-sample columns, by each item's reference."""
        if self.judge is None:
            return {}
        verdicts = self.judge.update(outputs, [it.reference for it in items], baselines=baselines)
        return {k: [v[k] for v in verdicts] for k in verdicts[0]} if verdicts else {}

    def _score(self, metrics: nn.ModuleDict, outputs, items, images) -> dict[str, list[float]]:
        """Update ``metrics`` for one batch; per-sample values (NaN = not applicable)."""
        n = len(outputs)
        rows = {name: [float("nan")] * n for name in metrics}
        refs = [images[i]["reference"] for i in range(n)]
        for name in ("dino", "clip_i", "l1", "l2"):
            if name in metrics:
                metrics[name].update(outputs, refs)
                rows[name] = metrics[name].last.tolist()
        rows.update(
            update_caption_scores(
                metrics,
                outputs,
                [images[i]["source"] if it.source is not None else None for i, it in enumerate(items)],
                [it.caption for it in items],
                [it.input_caption for it in items],
                [it.output_caption for it in items],
            )
        )
        return rows

    def update(self, outputs: list[PIL.Image.Image], items: list, images: list[dict]) -> list[dict]:
        """Score a batch (model outputs and the baseline); returns one row of values per item."""
        if self.jpeg_quality is not None:  # scored as the file a JPEG-writing pipeline would read back
            outputs = [jpeg_round_trip(image, self.jpeg_quality) for image in outputs]
        model_rows = self._score(self.model_metrics, outputs, items, images)
        baselines = [
            next(im[k] for k in ("baseline", "source", "reference") if im.get(k) is not None) for im in images
        ]
        base_rows = self._score(self.baseline_metrics, baselines, items, images)
        extra_rows = {name: [float("nan")] * len(items) for name in self.extra_metrics}
        masked = [
            i for i, im in enumerate(images) if im.get("mask") is not None and im.get("source") is not None
        ]
        if masked:
            outs = [outputs[i] for i in masked]
            for name in ("l1_outside", "l2_outside"):
                self.extra_metrics[name].update(
                    outs, [images[i]["source"] for i in masked], [images[i]["mask"] for i in masked]
                )
                for j, i in enumerate(masked):
                    extra_rows[name][i] = self.extra_metrics[name].last[j].item()
            inside_out = [crop_with_mask(outputs[i], images[i]["mask"]) for i in masked]
            inside_ref = [crop_with_mask(images[i]["reference"], images[i]["mask"]) for i in masked]
            for name in ("dino_inside", "clip_i_inside"):
                if name in self.extra_metrics:
                    self.extra_metrics[name].update(inside_out, inside_ref)
                    for j, i in enumerate(masked):
                        extra_rows[name][i] = self.extra_metrics[name].last[j].item()
        subj = [i for i, im in enumerate(images) if im.get("subject") is not None]
        if subj:
            crops = [self.crop(outputs[i], images[i].get("mask")) for i in subj]
            for name in ("subject_dino", "subject_clip_i"):
                if name in self.extra_metrics:
                    self.extra_metrics[name].update(crops, [images[i]["subject"] for i in subj])
                    for j, i in enumerate(subj):
                        extra_rows[name][i] = self.extra_metrics[name].last[j].item()
        judge_rows = self._judge(outputs, items, baselines)
        rows = []
        for i, item in enumerate(items):
            row = {"id": item.id, "task": item.task.value, "instruction": item.instruction}
            row.update({k: v[i] for k, v in judge_rows.items()})
            row.update({k: v[i] for k, v in model_rows.items()})
            row.update({f"baseline_{k}": v[i] for k, v in base_rows.items()})
            row.update({k: v[i] for k, v in extra_rows.items()})
            rows.append(row)
        return rows

    def compute(self) -> BenchmarkResult:
        """The benchmark's figures, synced across ranks."""

        def values(metrics):
            with warnings.catch_warnings():  # a metric this benchmark never feeds (no masks, say) is NaN
                warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
                out = {COLUMN_NAMES.get(k, k): float(m.compute()) for k, m in metrics.items()}
            return {k: v for k, v in out.items() if not np.isnan(v)}  # NaN: not applicable here

        return BenchmarkResult(
            model=values(self.model_metrics),
            baseline=values(self.baseline_metrics),
            extras=values(self.extra_metrics),
            scenes=self.judge.compute() if self.judge is not None else None,
        )


@dataclass(frozen=True)
class BenchmarkResult:
    """A ``test`` run's figures: the model's and the copy-the-input baseline's columns (paper
    names: DINO, CLIP-I, …), the extras (edit locality, subject preservation) and, on the
    synthetic world, the scene judge's groups (``SceneJudge.compute``: ``{"model", BASELINE}`` →
    ``{task or task/kind: {scene_acc, element_acc, n}}``). The report callback reads it as is;
    ``log_values`` is the view the module logs."""

    model: dict[str, float]
    baseline: dict[str, float]
    extras: dict[str, float] = field(default_factory=dict)
    scenes: dict[str, dict[str, dict[str, float]]] | None = None

    def log_values(self) -> dict[str, float]:
        """``test/<metric>``, ``test/baseline/<metric>``, ``test/<extra>`` and on the synthetic
        world ``test[/baseline]/<task or task/kind>/{scene_acc,element_acc}``."""
        values = {f"test/{k}": v for k, v in {**self.model, **self.extras}.items()}
        values.update({f"test/baseline/{k}": v for k, v in self.baseline.items()})
        for label, groups in (self.scenes or {}).items():
            prefix = "test" if label == "model" else "test/baseline"
            for group, accs in groups.items():
                for name in SCENE_VALUES:
                    values[f"{prefix}/{group}/{name}"] = accs[name]
        return values

    def tables(self) -> dict:
        """What ``results.json`` holds: ``{"MIGE", BASELINE, "extras"[, "scenes"]}``."""
        out = {"MIGE": self.model, BASELINE: self.baseline, "extras": self.extras}
        if self.scenes is not None:
            out["scenes"] = {"MIGE" if k == "model" else k: v for k, v in self.scenes.items()}
        return out


class BenchmarkRun:
    """One ``test`` run on a benchmark: generate each item's output, score it, return the lot.

    The LightningModule's ``test_step`` delegates here and returns ``step``'s result, so callbacks
    (``callbacks/benchmark_report.py``) get each batch's generated images and per-sample rows as
    ``on_test_batch_end``'s ``outputs``; ``compute`` returns the typed ``BenchmarkResult``.
    ``generate``: requests → ``Generated`` (the module's one sampling path).
    """

    def __init__(self, generate: Callable[[list], list], evaluator: BenchmarkEvaluator):
        self.generate, self.evaluator = generate, evaluator

    def step(self, batch: list) -> dict:
        """A batch of benchmark samples (``datamodules.benchmarks.BenchmarkSample``) →
        ``{"generated", "rows"}`` (rows: per-sample scores)."""
        generated = self.generate([b.request for b in batch])
        outputs = [g.image for g in generated]
        rows = self.evaluator.update(outputs, [b.item for b in batch], [b.images for b in batch])
        return {"generated": generated, "rows": rows}

    def compute(self) -> BenchmarkResult:
        return self.evaluator.compute()


def format_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per setting (e.g. model, baseline), columns per task group."""
    groups = list(dict.fromkeys(g for r in rows.values() for g in r))
    head = "| | " + " | ".join(f"{g} scene / element (n)" for g in groups) + " |"
    lines = [head, "|---|" + "---|" * len(groups)]
    for label, r in rows.items():
        cells = [
            f"{r[g]['scene_acc']:.2f} / {r[g]['element_acc']:.2f} ({r[g]['n']})" if g in r else "—"
            for g in groups
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

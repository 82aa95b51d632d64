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
import math
import warnings
from collections.abc import Callable

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


def resolve_crop_fn(name: str) -> CropFn:
    """``mask`` (default), or ``package.module:function`` — e.g. a Grounded-SAM wrapper taking
    (image, mask) and returning the subject crop."""
    if name == "mask":
        return crop_with_mask
    if ":" not in name:
        raise ValueError(f"model.eval_crop_fn: expected 'mask' or 'package.module:function', got {name!r}")
    module, fn = name.split(":", 1)
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.eval_crop_fn: cannot import {name!r}: {e}") from e


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
    def __init__(
        self, *, dino: str | None, clip_model: str, clip_pretrained: str | None, crop_fn: str = "mask"
    ):
        super().__init__()
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
        self.scene_metrics: nn.ModuleDict | None = None  # the synthetic world: {model, baseline} judges

    def _judge(self, outputs, items, baselines) -> dict[str, list]:
        """Scene judge on items that carry their scene (the synthetic world); per-sample columns."""
        from mige_lightning.scene_judge import SceneAccuracy

        n = len(items)
        rows = {k: [float("nan")] * n for k in ("scene_correct", "element_acc", "wrong")}
        rows.update({f"baseline_{k}": [float("nan")] * n for k in ("scene_correct", "element_acc")})
        judged = [i for i, it in enumerate(items) if "scene" in it.meta]
        if not judged:
            return {}
        if self.scene_metrics is None:
            size = items[judged[0]].meta["size"]
            self.scene_metrics = nn.ModuleDict(
                {"model": SceneAccuracy(size=size), "baseline": SceneAccuracy(size=size)}
            )
        scenes = [items[i].meta["scene"] for i in judged]
        kinds = [items[i].meta["kind"] for i in judged]
        for name, images in (("model", outputs), ("baseline", baselines)):
            metric = self.scene_metrics[name]
            metric.update([images[i] for i in judged], scenes, kinds)
            prefix = "" if name == "model" else "baseline_"
            for j, i in enumerate(judged):
                v = metric.last[j]
                rows[f"{prefix}scene_correct"][i] = float(v.scene_correct)
                rows[f"{prefix}element_acc"][i] = v.element_accuracy
                if name == "model":
                    rows["wrong"][i] = " ".join(v.wrong)
        return rows

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
            if "kind" in item.meta:
                row["kind"] = item.meta["kind"]
            row.update({k: v[i] for k, v in judge_rows.items()})
            row.update({k: v[i] for k, v in model_rows.items()})
            row.update({f"baseline_{k}": v[i] for k, v in base_rows.items()})
            row.update({k: v[i] for k, v in extra_rows.items()})
            rows.append(row)
        return rows

    def compute(self) -> dict[str, dict[str, float]]:
        """``{"MIGE": {...}, "copy-the-input baseline": {...}, "extras": {...}}``; synced across ranks."""

        def values(metrics):
            with warnings.catch_warnings():  # a metric this benchmark never feeds (no masks, say) is NaN
                warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
                out = {COLUMN_NAMES.get(k, k): float(m.compute()) for k, m in metrics.items()}
            return {k: v for k, v in out.items() if not np.isnan(v)}  # NaN: not applicable here

        out = {
            "MIGE": values(self.model_metrics),
            "copy-the-input baseline": values(self.baseline_metrics),
            "extras": values(self.extra_metrics),
        }
        if self.scene_metrics is not None:  # synthetic world: per task / kind scene and element accuracy
            out["scenes"] = {
                "MIGE": self.scene_metrics["model"].compute(),
                "copy-the-input baseline": self.scene_metrics["baseline"].compute(),
            }
        return out


class BenchmarkRun:
    """One ``test`` run on a benchmark: generate each item's output, score it, return the lot.

    The LightningModule's ``test_step`` delegates here and returns ``step``'s result, so callbacks
    (``callbacks/benchmark_report.py``) get each batch's images and per-sample rows as
    ``on_test_batch_end``'s ``outputs``; ``compute`` returns the benchmark's figures (synced across
    ranks), which the module logs.
    """

    def __init__(self, pipe, evaluator: BenchmarkEvaluator, *, num_inference_steps: int | None, seed: int):
        self.pipe, self.evaluator = pipe, evaluator
        self.num_inference_steps, self.seed = num_inference_steps, seed

    def generate(self, items: list, images: list[dict]) -> list[PIL.Image.Image]:
        """Items → output images (per-item seeds; MagicBrush follow-ups chained on the outputs)."""
        outputs: list = [None] * len(items)
        by_task: dict = {}
        for i, item in enumerate(items):
            by_task.setdefault(item.task, []).append(i)
        for task, idx in by_task.items():
            out = self.pipe(
                [items[i].instruction for i in idx],
                task=task,
                images=[images[i]["images"] for i in idx],
                source=[images[i]["source"] for i in idx],
                num_inference_steps=self.num_inference_steps,
                seeds=[self.seed + items[i].seed for i in idx],
            )
            for i, image in zip(idx, out.images, strict=True):
                outputs[i] = image
        for i, item in enumerate(items):
            for instruction in item.followups:  # multi-turn: edit the model's own previous output
                prev = outputs[i]
                outputs[i] = self.pipe(
                    instruction,
                    task=item.task,
                    images=[prev],
                    source=prev,
                    num_inference_steps=self.num_inference_steps,
                    seeds=[self.seed + item.seed],
                ).images[0]
        return outputs

    def step(self, batch: list[dict]) -> dict:
        """A batch of benchmark items → ``{"ids", "images", "rows"}`` (rows: per-sample scores)."""
        items = [b["item"].value for b in batch]
        images = [b["images"] for b in batch]
        outputs = self.generate(items, images)
        rows = self.evaluator.update(outputs, items, images)
        return {"ids": [it.id for it in items], "images": outputs, "rows": rows}

    def compute(self) -> dict[str, float]:
        """The benchmark's figures as flat log keys: ``test/<metric>`` (the model),
        ``test/baseline/<metric>`` (the copy-the-input baseline), and on the synthetic world
        ``test[/baseline]/<task or task/kind>/{scene_acc,element_acc}``."""
        results = self.evaluator.compute()
        values = {}
        for name, value in {**results["MIGE"], **results["extras"]}.items():
            values[f"test/{name}"] = value
        for name, value in results["copy-the-input baseline"].items():
            values[f"test/baseline/{name}"] = value
        for label, groups in results.get("scenes", {}).items():
            prefix = "test" if label == "MIGE" else "test/baseline"
            for group, accs in groups.items():
                for name in SCENE_VALUES:
                    values[f"{prefix}/{group}/{name}"] = accs[name]
        return values


def tables_from_logged(logged: dict[str, float], rows: list[dict]) -> dict:
    """``BenchmarkRun.compute``'s keys, as logged, back into ``BenchmarkEvaluator.compute``'s tables
    (``{"MIGE", "copy-the-input baseline", "extras", "scenes"}``); the scene table's counts (n)
    come from the per-sample rows."""
    out: dict = {"MIGE": {}, "copy-the-input baseline": {}, "extras": {}, "scenes": {}}
    for key, value in logged.items():
        parts = key.split("/")[1:]
        label = "MIGE"
        if parts[0] == "baseline":
            label, parts = "copy-the-input baseline", parts[1:]
        if parts[-1] in SCENE_VALUES:  # <task>[/<kind>]/<scene_acc|element_acc>
            group = "/".join(parts[:-1])
            out["scenes"].setdefault(label, {}).setdefault(group, {})[parts[-1]] = value
        elif parts[0] in COLUMN_NAMES.values():
            out[label][parts[0]] = value
        elif label == "MIGE":
            out["extras"][parts[0]] = value
    counts: dict[str, int] = {}
    for row in rows:
        if row.get("scene_correct") is not None and not math.isnan(row["scene_correct"]):
            for group in {row["task"], f"{row['task']}/{row.get('kind')}"}:
                counts[group] = counts.get(group, 0) + 1
    for groups in out["scenes"].values():
        for group, accs in groups.items():
            accs["n"] = counts.get(group, 0)
    if not out["scenes"]:
        del out["scenes"]
    return out

"""Score Lightning's validation loop: the module samples held-out requests in ``validation_step``,
this callback scores each batch's outputs and logs through ``pl_module.log``.

Logged keys (every validation run, on every rank, so ``ModelCheckpoint(monitor=…)``,
``EarlyStopping`` and the progress bar see them): ``val/<task>/l1``, ``val/<task>/l2`` always;
``val/<task>/dino`` and ``val/<task>/clip_i`` when ``model.eval_metrics`` configures the backbones,
and with CLIP also ``val/<task>/clip_t`` (output vs the record's ``output_caption``; rows whose
input and output captions are identical skipped) and ``val/<task>/clip_dir`` (source → output vs
``input_caption`` → ``output_caption``; identical captions skipped) when that task's held-out
records carry captions — the same metrics and rules as ``test`` (``mige_lightning/metrics.py``);
on the synthetic world (``data.synthetic``) the pixel judge's ``val/<task>/scene_acc`` and
``val/<task>/element_acc``, and once, at the first validation of a run, the copy-the-input
baseline's ``val_baseline/<task>/{scene_acc,element_acc,l1,l2}``. TensorBoard images
``val/<task>/grid`` (rows: source | references | output | target) from rank 0.

Each rank scores only its own held-out rows (``datamodules/heldout.py`` marks the padding that
keeps ranks in step); the torchmetrics states sum across ranks in ``compute``, so each record
counts once on any number of ranks, and a rank with no record of its own adds nothing.
When (``trainer.val_check_interval`` / ``check_val_every_n_epoch``) and how much
(``limit_val_batches``, ``data.val_per_task``) are Lightning's and the data module's settings; the
EMA callback swaps its weights in for the loop.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torchvision.utils import make_grid

from mige_lightning.evaluation import BASELINE
from mige_lightning.generate import Generated
from mige_lightning.images import load_rgb
from mige_lightning.metrics import (
    DEFAULT_CLIP_MODEL,
    L1Distance,
    L2Distance,
    build_metrics,
    clip_t_caption,
    update_caption_scores,
)
from mige_lightning.prompt import Task

CAPTIONED = ("clip_t", "clip_dir")  # scored only on rows whose records carry captions


class ValidationMetrics(L.Callback):
    def __init__(self, *, log_images: bool = True, scene_judge: bool = True, grid_rows: int = 8):
        """``scene_judge``: score with the pixel judge when the data module generates the synthetic
        world; ``grid_rows``: held-out rows per task in the logged image grid."""
        self.log_images, self.scene_judge, self.grid_rows = log_images, scene_judge, grid_rows
        self.metrics: dict | None = None
        self.baseline: dict | None = None
        self.judge = None  # the data module's judge of outputs (the synthetic world's), if any
        self._baseline_logged = False
        self._rows: dict[Task, list] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage not in ("fit", "validate") or self.metrics is not None:
            return
        cfg = dict(pl_module.hparams.eval_metrics or {})
        self.metrics = {
            task: {
                k: m
                for k, m in build_metrics(
                    dino=cfg.get("dino"),
                    clip_model=cfg.get("clip_model") or DEFAULT_CLIP_MODEL,
                    clip_pretrained=cfg.get("clip_pretrained"),
                ).items()
                if k in ("dino", "clip_i", "clip_t", "clip_dir", "l1", "l2")
            }
            for task in Task
        }
        self.baseline = {task: {"l1": L1Distance(), "l2": L2Distance()} for task in Task}
        make_judge = (
            getattr(trainer.datamodule, "output_judge", None) if trainer.datamodule is not None else None
        )
        if self.scene_judge and callable(make_judge):
            self.judge = make_judge()

    def _with_baseline(self, trainer) -> bool:
        return not self._baseline_logged and not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        for group in (self.metrics, self.baseline):
            for metrics in group.values():
                for metric in metrics.values():
                    metric.reset()
                    metric.to(pl_module.device)  # the states sync over the strategy's backend
        if self.judge is not None:
            self.judge.reset()
            self.judge.to(pl_module.device)
        self._rows = {}

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: list[Generated], batch, batch_idx, dataloader_idx=0
    ) -> None:
        """``batch``: ``HeldOutRow``s of one task (``datamodules/heldout.py``); ``outputs``: their
        ``Generated``, in order. Only ``scored`` rows count."""
        rows = [(row, g.image) for row, g in zip(batch, outputs, strict=True) if row.scored]
        if not rows:
            return
        task: Task = rows[0][0].request.task
        images = [image for _, image in rows]
        targets = [row.target for row, _ in rows]
        sources = [row.request.source for row, _ in rows]
        captions = [(row.input_caption, row.output_caption) for row, _ in rows]
        self._update(self.metrics[task], images, targets, sources, captions)
        with_baseline = self._with_baseline(trainer)
        if self.judge is not None:
            target_paths = [row.record.target for row, _ in rows]
            inputs = [self.judge.input_image(t) for t in target_paths] if with_baseline else None
            self.judge.update(images, target_paths, baselines=inputs)
            if with_baseline:
                self._update(self.baseline[task], inputs, targets, sources, captions)
        shown = self._rows.setdefault(task, [])
        if trainer.is_global_zero and len(shown) < self.grid_rows:
            shown += [(row.record, image) for row, image in rows][: self.grid_rows - len(shown)]

    @staticmethod
    def _update(metrics: dict, images: list, targets: list, sources: list, captions: list) -> None:
        """``captions``: (input caption, output caption) per row, None where the record has none."""
        update_caption_scores(  # CLIP-T / CLIPdir, where configured: the rows with captions only
            metrics,
            images,
            sources,
            [clip_t_caption(i, o) for i, o in captions],
            [i for i, _ in captions],
            [o for _, o in captions],
        )
        for name, metric in metrics.items():
            if name not in CAPTIONED:
                metric.update(images, targets)  # an empty list adds nothing; compute still syncs

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        values = self._compute(self.metrics, "val")
        with_baseline = self.judge is not None and self._with_baseline(trainer)
        if with_baseline:
            values.update(self._compute(self.baseline, "val_baseline"))
        if self.judge is not None:  # per task, and per kind where a task has several
            judged = self.judge.compute()
            for label, prefix in (("model", "val"), (BASELINE, "val_baseline")):
                if label == BASELINE and not with_baseline:
                    continue
                for group, accs in sorted(judged.get(label, {}).items()):
                    values[f"{prefix}/{group}/scene_acc"] = accs["scene_acc"]
                    values[f"{prefix}/{group}/element_acc"] = accs["element_acc"]
            self._baseline_logged = self._baseline_logged or with_baseline
        for name, value in values.items():  # already summed over ranks: the same on every rank
            # the progress bar shows one figure per task (not per kind): the judge's scene accuracy,
            # else L1
            shown = "scene_acc" if self.judge is not None else "l1"
            per_task = name.startswith("val/") and name.endswith(f"/{shown}") and name.count("/") == 2
            pl_module.log(name, value, prog_bar=per_task)
        if values and trainer.state.fn == "fit" and not trainer.sanity_checking:
            # the x-axis of these values: the optimiser steps taken (Lightning's default for
            # validation inside an epoch is one less), as the grids and checkpoint names use
            pl_module.log("step", float(trainer.global_step))
        if self.log_images and trainer.is_global_zero and not trainer.sanity_checking:
            self._log_grids(trainer, pl_module)

    @staticmethod
    def _compute(groups: dict, prefix: str) -> dict[str, float]:
        """Every metric, in the same order on every rank (``compute`` syncs)."""
        values = {}
        for task, metrics in groups.items():
            for name, metric in metrics.items():
                with warnings.catch_warnings():  # a rank with no row of this task still syncs
                    warnings.filterwarnings("ignore", message=r".*was called before the ``update``")
                    result = metric.compute()
                if not torch.isnan(result):
                    values[f"{prefix}/{task.value}/{name}"] = result.item()
        return values

    def _log_grids(self, trainer, pl_module) -> None:
        logger = trainer.logger
        if logger is None or not hasattr(logger.experiment, "add_image"):
            return
        res = pl_module.config.resolution
        for task, rows in self._rows.items():
            if rows:
                grid = self._grid([r for r, _ in rows], [o for _, o in rows], res)
                logger.experiment.add_image(f"val/{task.value}/grid", grid, trainer.global_step)

    @staticmethod
    def _grid(records, outputs, res: int) -> torch.Tensor:
        from torchvision.transforms import v2

        to_t = v2.Compose([v2.Resize((res, res)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        blank = torch.ones(3, res, res)
        max_refs = max(len(r.references) for r in records)
        tiles = []
        for r, out in zip(records, outputs, strict=True):
            row = [to_t(load_rgb(r.source)) if r.source else blank]
            refs = [to_t(load_rgb(p)) for p in r.references]
            row += refs + [blank] * (max_refs - len(refs))
            row += [to_t(out), to_t(load_rgb(r.target))]
            tiles += row
        return make_grid(torch.stack(tiles), nrow=max_refs + 3, padding=1, pad_value=1.0)

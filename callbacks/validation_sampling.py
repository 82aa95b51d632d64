"""Periodic validation by sampling: generate a fixed subset per task and score it.

Logged keys: ``val/<task>/l1``, ``val/<task>/l2`` always; ``val/<task>/dino`` and
``val/<task>/clip_i`` when ``model.eval_metrics`` configures the backbones (never on random
weights); TensorBoard images ``val/<task>/grid`` (rows: source | references | output | target).
On the synthetic world (``data.synthetic``) the pixel judge (``datamodules/scene_judge.py``) also
logs ``val/<task>/scene_acc`` and ``val/<task>/element_acc``, and once, at the first validation,
the copy-the-input baseline's ``val_baseline/<task>/{scene_acc,element_acc,l1,l2}``.

Every rank samples its shard of the subset (all ranks run the same number of forwards, which
FSDP requires), metrics are synced by torchmetrics, and only rank 0 writes images. When an
``EMA`` callback is present, sampling uses the EMA weights.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torchvision.utils import make_grid

from callbacks.ema import EMA
from datamodules.images import load_rgb
from datamodules.scene_judge import SceneAccuracy, load_truth, world_size
from mige_lightning.metrics import DEFAULT_CLIP_MODEL, L1Distance, L2Distance, build_metrics
from mige_lightning.prompt import Task


class ValidationSampling(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 500,
        *,
        num_per_task: int | None = 4,
        num_inference_steps: int | None = 20,
        seed: int = 0,
        log_images: bool = True,
        scene_judge: bool = True,
    ):
        """``num_per_task``: held-out records sampled per task (null: all of them);
        ``num_inference_steps``: null = the per-task defaults; ``scene_judge``: score with the
        pixel judge when the data module generates the synthetic world."""
        self.every_n_steps, self.num_per_task = every_n_steps, num_per_task
        self.num_inference_steps, self.seed, self.log_images = num_inference_steps, seed, log_images
        self.scene_judge = scene_judge
        self.metrics: dict | None = None
        self.truth: dict | None = None  # target path → judged sample, on the synthetic world
        self._baseline_logged = False
        self._last_step: int | None = None  # the optimiser step the last check followed

    def on_fit_start(self, trainer, pl_module) -> None:
        cfg = dict(pl_module.hparams.eval_metrics or {})
        self.metrics = {
            task: {
                k: m
                for k, m in build_metrics(
                    dino=cfg.get("dino"),
                    clip_model=cfg.get("clip_model") or DEFAULT_CLIP_MODEL,
                    clip_pretrained=cfg.get("clip_pretrained"),
                ).items()
                if k in ("dino", "clip_i", "l1", "l2")
            }
            for task in Task
        }
        records = trainer.datamodule.val_records()
        self.subset = {t: [r for r in records if r.task is t][: self.num_per_task] for t in Task}
        world = getattr(trainer.datamodule, "synthetic", None)
        if self.scene_judge and world:
            root = world.get("root", "data/demo")
            self.truth = {str(s.target): s for s in load_truth(root, "heldout").values()}
            size = world_size(root)
            for task in Task:
                self.metrics[task]["scene"] = SceneAccuracy(size=size)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # once per optimiser step: with gradient accumulation most batches end without one
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if trainer.global_step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer, pl_module) -> None:
        ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
        was_training = pl_module.model.training
        pl_module.model.eval()
        try:
            if ema is not None and ema.shadow:
                with ema.swapped_in(pl_module):
                    self._sample_and_score(trainer, pl_module)
            else:
                self._sample_and_score(trainer, pl_module)
        finally:
            pl_module.model.train(was_training)

    def _sample_and_score(self, trainer, pl_module) -> None:
        pipe = pl_module.pipeline()
        pipe.set_progress_bar_config(disable=True)
        rank, world = trainer.global_rank, trainer.world_size
        res = pl_module.config.resolution
        for task, records in self.subset.items():
            if not records:
                continue
            per_rank = math.ceil(len(records) / world)
            mine = [(i, records[i]) for i in range(rank, len(records), world)]
            n_real = len(mine)
            while len(mine) < per_rank:  # equal forwards on every rank; padding is not scored
                mine.append(mine[-1] if mine else (0, records[0]))
            out = pipe(
                [r.instruction for _, r in mine],
                task=task,
                images=[[load_rgb(p) for p in r.references] for _, r in mine],
                source=[load_rgb(r.source) if r.source else None for _, r in mine],
                num_inference_steps=self.num_inference_steps,
                seeds=[self.seed + i for i, _ in mine],
                batch_invariant=False,  # one forward per step for the whole shard: validation speed
            )
            outputs, targets = out.images[:n_real], [load_rgb(r.target) for _, r in mine[:n_real]]
            scalars = self._score(task, outputs, targets, [r for _, r in mine[:n_real]], prefix="val")
            if self.truth is not None and not self._baseline_logged:
                inputs = [load_rgb(self.truth[str(r.target)].input_image) for _, r in mine[:n_real]]
                scalars.update(
                    self._score(task, inputs, targets, [r for _, r in mine[:n_real]], prefix="val_baseline")
                )
            if rank == 0:  # values are already synced: write them once, at this exact step
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=trainer.global_step)
            if (
                self.log_images
                and rank == 0
                and trainer.logger is not None
                and hasattr(trainer.logger.experiment, "add_image")
            ):
                grid = self._grid([r for _, r in mine[:n_real]], outputs, res)
                trainer.logger.experiment.add_image(f"val/{task.value}/grid", grid, trainer.global_step)
        self._baseline_logged = True

    def _score(self, task, outputs, targets, records, *, prefix: str) -> dict[str, float]:
        """Every metric of ``task`` on these outputs, synced across ranks → ``{prefix/task/name: value}``."""
        scalars = {}
        metrics = self.metrics[task]
        if prefix != "val":  # the baseline: pixel distances and the judge only
            metrics = {
                k: m for k, m in metrics.items() if isinstance(m, (L1Distance, L2Distance, SceneAccuracy))
            }
        for name, metric in metrics.items():
            metric.reset()
            if isinstance(metric, SceneAccuracy):
                samples = [self.truth[str(r.target)] for r in records]
                metric.update(outputs, [s.scene for s in samples], [s.kind for s in samples])
                values = metric.compute().get(task.value)  # synced; None when no rank had a sample
                if values:
                    scalars[f"{prefix}/{task.value}/scene_acc"] = values["scene_acc"]
                    scalars[f"{prefix}/{task.value}/element_acc"] = values["element_acc"]
                continue
            metric.update(outputs, targets)  # every rank updates (possibly nothing) and syncs
            value = metric.compute()
            if not torch.isnan(value):
                scalars[f"{prefix}/{task.value}/{name}"] = value.item()
        return scalars

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

"""EMA of the trainable weights, saved in checkpoints and used for sampling.

Logged keys: none. Checkpoint keys: ``checkpoint["ema"]`` (parameter name → EMA tensor, read by
``MIGELightningModule`` to sample with EMA weights) and this callback's own state (for resume).
Under FSDP2 the EMA tensors are shards laid out like the parameters (DTensors); the module writes
them into the distributed checkpoint as shards (``mige_lightning/checkpoint_state.py``).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class EMA(L.Callback):
    """Args:
    decay: EMA decay per update.
    update_every: update every N optimiser steps.
    warmup: use ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by init.
    validate_with_ema: swap the EMA weights in for Lightning's validation loop (and back after).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        *,
        update_every: int = 1,
        warmup: bool = True,
        validate_with_ema: bool = True,
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.update_every, self.warmup = decay, update_every, warmup
        self.validate_with_ema = validate_with_ema
        self._backup: dict[str, torch.Tensor] | None = None  # the trained weights while validating
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self._last_step: int | None = None  # the optimiser step the last update followed

    @staticmethod
    def _trainable(pl_module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module) -> None:
        params = self._trainable(pl_module)
        if not self.shadow:
            self.shadow = {n: p.detach().clone() for n, p in params.items()}
        elif self.shadow.keys() != params.keys():
            raise ValueError("EMA state does not match the model's trainable parameters (different model?)")
        else:
            self.shadow = {n: t.to(params[n].device) for n, t in self.shadow.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # once per optimiser step: with gradient accumulation most batches end without one
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if trainer.global_step % self.update_every:
            return
        decay = self.current_decay()
        params = self._trainable(pl_module)
        names = list(self.shadow)
        torch._foreach_lerp_(
            [_local(self.shadow[n]) for n in names], [_local(params[n].detach()) for n in names], 1.0 - decay
        )
        self.num_updates += 1

    # Lightning's validation loop samples with the EMA weights (callbacks/validation_metrics.py)
    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validate_with_ema and self.shadow and self._backup is None:
            params = self._trainable(pl_module)
            self._backup = {n: p.detach().clone() for n, p in params.items()}
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.shadow[n])

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore(pl_module)  # never leave the EMA weights in the trained model

    def _restore(self, pl_module) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for n, p in self._trainable(pl_module).items():
                p.copy_(self._backup[n])
        self._backup = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # shards stay where they are: the strategy writes each rank's part
        checkpoint["ema"] = {
            n: t.detach() if isinstance(t, DTensor) else t.detach().cpu() for n, t in self.shadow.items()
        }

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if "ema" in checkpoint:
            self.shadow = {n: t.clone() for n, t in checkpoint["ema"].items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: updating it updates the DTensor), else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t

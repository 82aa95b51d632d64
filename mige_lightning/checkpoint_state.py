"""What a resumable checkpoint holds beyond Lightning's own state.

* Every rank's RNG states (torch CPU and accelerator, numpy, python): the training step draws
  timesteps, noise, condition dropout and network dropout from the global generators, so a
  resumed run needs them to repeat the uninterrupted run's losses. Lightning saves none, and a
  distributed checkpoint's metadata is written by rank 0 alone, so all ranks' states are gathered
  into one list (index = global rank).
* The EMA weights of a sharded model (``callbacks/ema.py`` puts them in ``checkpoint["ema"]``):
  in a distributed checkpoint they are written as shards next to the model's
  (``state_dict["_ema.<name>"]``) instead of being gathered on one rank.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from mige_lightning.checkpoint_files import load_torch_file

log = logging.getLogger(__name__)

EMA_PREFIX = "_ema."
SHARDED_EMA_KEY = "ema_sharded"  # checkpoint key: names of the EMA weights stored as shards


# ----------------------------------------------------------------------------------- loading
def load_checkpoint_file(path: str | Path, *, mmap: bool = False):
    """``torch.load`` with ``weights_only=True``: tensors, containers and plain values only. A file
    that needs arbitrary unpickling (which can run code) is refused with an error naming it, one
    that cannot be read is ``<file>: not a readable checkpoint (<reason>)``
    (``checkpoint_files.load_torch_file``)."""
    return load_torch_file(path, mmap=mmap)


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """This process's generator states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG states, index = global rank (a collective: every rank must call it)."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def rank_rng_state(states: list[dict] | None, *, rank: int, world_size: int) -> dict | None:
    """This rank's entry, or None (with a warning) when the checkpoint was made by another world size."""
    if not states:
        return None
    if len(states) != world_size:
        log.warning(
            "checkpoint holds RNG states of %d rank(s), this run has %d: random draws after the "
            "resume will differ from an uninterrupted run",
            len(states),
            world_size,
        )
        return None
    return states[rank]


# ------------------------------------------------------------------------------------------ EMA
def pack_ema(checkpoint: dict) -> None:
    """Before saving: sharded EMA weights become shards of a distributed checkpoint, or full tensors
    (a collective gather) when the checkpoint is one file."""
    ema = checkpoint.get("ema")
    if not ema or not any(isinstance(t, DTensor) for t in ema.values()):
        return
    state = checkpoint.get("state_dict", {})
    if any(isinstance(v, DTensor) for v in state.values()):  # ModelParallelStrategy, distributed save
        for name, tensor in ema.items():
            state[EMA_PREFIX + name] = tensor
        checkpoint[SHARDED_EMA_KEY] = sorted(ema)
        del checkpoint["ema"]
    else:
        checkpoint["ema"] = {
            n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for n, t in ema.items()
        }


def unpack_ema(checkpoint: dict, *, path: str | Path | None, params: Mapping[str, torch.Tensor]) -> None:
    """After loading: ``checkpoint["ema"]`` holds the EMA weights laid out like ``params`` (shards
    of a sharded model are read from the distributed checkpoint at ``path``)."""
    names = checkpoint.pop(SHARDED_EMA_KEY, None)
    if names is not None:
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"{path}: checkpoint EMA has weights the model lacks: {missing[:3]}")
        import torch.distributed.checkpoint as dcp

        templates = {EMA_PREFIX + n: torch.empty_like(params[n]) for n in names}
        dcp.load({"state_dict": templates}, checkpoint_id=str(path))
        checkpoint["ema"] = {n: templates[EMA_PREFIX + n] for n in names}
        return
    ema = checkpoint.get("ema")
    if ema and any(isinstance(params.get(n), DTensor) for n in ema):
        # a single-file checkpoint (full tensors on every rank) loaded into a sharded model
        checkpoint["ema"] = {
            n: distribute_tensor(
                t.to(params[n].device), params[n].device_mesh, params[n].placements, src_data_rank=None
            )
            if isinstance(params.get(n), DTensor)
            else t
            for n, t in ema.items()
        }

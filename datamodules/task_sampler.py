"""Task-balanced joint sampling: draw tasks at configured ratios, on every rank.

Pools are keyed by ``Record.pool`` (``subject``, ``edit``, ``subject_edit/add``,
``subject_edit/replace``). For each sample a pool is drawn with the configured weights and the
next index of that pool is taken. Each pool is split between ranks (a permutation fixed by
``(seed, epoch)``, rank r takes every world-th element), so the ranks' streams are disjoint by
construction; each rank walks its share in a reshuffled order, pass after pass.

The stream is a pure function of ``(seed, epoch, rank)``, so resuming needs only how many
samples of the epoch were consumed: ``state_dict`` / ``load_state_dict`` carry that, and
iteration restarts at exactly the next sample.

The class derives from ``DistributedSampler`` only so that Lightning leaves it alone (it wraps
any other custom sampler in a ``DistributedSamplerWrapper``); it does its own rank split.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import DistributedSampler

DEFAULT_WEIGHTS = {
    # subject-driven : editing side = 1 : 1; add : replace = 1 : 1 inside subject_edit (the paper's ratios)
    "subject": 0.5,
    "edit": 0.25,
    "subject_edit/add": 0.125,
    "subject_edit/replace": 0.125,
}


def check_pool_weights(
    pool_sizes: Mapping[str, int], weights: Mapping[str, float], num_replicas: int = 1
) -> dict[str, float]:
    """Pools (``task`` or ``task/subtask`` → record count) against ``data.task_weights`` → the
    active weights. Every pool with records needs a weight (0 disables it explicitly); every
    weighted pool needs a record per rank; weights are >= 0 with one > 0."""
    unweighted = sorted(k for k, n in pool_sizes.items() if n and k not in weights)
    if unweighted:
        raise ValueError(
            f"data.task_weights: no weight for pool(s) {unweighted}; add them (0 disables a pool explicitly)"
        )
    active = {k: float(w) for k, w in weights.items() if w > 0}
    if any(w < 0 for w in weights.values()) or not active:
        raise ValueError(
            f"data.task_weights: weights must be >= 0 with at least one > 0, got {dict(weights)}"
        )
    for key in active:
        if pool_sizes.get(key, 0) < num_replicas:
            raise ValueError(
                f"data.task_weights: pool '{key}' has weight {active[key]} but {pool_sizes.get(key, 0)} "
                f"record(s); each of the {num_replicas} rank(s) needs at least one"
            )
    return active


def pool_probabilities(active: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    """The active pools in draw order (sorted) and their probabilities (weights normalised)."""
    keys = sorted(active)
    total = sum(active.values())
    return keys, np.array([active[k] / total for k in keys])


def pool_choices(probs: np.ndarray, *, seed: int, epoch: int, rank: int, num_samples: int) -> np.ndarray:
    """Which pool (index into the sorted pool keys) each of a rank's ``num_samples`` samples of an
    epoch comes from: a pure function of ``(seed, epoch, rank)``, shared by the task sampler (file
    loader) and the shard mixer (``datamodules/streaming.py``)."""
    rng = np.random.default_rng([seed, epoch, rank, 0])
    return rng.choice(len(probs), size=num_samples, p=probs)


class TaskBalancedSampler(DistributedSampler):
    def __init__(
        self,
        pools: Mapping[str, Sequence[int]],
        weights: Mapping[str, float],
        *,
        num_samples: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        # DistributedSampler.__init__ wants a dataset and a process group; nothing of it is used.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        active = check_pool_weights({k: len(v) for k, v in pools.items()}, weights, num_replicas)
        self.keys, self.probs = pool_probabilities(active)
        self.pools = {k: np.asarray(pools[k], dtype=np.int64) for k in self.keys}
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.num_samples = num_samples or sum(len(v) for v in self.pools.values()) // num_replicas
        self.total_size = self.num_samples * num_replicas
        self.shuffle, self.drop_last = True, True
        self.epoch, self.consumed = 0, 0

    # ------------------------------------------------------------------------------------ stream
    def pool_choices(self, epoch: int | None = None) -> np.ndarray:
        """Which pool (index into ``self.keys``) each of this rank's samples comes from."""
        epoch = self.epoch if epoch is None else epoch
        return pool_choices(
            self.probs, seed=self.seed, epoch=epoch, rank=self.rank, num_samples=self.num_samples
        )

    def stream(self, epoch: int | None = None) -> np.ndarray:
        """This rank's dataset indices for the whole epoch."""
        epoch = self.epoch if epoch is None else epoch
        choices = self.pool_choices(epoch)
        out = np.empty(self.num_samples, dtype=np.int64)
        for p, key in enumerate(self.keys):
            slots = np.flatnonzero(choices == p)
            if not len(slots):
                continue
            pool = self.pools[key]
            split = np.random.default_rng([self.seed, epoch, p, 1]).permutation(len(pool))
            share = pool[split[self.rank :: self.num_replicas]]  # this rank's disjoint share
            passes = -(-len(slots) // len(share))
            order = np.concatenate(
                [
                    np.random.default_rng([self.seed, epoch, p, 2, self.rank, k]).permutation(share)
                    for k in range(passes)
                ]
            )
            out[slots] = order[: len(slots)]
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.stream()[self.consumed :].tolist())

    def __len__(self) -> int:
        return self.num_samples

    # ------------------------------------------------------------------------------- resumption
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def advance(self, n: int) -> None:
        """Record that ``n`` more samples reached the training step (called per consumed batch)."""
        self.consumed += n

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if "ranks" in state or "consumed" not in state:
            raise ValueError(
                f"the checkpoint's training-data state {sorted(state)} is not the task sampler's (made "
                "with data.streaming?): resuming mid-epoch needs the same data source"
            )
        if state["seed"] != self.seed or state["num_samples"] != self.num_samples:
            raise ValueError(
                f"sampler state is for seed {state['seed']} / {state['num_samples']} samples per epoch, "
                f"this run has seed {self.seed} / {self.num_samples}: the data or data.seed changed"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

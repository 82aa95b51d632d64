"""Held-out requests for Lightning's validation loop: batches of one task, the same number and
sizes on every rank.

Sharded data parallel needs every rank to run the same forwards, and a sampling batch has one
task (its guidance and default steps). So the records of each task are dealt round-robin to the
ranks, each rank's share is padded to the largest share with copies marked ``scored=False`` (a
rank with no record of its own runs copies only), and the shares are cut into batches. The
validation metrics score only ``scored`` rows, so every record counts exactly once whatever the
number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import PIL.Image
from torch.utils.data import Dataset, DistributedSampler

from datamodules.records import Record
from mige_lightning.generate import GenerationRequest, SamplingBatch
from mige_lightning.images import load_rgb
from mige_lightning.prompt import Task


@dataclass(frozen=True, eq=False)
class HeldOutItem:
    record: Record
    index: int  # position among the held-out records of its task: its request number (seed offset)
    scored: bool


def heldout_id(task: Task, index: int) -> str:
    """A held-out record's request id: ``<task>_<index>``, as in the synthetic world's
    ``heldout_requests.jsonl`` and its judge's truth."""
    return f"{task.value}_{index:03d}"


def shard_heldout(
    records: list[Record], *, world: int, rank: int, batch_size: int, per_task: int | None = None
) -> list[list[HeldOutItem]]:
    """This rank's batches: per task (in ``Task`` order), its round-robin share padded to the
    largest share, cut into batches of at most ``batch_size``."""
    batches: list[list[HeldOutItem]] = []
    for task in Task:
        recs = [r for r in records if r.task is task][:per_task]
        if not recs:
            continue
        mine = [HeldOutItem(recs[i], i, True) for i in range(rank, len(recs), world)]
        share = math.ceil(len(recs) / world)
        filler = mine[-1] if mine else HeldOutItem(recs[0], 0, True)
        mine += [HeldOutItem(filler.record, filler.index, False)] * (share - len(mine))
        batches += [mine[i : i + batch_size] for i in range(0, share, batch_size)]
    return batches


@dataclass(frozen=True, eq=False)
class HeldOutRow:
    """A held-out record, loaded: its generation request, its target and its captions."""

    request: GenerationRequest
    record: Record
    target: PIL.Image.Image
    scored: bool  # False: a copy that keeps the ranks in step, not scored

    @property
    def input_caption(self) -> str | None:
        return self.record.input_caption

    @property
    def output_caption(self) -> str | None:
        return self.record.output_caption


def load_heldout(item: HeldOutItem) -> HeldOutRow:
    r = item.record
    request = GenerationRequest(
        id=heldout_id(r.task, item.index),
        task=r.task,
        instruction=r.instruction,
        references=tuple(load_rgb(p) for p in r.references),
        source=load_rgb(r.source) if r.source else None,
        number=item.index,
        origin=r.origin,
    )
    return HeldOutRow(request, r, load_rgb(r.target), item.scored)


class HeldOutBatches(Dataset):
    """One item per batch: a ``SamplingBatch`` of ``HeldOutRow`` (one task), images loaded."""

    def __init__(self, batches: list[list[HeldOutItem]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> SamplingBatch:
        return SamplingBatch(load_heldout(item) for item in self.batches[i])


class RankLocalSampler(DistributedSampler):
    """Every index of a dataset that already holds only this rank's share, in order. A
    ``DistributedSampler`` only so that Lightning does not split the share again."""

    def __init__(self, length: int):  # noqa: D107 — nothing of DistributedSampler's state is used
        self.length = length
        self.epoch = 0

    def __iter__(self):
        return iter(range(self.length))

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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

from torch.utils.data import Dataset, DistributedSampler

from datamodules.records import Record
from mige_lightning.images import load_rgb
from mige_lightning.prompt import Task


@dataclass(frozen=True)
class HeldOutItem:
    record: Record
    index: int  # position among the held-out records of its task: the sampling seed's offset
    scored: bool


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


class Rows:
    """A batch's held-out items, opaque to Lightning's batch transfer (which refuses frozen
    dataclasses and has nothing to move here): iterate or index it like a list."""

    def __init__(self, items: list[HeldOutItem]):
        self._items = list(items)

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> HeldOutItem:
        return self._items[i]


class HeldOutBatches(Dataset):
    """One item per batch: ``{task, items, instruction, references, source, target, input_caption,
    output_caption}`` with images loaded; a caption is None where the record has none."""

    def __init__(self, batches: list[list[HeldOutItem]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        items = self.batches[i]
        return {
            "task": items[0].record.task,
            "items": Rows(items),
            "instruction": [it.record.instruction for it in items],
            "references": [[load_rgb(p) for p in it.record.references] for it in items],
            "source": [load_rgb(it.record.source) if it.record.source else None for it in items],
            "target": [load_rgb(it.record.target) for it in items],
            "input_caption": [it.record.input_caption for it in items],
            "output_caption": [it.record.output_caption for it in items],
        }


def as_is(batch: dict) -> dict:
    """Collate for a dataset whose items are already batches (``batch_size=None``)."""
    return batch


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

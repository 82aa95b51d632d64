"""One way from requests to images, for every stage that samples.

``validate`` (held-out records), ``test`` (benchmark items), ``predict`` (request files) and the
synthetic world's judge each adapt their own items into ``GenerationRequest`` and call
``generate``, so the same request gets the same image whichever of them runs it:

- **one seed rule**: a request's own ``seed`` when it has one, else ``base_seed + number``, where
  ``number`` is the request's position among the requests *of its task* in its source (a
  manifest, a request file, a benchmark split; on DreamBench the image number of its prompt);
- **one grouping**: requests that share task and sampler settings run as one pipeline call, in
  order of first appearance, and results come back in the requests' order;
- **batch invariance by default**: each sample is computed on its own inside a call
  (``MIGEPipeline(batch_invariant=True)``), so neither the grouping nor the batch a request falls
  in changes a bit of its image. ``batch_invariant=False`` batches every group into each forward
  (faster on a GPU; the images then depend on their batch-mates).

Sampling batches travel through Lightning as ``SamplingBatch``, which its batch transfer leaves
untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import PIL.Image

from mige_lightning.prompt import Task

if TYPE_CHECKING:
    from mige_lightning.pipeline import MIGEPipeline


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """What to generate: the instruction, the images filling its ``<imagehere>`` placeholders
    (``references``), the image to edit (``source``; edit and subject_edit), and per-request
    sampler settings (None: the task's default)."""

    id: str
    task: Task
    instruction: str
    references: tuple[PIL.Image.Image, ...] = ()
    source: PIL.Image.Image | None = None
    number: int = 0  # position among its source's requests of its task: the default seed offset
    seed: int | None = None  # an explicit seed overrides the rule
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    resize_to_source: bool = False
    followups: tuple[str, ...] = ()  # multi-turn: later instructions, each editing the previous output
    origin: str = ""  # where the request came from, for messages ("requests.jsonl:3")

    def seed_for(self, base_seed: int) -> int:
        """The seed of this request's initial noise: its own, else ``base_seed + number``."""
        return int(self.seed) if self.seed is not None else int(base_seed) + int(self.number)

    @property
    def settings_key(self) -> tuple:
        """Requests with equal keys run as one pipeline call."""
        return (
            self.task,
            self.num_inference_steps,
            self.guidance_scale,
            self.image_guidance_scale,
            self.resize_to_source,
        )


@dataclass(frozen=True, eq=False)
class Generated:
    """A request's image and what it was generated with (task, seed, steps, scales, scheduler,
    prompt; ``followups`` when the image is the last of several turns)."""

    request: GenerationRequest
    image: PIL.Image.Image
    settings: dict = field(default_factory=dict)


class SamplingBatch:
    """A batch of a sampling stage's items (held-out rows, requests, benchmark items), iterated
    and indexed like a list. Deliberately not a list, dict or dataclass: Lightning's batch transfer
    (and a data loader's memory pinning) pass such an object through untouched — its PIL images
    have nothing to move, and the frozen dataclasses inside would be refused. Also the collate
    function of every sampling data loader: ``collate_fn=SamplingBatch``."""

    def __init__(self, items=()):
        self._items = list(items)

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]

    def __repr__(self) -> str:
        return f"SamplingBatch({self._items!r})"


def generate(
    pipe: MIGEPipeline,
    requests: list[GenerationRequest],
    *,
    base_seed: int,
    num_inference_steps: int | None = None,
    batch_invariant: bool = True,
) -> SamplingBatch:
    """Requests → ``Generated``, in the requests' order (a ``SamplingBatch``: step outputs pass
    Lightning's batch transfer untouched). ``num_inference_steps`` replaces the task
    default for requests that do not set their own (``model.eval_num_inference_steps``)."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.settings_key, []).append(i)
    out: list[Generated | None] = [None] * len(requests)
    for (task, steps, scale, image_scale, resize), idx in groups.items():
        part = [requests[i] for i in idx]
        try:
            result = pipe(
                [r.instruction for r in part],
                task=task,
                images=[list(r.references) for r in part],
                source=[r.source for r in part],
                num_inference_steps=steps or num_inference_steps,
                guidance_scale=scale,
                image_guidance_scale=image_scale,
                seeds=[r.seed_for(base_seed) for r in part],
                resize_to_source=resize,
                batch_invariant=batch_invariant,
            )
        except FloatingPointError as err:  # name the requests, not positions in a group
            where = ", ".join(f"{r.id} ({r.origin})" if r.origin else r.id for r in part)
            raise FloatingPointError(f"requests {where}: {err}") from err
        for i, image, settings in zip(idx, result.images, result.settings, strict=True):
            out[i] = Generated(requests[i], image, settings)
    for i, r in enumerate(requests):
        for turn, instruction in enumerate(r.followups, 2):  # edit the model's own previous output
            prev = out[i].image
            result = pipe(
                instruction,
                task=r.task,
                images=[prev],
                source=prev,
                num_inference_steps=r.num_inference_steps or num_inference_steps,
                guidance_scale=r.guidance_scale,
                image_guidance_scale=r.image_guidance_scale,
                seeds=[r.seed_for(base_seed)],
                batch_invariant=batch_invariant,
            )
            out[i] = Generated(r, result.images[0], {**result.settings[0], "turns": turn})
    return SamplingBatch(out)

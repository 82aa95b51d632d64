"""Reads a generated image of the synthetic world back into a scene and scores it against the truth.

The synthetic world (``mige_world/synthetic.py``) knows the scene every target was rendered
from; this module reads an image — the model's output, or any image — back from pixels:

- the background colour: the median of the rows no sprite ever reaches, nearest of the four
  named backgrounds;
- per slot (left / center / right third of the image): every pixel of the sprite band is given
  the nearest of {the observed background, the four sprite colours}; the most frequent sprite
  colour is the slot's colour, and the slot holds a sprite when that colour covers at least half
  the area of the smallest sprite; the shape is the rendered template (3 shapes × 2 sizes, shifted
  by up to ``S/16`` pixels) whose mask overlaps the colour's mask best (IoU).

Elements scored per scene: the background, and per slot whether a sprite is there; for a slot
where the truth has a sprite, also its colour and its shape (counted wrong when none is read).
Element accuracy = correct / scored elements; scene accuracy = every element correct. Sizes are
not scored. Small rendering differences — a sprite a pixel or two off its slot centre, mild noise,
soft edges — still read correctly; a sprite in another slot, of another colour or shape, or
missing does not.

``SceneAccuracy`` accumulates these per task and per kind of sample (``subject``; ``recolour`` /
``remove`` / ``move`` / ``background`` for edit; ``add`` / ``replace`` for subject_edit) as a
torchmetrics ``Metric``, so it syncs across ranks like the other metrics.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torchmetrics import Metric

from mige_lightning.evaluation import BASELINE
from mige_lightning.images import load_rgb
from mige_world.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Sprite, render

KIND_TASK = {
    "subject": "subject",
    "recolour": "edit",
    "remove": "edit",
    "move": "edit",
    "background": "edit",
    "add": "subject_edit",
    "replace": "subject_edit",
}
KINDS = tuple(KIND_TASK)
TASKS = ("subject", "edit", "subject_edit")
BAND = (0.5 - max(SIZES.values()), 0.5 + max(SIZES.values()))  # rows sprites can occupy (fraction)


@dataclass(frozen=True)
class Scene:
    background: str
    sprites: tuple[Sprite, ...]

    def at(self, position: str) -> Sprite | None:
        return next((s for s in self.sprites if s.position == position), None)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        if not isinstance(d, dict) or "background" not in d or not isinstance(d.get("sprites"), list):
            raise ValueError(f"a scene needs 'background' and a 'sprites' list, got {d!r}")
        return cls(d["background"], tuple(Sprite(**s) for s in d["sprites"]))


@dataclass(frozen=True)
class Verdict:
    read: Scene  # what the image shows, as read back
    correct: int  # elements read correctly
    total: int  # elements scored
    wrong: tuple[str, ...]  # e.g. ("background", "left:colour")

    @property
    def element_accuracy(self) -> float:
        return self.correct / self.total

    @property
    def scene_correct(self) -> bool:
        return self.correct == self.total


def _rgb_table(names: dict[str, tuple[int, int, int]]) -> tuple[list[str], np.ndarray]:
    return list(names), np.array(list(names.values()), dtype=np.float64)


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each pixel ([..., 3] → [...])."""
    d = ((pixels[..., None, :] - palette) ** 2).sum(-1)
    return d.argmin(-1)


@functools.lru_cache(maxsize=64)
def _templates(size: int, position: str) -> tuple[tuple[str, np.ndarray], ...]:
    """(shape, mask) for every shape × size of a sprite at ``position``, rendered like the world."""
    out = []
    for shape in SHAPES:
        for sprite_size in SIZES:
            img = render([Sprite(shape, "red", position, sprite_size)], background=(0, 0, 0), size=size)
            out.append((shape, np.asarray(img)[..., 0] > 0))
    return tuple(out)


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def read_scene(image: PIL.Image.Image, *, size: int) -> tuple[Scene, dict[str, float]]:
    """The scene an image shows (at the world's ``size``), and the best template IoU per slot."""
    if image.size != (size, size):
        image = image.convert("RGB").resize((size, size), PIL.Image.BILINEAR)
    px = np.asarray(image.convert("RGB"), dtype=np.float64)
    top, bottom = int(BAND[0] * size) - 1, int(np.ceil(BAND[1] * size)) + 1
    outside = np.concatenate([px[: max(top, 1)], px[min(bottom, size - 1) :]]).reshape(-1, 3)
    bg_rgb = np.median(outside, axis=0)
    bg_names, bg_table = _rgb_table(BACKGROUNDS)
    background = bg_names[int(_nearest(bg_rgb, bg_table))]

    colour_names, colour_table = _rgb_table(COLOURS)
    palette = np.concatenate([bg_rgb[None], colour_table])  # 0 = background, 1.. = sprite colours
    labels = _nearest(px, palette)
    band = np.zeros((size, size), dtype=bool)
    band[max(top, 0) : bottom] = True
    small_area = min(m.sum() for _, m in _templates(size, "center"))
    shift = max(1, round(size / 16))
    sprites, ious = [], {}
    for k, position in enumerate(POSITIONS):
        window = band.copy()
        window[:, : k * size // 3] = False
        window[:, (k + 1) * size // 3 :] = False
        counts = [int(((labels == c + 1) & window).sum()) for c in range(len(colour_names))]
        best = int(np.argmax(counts))
        if counts[best] < 0.5 * small_area:
            continue
        mask = (labels == best + 1) & window
        score, shape = -1.0, None
        for name, template in _templates(size, position):
            for dy in range(-shift, shift + 1):
                for dx in range(-shift, shift + 1):
                    t = _shifted(template, dy, dx)
                    iou = (t & mask).sum() / max((t | mask).sum(), 1)
                    if iou > score:
                        score, shape = float(iou), name
        ious[position] = score
        sprites.append(Sprite(shape, colour_names[best], position))
    return Scene(background, tuple(sprites)), ious


def judge(image: PIL.Image.Image, truth: Scene | dict, *, size: int) -> Verdict:
    """Score ``image`` against the scene its target was rendered from."""
    truth = truth if isinstance(truth, Scene) else Scene.from_dict(truth)
    read, _ = read_scene(image, size=size)
    wrong = []
    total = 1
    if read.background != truth.background:
        wrong.append("background")
    for position in POSITIONS:
        want, got = truth.at(position), read.at(position)
        total += 1
        if (want is None) != (got is None):
            wrong.append(f"{position}:presence")
        if want is not None:
            total += 2
            if got is None or got.colour != want.colour:
                wrong.append(f"{position}:colour")
            if got is None or got.shape != want.shape:
                wrong.append(f"{position}:shape")
    return Verdict(read=read, correct=total - len(wrong), total=total, wrong=tuple(wrong))


# ----------------------------------------------------------------------------------- the world's truth
@dataclass(frozen=True)
class JudgedSample:
    """A held-out sample of a generated world, with what the judge needs."""

    task: str
    kind: str
    scene: Scene
    target: Path
    source: Path | None
    references: tuple[Path, ...]
    instruction: str
    number: int = 0  # its position among the split's samples of its task (its request number)

    @property
    def input_image(self) -> Path:
        """What the copy-the-input baseline outputs: the source (edits) or the first reference."""
        if self.source is not None:
            return self.source
        if not self.references:
            raise ValueError(
                f"{self.task} request for {self.target} ({self.instruction!r}) has neither a source nor "
                "a reference image: the copy-the-input baseline has nothing to copy"
            )
        return self.references[0]


def world_size(root: str | Path) -> int:
    return int(json.loads((Path(root) / "world.json").read_text())["size"])


def load_truth(root: str | Path, split: str = "heldout") -> dict[str, JudgedSample]:
    """``{request id: sample}`` for one split of a generated world (ids as in its request file)."""
    from mige_world.synthetic import TASK_FILES

    root = Path(root)
    out = {}
    for task, filename in TASK_FILES.items():
        path = root / f"{split}_{filename}"
        for i, rec in enumerate(json.loads(path.read_text())):
            if "scene" not in rec:
                raise ValueError(
                    f"{path}: record {i} has no 'scene': the world predates the judge; regenerate it"
                )
            out[f"{task}_{i:03d}"] = JudgedSample(
                task=task,
                kind=rec["kind"],
                scene=Scene.from_dict(rec["scene"]),
                target=root / rec["image"],
                source=root / rec["source_path"][0] if rec["source_path"] else None,
                references=tuple(root / p for p in rec["entity_path"]),
                instruction=rec["multi_prompt"],
                number=i,
            )
    return out


# ----------------------------------------------------------------------------------- accumulation
class SceneAccuracy(Metric):
    """Element and scene accuracy per task and per kind; ``update(outputs, scenes, kinds)``.

    ``compute()`` → ``{"subject": {"element_acc", "scene_acc", "n"}, …, "edit/move": {…}, …}``
    (groups with no sample are left out); state is summed across ranks.
    """

    full_state_update = False

    def __init__(self, *, size: int, **kwargs):
        super().__init__(**kwargs)
        self.size = size
        # per kind: elements correct, elements scored, scenes correct, scenes
        self.add_state(
            "counts", default=torch.zeros(len(KINDS), 4, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.last: list[Verdict] = []

    def update(self, outputs: list[PIL.Image.Image], scenes: list, kinds: list[str]) -> None:
        self.last = []
        for image, scene, kind in zip(outputs, scenes, kinds, strict=True):
            if kind not in KIND_TASK:
                raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
            v = judge(image, scene, size=self.size)
            self.last.append(v)
            row = KINDS.index(kind)
            self.counts[row] += torch.tensor(
                [v.correct, v.total, float(v.scene_correct), 1.0],
                dtype=torch.float64,
                device=self.counts.device,
            )

    def compute(self) -> dict[str, dict[str, float]]:
        counts = self.counts.cpu()
        groups: dict[str, torch.Tensor] = {}
        for task in TASKS:
            rows = [i for i, k in enumerate(KINDS) if KIND_TASK[k] == task]
            groups[task] = counts[rows].sum(0)
            if len(rows) > 1:
                for i in rows:
                    groups[f"{task}/{KINDS[i]}"] = counts[i]
        return {
            name: {
                "element_acc": float(c[0] / c[1]),
                "scene_acc": float(c[2] / c[3]),
                "n": int(c[3]),
            }
            for name, c in groups.items()
            if c[3] > 0
        }


class SceneJudge(torch.nn.Module):
    """The one place outputs of the synthetic world are judged, by the target they were asked to
    match: the model's outputs and the copy-the-input baseline (``JudgedSample.input_image``),
    per task and kind, synced across ranks. The world's data modules hand it to the framework
    (``output_judge()``): validation, ``test`` on the world and ``judge-synthetic`` score through
    it. ``SceneJudge(root, split)`` judges that split of a generated world."""

    def __init__(self, root: str | Path, split: str = "heldout"):
        super().__init__()
        self.root, self.split = str(root), split
        self.truth = {str(s.target): s for s in load_truth(root, split).values()}
        size = world_size(root)
        self.model = SceneAccuracy(size=size)
        self.baseline = SceneAccuracy(size=size)

    def sample(self, target: str | Path) -> JudgedSample:
        try:
            return self.truth[str(target)]
        except KeyError:
            raise KeyError(
                f"{target}: not a target of the {self.split} split of the world at {self.root}"
            ) from None

    def input_image(self, target: str | Path) -> PIL.Image.Image:
        """What the copy-the-input baseline outputs for this target."""
        return load_rgb(self.sample(target).input_image)

    def update(
        self,
        outputs: list[PIL.Image.Image],
        targets: list[str | Path],
        *,
        baselines: list[PIL.Image.Image] | None = None,
    ) -> list[dict]:
        """Judge a batch → one row per output (``kind``, ``scene_correct``, ``element_acc``,
        ``wrong``); with ``baselines`` (what copy-the-input outputs for each target,
        ``input_image``) the baseline's ``baseline_scene_correct``, ``baseline_element_acc``."""
        samples = [self.sample(t) for t in targets]
        scenes, kinds = [s.scene for s in samples], [s.kind for s in samples]
        self.model.update(outputs, scenes, kinds)
        rows = [
            {
                "kind": s.kind,
                "scene_correct": int(v.scene_correct),
                "element_acc": round(v.element_accuracy, 4),
                "wrong": " ".join(v.wrong),
            }
            for s, v in zip(samples, self.model.last, strict=True)
        ]
        if baselines is not None:
            self.baseline.update(baselines, scenes, kinds)
            for row, b in zip(rows, self.baseline.last, strict=True):
                row["baseline_scene_correct"] = int(b.scene_correct)
                row["baseline_element_acc"] = round(b.element_accuracy, 4)
        return rows

    def compute(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{"model": groups, BASELINE: groups}`` (``SceneAccuracy.compute``'s groups: per task
        and ``task/kind``; the baseline left out when it judged nothing)."""
        with warnings.catch_warnings():  # a rank (or a run's baseline) with no update still syncs
            warnings.filterwarnings("ignore", message=r".*was called before the ``update``")
            out = {"model": self.model.compute()}
            baseline = self.baseline.compute()
        if baseline:
            out[BASELINE] = baseline
        return out

    def reset(self) -> None:
        self.model.reset()
        self.baseline.reset()

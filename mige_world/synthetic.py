"""A procedural multi-task world for the CPU demo and the tests.

A scene is a background colour plus sprites — a shape (circle / square / triangle) with a colour,
a size and one of three horizontal slots. Every sample's target is rendered from the same scene
description its instruction is written from, for all three tasks:

- ``subject``: the given sprites (each shown alone on white) placed as the instruction says on a
  blank canvas of the named colour;
- ``edit``: recolour, remove or move one sprite, or change the background;
- ``subject_edit``: ``add`` a given sprite at a free slot, or ``replace`` a sprite by a given one.

Output: images plus per-task manifests in the authors' format (JSON lists with ``image``,
``multi_prompt``, ``entity_path``, ``source_path``; ``subtask`` for subject_edit; plus ``kind`` and
the target's ``scene`` for the pixel judge, which the loader ignores; held-out records also carry
``output_caption`` and, with a source, ``input_caption``: the scenes' captions, for the validation
loop's CLIP-T and CLIPdir), for a train and
a held-out split (``<root>/{train,heldout}_{subject,edit,subject_edit}.json``), so the demo reads it through exactly the loader real data uses.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "pink": (250, 180, 200),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": 1 / 6, "center": 1 / 2, "right": 5 / 6}  # slot centres, fraction of the width
SIZES = {"small": 0.09, "large": 0.15}  # half-extent, fraction of the width (slots never overlap)
REFERENCE_BACKGROUND = (255, 255, 255)
DEFAULT_WORLD_ROOT = "data/demo"  # where a world is generated when its config names no root
TASK_FILES = {"subject": "subject.json", "edit": "edit.json", "subject_edit": "subject_edit.json"}
KINDS = ("subject", "edit", "add", "replace")
SLOT_ORDER = tuple(POSITIONS)  # left, center, right


def sprite_name(sprite: dict) -> str:
    """A reference's words: ``red circle`` (its size and place come from the instruction)."""
    return f"{sprite['colour']} {sprite['shape']}"


def caption(scene: dict) -> str:
    """A scene's caption, sprites left to right: ``a large red circle on the left and a small blue
    square on the right, on a pink background``; an empty scene is ``a pink background``."""
    sprites = sorted(scene["sprites"], key=lambda s: SLOT_ORDER.index(s["position"]))
    phrase = " and ".join(f"a {s['size']} {sprite_name(s)} on the {s['position']}" for s in sprites)
    return (
        f"{phrase}, on a {scene['background']} background"
        if phrase
        else f"a {scene['background']} background"
    )


def scene_captions(record: dict) -> dict[str, str]:
    """A record's manifest captions from its scene truth: ``output_caption`` (the target scene) and,
    where it has a source, ``input_caption`` (the source scene)."""
    out = {"output_caption": caption(record["scene"])}
    if "source_scene" in record:
        out = {"input_caption": caption(record["source_scene"]), **out}
    return out


@dataclass(frozen=True)
class Sprite:
    shape: str
    colour: str
    position: str
    size: str = "large"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def render(sprites, *, background: str | tuple[int, int, int], size: int) -> Image.Image:
    fill_bg = BACKGROUNDS[background] if isinstance(background, str) else background
    img = Image.new("RGB", (size, size), fill_bg)
    draw = ImageDraw.Draw(img)
    for s in sprites:
        r = SIZES[s.size] * size
        cx, cy = POSITIONS[s.position] * size, size / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def render_reference(sprite: Sprite, *, size: int) -> Image.Image:
    """A subject image: the sprite alone, large and centred, on white."""
    return render(
        [Sprite(sprite.shape, sprite.colour, "center", "large")], background=REFERENCE_BACKGROUND, size=size
    )


class _World:
    def __init__(
        self,
        root: Path,
        *,
        size: int,
        rng: random.Random,
        prefix: str,
        exclude: frozenset[str] = frozenset(),
        captions: bool = False,
    ):
        self.root, self.size, self.rng, self.prefix = root, size, rng, prefix
        self.captions = captions  # write the scenes' captions into each record (the held-out split)
        self.records: dict[str, list[dict]] = {task: [] for task in TASK_FILES}
        self.count = 0
        self.exclude = exclude  # sample keys this split must not contain (the held-out split's)
        self.keys: set[str] = set()
        self._pending: list[tuple[Image.Image, str]] = []

    def save(self, img: Image.Image, name: str) -> str:
        """The image's manifest path; written by ``run`` once the sample is kept."""
        rel = f"images/{self.prefix}{self.count:05d}_{name}.png"
        self._pending.append((img, rel))
        return rel

    def sprites(self, n: int, *, positions=None) -> list[Sprite]:
        """n sprites, distinct by (colour, shape) so instructions are unambiguous, in distinct slots."""
        rng = self.rng
        slots = list(positions or rng.sample(list(POSITIONS), n))
        kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
        return [Sprite(s, c, p, rng.choice(list(SIZES))) for (c, s), p in zip(kinds, slots, strict=True)]

    def scene(self, sprites, bg: str) -> Image.Image:
        return render(sprites, background=bg, size=self.size)

    @staticmethod
    def truth(sprites, bg: str, kind: str, *, source: tuple[list, str] | None = None) -> dict:
        """What the target (and the source) show, for the pixel judge (``mige_world/scene_judge.py``)."""

        def scene(sprites, bg):
            return {
                "background": bg,
                "sprites": [
                    {"shape": s.shape, "colour": s.colour, "position": s.position, "size": s.size}
                    for s in sprites
                ],
            }

        out = {"kind": kind, "scene": scene(sprites, bg)}
        if source is not None:
            out["source_scene"] = scene(*source)
        return out

    # -------------------------------------------------------------------------------- tasks
    def subject(self) -> None:
        rng, n = self.rng, self.rng.choice([1, 1, 2])
        bg = rng.choice(list(BACKGROUNDS))
        sprites = self.sprites(n)
        refs = [self.save(render_reference(s, size=self.size), f"ref{j}") for j, s in enumerate(sprites)]
        phrase = " and ".join(f"a {s.size} <imagehere> on the {s.position}" for s in sprites)
        self.emit(
            "subject",
            {
                "image": self.save(self.scene(sprites, bg), "tgt"),
                "multi_prompt": f"{phrase}, on a {bg} background",
                "entity_path": refs,
                "source_path": [],
                **self.truth(sprites, bg, "subject"),
            },
        )

    def edit(self) -> None:
        rng = self.rng
        bg = rng.choice(list(BACKGROUNDS))
        sprites = self.sprites(rng.choice([1, 2]))
        target = rng.randrange(len(sprites))
        s = sprites[target]
        op = rng.choice(["recolour", "remove", "move", "background"])
        new_bg, out = bg, list(sprites)
        if op == "recolour":
            new = rng.choice(
                [
                    c
                    for c in COLOURS
                    if c != s.colour and (c, s.shape) not in {(x.colour, x.shape) for x in sprites}
                ]
            )
            out[target] = replace(s, colour=new)
            text = f"make the {s.name} in <imagehere> {new}"
        elif op == "remove":
            del out[target]
            text = f"remove the {s.name} from <imagehere>"
        elif op == "move":
            free = [p for p in POSITIONS if p not in {x.position for x in sprites}]
            dest = rng.choice(free)
            out[target] = replace(s, position=dest)
            text = f"move the {s.name} in <imagehere> to the {dest}"
        else:
            new_bg = rng.choice([b for b in BACKGROUNDS if b != bg])
            text = f"change the background of <imagehere> to {new_bg}"
        src = self.save(self.scene(sprites, bg), "src")
        self.emit(
            "edit",
            {
                "image": self.save(self.scene(out, new_bg), "tgt"),
                "multi_prompt": text,
                "entity_path": [src],
                "source_path": [src],
                "edit_type": op,
                **self.truth(out, new_bg, op, source=(sprites, bg)),
            },
        )

    def add(self) -> None:
        rng = self.rng
        bg = rng.choice(list(BACKGROUNDS))
        existing, new = self.sprites(2)
        ref = self.save(render_reference(new, size=self.size), "ref")
        src = self.save(self.scene([existing], bg), "src")
        self.emit(
            "subject_edit",
            {
                "image": self.save(self.scene([existing, new], bg), "tgt"),
                "subtask": "add",
                "multi_prompt": f"add a {new.size} <imagehere> on the {new.position} of <imagehere>",
                "entity_path": [ref, src],
                "source_path": [src],
                **self.truth([existing, new], bg, "add", source=([existing], bg)),
            },
        )

    def replace(self) -> None:
        rng = self.rng
        bg = rng.choice(list(BACKGROUNDS))
        sprites = self.sprites(rng.choice([1, 2]) + 1)
        *scene, incoming = sprites
        target = rng.randrange(len(scene))
        old = scene[target]
        out = list(scene)
        out[target] = Sprite(incoming.shape, incoming.colour, old.position, old.size)
        ref = self.save(render_reference(incoming, size=self.size), "ref")
        src = self.save(self.scene(scene, bg), "src")
        self.emit(
            "subject_edit",
            {
                "image": self.save(self.scene(out, bg), "tgt"),
                "subtask": "replace",
                "multi_prompt": f"replace the {old.name} in <imagehere> with <imagehere>",
                "entity_path": [src, ref],
                "source_path": [src],
                **self.truth(out, bg, "replace", source=(scene, bg)),
            },
        )

    def emit(self, task: str, record: dict) -> None:
        self._drawn = (task, record)

    def run(self, n: int) -> None:
        """n samples, cycling through the kinds; a sample whose key is excluded is drawn again."""
        for i in range(n):
            for _attempt in range(1000):
                self._pending.clear()
                getattr(self, KINDS[i % len(KINDS)])()
                task, record = self._drawn
                key = sample_key(task, record)
                if key not in self.exclude:
                    break
            else:
                raise RuntimeError("could not draw a sample outside the held-out split in 1000 tries")
            self.records[task].append({**record, **scene_captions(record)} if self.captions else record)
            self.keys.add(key)
            for img, rel in self._pending:
                img.save(self.root / rel)
            self._pending.clear()
            self.count += 1


def sample_key(task: str, record: dict) -> str:
    """What makes two samples the same task instance: the instruction and the scenes (not file names)."""
    fields = ("kind", "multi_prompt", "scene", "source_scene")
    return json.dumps([task, *(record.get(f) for f in fields)], sort_keys=True)


def generate(
    root: str | Path, *, num_samples: int = 320, size: int = 32, seed: int = 0, heldout_fraction: float = 0.1
) -> dict[str, list[dict[str, str]]]:
    """Write the world under ``root`` (deterministic in ``seed``); returns the manifest specs per
    split, ``{"train": [{path, task}, …], "heldout": […]}``, ready for ``data.manifests``.
    No training sample repeats a held-out one (same task, instruction, source and target scene)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    n_heldout = max(len(KINDS), round(num_samples * heldout_fraction)) if heldout_fraction > 0 else 0
    specs, heldout_keys = {}, frozenset()
    # the held-out split first: no training sample may repeat one of its task instances
    for split, n, split_seed in (
        ("heldout", n_heldout, seed + 1_000_003),
        ("train", num_samples - n_heldout, seed),
    ):
        world = _World(
            root,
            size=size,
            rng=random.Random(split_seed),
            prefix=f"{split}_",
            exclude=heldout_keys,
            captions=split == "heldout",
        )
        world.run(n)
        heldout_keys = frozenset(world.keys)
        for task, filename in TASK_FILES.items():
            (root / f"{split}_{filename}").write_text(json.dumps(world.records[task], indent=1))
        specs[split] = manifest_specs(root, split)
    _write_requests(root, specs["heldout"])
    (root / "world.json").write_text(
        json.dumps(
            {"num_samples": num_samples, "size": size, "seed": seed, "heldout_fraction": heldout_fraction}
        )
    )
    return specs


def _write_requests(root: Path, heldout: list[dict[str, str]]) -> None:
    """``heldout_requests.jsonl``: the held-out split as a ``predict`` request file (all tasks)."""
    lines = []
    for spec in heldout:
        for i, rec in enumerate(json.loads(Path(spec["path"]).read_text())):
            req = {
                "id": f"{spec['task']}_{i:03d}",
                "task": spec["task"],
                "instruction": rec["multi_prompt"],
                "images": rec["entity_path"],
                "target": rec["image"],
            }
            if rec["source_path"]:
                req["source"] = rec["source_path"][0]
            lines.append(json.dumps(req))
    (root / "heldout_requests.jsonl").write_text("\n".join(lines) + "\n")


def manifest_specs(root: str | Path, split: str = "train") -> list[dict[str, str]]:
    """``data.manifests`` entries for one split of a generated world (task given per manifest)."""
    root = Path(root)
    return [{"path": str(root / f"{split}_{f}"), "task": t} for t, f in TASK_FILES.items()]

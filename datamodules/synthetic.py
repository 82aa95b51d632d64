"""A procedural multi-task world for the CPU demo and the tests.

Scenes are coloured sprites (circle / square / triangle) on a plain background; every sample's
target is computed from the same scene description its instruction is written from, for all
three tasks. The output is images plus a JSONL manifest in the authors' field format, so the demo
reads it through exactly the loader real data uses.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": 0.25, "center": 0.5, "right": 0.75}


@dataclass(frozen=True)
class Sprite:
    shape: str
    colour: str
    position: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def render(sprites: list[Sprite], *, background: str, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    r = size * 0.18
    for s in sprites:
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


def _sprite(rng: random.Random, position: str | None = None) -> Sprite:
    return Sprite(rng.choice(SHAPES), rng.choice(list(COLOURS)), position or rng.choice(list(POSITIONS)))


def generate(root: str | Path, *, num_samples: int = 300, size: int = 32, seed: int = 0) -> Path:
    """Write ``num_samples`` examples (tasks in turn) under ``root``; returns the manifest path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []

    def save(img: Image.Image, name: str) -> str:
        rel = f"images/{name}.png"
        img.save(root / rel)
        return rel

    for i in range(num_samples):
        bg = rng.choice(list(BACKGROUNDS))
        kind = ("subject", "edit", "add", "replace")[i % 4]
        if kind == "subject":
            s = _sprite(rng)
            ref = save(
                render([Sprite(s.shape, s.colour, "center")], background="white", size=size), f"{i:05d}_ref"
            )
            tgt = save(render([s], background=bg, size=size), f"{i:05d}_tgt")
            rec = {
                "task": "subject",
                "multi_prompt": f"a <imagehere> on the {s.position} of a {bg} background",
                "entity_path": [ref],
                "source_path": [],
                "image": tgt,
            }
        elif kind == "edit":
            s = _sprite(rng)
            new = rng.choice([c for c in COLOURS if c != s.colour])
            src = save(render([s], background=bg, size=size), f"{i:05d}_src")
            tgt = save(render([Sprite(s.shape, new, s.position)], background=bg, size=size), f"{i:05d}_tgt")
            rec = {
                "task": "edit",
                "multi_prompt": f"make the {s.name} in <imagehere> {new}",
                "entity_path": [src],
                "source_path": [src],
                "image": tgt,
            }
        elif kind == "add":
            a, b = _sprite(rng, "left"), _sprite(rng, "right")
            src = save(render([a], background=bg, size=size), f"{i:05d}_src")
            ref = save(
                render([Sprite(b.shape, b.colour, "center")], background="white", size=size), f"{i:05d}_ref"
            )
            tgt = save(render([a, b], background=bg, size=size), f"{i:05d}_tgt")
            rec = {
                "task": "subject_edit",
                "subtask": "add",
                "multi_prompt": "add <imagehere> on the right of <imagehere>",
                "entity_path": [ref, src],
                "source_path": [src],
                "image": tgt,
            }
        else:
            a = _sprite(rng)
            b = Sprite(rng.choice([s for s in SHAPES if s != a.shape]), rng.choice(list(COLOURS)), a.position)
            src = save(render([a], background=bg, size=size), f"{i:05d}_src")
            ref = save(
                render([Sprite(b.shape, b.colour, "center")], background="white", size=size), f"{i:05d}_ref"
            )
            tgt = save(render([b], background=bg, size=size), f"{i:05d}_tgt")
            rec = {
                "task": "subject_edit",
                "subtask": "replace",
                "multi_prompt": f"replace the {a.name} in <imagehere> with <imagehere>",
                "entity_path": [src, ref],
                "source_path": [src],
                "image": tgt,
            }
        records.append(rec)
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest

"""The world's images in words, and which of them pre-training may see.

The pretraining stages pair each training image with the words that describe it: a scene (a
target or source image) with its caption, a reference (one sprite alone on white) with its name.
Captions use the instructions' own phrasing and vocabulary (``a large <imagehere> on the left, on
a pink background`` names a subject exactly where ``a large red circle on the left, on a pink
background`` names it in words), so a subject request read through the vision bridge lands where
the text-to-image DiT already knows what to draw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mige_lightning.prompt import split_placeholders

# the words of a scene live with the scenes (mige_world.synthetic): the held-out manifests carry
# the same captions for the validation loop
from mige_world.synthetic import SLOT_ORDER, caption, manifest_specs, sprite_name


def scene_key(scene: dict) -> str:
    """One string per distinct scene (sprite order does not matter)."""
    sprites = sorted(scene["sprites"], key=lambda s: SLOT_ORDER.index(s["position"]))
    return json.dumps({"background": scene["background"], "sprites": sprites}, sort_keys=True)


@dataclass(frozen=True)
class Described:
    """One image of the world with the words that describe it."""

    path: Path
    words: str  # caption (scene) or name (reference)
    kind: str  # "scene" or "reference"
    scene: dict  # the scene shown (a reference: its one sprite, large, centred, on no background)


def _sprite_set(scene: dict) -> set[tuple[str, str]]:
    return {(s["colour"], s["shape"]) for s in scene["sprites"]}


def record_images(record: dict, root: Path) -> list[Described]:
    """Each image of a world record (``entity_path`` order, i.e. placeholder order) described."""
    task_kind = record["kind"]
    target, source = record["scene"], record.get("source_scene")
    if task_kind == "subject":
        # references in the order of the target's sprites (synthetic.py draws them so)
        refs = iter(target["sprites"])
    elif task_kind in ("add", "replace"):
        incoming = _sprite_set(target) - _sprite_set(source)
        refs = iter([s for s in target["sprites"] if (s["colour"], s["shape"]) in incoming])
    else:
        refs = iter(())
    out = []
    for rel in record["entity_path"]:
        path = root / rel
        if record["source_path"] and rel == record["source_path"][0]:
            out.append(Described(path, caption(source), "scene", source))
        else:
            sprite = next(refs)
            out.append(
                Described(path, sprite_name(sprite), "reference", {"background": None, "sprites": [sprite]})
            )
    return out


def worded(record: dict, images: list[Described]) -> str:
    """The record's instruction with each ``<imagehere>`` replaced by its image's words."""
    segments = split_placeholders(record["multi_prompt"])
    parts = [segments[0]]
    for described, seg in zip(images, segments[1:], strict=True):
        parts += [described.words, seg]
    return "".join(parts)


def read_split(root: str | Path, split: str) -> list[tuple[str, dict]]:
    """(task, record) for every record of a world split."""
    out = []
    for spec in manifest_specs(root, split):
        out += [(spec["task"], r) for r in json.loads(Path(spec["path"]).read_text())]
    return out


def heldout_scene_keys(root: str | Path) -> frozenset[str]:
    """Every scene a held-out record shows (target or source): pre-training never sees them."""
    keys = set()
    for _task, record in read_split(root, "heldout"):
        keys.add(scene_key(record["scene"]))
        if record.get("source_scene") is not None:
            keys.add(scene_key(record["source_scene"]))
    return frozenset(keys)


def training_scenes(root: str | Path) -> list[Described]:
    """Distinct (image, scene) pairs of the training split's targets and sources, minus every scene
    a held-out record shows."""
    root = Path(root)
    excluded = heldout_scene_keys(root)
    seen: dict[str, Described] = {}
    for _task, record in read_split(root, "train"):
        pairs = [(record["image"], record["scene"])]
        if record.get("source_scene") is not None:
            pairs.append((record["source_path"][0], record["source_scene"]))
        for rel, scene in pairs:
            key = scene_key(scene)
            if key not in excluded and key not in seen:
                seen[key] = Described(root / rel, caption(scene), "scene", scene)
    return list(seen.values())

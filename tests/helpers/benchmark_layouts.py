"""Each benchmark's public layout (Emu Edit's parquet, MagicBrush's sessions, DreamBench's
dataset folder, MIGEBench's JSON files), reproduced as a tiny fixture with random images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image


def img(seed, size=(40, 30)):
    return PIL.Image.fromarray(
        np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    )


def save(path: Path, seed: int, size=(40, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img(seed, size).save(path)
    return str(path)


def make_emu(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, (instr, task, cin, cout) in enumerate(
        [
            ("Make the image black and white.", "global", "a dog", "a black and white dog"),
            ("add a hat to the cat", "add", "a cat", "a cat with a hat"),
            ("remove the car", "remove", "a street", "a street"),  # identical captions: CLIPdir skips it
        ]
    ):
        buf = io.BytesIO()
        img(i).save(buf, format="PNG")
        rows.append(
            {
                "instruction": instr,
                "image": {"bytes": buf.getvalue(), "path": f"{i}.png"},
                "task": task,
                "split": "test",
                "idx": i,
                "hash": str(i),
                "input_caption": cin,
                "output_caption": cout,
            }
        )
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "test-00000-of-00001.parquet")


def make_magicbrush(root: Path) -> None:
    sessions, desc = {}, {}
    for s, sid in enumerate(["327726", "242679"]):
        d = root / "images" / sid
        save(d / f"{sid}-input.png", 10 * s)
        turns = []
        for t in (1, 2):
            save(d / f"{sid}-output{t}.png", 10 * s + t)
            mask = np.zeros((30, 40), np.uint8)
            mask[5:20, 10:30] = 255
            PIL.Image.fromarray(mask).save(d / f"{sid}-mask{t}.png")
            turns.append(
                {
                    "input": f"{sid}-input.png" if t == 1 else f"{sid}-output1.png",
                    "mask": f"{sid}-mask{t}.png",
                    "output": f"{sid}-output{t}.png",
                    "instruction": f"put a hat on the dog {t}",
                }
            )
        sessions[sid] = turns
        desc[sid] = {
            f"{sid}-input.png": "a dog",
            f"{sid}-output1.png": "a dog with a hat",
            f"{sid}-output2.png": "a dog with a red hat",
        }
    (root / "edit_sessions.json").write_text(json.dumps(sessions))
    (root / "global_descriptions.json").write_text(json.dumps(desc))


DREAMBENCH_PROMPTS = """Classes
subject_name,class
backpack,backpack
dog,dog

Prompts
Object Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
]

Live Subject Prompts
prompt_list = [
'a {0} {1} on the beach'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
]
"""


def make_dreambench(root: Path) -> None:
    ds = root / "dataset"
    for s, subject in enumerate(["backpack", "dog"]):
        for k in range(2):
            save(ds / subject / f"{k:02d}.jpg", 100 + 10 * s + k)
    (ds / "prompts_and_classes.txt").write_text(DREAMBENCH_PROMPTS)


def make_migebench(root: Path) -> None:
    for sub in ("add", "replace"):
        recs = []
        for i in range(2):
            {
                k: save(root / sub / f"{sub}_{k}" / f"{i}_{k}.jpg", 200 + i * 7 + len(k))
                for k in ("source", "target", "entity")
            }
            mask = np.zeros((30, 40), np.uint8)
            mask[8:22, 12:28] = 255
            (root / sub / f"{sub}_mask").mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(mask).save(root / sub / f"{sub}_mask" / f"{i}_mask.jpg")

            def absolute(k, name, sub=sub):  # the authors' files hold absolute paths like these
                return f"/path/to/MIGEBench/{sub}/{sub}_{k}/{name}"

            entities = [absolute("entity", f"{i}_entity.jpg"), absolute("source", f"{i}_source.jpg")]
            if sub == "replace":
                entities = entities[::-1]
            recs.append(
                {
                    "image": absolute("target", f"{i}_target.jpg"),
                    "source_path": [absolute("source", f"{i}_source.jpg")],
                    "multi_prompt": "Add<imagehere>to<imagehere>"
                    if sub == "add"
                    else "replace the cat in<imagehere>with<imagehere>",
                    "target_caption": "a room with a chair",
                    "mask_path": [absolute("mask", f"{i}_mask.jpg")],
                    "entity_path": entities,
                    "entity_path_white": [absolute("entity", f"{i}_entity.jpg")],
                    "idx": i,
                }
            )
        (root / f"{sub}_bench.json").write_text(json.dumps(recs))


MAKERS = {
    "emu_edit": make_emu,
    "magicbrush": make_magicbrush,
    "dreambench": make_dreambench,
    "migebench": make_migebench,
}

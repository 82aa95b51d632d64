"""The issue-2 data path: authors' manifest fields, file:line errors, batch-local padding, the demo world."""

from __future__ import annotations

import json

import pytest

from datamodules.dataset import MIGEDataset, collate
from datamodules.records import ManifestError, read_manifest
from datamodules.synthetic import generate
from mige_lightning.prompt import Task


def test_authors_json_list_loads_with_task_from_config(tmp_path):
    (tmp_path / "m.json").write_text(
        json.dumps(
            [
                {
                    "image": "t.png",
                    "multi_prompt": "make <ImageHere> blue",
                    "entity_path": ["s.png"],
                    "source_path": ["s.png"],
                },
                {
                    "image": "u.png",
                    "multi_prompt": "put <imagehere> in <imagehere>",
                    "entity_path": ["a.png", "b.png"],
                    "source_path": ["b.png"],
                },
            ],
            indent=1,
        )
    )
    recs = read_manifest(tmp_path / "m.json", task="edit")
    assert [r.task for r in recs] == [Task.EDIT, Task.EDIT]
    assert (
        recs[1].references == (tmp_path / "a.png", tmp_path / "b.png")
        and recs[0].source == tmp_path / "s.png"
    )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            '{"image": "t.png", "multi_prompt": "<imagehere>", "entity_path": [], "task": "subject"}',
            "1 <imagehere> placeholder(s) but 0 image(s)",
        ),
        ('{"image": "t.png", "multi_prompt": "x", "task": "paint"}', "unknown task 'paint'"),
        ('{"image": "t.png", "multi_prompt": "x", "task": "edit"}', "needs a 'source_path'"),
        ('{"image": "t.png", "multi_prompt": "x"', "malformed JSON line"),
        ('{"multi_prompt": "x", "task": "subject"}', "missing field 'image'"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, line, reason):
    good = '{"image": "t.png", "multi_prompt": "a cat", "task": "subject"}'
    path = tmp_path / "m.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert str(err.value).startswith(f"{path}:3: ") and reason in str(err.value)


def test_collate_pads_to_the_batch_maximum_with_a_mask(tmp_path):
    manifest = generate(tmp_path, num_samples=8, size=16, seed=1)
    recs = read_manifest(manifest)
    ds = MIGEDataset(recs, resolution=16, vision_resolution=8, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3)
    subject_only = collate([ds[0], ds[4]])  # subject samples: one reference each
    assert subject_only["ref_mask"].shape == (2, 1) and subject_only["ref_pixels"].shape == (2, 1, 3, 8, 8)
    mixed = collate([ds[i] for i in range(4)])  # subject, edit, add, replace → 1, 1, 2, 2 references
    assert mixed["ref_mask"].tolist() == [[True, False], [True, False], [True, True], [True, True]]
    assert mixed["has_source"].tolist() == [False, True, True, True]
    assert mixed["ref_vae"].shape == (4, 2, 3, 16, 16) and mixed["ref_vae"][0, 1].abs().sum() == 0
    assert mixed["target"].min() >= -1 and mixed["target"].max() <= 1


def test_synthetic_world_is_deterministic_and_covers_all_tasks(tmp_path):
    a = generate(tmp_path / "a", num_samples=12, size=16, seed=3).read_text()
    b = generate(tmp_path / "b", num_samples=12, size=16, seed=3).read_text()
    assert a == b
    tasks = {r.task for r in read_manifest(tmp_path / "a" / "train.jsonl")}
    assert tasks == set(Task)
    img_a = (tmp_path / "a" / "images" / "00001_tgt.png").read_bytes()
    assert img_a == (tmp_path / "b" / "images" / "00001_tgt.png").read_bytes()

"""The authors' manifest layout: a base folder for relative paths, records checked against their
task, and ``inspect-manifest`` / ``inspect``.

The layout is a copy of the authors' sample (``example_data/example_data.json`` in their
repository: one subject, one edit and one replace record, no ``task`` field, paths relative to
the dataset root, ``source_path`` a list), built here with the same field names and generated
images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from datamodules.records import ManifestError, infer_task, read_manifest, subtask_by_wording
from datamodules.training_data import TrainingDataModule
from datamodules.validation import check_records, resolve_problems
from mige_cli.main import main as cli_main

SIZES = {
    "subject.jpg": (150, 83),
    "sub_entity_0.jpg": (64, 64),
    "sub_entity_1.jpg": (80, 60),
    "edit_target.jpg": (40, 53),
    "edit_source.jpg": (40, 53),
    "replace_target.jpg": (51, 51),
    "replace_source.jpg": (51, 51),
    "replace_entity.jpg": (32, 48),
}


def authors_layout(root: Path) -> Path:
    """``root/example_data/example_data.json`` + its images, as the authors lay them out."""
    folder = root / "example_data"
    folder.mkdir(parents=True)
    for i, (name, size) in enumerate(SIZES.items()):
        Image.new("RGB", size, (20 * i, 100, 200 - 20 * i)).save(folder / name)
    records = [
        {
            "image": "example_data/subject.jpg",
            "width": 150,
            "height": 83,
            "entity_path": ["example_data/sub_entity_0.jpg", "example_data/sub_entity_1.jpg"],
            "multi_prompt": "a poached<imagehere>are several<imagehere>spears on a plate",
            "source_path": [],
        },
        {
            "image": "example_data/edit_target.jpg",
            "width": 40,
            "height": 53,
            "entity_path": ["example_data/edit_source.jpg"],
            "multi_prompt": "Delete the person in the blue jacket from<imagehere>and repair the background",
            "source_path": ["example_data/edit_source.jpg"],
        },
        {
            "image": "example_data/replace_target.jpg",
            "width": 51,
            "height": 51,
            "entity_path": ["example_data/replace_source.jpg", "example_data/replace_entity.jpg"],
            "multi_prompt": "replace the plaid skirt in<ImageHere>with<imagehere>",
            "source_path": ["example_data/replace_source.jpg"],
        },
    ]
    manifest = folder / "example_data.json"
    manifest.write_text(json.dumps(records, indent=4))
    return manifest


def test_relative_paths_resolve_against_the_given_base(tmp_path):
    manifest = authors_layout(tmp_path)
    # in place, without a base: every path is looked for under example_data/example_data/
    records, problems = read_manifest(manifest, task="subject")
    _, bad = check_records(records[:1], root=manifest.parent, max_images=4)
    assert f"missing file {tmp_path}/example_data/example_data/subject.jpg" in str(bad[0])
    # with the dataset root as base, they resolve
    records, problems = read_manifest(manifest, task="subject", base=tmp_path)
    good, bad = check_records(records, root=tmp_path, max_images=4)
    assert [r.target for r in good] == [tmp_path / "example_data/subject.jpg"]
    assert good[0].base == str(tmp_path)


def test_a_path_outside_the_base_is_refused(tmp_path):
    manifest = authors_layout(tmp_path)
    records = json.loads(manifest.read_text())[:1]
    records[0]["image"] = "../outside.jpg"
    Image.new("RGB", (8, 8)).save(tmp_path.parent / "outside.jpg")
    manifest.write_text(json.dumps(records))
    good, problems = read_manifest(manifest, task="subject", base=tmp_path)
    _, bad = check_records(good, root=Path(good[0].base), max_images=4)
    assert bad[0].kind == "path escapes data root" and str(tmp_path) in bad[0].detail


@pytest.mark.parametrize(
    ("task", "subtask", "expected"),
    [
        # declared subject: the edit and the replace record carry a source image
        (
            "subject",
            None,
            {
                2: "'subject' record has a source image — edit or subject_edit?",
                3: "'subject' record has a source image — edit or subject_edit?",
            },
        ),
        # declared edit: the subject record lacks a source, the replace record references another image
        (
            "edit",
            None,
            {
                1: "task 'edit' needs a 'source_path'",
                3: "'edit' record references 2 image(s) other than or besides its source; an edit "
                "references exactly its source image — subject_edit?",
            },
        ),
        # declared subject_edit/add: the edit record has no entity, the replace record says replace
        (
            "subject_edit",
            "add",
            {
                1: "task 'subject_edit' needs a 'source_path'",
                2: "'subject_edit' record has no entity image besides its source — edit?",
                3: "'add' record whose instruction says 'replace' — subtask replace?",
            },
        ),
    ],
)
def test_records_whose_fields_contradict_their_task_are_bad_records(tmp_path, task, subtask, expected):
    manifest = authors_layout(tmp_path)
    records, problems = read_manifest(manifest, task=task, subtask=subtask, base=tmp_path)
    got = {int(p.origin.rsplit("record ", 1)[1]): p.detail for p in problems}
    assert got == expected
    lines = {1: 2, 2: 13, 3: 25}  # each record's first line in the file
    for number in expected:
        assert any(p.origin == f"{manifest}:{lines[number]}: record {number}" for p in problems)
    kinds = {p.kind for p in problems if "needs a 'source_path'" not in p.detail}
    assert kinds == {"task mismatch"}
    assert len(records) == 3 - len(expected)


def test_mismatched_records_error_or_are_skipped_and_counted(tmp_path, caplog):
    manifest = authors_layout(tmp_path)
    records, problems = read_manifest(manifest, task="subject", base=tmp_path)
    with pytest.raises(
        ManifestError, match=r"(?s)2 bad record\(s\).*record 2: 'subject' record has a source"
    ):
        resolve_problems(records, problems, on_bad_record="error")
    with caplog.at_level(logging.INFO):
        kept = resolve_problems(records, problems, on_bad_record="skip")
    assert [r.origin for r in kept] == [f"{manifest}:2: record 1"]
    assert "skipped 2 bad record(s): task mismatch: 2" in caplog.text


def test_the_data_module_reads_a_manifest_with_a_base_and_refuses_unknown_keys(tmp_path):
    manifest = authors_layout(tmp_path)
    dm = TrainingDataModule(
        manifests=[{"path": str(manifest), "task": "subject", "base": str(tmp_path)}],
        task_weights={"subject": 1.0},
        on_bad_record="skip",
    )
    records = dm.validated_records()
    assert [r.target for r in records] == [tmp_path / "example_data/subject.jpg"]
    with pytest.raises(ValueError, match=r"data.manifests\[0\]: unknown key\(s\) \['bas'\]"):
        TrainingDataModule(manifests=[{"path": str(manifest), "bas": str(tmp_path)}])
    with pytest.raises(FileNotFoundError, match=r"data.manifests\[0\].base: folder '.*nope' does not exist"):
        TrainingDataModule(manifests=[{"path": str(manifest), "base": str(tmp_path / "nope")}])


def test_task_by_shape_and_subtask_by_wording(tmp_path):
    entries = json.loads(authors_layout(tmp_path).read_text())
    assert [infer_task(e) for e in entries] == ["subject", "edit", "subject_edit/replace"]
    assert subtask_by_wording("Add <imagehere> on the left of <imagehere>") == "add"
    assert subtask_by_wording("swap the cat in <imagehere> for <imagehere>") == "replace"
    assert subtask_by_wording("put <imagehere> where the dog is, replacing it") is None  # both: undecided


def test_inspect_manifest_summarises_the_authors_sample(tmp_path, capsys):
    manifest = authors_layout(tmp_path)
    cli_main(["inspect-manifest", str(manifest), "--base", str(tmp_path)])
    text = capsys.readouterr().out
    assert "records: 3, usable: 3" in text
    for line in ("subject (inferred)", "edit (inferred)", "subject_edit/replace (inferred)"):
        assert line in text
    assert "task by shape: edit 1, subject 1, subject_edit/replace 1" in text
    assert "image sizes (8 images): min 32×48, median 51×51, max 150×83" in text
    assert "placeholders: <imagehere> ×4, <ImageHere> ×1" in text
    assert "problems: none" in text

    summaries = cli_main(["inspect-manifest", str(manifest), "--json"])  # no base: paths miss
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(summaries)) and out[0]["problems"] == {"missing file": 3}
    assert out[0]["per_task"]["subject (inferred)"]["refs_per_record"] == {"2": 1}

    # declared subject for the whole file: the other two show up as problems and disagreements
    out = cli_main(
        ["inspect-manifest", str(manifest), "--base", str(tmp_path), "--task", "subject", "--json"]
    )
    assert out[0]["problems"] == {"task mismatch": 2}
    assert len(out[0]["declared_vs_shape"]) == 2


def test_inspect_reads_the_manifests_of_a_config(tmp_path, capsys):
    manifest = authors_layout(tmp_path)
    config = tmp_path / "fit.yaml"
    config.write_text(
        "data:\n  manifests:\n"
        f"    - {{path: {manifest}, task: subject, base: {tmp_path}}}\n"
        f"    - {{path: {tmp_path / 'missing.json'}, task: edit}}\n"
    )
    out = cli_main(["inspect", "--config", str(config), "--no-images"])
    text = capsys.readouterr().out
    assert out[0]["per_task"] == {"subject": {"records": 3, "refs_per_record": {1: 1, 2: 2}}}
    assert out[1]["problems"] == {"missing manifest": 1}
    assert f"{tmp_path / 'missing.json'}:0: does not exist" in text

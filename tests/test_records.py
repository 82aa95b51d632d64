"""Manifest reading and validation: the authors' field names, and every bad-record kind as file:line: reason."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from datamodules.records import ManifestError, read_manifest
from datamodules.training_data import TrainingDataModule
from mige_lightning.images import load_rgb, to_rgb
from mige_lightning.prompt import Task


def _img(path, colour=(10, 20, 30), size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path.name


def test_authors_json_list_loads_unchanged_with_task_from_config(tmp_path):
    for n in ("t.png", "s.png", "a.png"):
        _img(tmp_path / n)
    # exactly the authors' field names (and their capitalised placeholder)
    (tmp_path / "edit.json").write_text(
        json.dumps(
            [
                {
                    "image": "t.png",
                    "multi_prompt": "make <ImageHere> blue",
                    "entity_path": ["s.png"],
                    "source_path": ["s.png"],
                    "width": 8,
                    "height": 8,
                },
                {  # a record's own task wins over the manifest's
                    "image": "t.png",
                    "multi_prompt": "put <imagehere> in <imagehere>",
                    "entity_path": ["a.png", "s.png"],
                    "source_path": ["s.png"],
                    "task": "subject_edit",
                },
            ],
            indent=1,
        )
    )
    recs, problems = read_manifest(tmp_path / "edit.json", task="edit")
    assert problems == []
    assert [r.task for r in recs] == [Task.EDIT, Task.SUBJECT_EDIT]
    assert (
        recs[1].references == (tmp_path / "a.png", tmp_path / "s.png")
        and recs[0].source == tmp_path / "s.png"
    )
    starts = [
        i for i, line in enumerate((tmp_path / "edit.json").read_text().splitlines(), 1) if line == " {"
    ]
    assert [r.origin for r in recs] == [
        f"{tmp_path / 'edit.json'}:{n}: record {i}" for i, n in enumerate(starts, 1)
    ]  # each object's first line and its number in the file


def test_subtask_from_record_or_manifest(tmp_path):
    line = {
        "image": "t.png",
        "multi_prompt": "the dog <imagehere> in <imagehere>",  # wording names neither subtask
        "entity_path": ["a.png", "s.png"],
        "source_path": ["s.png"],
    }
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "subtask": "add"}) + "\n")
    recs, _ = read_manifest(tmp_path / "m.jsonl", task="subject_edit", subtask="replace")
    assert [r.pool for r in recs] == ["subject_edit/replace", "subject_edit/add"]


GOOD = {"image": "t.png", "multi_prompt": "a <imagehere>", "entity_path": ["r.png"], "task": "subject"}


def test_optional_captions_are_read_and_their_types_checked(tmp_path):
    """``input_caption`` / ``output_caption`` (the benchmarks' caption names) for the validation
    loop's CLIP-T and CLIPdir: optional, strings, and a bad one is reported as file:line: record N."""
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    lines = [
        {**GOOD, "input_caption": "a pink background", "output_caption": "a red circle on the left"},
        {**GOOD, "output_caption": "a red circle on the left"},
        {**GOOD, "input_caption": None, "output_caption": None},
        GOOD,
        {**GOOD, "output_caption": 3},
        {**GOOD, "input_caption": ["a"]},
        {**GOOD, "output_caption": "  "},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs, problems = read_manifest(manifest)
    assert [(r.input_caption, r.output_caption) for r in recs] == [
        ("a pink background", "a red circle on the left"),
        (None, "a red circle on the left"),
        (None, None),
        (None, None),
    ]
    assert [str(p) for p in problems] == [
        f"{manifest}:5: record 5: 'output_caption' must be a string, got int 3",
        f"{manifest}:6: record 6: 'input_caption' must be a string, got list ['a']",
        f"{manifest}:7: record 7: 'output_caption' is empty; leave the field out (or null) for no caption",
    ]
    assert [p.kind for p in problems] == ["wrong type", "wrong type", "empty caption"]


def _bad_cases(tmp_path):
    """(manifest line, expected reason) for every bad-record kind the issue names."""
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big)
    (tmp_path / "trunc.png").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "t.png").read_bytes())
    return [
        ({**GOOD, "image": "missing.png"}, "missing file"),
        ({**GOOD, "image": "trunc.png"}, "unreadable or truncated image"),
        ({**GOOD, "image": "text.png"}, "unreadable or truncated image"),
        (
            {**GOOD, "multi_prompt": "a <imagehere> and <imagehere>"},
            "2 <imagehere> placeholder(s) but 1 image(s)",
        ),
        ({**GOOD, "task": "paint"}, "unknown task 'paint'"),
        ({**GOOD, "image": "../outside.png"}, "escapes the data root"),
        (
            {**GOOD, "multi_prompt": "<imagehere>" * 5, "entity_path": ["r.png"] * 5},
            "5 reference images; the model allows 4",
        ),
        (None, "malformed JSON line"),
        (GOOD, "duplicate of"),  # the same record as line 1
        ({**GOOD, "entity_path": 7}, "'entity_path' must be a path or a list of paths (strings), got int 7"),
        ({**GOOD, "entity_path": ["r.png", 3]}, "'entity_path' must be a path or a list of paths"),
        ({**GOOD, "source_path": {"a": 1}}, "'source_path' must be a path or a list of paths"),
        ({**GOOD, "image": ["t.png"]}, "'image' must be a string, got list"),
        ({**GOOD, "multi_prompt": 5}, "'multi_prompt' must be a string, got int 5"),
        ({**GOOD, "task": 1}, "'task' must be a string, got int 1"),
        (
            # 95 words before the placeholder: the 88-word limit would cut it, and training
            # would then fail on "0 placeholder(s) but 1 image(s)" mid-run
            {**GOOD, "multi_prompt": "word " * 95 + "a <imagehere>"},
            "the instruction has 97 words and the 88-word limit cuts 1 of its 1 <imagehere> placeholder(s)",
        ),
    ]


def test_every_bad_record_kind_is_reported_at_once_as_file_line_reason(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cases = _bad_cases(data)
    lines = [json.dumps(GOOD)] + [json.dumps(c) if c is not None else '{"image": "t.png",' for c, _ in cases]
    manifest = data / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    dm = TrainingDataModule(
        [{"path": str(manifest)}],
        resolution=8,
        vision_resolution=8,
        vision_mean=(0.5,) * 3,
        vision_std=(0.5,) * 3,
    )
    dm.connect(resolution=8, vision_resolution=8, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3, max_images=4)
    with pytest.raises(ManifestError) as err:
        dm.validated_records()
    report = str(err.value)
    assert report.startswith(f"{len(cases)} bad record(s)")
    for lineno, (_, reason) in enumerate(cases, start=2):
        line = next(x for x in report.splitlines() if x.startswith(f"{manifest}:{lineno}: "))
        assert reason in line, (lineno, line)
    assert not any(
        x.startswith(f"{manifest}:1:") for x in report.splitlines()
    )  # the good one is not reported


def test_skip_mode_drops_bad_records_and_logs_counts_per_reason(tmp_path, caplog):
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    bad = [{**GOOD, "image": "missing.png"}, {**GOOD, "image": "missing2.png"}, {**GOOD, "task": "paint"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in [GOOD, *bad]) + "\n")
    dm = TrainingDataModule([{"path": str(tmp_path / "m.jsonl")}], on_bad_record="skip")
    dm.connect(resolution=8, vision_resolution=8, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3, max_images=4)
    with caplog.at_level(logging.WARNING):
        records = dm.validated_records()
    assert [r.origin for r in records] == [f"{tmp_path / 'm.jsonl'}:1: record 1"]
    assert "skipped 3 bad record(s): missing file: 2, unknown task: 1" in caplog.text


def test_empty_manifest_and_malformed_json_list_are_reported(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    _, problems = read_manifest(tmp_path / "empty.json", task="edit")
    assert [str(p) for p in problems] == [f"{tmp_path / 'empty.json'}:1: manifest holds no records"]
    (tmp_path / "bad.json").write_text('[\n {"image": "a"},\n {"image": \n]')
    _, problems = read_manifest(tmp_path / "bad.json", task="edit")
    assert str(problems[0]).startswith(f"{tmp_path / 'bad.json'}:4: malformed JSON list")


def _dm(manifest, mode):
    dm = TrainingDataModule([{"path": str(manifest)}], on_bad_record=mode)
    dm.connect(resolution=8, vision_resolution=8, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3, max_images=4)
    return dm


def test_a_minified_manifest_loses_exactly_its_bad_record(tmp_path, caplog):
    """Seven records on one line, the fourth with a missing image: skip mode keeps the other six
    and counts one; error mode reports that one record, by record number."""
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    recs = [{**GOOD, "multi_prompt": f"a <imagehere> number {n}"} for n in range(7)]
    recs[3]["image"] = "missing.png"
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(recs, separators=(",", ":")))  # one line
    with caplog.at_level(logging.WARNING):
        kept = _dm(manifest, "skip").validated_records()
    assert [r.origin for r in kept] == [f"{manifest}:1: record {n}" for n in (1, 2, 3, 5, 6, 7)]
    assert "skipped 1 bad record(s): missing file: 1" in caplog.text
    with pytest.raises(ManifestError) as err:
        _dm(manifest, "error").validated_records()
    report = str(err.value).splitlines()
    assert report[0].startswith("1 bad record(s)")
    assert report[1:] == [f"{manifest}:1: record 4: missing file {tmp_path / 'missing.png'}"]


def test_a_malformed_json_list_stops_the_run_in_skip_mode_too(tmp_path):
    """Its records cannot be told apart: dropping the file as '1 bad record' would lose them all."""
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    good, broken = tmp_path / "good.json", tmp_path / "broken.json"
    good.write_text(json.dumps([GOOD]))
    broken.write_text(json.dumps([GOOD, GOOD])[:-3])
    dm = TrainingDataModule([{"path": str(good)}, {"path": str(broken)}], on_bad_record="skip")
    dm.connect(resolution=8, vision_resolution=8, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3, max_images=4)
    with pytest.raises(
        ManifestError, match=r"cannot be read \(skip mode drops bad records, not whole files\)"
    ) as err:
        dm.validated_records()
    assert f"{broken}:1: malformed JSON list" in str(err.value)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_every_image_mode_converts_correctly_to_rgb(tmp_path, mode):
    if mode == "RGBA":
        img = Image.new("RGBA", (4, 4), (200, 10, 10, 0))  # fully transparent red → white
        img.putpixel((0, 0), (200, 10, 10, 255))
        expected = {(0, 0): (200, 10, 10), (1, 1): (255, 255, 255)}
    elif mode == "LA":
        img = Image.new("LA", (4, 4), (0, 0))
        img.putpixel((0, 0), (60, 255))
        expected = {(0, 0): (60, 60, 60), (1, 1): (255, 255, 255)}
    elif mode == "L":
        img = Image.new("L", (4, 4), 77)
        expected = {(1, 1): (77, 77, 77)}
    elif mode == "P":
        img = Image.new("P", (4, 4), 1)
        img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        img.info["transparency"] = 0
        img.putpixel((0, 0), 0)
        expected = {(1, 1): (10, 200, 30), (0, 0): (255, 255, 255)}
    elif mode == "CMYK":
        img = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
        expected = {(1, 1): (255, 0, 0)}
    else:
        img = Image.fromarray(
            np.full((4, 4), 39321, dtype=np.uint16)
        )  # 60 % grey in 16 bits (naive convert: 255)
        assert img.mode.startswith("I;16") or img.mode == "I"
        expected = {(1, 1): (153, 153, 153)}
    path = tmp_path / f"img.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    img.save(path)
    for loaded in (load_rgb(path), to_rgb(img)):
        assert loaded.mode == "RGB"
        for xy, rgb in expected.items():
            assert loaded.getpixel(xy) == rgb, (mode, xy, loaded.getpixel(xy))


def test_undecodable_bytes_bom_and_a_lone_object_are_named(tmp_path):
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    jsonl = tmp_path / "m.jsonl"
    lines = [
        json.dumps(GOOD).encode(),
        b'{"image": "t.png", "multi_prompt": "caf\xe9 <imagehere>"}',
        json.dumps(GOOD).encode(),
    ]
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # BOM + one Latin-1 byte on line 2
    records, problems = read_manifest(jsonl, task="subject")
    assert [r.origin for r in records] == [f"{jsonl}:1: record 1", f"{jsonl}:3: record 2"]
    assert [str(p) for p in problems] == [f"{jsonl}:2: not UTF-8 text (byte 40 of the line: b'\\xe9')"]
    listed = tmp_path / "l.json"
    listed.write_bytes(b"[\n" + lines[1] + b"\n]")
    _, problems = read_manifest(listed, task="subject")
    assert problems[0].kind == "malformed manifest" and str(problems[0]).startswith(
        f"{listed}:2: JSON list with not UTF-8"
    )
    lone = tmp_path / "o.json"
    lone.write_text(json.dumps(GOOD, indent=2))
    _, problems = read_manifest(lone, task="subject")
    assert problems[0].kind == "malformed manifest" and "one JSON object spread over several lines" in str(
        problems[0]
    )


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    import mige_lightning.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    _img(tmp_path / "t.png", size=8)  # 64 px: fine
    _img(tmp_path / "r.png", size=16)  # 256 px: over the (patched) limit
    (tmp_path / "m.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(ManifestError, match=r"image too large|r\.png is 16×16 = 0 Mpx; the limit is 0 Mpx"):
        _dm(tmp_path / "m.jsonl", "error").validated_records()
    with pytest.raises(images.ImageTooLargeError):
        load_rgb(tmp_path / "r.png")

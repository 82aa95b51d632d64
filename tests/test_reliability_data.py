"""Bad input at the data layer: manifest reading at scale, missing and non-regular files (also with
``check_images: false``), records without a task, deeply nested JSON, EXIF orientation, and images
that would be silently coerced (several frames, an extreme aspect ratio).

Every message names the file and line (manifests: ``file:line: record N: reason``); skip mode drops
exactly the bad records, counted per reason.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mige_lightning.images as images
from datamodules.benchmarks import open_image
from datamodules.dataset import MIGEDataset
from datamodules.manifest_report import inspect_manifest
from datamodules.records import ManifestError, entries_of, read_lines, read_manifest
from datamodules.requests import RequestDataset, read_requests
from datamodules.training_data import TrainingDataModule
from datamodules.validation import check_records
from mige_lightning.images import load_rgb
from mige_lightning.transforms import Transforms

SETTINGS = dict(resolution=8, vision_resolution=8, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3)
GOOD = {"image": "t.png", "multi_prompt": "a <imagehere>", "entity_path": ["r.png"], "task": "subject"}


def _img(path: Path, colour=(10, 20, 30), size=(8, 8)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


def _dm(manifests, mode="error", **kwargs) -> TrainingDataModule:
    specs = [m if isinstance(m, dict) else {"path": str(m)} for m in manifests]
    dm = TrainingDataModule(specs, on_bad_record=mode, **kwargs)
    dm.connect(**SETTINGS, max_images=4)
    return dm


def _never_blocks(fn, fifo: Path | None, *, timeout=20.0):
    """Run ``fn``; if it is still running after ``timeout`` (it opened the FIFO and waits for a
    writer), open the FIFO for writing to release it and fail."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 — handed back to the test below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if fifo is not None:
            try:  # a writer that comes and goes hands the blocked reader an end of file
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(timeout)
        pytest.fail(f"the reader opened the FIFO {fifo} and blocked on it")
    if "error" in result:
        raise result["error"]
    return result["value"]


# ----------------------------------------------------------------------------------- 1. scale
def _pretty_list(n: int) -> tuple[str, list[int]]:
    """A pretty-printed JSON list of ``n`` realistic records, laid out in several ways (one record
    over several lines, a comma on its own line, blank lines, two records on one line, CRLF), and
    each record's first line, counted while writing."""
    parts, starts, line = ["["], [], 1
    for i in range(n):
        rec = {
            "image": f"images/{i:07d}.jpg",
            "width": 512,
            "height": 384,
            "entity_path": [f"entities/{i:07d}_0.jpg"],
            "multi_prompt": f"a photo of <imagehere> number {i} on a wooden table",
            "source_path": [],
            "task": "subject",
        }
        layout = i % 5
        if layout == 0:  # json.dumps(indent=4)-style, on a new line
            body = json.dumps(rec, indent=4)
            sep = "\n"
        elif layout == 1:  # after a blank line and a comma on its own line
            body = json.dumps(rec, indent=2)
            sep = "\n\n,\n" if i else "\n\n"
        elif layout == 2:  # on the same line as the previous record's end
            body = json.dumps(rec)
            sep = " " if i else "\n"
        elif layout == 3:  # CRLF line endings inside the record
            body = json.dumps(rec, indent=1).replace("\n", "\r\n")
            sep = "\r\n"
        else:
            body = json.dumps(rec, indent="\t")
            sep = "\n\t"
        if i and layout not in (1,):
            sep = "," + sep
        line += sep.count("\n")
        starts.append(line)
        parts.append(sep + body)
        line += body.count("\n")
    parts.append("\n]\n")
    return "".join(parts), starts


def test_json_list_line_numbers_are_exact_and_reading_is_linear(tmp_path):
    """Each record's line is its first line in the file, as counted while writing; and reading
    costs a small multiple of parsing the file once (counting newlines from the file's start for
    every record made 20,000 records take 16 s)."""
    small, starts = _pretty_list(50)
    path = tmp_path / "small.json"
    path.write_text(small)
    entries, problems = entries_of(path)
    assert problems == [] and [line for line, _ in entries] == starts
    records, problems = read_manifest(path)
    assert problems == [] and [r.origin for r in records] == [
        f"{path}:{line}: record {n}" for n, line in enumerate(starts, 1)
    ]

    n = 12_000
    text, starts = _pretty_list(n)
    path = tmp_path / "big.json"
    path.write_text(text)
    entries, problems = entries_of(path)
    assert problems == [] and len(entries) == n
    assert [line for line, _ in entries] == starts  # records on one line, blank lines, CRLF, …

    def seconds(fn) -> float:
        gc.disable()  # a collection of the suite's objects is no part of reading a manifest
        try:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        finally:
            gc.enable()

    # what any reader pays: split the lines and parse the list once (the best of three)
    baseline = min(seconds(lambda: (read_lines(path), json.loads(text))) for _ in range(3))
    bound = 1.0 + 15 * baseline  # the reader takes about 3×; counting from the start, 60× at n = 12,000
    elapsed = seconds(lambda: entries_of(path))
    if elapsed > bound:  # once more, in case the machine was busy
        elapsed = seconds(lambda: entries_of(path))
    assert elapsed < bound, f"{n} records read in {elapsed:.2f} s (parsing once: {baseline:.3f} s)"


# ------------------------------------------------- 2. + 3. missing and non-regular files
def _non_regular(path: Path, kind: str) -> Path:
    if kind == "directory":
        path.mkdir(parents=True)
    else:
        os.mkfifo(path)
    return path


NOT_REGULAR = {
    "directory": "is a directory, not a file",
    "fifo": "is not a regular file (a FIFO",
}


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_check_images_false_still_refuses_missing_and_non_regular_images(tmp_path, mode, caplog):
    """``check_images: false`` skips decoding (a text file posing as an image passes), not the
    check that every image is a regular file: training would otherwise stop mid-run on a bare
    FileNotFoundError."""
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    (tmp_path / "text.png").write_text("not decoded with check_images: false")
    _non_regular(tmp_path / "folder.png", "directory")
    _non_regular(tmp_path / "pipe.png", "fifo")
    lines = [
        GOOD,
        {**GOOD, "image": "missing.png"},
        {**GOOD, "image": "folder.png"},
        {**GOOD, "entity_path": ["pipe.png"]},
        {**GOOD, "image": "text.png"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dm = _dm([manifest], mode, check_images=False)
    if mode == "error":
        with pytest.raises(ManifestError) as err:
            _never_blocks(dm.validated_records, tmp_path / "pipe.png")
        report = str(err.value).splitlines()
        assert report[0].startswith("3 bad record(s)")
        assert report[1:] == [
            f"{manifest}:2: record 2: missing file {tmp_path / 'missing.png'}",
            f"{manifest}:3: record 3: {tmp_path / 'folder.png'} is a directory, not a file",
            f"{manifest}:4: record 4: {tmp_path / 'pipe.png'} is not a regular file (a FIFO / named pipe)",
        ]
    else:
        with caplog.at_level(logging.WARNING):
            kept = _never_blocks(dm.validated_records, tmp_path / "pipe.png")
        assert [r.origin for r in kept] == [f"{manifest}:1: record 1", f"{manifest}:5: record 5"]
        assert "skipped 3 bad record(s): not a regular file: 2, missing file: 1" in caplog.text


@pytest.mark.parametrize("kind", ["directory", "fifo"])
@pytest.mark.parametrize("where", ["image", "manifest", "request file", "request image"])
def test_a_directory_or_fifo_is_named_as_such_not_as_missing(tmp_path, kind, where):
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    odd = tmp_path / "odd.png"
    if where == "image":
        _non_regular(odd, kind)
        manifest = tmp_path / "m.jsonl"
        manifest.write_text(json.dumps({**GOOD, "image": "odd.png"}) + "\n")
        records, problems = read_manifest(manifest)
        _, bad = _never_blocks(lambda: check_records(records, root=tmp_path, max_images=4), odd)
        assert [p.kind for p in bad] == ["not a regular file"]
        assert str(bad[0]).startswith(f"{manifest}:1: record 1: {odd} {NOT_REGULAR[kind]}")
    elif where == "manifest":
        manifest = _non_regular(tmp_path / "m.json", kind)
        _, problems = _never_blocks(lambda: read_manifest(manifest), manifest)
        assert len(problems) == 1 and "does not exist" not in problems[0].detail
        assert str(problems[0]).startswith(f"{manifest}:0: the manifest {NOT_REGULAR[kind]}")
        # a whole file lost: the run stops in skip mode too
        with pytest.raises(ManifestError, match="cannot be read"):
            _never_blocks(_dm([manifest], "skip").validated_records, manifest)
    elif where == "request file":
        requests = _non_regular(tmp_path / "requests.jsonl", kind)
        _, problems = _never_blocks(lambda: read_requests(requests), requests)
        assert len(problems) == 1 and "does not exist" not in problems[0].detail
        assert str(problems[0]).startswith(f"{requests}:0: the request file {NOT_REGULAR[kind]}")
    else:
        _non_regular(odd, kind)
        requests = tmp_path / "requests.jsonl"
        good = {"id": "ok", "task": "subject", "instruction": "a <imagehere>", "images": ["r.png"]}
        requests.write_text(
            json.dumps(good) + "\n" + json.dumps({**good, "id": "odd", "images": ["odd.png"]})
        )
        kept, problems = _never_blocks(lambda: read_requests(requests), odd)
        assert [r.id for r in kept] == ["ok"]
        assert len(problems) == 1 and str(problems[0]).startswith(f"{requests}:2: {odd} {NOT_REGULAR[kind]}")
    if kind == "fifo" and where in ("image", "request image"):
        with pytest.raises(OSError, match="is not a regular file"):
            _never_blocks(lambda: load_rgb(odd), odd)  # the one decoder never opens a FIFO either


# ----------------------------------------------------------------------- 4. records without a task
@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize("layout", ["json list", "jsonl"])
def test_records_without_a_task_are_named_when_a_weighted_pool_is_empty(tmp_path, mode, layout):
    """The authors' files have no ``task`` field: the task comes from ``data.manifests[i].task``
    (``inspect-manifest`` shows each record's task by shape; training never guesses it). Without
    one, the pool check that stops ``fit`` early names the records that lack a task."""
    _img(tmp_path / "t.png")
    _img(tmp_path / "s.png")
    rec = {"image": "t.png", "multi_prompt": "make <imagehere> blue", "entity_path": ["s.png"],
           "source_path": ["s.png"]}  # fmt: skip
    recs = [{**rec, "multi_prompt": f"make <imagehere> blue {i}"} for i in range(5)]
    manifest = tmp_path / ("edit.json" if layout == "json list" else "edit.jsonl")
    if layout == "json list":
        manifest.write_text(json.dumps(recs, indent=4))
        lines = [i for i, text in enumerate(manifest.read_text().splitlines(), 1) if text == "    {"]
    else:
        manifest.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        lines = [1, 2, 3, 4, 5]
    _, problems = read_manifest(manifest)
    assert [str(p) for p in problems] == [
        f"{manifest}:{line}: record {n}: no 'task' field and no task given for this manifest in the data config"
        for n, line in enumerate(lines, 1)
    ]
    assert {p.kind for p in problems} == {"missing task"}
    dm = _dm([manifest], mode, task_weights={"subject": 0.5, "edit": 0.5})
    with pytest.raises(ManifestError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "pool 'subject' has weight 0.5 but 0 record(s)" in message
    assert (
        f"5 record(s) have no 'task' field and no task in data.manifests, e.g. {manifest}:{lines[0]}: "
        f"record 1, {manifest}:{lines[1]}: record 2, {manifest}:{lines[2]}: record 3" in message
    )
    assert "data.manifests[0].task" in message and "inspect-manifest" in message
    # given the task, the same file trains
    ok = _dm([{"path": str(manifest), "task": "edit"}], mode, task_weights={"edit": 1.0})
    ok.setup("fit")
    assert len(ok.validated_records()) == 5


# ----------------------------------------------------------------------- 5. deeply nested JSON
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["json list", "record in a json list", "jsonl line", "request line"])
def test_deeply_nested_json_is_a_clear_error_not_a_recursion_error(tmp_path, where, caplog):
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    good = [{**GOOD, "multi_prompt": f"a <imagehere> {i}"} for i in range(3)]
    if where == "request line":
        requests = tmp_path / "requests.jsonl"
        req = {"id": "a", "task": "subject", "instruction": "a <imagehere>", "images": ["r.png"]}
        requests.write_text(
            json.dumps(req)
            + "\n"
            + '{"id": "deep", "images": '
            + DEEP
            + "}\n"
            + json.dumps({**req, "id": "b"})
        )
        kept, problems = read_requests(requests)
        assert [r.id for r in kept] == ["a", "b"]
        assert [p.origin for p in problems] == [f"{requests}:2"]
        assert "nested" in problems[0].detail and "deeper than" in problems[0].detail
        return
    manifest = tmp_path / ("m.jsonl" if where == "jsonl line" else "m.json")
    if where == "json list":
        manifest.write_text("[\n" + DEEP + "\n]")
    elif where == "record in a json list":
        body = ",\n".join(json.dumps(g) for g in good)
        manifest.write_text("[\n" + body + ',\n{"image": "t.png",\n "entity_path": ' + DEEP + "}\n]")
    else:
        lines = [json.dumps(g) for g in good]
        lines.insert(1, '{"image": "t.png", "entity_path": ' + DEEP + "}")
        manifest.write_text("\n".join(lines) + "\n")
    records, problems = read_manifest(manifest)
    assert len(problems) == 1
    if where == "jsonl line":  # that line is a bad record; the others are read
        assert [r.origin for r in records] == [
            f"{manifest}:{n}: record {i}" for i, n in ((1, 1), (2, 3), (3, 4))
        ]
        assert problems[0].origin == f"{manifest}:2" and problems[0].kind == "malformed JSON"
        assert "nested" in problems[0].detail and "deeper than" in problems[0].detail
        with caplog.at_level(logging.WARNING):
            kept = _dm([manifest], "skip").validated_records()
        assert len(kept) == 3 and "skipped 1 bad record(s): malformed JSON: 1" in caplog.text
        return
    line = 2 if where == "json list" else 6
    assert problems[0].kind == "malformed manifest" and records == []
    assert str(problems[0]).startswith(f"{manifest}:{line}: JSON list nested deeper than")
    with pytest.raises(ManifestError, match="cannot be read") as err:
        _dm([manifest], "skip").validated_records()
    assert f"{manifest}:{line}: JSON list nested" in str(err.value)


# ------------------------------------------------------------------------ 6. EXIF orientation
UPRIGHT = (48, 32)  # width, height: left half red, right half blue
INVERSE = {  # what the camera stored, for each orientation tag (exif_transpose undoes it)
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def _sideways(path: Path, orientation: int) -> Path:
    arr = np.zeros((UPRIGHT[1], UPRIGHT[0], 3), np.uint8)
    arr[:, : UPRIGHT[0] // 2] = (255, 0, 0)
    arr[:, UPRIGHT[0] // 2 :] = (0, 0, 255)
    stored = Image.fromarray(arr).transpose(INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def _is_upright(img: Image.Image) -> None:
    assert img.size == UPRIGHT
    left, right = img.getpixel((6, 16)), img.getpixel((42, 16))
    assert left[0] > 200 and left[2] < 60, left
    assert right[2] > 200 and right[0] < 60, right


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("where", ["training", "request", "benchmark"])
def test_exif_orientation_is_applied_wherever_a_user_image_is_read(tmp_path, where, orientation, suffix):
    photo = _sideways(tmp_path / f"photo{suffix}", orientation)
    if where == "training":
        manifest = tmp_path / "m.jsonl"
        manifest.write_text(json.dumps({"image": photo.name, "multi_prompt": "a cat", "task": "subject"}))
        records, problems = read_manifest(manifest)
        records, bad = check_records(records, root=tmp_path, max_images=4, check_images=False)
        assert problems == bad == []
        item = MIGEDataset(records, Transforms(32, 8, (0.0,) * 3, (1.0,) * 3))[0]
        target = item["target"]  # 48×32 → short side 32, centre crop 32×32: x in [8, 40)
        assert target.shape == (3, 32, 32)
        assert target[0, 16, 4] > 0.6 and target[2, 16, 4] < -0.6, target[:, 16, 4]
        assert target[2, 16, 28] > 0.6 and target[0, 16, 28] < -0.6, target[:, 16, 28]
        # inspect-manifest reports the size as shown, from the header
        assert inspect_manifest(manifest)["image_sizes"]["min"] == list(UPRIGHT)
    elif where == "request":
        requests = tmp_path / "requests.jsonl"
        requests.write_text(
            json.dumps({"id": "p", "task": "subject", "instruction": "a <imagehere>", "images": [photo.name]})
        )
        kept, problems = read_requests(requests)
        assert problems == []
        _is_upright(RequestDataset(kept)[0].request.references[0])
    else:
        _is_upright(open_image(str(photo)))
        _is_upright(open_image(photo.read_bytes()))  # parquet test sets hold encoded bytes


# ------------------------------------------------- 7. several frames, an extreme aspect ratio
def _frames(path: Path, n: int) -> Path:
    frames = [Image.new("RGB", (16, 16), (40 * i, 100, 200 - 40 * i)) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    return path


def _sized(path: Path, size: tuple[int, int]) -> Path:
    Image.new("RGB", size, (90, 90, 90)).save(path)
    return path


SILENTLY_COERCED = {
    "animated gif": (lambda p: _frames(p.with_suffix(".gif"), 3), "multi-frame image", "has 3 frames"),
    "apng": (lambda p: _frames(p.with_suffix(".png"), 2), "multi-frame image", "has 2 frames"),
    "multi-page tiff": (lambda p: _frames(p.with_suffix(".tiff"), 2), "multi-frame image", "has 2 frames"),
    "1000x10": (
        lambda p: _sized(p.with_suffix(".png"), (1000, 10)),
        "extreme aspect ratio",
        "is 1000×10 (aspect ratio 100.0:1)",
    ),
    "10x90": (
        lambda p: _sized(p.with_suffix(".png"), (10, 90)),
        "extreme aspect ratio",
        "is 10×90 (aspect ratio 9.0:1)",
    ),
}


@pytest.mark.parametrize("case", list(SILENTLY_COERCED))
@pytest.mark.parametrize("where", ["record", "request"])
def test_multi_frame_and_extreme_aspect_images_are_refused(tmp_path, case, where):
    make, kind, detail = SILENTLY_COERCED[case]
    odd = make(tmp_path / "odd")
    _img(tmp_path / "t.png")
    _img(tmp_path / "r.png")
    _img(tmp_path / "wide.png", size=(8 * images.MAX_ASPECT_RATIO, 8))  # exactly at the limit: fine
    if where == "record":
        manifest = tmp_path / "m.jsonl"
        lines = [{**GOOD, "image": "wide.png"}, {**GOOD, "entity_path": [odd.name]}]
        manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        records, _ = read_manifest(manifest)
        good, bad = check_records(records, root=tmp_path, max_images=4)
        assert [r.origin for r in good] == [f"{manifest}:1: record 1"]
        assert [p.kind for p in bad] == [kind]
        assert str(bad[0]).startswith(f"{manifest}:2: record 2: image {odd} {detail}")
    else:
        requests = tmp_path / "requests.jsonl"
        req = {"id": "wide", "task": "subject", "instruction": "a <imagehere>", "images": ["wide.png"]}
        requests.write_text(json.dumps(req) + "\n" + json.dumps({**req, "id": "odd", "images": [odd.name]}))
        kept, problems = read_requests(requests)
        assert [r.id for r in kept] == ["wide"]
        assert [p.origin for p in problems] == [f"{requests}:2"]
        assert problems[0].detail.startswith(f"image {odd} {detail}")
    with pytest.raises(ValueError, match=re.escape(detail)):
        load_rgb(odd)
    with pytest.raises(ValueError, match="frames|aspect ratio"):
        open_image(odd.read_bytes())

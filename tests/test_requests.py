"""Prediction request ids name output files: nothing may write outside the output folder, crash the
run, or overwrite another request's image."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from datamodules.requests import read_requests


def test_ids_that_leave_the_output_folder_or_collide_are_bad_requests(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "ref.png")
    body = {"task": "subject", "instruction": "a <imagehere> on grass", "images": ["ref.png"]}
    ids = [
        "x",
        "../../x",
        "/abs/x",
        "sub/x",
        "./x",
        "X",
        ".hidden",
        "a b",
        "x.",
        "ok-1.v2",
        7,
        3.5,
        True,
        ["a"],
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, **body}) for i in ids) + "\n")
    requests, problems = read_requests(path)
    assert [r.id for r in requests] == ["x", "ok-1.v2", "7"]
    bad = {p.origin: p.detail for p in problems}
    assert sorted(bad) == sorted(f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14))
    for n in (2, 3, 4, 5, 7, 8, 9):
        assert "is not a plain file name" in bad[f"{path}:{n}"], bad[f"{path}:{n}"]
    assert "duplicate id 'X'" in bad[f"{path}:6"]
    for n in (12, 13, 14):
        assert "'id' must be a string or an integer" in bad[f"{path}:{n}"]


def test_a_placeholder_beyond_the_word_limit_is_a_bad_request(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "ref.png")
    long = "word " * 90 + "put <imagehere> here"
    lines = [
        {"id": "short", "task": "subject", "instruction": "a <imagehere>", "images": ["ref.png"]},
        {"id": "long", "task": "subject", "instruction": long, "images": ["ref.png"]},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    requests, problems = read_requests(path)
    assert [r.id for r in requests] == ["short"]
    assert [p.origin for p in problems] == [f"{path}:2"] and "88-word limit cuts 1" in problems[0].detail

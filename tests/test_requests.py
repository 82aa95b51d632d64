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


def test_request_fields_of_the_wrong_type_or_out_of_range_are_bad_requests(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "ref.png")
    body = {"task": "subject", "instruction": "a <imagehere>", "images": ["ref.png"]}
    cases = [
        ({"seed": "3"}, "'seed' must be an integer, got str '3'"),
        ({"seed": 2.5}, "'seed' must be an integer, got float 2.5"),
        ({"seed": 2**64}, "'seed' must be in [0, 9223372036854775807]"),
        ({"num_inference_steps": -5}, "'num_inference_steps' must be in [1, 1000], got -5"),
        ({"num_inference_steps": 100000}, "'num_inference_steps' must be in [1, 1000], got 100000"),
        ({"guidance_scale": float("nan")}, "'guidance_scale' must be in [0.0, 100.0], got nan"),
        ({"guidance_scale": True}, "'guidance_scale' must be a number, got bool True"),
        ({"resize_to_source": "yes"}, "'resize_to_source' must be true or false, got 'yes'"),
        ({"instruction": ["a <imagehere>"]}, "'instruction' must be a string, got list"),
        ({"images": "ref.png"}, "'images' must be a list of paths (strings), got 'ref.png'"),
        ({"seed": 7, "guidance_scale": 2, "num_inference_steps": 4, "resize_to_source": False}, None),
    ]
    path = tmp_path / "requests.jsonl"
    text = "\n".join(json.dumps({"id": f"r{i}", **body, **extra}) for i, (extra, _) in enumerate(cases))
    path.write_bytes(text.encode() + b'\n{"id": "latin", "instruction": "caf\xe9"}\n')
    requests, problems = read_requests(path)
    bad = {p.origin: p.detail for p in problems}
    for lineno, (_, expected) in enumerate(cases, start=1):
        if expected is None:
            assert f"{path}:{lineno}" not in bad
        else:
            assert expected in bad[f"{path}:{lineno}"], (lineno, bad.get(f"{path}:{lineno}"))
    assert [r.id for r in requests] == [f"r{len(cases) - 1}"]
    assert dict(requests[0].options) == {
        "seed": 7,
        "guidance_scale": 2.0,
        "num_inference_steps": 4,
        "resize_to_source": False,
    }
    assert bad[f"{path}:{len(cases) + 1}"].startswith("not UTF-8 text")


def test_more_references_than_the_model_takes_skip_that_request_only(tmp_path, caplog):
    import logging

    from datamodules.requests import RequestDataModule

    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "ref.png")
    lines = [
        {"id": "ok", "task": "subject", "instruction": "a <imagehere>", "images": ["ref.png"]},
        {"id": "many", "task": "subject", "instruction": "<imagehere> " * 3, "images": ["ref.png"] * 3},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dm = RequestDataModule(str(path))
    dm.connect(resolution=8, vision_resolution=8, vision_mean=(0.5,) * 3, vision_std=(0.5,) * 3, max_images=2)
    with caplog.at_level(logging.WARNING):
        loader = dm.predict_dataloader()
    assert [r.id for r in loader.dataset.requests] == ["ok"]
    assert f"{path}:2: 3 images; the model allows 2" in caplog.text


def test_a_rerun_never_empties_an_earlier_predict_log_silently(tmp_path):
    from types import SimpleNamespace

    import pytest

    from callbacks.prediction_writer import PredictionWriter

    trainer = SimpleNamespace(world_size=1, global_rank=0)
    out = tmp_path / "out"
    PredictionWriter(str(out)).on_predict_start(trainer, None)
    (out / "predictions.jsonl").write_text('{"id": "a"}\n')
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(out / "a.png")
    with pytest.raises(
        FileExistsError, match=r"holds an earlier predict run \(predictions.jsonl, 1 image\(s\)\)"
    ):
        PredictionWriter(str(out)).on_predict_start(trainer, None)
    assert (out / "predictions.jsonl").read_text() == '{"id": "a"}\n'
    PredictionWriter(str(out), overwrite=True).on_predict_start(trainer, None)
    assert (out / "predictions.jsonl").read_text() == ""

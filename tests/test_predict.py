"""``predict`` from a request file on a trained demo checkpoint: images + predictions.jsonl, bad lines skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from mige_cli.main import main
from tests.helpers.training import FROM_SCRATCH

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_predict_on_demo_checkpoint_writes_images_and_log(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    world = f"--data.synthetic={{root: {tmp_path}/world, num_samples: 40, size: 32, seed: 0}}"
    cli = main(
        ["--config", str(REPO / "configs/demo.yaml"), *FROM_SCRATCH, world, "--trainer.max_steps=4"],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file()

    requests = (tmp_path / "world" / "heldout_requests.jsonl").read_text().splitlines()
    tasks = {json.loads(r)["task"] for r in requests}
    assert tasks == {"subject", "edit", "subject_edit"}
    bad = [
        '{"id": "bad1", "task": "subject", "instruction": "a <imagehere>", "images": ["images/nope.png"]}',
        '{"id": "bad2", "task": "paint", "instruction": "x"}',
        '{"id": "bad3", "task": "subject", "instruction": "<imagehere> <imagehere>", "images": ["images/heldout_00000_ref0.png"]}',
        '{"id": "bad4", "task": "edit", "instruction": "make it red"}',
        "not json",
    ]
    good = [json.loads(r) for r in requests]
    good[0]["seed"] = 1234
    good[1]["num_inference_steps"] = 3
    good = good
    lines = [json.dumps(g) for g in good] + bad
    req_file = tmp_path / "world" / "requests.jsonl"
    req_file.write_text("\n".join(lines) + "\n")

    out_dir = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        main(
            [
                "predict",
                "--config",
                str(REPO / "configs/demo.yaml"),
                "--config",
                str(REPO / "configs/predict/demo.yaml"),
                *FROM_SCRATCH,
                f"--data.requests={req_file}",
                f"--trainer.callbacks.init_args.output_dir={out_dir}",
                "--ckpt_path",
                str(ckpt),
            ]
        )
    log = [json.loads(x) for x in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in log) == sorted(g["id"] for g in good)
    for e in log:
        img = Image.open(out_dir / e["file"])
        assert img.size == (32, 32)
        assert e["ema"] is True  # the demo trains with the EMA callback; predict samples with it
    by_id = {e["id"]: e for e in log}
    assert by_id[good[0]["id"]]["seed"] == 1234 and by_id[good[1]["id"]]["num_inference_steps"] == 3
    # base seed 0 + the request's position among the file's requests of its task
    number = sum(g["task"] == good[2]["task"] for g in good[:2])
    assert by_id[good[2]["id"]]["seed"] == number
    for lineno in range(len(good) + 1, len(lines) + 1):
        assert f"{req_file}:{lineno}:" in caplog.text
    assert f"skipped 5 bad request(s) of {len(lines)}" in caplog.text

"""One generation path: a held-out request gives the bitwise-same image, and the same scene
accuracy, through ``validate``, ``test`` on the synthetic world and ``predict`` (+ judge-synthetic)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

from mige_cli.main import main
from mige_lightning.generate import GenerationRequest, SamplingBatch, generate
from mige_lightning.prompt import Task
from tests.helpers.training import FROM_SCRATCH

REPO = Path(__file__).resolve().parents[1]
TASKS = ("subject", "edit", "subject_edit")


class CaptureValidation(L.Callback):
    """The scored validation images by request id."""

    def __init__(self):
        self.images: dict[str, np.ndarray] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for row, generated in zip(batch, outputs, strict=True):
            if row.scored:
                self.images[generated.request.id] = np.asarray(generated.image)


@pytest.mark.slow
def test_a_heldout_request_gives_the_same_image_through_validate_test_and_predict(tmp_path):
    world = (
        f"--data.synthetic={{root: {tmp_path}/world, num_samples: 48, size: 32, seed: 0, "
        "heldout_fraction: 0.25}"
    )
    demo = ["--config", str(REPO / "configs/demo.yaml"), *FROM_SCRATCH]
    cli = main(
        [*demo, world, "--trainer.max_steps=2", f"--trainer.logger.init_args.save_dir={tmp_path}/runs"],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = cli.trainer.checkpoint_callback.last_model_path

    # validate: Lightning's loop, held-out batches of 3 (predict runs batches of 8, test of 64)
    cli = main(
        [
            *demo,
            world,
            "--data.val_batch_size=3",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    capture = CaptureValidation()
    cli.trainer.callbacks.append(capture)
    logged = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)[0]

    main(
        [
            "test",
            *demo[:2],
            "--config",
            str(REPO / "configs/eval/synthetic.yaml"),
            *demo[2:],
            f"--data.benchmark={{name: synthetic, root: {tmp_path}/world}}",
            f"--trainer.callbacks.init_args.output_dir={tmp_path}/eval",
            "--ckpt_path",
            ckpt,
        ]
    )
    main(
        [
            "predict",
            *demo[:2],
            "--config",
            str(REPO / "configs/predict/demo.yaml"),
            *demo[2:],
            f"--data.requests={tmp_path}/world/heldout_requests.jsonl",
            f"--trainer.callbacks.init_args.output_dir={tmp_path}/pred",
            "--ckpt_path",
            ckpt,
        ]
    )
    judged = main(["judge-synthetic", "--world", f"{tmp_path}/world", "--predictions", f"{tmp_path}/pred"])

    ids = [
        json.loads(line)["id"]
        for line in (tmp_path / "world/heldout_requests.jsonl").read_text().splitlines()
    ]
    assert {i.split("_0")[0] for i in ids} == set(TASKS) and sorted(capture.images) == sorted(ids)
    for rid in ids:
        tested = np.asarray(Image.open(tmp_path / "eval/images" / f"{rid}.png").convert("RGB"))
        predicted = np.asarray(Image.open(tmp_path / "pred" / f"{rid}.png").convert("RGB"))
        assert np.array_equal(capture.images[rid], tested), f"{rid}: validate and test differ"
        assert np.array_equal(capture.images[rid], predicted), f"{rid}: validate and predict differ"
    settings = {
        json.loads(x)["id"]: json.loads(x)
        for x in (tmp_path / "pred/predictions.jsonl").read_text().splitlines()
    }
    assert settings["edit_001"]["seed"] == 1  # predict_seed 0 + its number among the edits

    scenes = json.loads((tmp_path / "eval/results.json").read_text())["scenes"]["MIGE"]
    for task in TASKS:
        assert judged["model"][task] == scenes[task]
        assert logged[f"val/{task}/scene_acc"] == pytest.approx(scenes[task]["scene_acc"])
        assert logged[f"val/{task}/element_acc"] == pytest.approx(scenes[task]["element_acc"])


class _RecordingPipe:
    """Stands in for ``MIGEPipeline``: records each call, returns one tagged image per request."""

    def __init__(self):
        self.calls = []

    def __call__(self, instructions, *, task, seeds, **kw):
        instructions = [instructions] if isinstance(instructions, str) else instructions
        self.calls.append({"task": task, "seeds": list(seeds), **kw})
        images = [Image.new("RGB", (4, 4), (len(self.calls), i, 0)) for i in range(len(instructions))]
        settings = [{"seed": s} for s in seeds]
        return type("Out", (), {"images": images, "settings": settings})()


def test_generate_groups_by_settings_keeps_order_and_follows_one_seed_rule():
    reqs = [
        GenerationRequest("a", Task.SUBJECT, "x", number=0),
        GenerationRequest("b", Task.EDIT, "y", source=Image.new("RGB", (4, 4)), number=0),
        GenerationRequest("c", Task.SUBJECT, "z", number=1, seed=99),
        GenerationRequest("d", Task.SUBJECT, "w", number=2, num_inference_steps=3),
    ]
    pipe = _RecordingPipe()
    out = generate(pipe, reqs, base_seed=10, num_inference_steps=7)
    assert isinstance(out, SamplingBatch) and [g.request.id for g in out] == ["a", "b", "c", "d"]
    assert [g.settings["seed"] for g in out] == [10, 10, 99, 12]  # own seed, else base + number
    # one call per settings group, in order of first appearance; a request's own steps win
    assert [(c["task"], c["num_inference_steps"], c["seeds"]) for c in pipe.calls] == [
        (Task.SUBJECT, 7, [10, 99]),
        (Task.EDIT, 7, [10]),
        (Task.SUBJECT, 3, [12]),
    ]
    assert all(c["batch_invariant"] for c in pipe.calls)


def test_a_followup_edits_the_previous_output_with_the_same_seed():
    first = Image.new("RGB", (4, 4))
    req = GenerationRequest("m", Task.EDIT, "one", source=first, number=4, followups=("two",))
    pipe = _RecordingPipe()
    (g,) = generate(pipe, [req], base_seed=0)
    assert len(pipe.calls) == 2 and pipe.calls[1]["seeds"] == [4] and g.settings["turns"] == 2
    assert pipe.calls[1]["source"].getpixel((0, 0)) == (1, 0, 0)  # the first call's image

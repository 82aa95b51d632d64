"""The predict path under bad input: requests with unknown fields or the wrong shape, instructions the
model would not see whole, non-finite samples, files already in the output folder, failed writes,
and run folders that are files."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from callbacks.prediction_writer import PredictionWriter
from datamodules.requests import RequestDataModule, RequestDataset, read_requests
from mige_lightning.models import build_mige, get_config
from mige_lightning.module import MIGELightningModule
from mige_lightning.pipeline import MIGEPipeline


def _png(path: Path, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
    return path.name


def _write(path: Path, objs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.fixture
def images(tmp_path):
    return SimpleNamespace(ref=_png(tmp_path / "ref.png", 0), src=_png(tmp_path / "src.png", 1))


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"guidance": 7.5}, "unknown field(s) 'guidance' (did you mean 'guidance_scale'?)"),
        ({"steps": 50}, "'steps'"),
        ({"num_inference_step": 50}, "did you mean 'num_inference_steps'?"),
        ({"Seed": 3}, "did you mean 'seed'?"),
    ],
)
def test_unknown_or_misspelled_request_fields_are_bad_requests(tmp_path, images, extra, said):
    good = {"id": "a", "task": "subject", "instruction": "a <imagehere>", "images": [images.ref]}
    requests, problems = read_requests(_write(tmp_path / "r.jsonl", [good, {**good, "id": "b", **extra}]))
    assert [r.id for r in requests] == ["a"]
    assert len(problems) == 1 and problems[0].origin.endswith("r.jsonl:2")
    assert said in problems[0].detail


def test_requests_whose_shape_contradicts_their_task_are_bad_requests(tmp_path, images):
    other = _png(tmp_path / "other.png", 2)
    objs = [
        # an edit shows exactly its source; here it shows another image
        {
            "id": "e1",
            "task": "edit",
            "instruction": "make <imagehere> red",
            "images": [other],
            "source": images.src,
        },
        # a subject request with a source image
        {
            "id": "s1",
            "task": "subject",
            "instruction": "a <imagehere>",
            "images": [images.ref],
            "source": images.src,
        },
        # a subject_edit with no entity besides its source
        {
            "id": "x1",
            "task": "subject_edit",
            "instruction": "add it to <imagehere>",
            "images": [images.src],
            "source": images.src,
        },
        # good: an edit showing its source (same file, spelled differently)
        {
            "id": "ok",
            "task": "edit",
            "instruction": "make <imagehere> red",
            "images": ["./src.png"],
            "source": images.src,
        },
    ]
    requests, problems = read_requests(_write(tmp_path / "r.jsonl", objs))
    assert [r.id for r in requests] == ["ok"]
    said = {p.origin.rsplit(":", 1)[1]: p.detail for p in problems}
    assert "'edit' request references 1 image(s) other than or besides its source" in said["1"]
    assert "'subject' request has a source image" in said["2"]
    assert "'subject_edit' request has no entity image besides its source" in said["3"]


@pytest.fixture(scope="module")
def word_module():
    """A tiny model reading words (the demo's tokenizer) with a short max_length."""
    torch.manual_seed(0)
    module = MIGELightningModule(
        preset="tiny", overrides={"max_length": 40}, pretrained={"tokenizer": "words"}
    )
    module.configure_model()
    return module


def test_instructions_cut_or_with_unknown_words_are_named_per_request(word_module):
    q = word_module.model.encoder.num_query_tokens
    long_tail = " ".join(["red"] * 60) + " change the background to white"
    unseen = word_module.instruction_problems(
        ["edit", "subject", "subject", "subject"],
        ["make <imagehere> red", long_tail, "a <imagehere> zorblax ☃", " ".join(["a"] * 95)],
        [1, 0, 1, 0],
    )
    assert unseen[0].messages == []
    assert len(unseen[1].cut) == 1 and "max_length=40" in unseen[1].cut[0]
    assert "change the background to white" in unseen[1].cut[0]  # names what is lost
    assert unseen[2].cut == () and "'zorblax'" in unseen[2].unknown[0] and "'☃'" in unseen[2].unknown[0]
    assert any("88-word limit drops the last 7" in m for m in unseen[3].cut)
    assert q > 0


def _request_module(tmp_path, images, word_module, mode):
    objs = [
        {"id": "ok", "task": "subject", "instruction": "a red <imagehere>", "images": [images.ref]},
        {"id": "cut", "task": "subject", "instruction": " ".join(["red"] * 60) + " to white"},
        {"id": "unk", "task": "subject", "instruction": "a <imagehere> qwzx", "images": [images.ref]},
    ]
    dm = RequestDataModule(str(_write(tmp_path / "r.jsonl", objs)), unseen_text=mode)
    word_module.connect_datamodule(dm)
    return dm


def test_predict_refuses_requests_the_model_would_not_see_whole_by_default(
    tmp_path, images, word_module, caplog
):
    dm = _request_module(tmp_path, images, word_module, "error")
    with caplog.at_level(logging.WARNING):
        loader = dm.predict_dataloader()
    assert [r.id for r in loader.dataset.requests] == ["ok"]
    assert "r.jsonl:2: the instruction does not fit the encoder's max_length=40" in caplog.text
    assert "r.jsonl:3: word(s) unknown to the tokenizer, read as its unknown token: 'qwzx'" in caplog.text
    assert "skipped 2 bad request(s) of 3" in caplog.text


def test_predict_with_unseen_text_warn_runs_them_and_records_the_warning(
    tmp_path, images, word_module, caplog
):
    dm = _request_module(tmp_path, images, word_module, "warn")
    with caplog.at_level(logging.WARNING):
        loader = dm.predict_dataloader()
    by_id = {r.id: r for r in loader.dataset.requests}
    assert set(by_id) == {"ok", "cut", "unk"}
    assert by_id["ok"].warnings == () and "'qwzx'" in by_id["unk"].warnings[0]
    item = loader.dataset[2]
    assert "'qwzx'" in item.spec.warnings[0]  # reaches predictions.jsonl through the writer
    assert "unk" in caplog.text


def test_training_counts_instructions_it_does_not_see_whole_and_warns_at_epoch_end(word_module, caplog):
    from mige_lightning.prompt import UnseenTextTally

    word_module._unseen_text = UnseenTextTally()
    unseen = word_module.instruction_problems(
        ["subject", "subject", "subject"],
        ["a red square", "a blorp square", " ".join(["red"] * 50)],
        [0, 0, 0],
    )
    word_module._unseen_text.add(["a red square", "a blorp square", "long"], unseen)
    assert word_module._unseen_text.step_counts(unseen) == {
        "train/instructions_cut": 1.0,
        "train/instructions_unknown_words": 1.0,
    }
    word_module.__dict__["_trainer"] = None
    with caplog.at_level(logging.WARNING):
        word_module.on_train_epoch_end()
    assert "of 3 training instructions on this rank, 1 were cut" in caplog.text and "'blorp'" in caplog.text


def test_non_finite_weights_never_become_black_images():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_mige(cfg).eval()
    with torch.no_grad():
        model.dit.proj_out.weight[0, 0] = float("nan")
    pipe = MIGEPipeline.from_mige(
        model, resolution=cfg.resolution, vision_mean=cfg.vision_mean, vision_std=cfg.vision_std
    )
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(FloatingPointError, match=r"non-finite values \(NaN / inf\) for 2 of 2 instruction"):
        pipe(["a red ball", "a blue ball"], task="subject", num_inference_steps=2)


class _Trainer(SimpleNamespace):
    world_size = 1
    global_rank = 0


def _writer_run(out: Path, ids: list[str], overwrite=False):
    writer = PredictionWriter(str(out), overwrite=overwrite)
    requests = [SimpleNamespace(id=i) for i in ids]
    # as Lightning gives it for one loader: the DataLoader itself (not a list)
    trainer = _Trainer(predict_dataloaders=DataLoader(RequestDataset(requests)))
    writer.on_predict_start(trainer, None)
    batch = [
        SimpleNamespace(
            spec=SimpleNamespace(
                id=i, origin=f"r.jsonl:{n + 1}", instruction="x", references=(), source=None, warnings=()
            )
        )
        for n, i in enumerate(ids)
    ]
    prediction = [SimpleNamespace(image=Image.new("RGB", (8, 8), "red"), settings={}) for _ in ids]
    writer.write_on_batch_end(trainer, None, prediction, None, batch, 0, 0)
    return writer


def test_predict_never_replaces_a_users_file_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (4, 4), "blue").save(out / "b.png")  # the user's own file, named like a request
    with pytest.raises(FileExistsError, match=r"already holds 1 file\(s\) this run would write \(b\.png\)"):
        _writer_run(out, ["a", "b"])
    assert Image.open(out / "b.png").size == (4, 4) and not (out / "a.png").exists()
    _writer_run(out, ["a", "b"], overwrite=True)
    assert Image.open(out / "b.png").size == (8, 8)


def test_a_failed_image_write_leaves_no_truncated_png_and_names_the_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:20])  # cut short, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match=r"r\.jsonl:1: could not write .*a\.png: No space left on device"):
        _writer_run(out, ["a"])
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl"]
    assert (out / "predictions.jsonl").read_text() == ""  # nothing logged for the image not written


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(NotADirectoryError, match="out exists and is not a folder"):
        _writer_run(tmp_path / "out", ["a"])
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("entry", ["runs", "runs/demo", "runs/demo/version_0"])
def test_run_folders_that_are_files_are_named_before_anything_is_built(tmp_path, entry):
    from mige_cli.cli import refuse_taken_version

    path = tmp_path / entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")
    logger = {"save_dir": str(tmp_path / "runs"), "name": "demo", "version": None}
    config = {
        "trainer": {
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": logger}
        },
        "ckpt_path": None,
    }
    with pytest.raises(NotADirectoryError) as err:
        refuse_taken_version(config)
    assert str(path.parent) in str(err.value) and path.name in str(err.value)
    assert path.read_text() == "not a folder"

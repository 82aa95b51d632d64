"""Each benchmark's public layout, reproduced as a tiny fixture, runs through `test` into the results table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from datamodules.benchmarks import parse_dreambench_prompts, read_benchmark, rewrite_emu_instruction
from datamodules.records import ManifestError
from mige_cli.main import main
from mige_lightning import metrics as M
from tests.helpers.benchmark_layouts import DREAMBENCH_PROMPTS, MAKERS, make_dreambench, make_migebench
from tests.helpers.metric_backbones import save_tiny_backbones

REPO = Path(__file__).resolve().parents[1]


EXPECTED_ITEMS = {"emu_edit": 3, "magicbrush": 4, "dreambench": 8, "migebench": 4}


def test_emu_rewrite_matches_the_authors_rule():
    assert (
        rewrite_emu_instruction("Make the image black and white.", "global")
        == "Make <imagehere> black and white."
    )
    assert (
        rewrite_emu_instruction("Turn it into a painting.", "global")
        == "Turn it into a painting of <imagehere>"
    )
    assert rewrite_emu_instruction("add a hat to the cat", "add") == "add a hat to the cat in <imagehere>"


def test_dreambench_prompt_file_parses():
    classes, objects, live = parse_dreambench_prompts(DREAMBENCH_PROMPTS)
    assert classes == {"backpack": "backpack", "dog": "dog"} and len(objects) == 2 and len(live) == 2


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_reader_builds_items_from_the_public_layout(tmp_path, name):
    MAKERS[name](tmp_path)
    items = read_benchmark(
        {"name": name, "root": str(tmp_path), **({"images_per_prompt": 2} if name == "dreambench" else {})}
    )
    assert len(items) == EXPECTED_ITEMS[name]
    for it in items:
        from mige_lightning.prompt import count_placeholders

        assert count_placeholders(it.instruction) == len(it.references)
    if name == "dreambench":
        dog = [it for it in items if it.meta["subject"] == "dog"]
        assert dog[0].instruction == "a <imagehere> on the beach" and dog[0].caption == "a dog on the beach"
        assert [it.number for it in dog[:2]] == [0, 1]
    if name == "emu_edit":  # identical captions: no CLIP-T caption, as the authors' evaluation
        assert [it.caption for it in items] == ["a black and white dog", "a cat with a hat", None]
    if name == "migebench":
        assert all(Path(it.reference).is_file() and it.mask and it.subject for it in items)  # re-rooted paths
    if name == "magicbrush":
        assert items[1].source.endswith("-output1.png") and items[1].reference.endswith("-output2.png")


def test_missing_benchmark_files_name_the_file(tmp_path):
    make_migebench(tmp_path)
    (tmp_path / "add" / "add_target" / "1_target.jpg").unlink()
    with pytest.raises(Exception, match=r"add_bench.json: item 1 \(idx 1\): missing file"):
        read_benchmark({"name": "migebench", "root": str(tmp_path)})


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    M.load_dino.cache_clear()
    M.load_clip.cache_clear()
    return save_tiny_backbones(tmp_path_factory.mktemp("bb"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_benchmark_runs_through_test_and_writes_the_table(tmp_path, monkeypatch, backbones, name):
    monkeypatch.chdir(tmp_path)
    MAKERS[name](tmp_path / "bench")
    out = tmp_path / "eval"
    extra = {"dreambench": ", images_per_prompt: 2"}.get(name, "")
    main(
        [
            "test",
            "--config",
            str(REPO / "configs" / "eval" / f"{name}.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--model.preset=tiny",
            "--model.pretrained={t5: null, blip2: null, dit: null, vae: null, tokenizer: byte}",
            f"--model.eval_metrics={{dino: {backbones['dino']}, clip_model: {backbones['clip_model']}, "
            f"clip_pretrained: {backbones['clip_pretrained']}}}",
            "--model.eval_num_inference_steps=2",
            "--data.num_workers=0",
            "--data.batch_size=3",
            f"--data.benchmark={{name: {name}, root: {tmp_path / 'bench'}{extra}}}",
            f"--trainer.callbacks.init_args.output_dir={out}",
            "--trainer.callbacks.init_args.save_images=true",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["samples"] == EXPECTED_ITEMS[name]
    # the sampling / scoring settings actually used are recorded beside the numbers
    assert {"sampler", "task_defaults", "eval_metrics", "ema"} <= set(results["settings"])
    assert results["settings"]["eval_metrics"]["clip_pretrained"]
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert (
        len(rows) == EXPECTED_ITEMS[name]
        and len(list((out / "images").glob("*.png"))) == EXPECTED_ITEMS[name]
    )
    table = (out / "results.md").read_text()
    assert "| MIGE |" in table and "| copy-the-input baseline |" in table
    model, base = results["MIGE"], results["copy-the-input baseline"]
    assert {"DINO", "CLIP-I", "CLIP-T", "L1", "L2"} <= set(model)
    if name == "emu_edit":
        # no ground truth: the baseline *is* the reference, so it scores perfectly — exactly what the row exposes
        assert base["DINO"] > 0.999 and base["L1"] == 0.0 and "CLIPdir" in model
        assert sum(r["clip_dir"] != "nan" for r in rows) == 2  # identical captions skipped
        assert sum(r["clip_t"] != "nan" for r in rows) == 2  # for CLIP-T too (the authors' rule)
    if name in ("magicbrush", "migebench"):
        assert {"l1_outside", "dino_inside"} <= set(results["extras"]) and "L1 outside mask" in table
    if name == "migebench":
        assert {"subject_dino", "subject_clip_i"} <= set(results["extras"]) and "subject DINO" in table
    header = table.splitlines()[2]
    expected = {"dreambench": "| | DINO | CLIP-I | CLIP-T |"}.get(name)
    if expected:
        assert header == expected


def half_black(image, path):  # a reference_prep given as package.module:function
    out = image.copy()
    out.paste((0, 0, 0), (0, 0, image.width // 2, image.height))
    return out


def test_dreambench_reference_prep_changes_what_the_model_sees_not_the_metric_reference(tmp_path):
    from datamodules.benchmarks import BenchmarkDataset, open_image

    make_dreambench(tmp_path)
    photo = tmp_path / "dataset" / "dog" / "00.jpg"
    w, h = open_image(str(photo)).size
    mask = np.zeros((h, w), np.uint8)
    mask[5:20, 10:30] = 255
    PIL.Image.fromarray(mask).save(photo.with_name("00_mask.png"))
    spec = {"name": "dreambench", "root": str(tmp_path), "images_per_prompt": 1}

    raw = read_benchmark(spec)
    assert {Path(it.references[0]).name for it in raw} == {"00.jpg"}  # masks are not taken for photos
    dog = next(i for i, it in enumerate(raw) if it.meta["subject"] == "dog")
    fed = np.asarray(BenchmarkDataset(raw)[dog].images["references"][0])
    assert np.array_equal(fed, np.asarray(open_image(str(photo))))  # default: the photo as it is

    cut = read_benchmark({**spec, "reference_prep": "mask_file"})
    sample = BenchmarkDataset(cut)[dog].images
    fed = np.asarray(sample["references"][0])
    original = np.asarray(open_image(str(photo)))
    assert (fed[mask == 0] == 0).all() and np.array_equal(fed[mask == 255], original[mask == 255])
    assert np.array_equal(np.asarray(sample["reference"]), original)  # the metric keeps the raw photo

    custom = read_benchmark({**spec, "reference_prep": "tests.test_benchmarks:half_black"})
    fed = np.asarray(BenchmarkDataset(custom)[dog].images["references"][0])
    assert (fed[:, : w // 2] == 0).all() and np.array_equal(fed[:, w // 2 :], original[:, w // 2 :])

    with pytest.raises(ValueError, match="reference_prep"):
        read_benchmark({**spec, "reference_prep": "segment"})
    backpack = next(i for i, it in enumerate(cut) if it.meta["subject"] == "backpack")
    with pytest.raises(ManifestError, match=r"00_mask\.png, which is missing"):
        BenchmarkDataset(cut)[backpack]

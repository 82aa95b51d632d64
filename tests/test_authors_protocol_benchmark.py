"""Acceptance: ``test`` on the benchmark fixtures with the shipped eval configs (configs/eval/base.yaml
sets ``model.protocol: authors``) — the results files' headers name the protocol and the reference
preparation the numbers were made with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from mige_cli.main import main
from mige_lightning import metrics as M
from tests.helpers.benchmark_layouts import make_dreambench, make_migebench
from tests.helpers.metric_backbones import save_tiny_backbones

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    M.load_dino.cache_clear()
    M.load_clip.cache_clear()
    return save_tiny_backbones(tmp_path_factory.mktemp("bb"))


def with_masks(root: Path) -> None:
    """DreamBench with the authors' preparation: each subject's reference photo has its mask."""
    make_dreambench(root)
    for photo in (root / "dataset").glob("*/00.jpg"):
        w, h = PIL.Image.open(photo).size
        mask = np.zeros((h, w), np.uint8)
        mask[h // 5 : 4 * h // 5, w // 4 : 3 * w // 4] = 255
        PIL.Image.fromarray(mask).save(photo.with_name("00_mask.png"))


def run_test(tmp_path, backbones, name: str, *extra: str) -> Path:
    out = tmp_path / "eval"
    spec = f"{{name: {name}, root: {tmp_path / 'bench'}{', images_per_prompt: 1' if name == 'dreambench' else ''}}}"
    main(
        [
            "test",
            "--config",
            str(REPO / "configs" / "eval" / "base.yaml"),
            "--config",
            str(REPO / "configs" / "eval" / f"{name}.yaml"),
            # the shipped files, on a CPU at tiny size
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--model.preset=tiny",
            "--model.pretrained={t5: null, blip2: null, dit: null, vae: null, tokenizer: byte}",
            f"--model.eval_metrics.dino={backbones['dino']}",
            f"--model.eval_metrics.clip_model={backbones['clip_model']}",
            f"--model.eval_metrics.clip_pretrained={backbones['clip_pretrained']}",
            "--model.eval_num_inference_steps=2",
            "--data.num_workers=0",
            "--data.batch_size=4",
            f"--data.benchmark={spec}",
            f"--trainer.callbacks.init_args.output_dir={out}",
            *extra,
        ]
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dreambench", "migebench"])
def test_benchmark_run_with_the_authors_protocol_names_it_in_the_results_header(
    tmp_path, monkeypatch, backbones, name
):
    monkeypatch.chdir(tmp_path)
    (with_masks if name == "dreambench" else make_migebench)(tmp_path / "bench")
    out = run_test(tmp_path, backbones, name)

    title = (out / "results.md").read_text().splitlines()[0]
    prep = "mask_file" if name == "dreambench" else "as shipped"
    assert title.endswith(f"; protocol: authors; reference preparation: {prep})"), title
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["name"] == "authors" and results["reference_prep"] == prep
    assert results["protocol"]["jpeg_quality"] == 75 and results["protocol"]["subject_crop"] == "mask_black"
    assert results["protocol"]["time_grid"] == "authors" and results["protocol"]["vision_norm_eps"] == 1e-5
    assert results["settings"]["protocol"] == "authors"
    if name == "migebench":
        assert {"subject_dino", "subject_clip_i"} <= set(results["extras"])


@pytest.mark.slow
def test_a_part_set_explicitly_is_named_as_a_change_of_the_protocol(tmp_path, monkeypatch, backbones):
    monkeypatch.chdir(tmp_path)
    make_dreambench(tmp_path / "bench")  # no masks: the photos as they are, explicitly
    out = run_test(
        tmp_path,
        backbones,
        "dreambench",
        f"--data.benchmark={{name: dreambench, root: {tmp_path / 'bench'}, images_per_prompt: 1, reference_prep: raw}}",
        "--model.eval_metrics.jpeg_quality=0",
    )
    title = (out / "results.md").read_text().splitlines()[0]
    assert "protocol: authors (changed: reference_prep, jpeg_quality); reference preparation: raw" in title

"""The pixel judge of the synthetic world: right on the world's own targets, wrong where the image is."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mige_lightning.images import load_rgb
from mige_world.scene_judge import KINDS, Scene, SceneAccuracy, judge, load_truth, read_scene, world_size
from mige_world.synthetic import Sprite, generate, render

SIZE = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("judged_world")
    generate(root, num_samples=240, size=SIZE, seed=5, heldout_fraction=0.5)
    return root


@pytest.fixture(scope="module")
def truth(world):
    return load_truth(world, "heldout")


SCENE = Scene(
    "gray", (Sprite("circle", "red", "left", "small"), Sprite("triangle", "blue", "right", "large"))
)


def image_of(scene: Scene) -> Image.Image:
    return render(scene.sprites, background=scene.background, size=SIZE)


def test_world_targets_score_one(world, truth):
    assert world_size(world) == SIZE
    metric = SceneAccuracy(size=SIZE)
    for sample in truth.values():
        metric.update([load_rgb(sample.target)], [sample.scene], [sample.kind])
        assert metric.last[0].scene_correct, (sample.target, metric.last[0])
    result = metric.compute()
    assert {k for k in result if "/" in k} == {
        f"{'edit' if k in ('recolour', 'remove', 'move', 'background') else 'subject_edit'}/{k}"
        for k in KINDS
        if k != "subject"
    }
    for values in result.values():
        assert values["scene_acc"] == 1.0 and values["element_acc"] == 1.0


def test_reads_the_scene_back():
    read, ious = read_scene(image_of(SCENE), size=SIZE)
    assert read.background == "gray"
    assert [(s.position, s.colour, s.shape) for s in read.sprites] == [
        ("left", "red", "circle"),
        ("right", "blue", "triangle"),
    ]
    assert min(ious.values()) == 1.0


@pytest.mark.parametrize(
    ("wrong", "expected"),
    [
        (Scene("gray", (Sprite("circle", "green", "left", "small"), SCENE.sprites[1])), {"left:colour"}),
        (Scene("gray", (Sprite("square", "red", "left", "small"), SCENE.sprites[1])), {"left:shape"}),
        (Scene("gray", SCENE.sprites[1:]), {"left:presence", "left:colour", "left:shape"}),
        (
            Scene("gray", (Sprite("circle", "red", "center", "small"), SCENE.sprites[1])),
            {"left:presence", "left:colour", "left:shape", "center:presence"},
        ),
        (Scene("pink", SCENE.sprites), {"background"}),
        (
            Scene("gray", (*SCENE.sprites, Sprite("square", "yellow", "center", "large"))),
            {"center:presence"},
        ),
    ],
    ids=["wrong-colour", "wrong-shape", "missing-sprite", "moved-sprite", "wrong-background", "extra-sprite"],
)
def test_wrong_images_are_caught(wrong, expected):
    verdict = judge(image_of(wrong), SCENE, size=SIZE)
    assert set(verdict.wrong) == expected
    assert not verdict.scene_correct
    assert verdict.total == 8  # background + 3 presences + colour and shape of 2 sprites
    assert verdict.element_accuracy == pytest.approx((8 - len(expected)) / 8)


@pytest.mark.parametrize("shift", [(2, 0), (0, -2), (-2, 2)])
def test_a_few_pixels_off_still_reads_right(shift):
    dx, dy = shift
    shifted = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    shifted.paste(image_of(SCENE), (dx, dy))
    assert judge(shifted, SCENE, size=SIZE).scene_correct


def test_shift_to_another_slot_is_wrong():
    off = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    off.paste(image_of(SCENE), (SIZE // 3, 0))  # the left sprite now sits in the centre slot
    assert not judge(off, SCENE, size=SIZE).scene_correct


def test_mild_noise_and_soft_edges_still_read_right():
    rng = np.random.default_rng(0)
    px = np.asarray(image_of(SCENE), dtype=np.float64) + rng.normal(0, 12, (SIZE, SIZE, 3))
    noisy = Image.fromarray(px.clip(0, 255).astype(np.uint8))
    assert judge(noisy, SCENE, size=SIZE).scene_correct
    blurred = image_of(SCENE).filter(ImageFilter.GaussianBlur(0.6))
    assert judge(blurred, SCENE, size=SIZE).scene_correct
    # heavy noise is not a scene
    px = np.asarray(image_of(SCENE), dtype=np.float64) + rng.normal(0, 120, (SIZE, SIZE, 3))
    assert not judge(Image.fromarray(px.clip(0, 255).astype(np.uint8)), SCENE, size=SIZE).scene_correct


def test_other_resolutions_are_read_at_the_world_size():
    big = image_of(SCENE).resize((4 * SIZE, 4 * SIZE), Image.BICUBIC)
    assert judge(big, SCENE, size=SIZE).scene_correct


def test_copy_the_input_baseline_gets_exactly_the_unchanged_elements(truth):
    """Copying the source is right on everything the edit did not touch and wrong on what it did."""
    seen = set()
    for sample in truth.values():
        if sample.source is None:
            continue
        verdict = judge(load_rgb(sample.input_image), sample.scene, size=SIZE)
        src = read_scene(load_rgb(sample.source), size=SIZE)[0]
        expected = set()
        if src.background != sample.scene.background:
            expected.add("background")
        for pos in ("left", "center", "right"):
            want, got = sample.scene.at(pos), src.at(pos)
            if (want is None) != (got is None):
                expected.add(f"{pos}:presence")
            if want is not None and (got is None or got.colour != want.colour):
                expected.add(f"{pos}:colour")
            if want is not None and (got is None or got.shape != want.shape):
                expected.add(f"{pos}:shape")
        assert set(verdict.wrong) == expected and expected, (sample.kind, verdict)
        seen.add(sample.kind)
    assert seen == {"recolour", "remove", "move", "background", "add", "replace"}


def test_copy_the_input_baseline_of_a_request_without_images_is_a_clear_error(truth):
    """A subject request given only in words (no reference) has nothing to copy: say so, by name."""
    import dataclasses

    subject = next(s for s in truth.values() if s.task == "subject")
    assert subject.input_image == subject.references[0]
    words_only = dataclasses.replace(subject, references=())
    with pytest.raises(
        ValueError, match=r"subject request for .*tgt\.png .* neither a source nor a reference"
    ):
        _ = words_only.input_image


def test_scene_accuracy_aggregates_per_task_and_kind(truth):
    samples = [s for s in truth.values() if s.kind in ("recolour", "move")][:6]
    metric = SceneAccuracy(size=SIZE)
    inputs = [load_rgb(s.input_image) for s in samples]
    targets = [load_rgb(s.target) for s in samples]
    metric.update(inputs + targets, [s.scene for s in samples] * 2, [s.kind for s in samples] * 2)
    result = metric.compute()
    assert result["edit"]["scene_acc"] == pytest.approx(0.5)  # targets right, copies wrong
    assert result["edit"]["n"] == 12
    assert 0.5 < result["edit"]["element_acc"] < 1.0
    with pytest.raises(ValueError, match="unknown kind"):
        metric.update(inputs[:1], [samples[0].scene], ["rotate"])

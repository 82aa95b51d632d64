"""The synthetic world's pretrained components: their words, their data (no held-out scene), their
stages (deterministic, written beside and moved into place), the shipped copies and their
provenance, and fit's refusal of components made for another world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mige_world.describe import (
    caption,
    heldout_scene_keys,
    read_split,
    record_images,
    scene_key,
    training_scenes,
    worded,
)
from mige_world.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "mige_world" / "pretrained"


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate(root, num_samples=160, size=32, seed=3, heldout_fraction=0.1)
    return root


def test_captions_name_sprites_left_to_right():
    scene = {
        "background": "pink",
        "sprites": [
            {"shape": "square", "colour": "blue", "position": "right", "size": "small"},
            {"shape": "circle", "colour": "red", "position": "left", "size": "large"},
        ],
    }
    assert (
        caption(scene)
        == "a large red circle on the left and a small blue square on the right, on a pink background"
    )
    assert caption({"background": "gray", "sprites": []}) == "a gray background"
    # the same scene with its sprites listed the other way round is the same scene
    flipped = {**scene, "sprites": scene["sprites"][::-1]}
    assert scene_key(flipped) == scene_key(scene)


def test_every_image_of_a_record_gets_its_own_words(small_world):
    """References are named by the sprite they show (the one the target gains, for add / replace),
    a source by its scene's caption; the worded instruction puts them where the placeholders stood."""
    seen = set()
    for _task, record in read_split(small_world, "train"):
        images = record_images(record, small_world)
        assert len(images) == len(record["entity_path"])
        text = worded(record, images)
        assert "<imagehere>" not in text
        kind = record["kind"]
        seen.add(kind)
        if kind == "subject":
            names = [f"{s['colour']} {s['shape']}" for s in record["scene"]["sprites"]]
            assert [i.words for i in images] == names
            assert text.startswith(f"a {record['scene']['sprites'][0]['size']} {names[0]} on the ")
        elif kind == "add":
            ref, src = images
            new = [s for s in record["scene"]["sprites"] if s not in record["source_scene"]["sprites"]]
            assert ref.words == f"{new[0]['colour']} {new[0]['shape']}"
            assert src.words == caption(record["source_scene"]) and src.kind == "scene"
        elif kind == "replace":
            src, ref = images
            assert src.words == caption(record["source_scene"])
            assert text.endswith(f" with {ref.words}")
        else:
            assert [i.words for i in images] == [caption(record["source_scene"])]
    assert seen == {"subject", "recolour", "remove", "move", "background", "add", "replace"}


def test_pretraining_data_holds_no_heldout_scene(small_world):
    from mige_world.pretrain import check_unseen, heldout_items, training_records

    excluded = heldout_scene_keys(small_world)
    assert excluded  # the held-out split shows scenes
    scenes = training_scenes(small_world)
    assert scenes and not any(scene_key(i.scene) in excluded for i in scenes)
    for _task, record in training_records(small_world):
        assert scene_key(record["scene"]) not in excluded
        if record.get("source_scene"):
            assert scene_key(record["source_scene"]) not in excluded
    # and the guard the stages run refuses a held-out scene slipped in
    _images, heldout_scenes = heldout_items(small_world)
    with pytest.raises(RuntimeError, match="held-out scenes in pre-training data"):
        check_unseen([*scenes, heldout_scenes[0]], excluded)


def test_bridge_layouts_align_text_positions():
    """The bridge compares the T5 outputs of the image version and the word version at the same
    words: every matched position holds the same token in both rows."""
    from mige_lightning.models.loading import load_tokenizer
    from mige_world.stages import bridge_layouts

    tokenizer = load_tokenizer("words")
    prompts = ["replace the red circle in <imagehere> with <imagehere>", "<imagehere>"]
    names = [["a large red circle on the left, on a pink background", "blue square"], ["green triangle"]]
    image_rows, word_rows, text_pos, spans = bridge_layouts(tokenizer, 4, prompts, names)
    for img, word, (pi, pw), pair_spans in zip(image_rows, word_rows, text_pos, spans, strict=True):
        assert [img[i] for i in pi] == [word[i] for i in pw]
        assert img[-1] == word[-1] == tokenizer.eos_token_id
        for (a0, a1), (w0, w1) in pair_spans:
            assert img[a0:a1] == [-1] * 4 and -1 not in word[w0:w1]
    assert len(spans[0]) == 2 and spans[1][0][1] == (0, 2)


TINY_STAGES = [
    "--t5-steps=3",
    "--bridge-steps=3",
    "--bridge-val-every=3",
    "--dit-steps=3",
    "--dit-val-every=3",
    "--dit-batch=4",
    "--bridge-batch=8",
    "--t5-batch=8",
    "--warmup=1",
]


def one_layer_dit() -> dict:
    overrides = yaml.safe_load((REPO / "configs/demo.yaml").read_text())["model"]["overrides"]
    return {**overrides, "dit": {**overrides["dit"], "num_layers": 1}}


def run_pretrain_world(tmp_path: Path, world: Path, out: str, *extra: str) -> dict:
    from mige_cli.main import main

    overlay = tmp_path / f"{out}.yaml"
    parts = tmp_path / out
    overlay.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "pretrained": {
                        "tokenizer": "words",
                        "t5": str(parts / "t5"),
                        "blip2": str(parts / "bridge"),
                        "dit": str(parts / "dit"),
                        "null_embedding": str(parts / "dit" / "null_caption.safetensors"),
                    },
                    # a dict given whole replaces the demo's: the demo's overrides, a 1-layer DiT
                    "overrides": one_layer_dit(),
                },
                "data": {
                    "synthetic": {
                        "root": str(world),
                        "num_samples": 160,
                        "size": 32,
                        "seed": 3,
                        "heldout_fraction": 0.1,
                    }
                },
            }
        )
    )
    args = ["pretrain-world", "--config", str(REPO / "configs/demo.yaml"), "--config", str(overlay)]
    return main([*args, *TINY_STAGES, f"--log-dir={tmp_path / 'runs'}", *extra])


@pytest.mark.slow
def test_stages_are_deterministic_and_load_into_mige(small_world, tmp_path):
    """Three steps of every stage, twice from the same seed: the same weights, tensor for tensor.
    The components load into MIGE through model.pretrained: the DiT widened by zero source channels
    (the plain DiT's output unchanged while the source is zero), the bridge's ViT / Q-Former /
    queries / projection as saved; a second run with the same settings does nothing."""
    from safetensors.torch import load_file

    from mige_lightning.models import build_mige, get_config

    first = run_pretrain_world(tmp_path, small_world, "a")
    second = run_pretrain_world(tmp_path, small_world, "b")
    for stage in ("t5", "bridge", "dit"):
        assert first["components"][stage]["hash"] == second["components"][stage]["hash"], stage
        a_files = sorted((tmp_path / "a" / stage).glob("*.safetensors"))
        assert a_files
        for f in a_files:
            a, b = load_file(f), load_file(tmp_path / "b" / stage / f.name)
            assert all(torch.equal(a[k], b[k]) for k in a)
        record = json.loads((tmp_path / "a" / stage / "pretraining.json").read_text())
        assert record["settings"]["world"]["settings"]["seed"] == 3 and record["measure"]
    assert not list(tmp_path.glob("a/*.partial"))
    provenance = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert provenance["command"].startswith("python -m mige_lightning pretrain-world --config")

    # up to date: nothing is re-made (the records, weights and provenance keep their times: the
    # provenance stays that of the run that made them)
    stamp = (tmp_path / "a" / "dit" / "pretraining.json").stat().st_mtime_ns
    made = (tmp_path / "a" / "provenance.json").read_text()
    run_pretrain_world(tmp_path, small_world, "a")
    assert (tmp_path / "a" / "dit" / "pretraining.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "a" / "provenance.json").read_text() == made
    # the DiT, aligned to the bridge's vision tower (the default), is recorded against that bridge;
    # without the alignment it is made again, and recorded against the T5 alone
    from mige_world.pretrain import component_hash

    record = json.loads((tmp_path / "a" / "dit" / "pretraining.json").read_text())
    assert record["settings"]["trained_against"]["bridge"] == component_hash(tmp_path / "a" / "bridge")
    assert record["settings"]["recipe"]["dit_repa_weight"] > 0
    run_pretrain_world(tmp_path, small_world, "a", "--dit-repa-weight=0")
    record = json.loads((tmp_path / "a" / "dit" / "pretraining.json").read_text())
    assert (tmp_path / "a" / "dit" / "pretraining.json").stat().st_mtime_ns != stamp
    assert set(record["settings"]["trained_against"]) == {"t5"}

    parts = tmp_path / "a"
    config = get_config(
        "tiny",
        one_layer_dit(),
        {
            "tokenizer": "words",
            "t5": str(parts / "t5"),
            "blip2": str(parts / "bridge"),
            "dit": str(parts / "dit"),
            "null_embedding": str(parts / "dit" / "null_caption.safetensors"),
        },
    )
    model = build_mige(config, seed=0).eval()
    bridge = load_file(parts / "bridge" / "model.safetensors")
    assert torch.equal(model.encoder.adapter.query_tokens, bridge["query_tokens"])
    assert torch.equal(model.encoder.adapter.projection.weight, bridge["language_projection.weight"])
    null = load_file(parts / "dit" / "null_caption.safetensors")["y_embedding"]
    assert torch.equal(model.null_condition, null)
    from diffusers import PixArtTransformer2DModel

    plain = PixArtTransformer2DModel.from_pretrained(parts / "dit").eval()
    x, cond = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 128)
    t, mask = torch.tensor([10, 900]), torch.ones(2, 5, dtype=torch.long)
    kwargs = dict(encoder_hidden_states=cond, encoder_attention_mask=mask, timestep=t)
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.no_grad():
        want = plain(x, **kwargs, **extra).sample
        got = model.dit(torch.cat([x, torch.zeros_like(x)], 1), **kwargs, **extra).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dit_stage_alignment_trains_early_blocks_towards_the_frozen_tower():
    """The text-to-image stage with representation alignment on (the shipped T5 and bridge as the
    frozen text encoder and vision tower): the tower's patch features of the clean image are the
    targets (8×8 patches, CLS dropped), a few optimiser steps lower the alignment loss, only the
    projector and the blocks up to the aligned one receive its gradient, and the tower stays frozen."""
    from mige_lightning.models import get_config
    from mige_lightning.models.repa import block_output
    from mige_world.stages import TextToImagePretraining

    config = get_config("tiny", {"resolution": 32, "vae": {"kind": "pixel"}})
    torch.manual_seed(0)
    module = TextToImagePretraining(
        t5=str(SHIPPED / "t5"),
        tokenizer="words",
        dit={"patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2},
        vae={"kind": "pixel"},
        resolution=32,
        diffusion={"num_train_timesteps": 1000, "prediction_type": "sample"},
        null_length=8,
        warmup_steps=1,
        repa_encoder=str(SHIPPED / "bridge"),
        repa_weight=0.5,
        repa_depth=1,
        vision_mean=tuple(config.vision_mean),
        vision_std=tuple(config.vision_std),
    ).train()
    assert module.encoder.training is False
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    targets = module.encoder_features(pixels)
    assert targets.shape == (4, 64, module.encoder.config.hidden_size)
    x_t = torch.randn(4, 3, 32, 32)
    cond, mask = torch.randn(4, 5, module.t5.config.d_model), torch.ones(4, 5, dtype=torch.long)
    t = torch.tensor([10, 300, 600, 900])
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(30):
        with block_output(module.dit.transformer_blocks, 1) as captured:
            module(x_t, t, cond, mask)
        loss = module.alignment(captured["tokens"], targets)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        later = [p.grad for p in module.dit.transformer_blocks[1].parameters()]
        assert all(g is None or not g.any() for g in later)
        assert all(p.grad is None for p in module.encoder.parameters())
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0], losses


def test_fit_refuses_components_of_another_world(tmp_path):
    from mige_world.pretrain import RECORD, check_components, world_hash

    world = {"root": "data/x", "num_samples": 100, "size": 32, "seed": 0, "heldout_fraction": 0.1}
    made = tmp_path / "t5"
    made.mkdir()
    (made / RECORD).write_text(
        json.dumps({"settings": {"world": {"settings": world, "hash": world_hash(world)}}})
    )
    check_components({"t5": str(made)}, world)  # its own world: accepted
    check_components({"t5": str(made)}, {**world, "root": "elsewhere"})  # the same world elsewhere
    with pytest.raises(
        SystemExit, match=r"model\.pretrained\.t5: .* another synthetic world .* pretrain-world"
    ):
        check_components({"t5": str(made)}, {**world, "seed": 1})


def test_shipped_world_matches_its_provenance():
    """The committed components are the ones provenance.json describes (hash of every weights
    file, the measures recorded beside each), made for the demo's world, 16 MB at most."""
    from mige_world.pretrain import component_hash, world_hash

    provenance = json.loads((SHIPPED / "provenance.json").read_text())
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    assert provenance["world"]["hash"] == world_hash(demo["data"]["synthetic"])
    pretrained = demo["model"]["pretrained"]
    assert {Path(pretrained[k]).resolve() for k in ("t5", "blip2", "dit")} == {
        (SHIPPED / s).resolve() for s in ("t5", "bridge", "dit")
    }
    size = 0
    for stage in ("t5", "bridge", "dit"):
        component = provenance["components"][stage]
        assert component_hash(SHIPPED / stage) == component["hash"], f"{stage} differs from its provenance"
        record = json.loads((SHIPPED / stage / "pretraining.json").read_text())
        assert record["measure"] == component["measure"] and record["measure"]
        assert record["settings"]["world"]["hash"] == provenance["world"]["hash"]
        size += sum(p.stat().st_size for p in (SHIPPED / stage).iterdir())
    assert size <= 16 * 2**20
    # and the demo's config loads them: a fit on another world is refused (checked above), this
    # one is accepted
    from mige_world.pretrain import check_components

    check_components(
        {k: str(REPO / pretrained[k]) for k in ("t5", "blip2", "dit")}, demo["data"]["synthetic"]
    )


def test_dit_stage_weight_averaging_and_cosine_rate_are_options_recorded_only_when_used():
    """``--dit-ema`` / ``--dit-lr-schedule``: Lightning's EMA callback on the stage's Trainer and a
    half-cosine rate that reaches 0 at the last step; left off (the default) they are not in the
    recorded recipe, so components made before the options existed stay up to date."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from mige_cli.pretrain_world import build_parser
    from mige_world.pretrain import recipe, trainer
    from mige_world.stages import warmup_schedule

    off = build_parser().parse_args([])
    assert "dit_ema" not in recipe(off, "dit") and "dit_lr_schedule" not in recipe(off, "dit")
    on = build_parser().parse_args(["--dit-ema", "0.999", "--dit-lr-schedule", "cosine"])
    assert recipe(on, "dit")["dit_ema"] == 0.999 and recipe(on, "dit")["dit_lr_schedule"] == "cosine"
    assert any(
        isinstance(c, EMAWeightAveraging)
        for c in trainer("dit", on, steps=4, val_every=4, precision="32-true", ema=0.999).callbacks
    )
    assert not any(
        isinstance(c, EMAWeightAveraging)
        for c in trainer("dit", off, steps=4, val_every=4, precision="32-true").callbacks
    )

    rates = {}
    for name, steps in (("constant", None), ("cosine", 100)):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = warmup_schedule(optimizer, 10, cosine_steps=steps)["lr_scheduler"]["scheduler"]
        seen = []
        for _ in range(100):
            optimizer.step()
            scheduler.step()
            seen.append(optimizer.param_groups[0]["lr"])
        rates[name] = seen
    assert rates["constant"][-1] == 1.0
    assert rates["cosine"][9] == pytest.approx(1.0) and rates["cosine"][54] == pytest.approx(0.5, abs=0.02)
    assert rates["cosine"][-1] == pytest.approx(0.0, abs=1e-6)

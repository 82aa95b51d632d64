"""``convert-authors``: the authors' key layout → our model, at tiny size (by value, through the CLI
and ``model.init_weights``) and at full size on the meta device (every key and shape); refusal of
files that need arbitrary unpickling; the behaviour switches a converted model runs with.

The authors' key lists come from ``tests/fixtures/authors_checkpoint/make_keys.py``, written from
their module structure; its own mapping table (``authors_to_ours``) is the oracle the converter's
placement is checked against, value by value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import PIL.Image
import pytest
import torch
import yaml

from mige_cli.main import main as cli_main
from mige_lightning.authors_checkpoint import (
    ConversionError,
    convert_state_dict,
    expected_shapes,
    read_authors_checkpoint,
    target_model,
)
from mige_lightning.models import build_mige, get_config
from mige_lightning.models.dit import patch_tokens
from mige_lightning.models.presets import AUTHORS_BEHAVIOUR
from mige_lightning.models.weights import tied_names
from mige_lightning.module import MIGELightningModule
from mige_world.synthetic import generate
from tests.fixtures.authors_checkpoint import make_keys
from tests.helpers.authors import TINY, authors_tiny_state, convert_tiny
from tests.helpers.batches import encode_condition, make_batch, prompts_of

FIXTURES = Path(__file__).parent / "fixtures" / "authors_checkpoint"


def test_tiny_authors_checkpoint_converts_and_every_tensor_lands_where_the_map_says(tmp_path, capsys):
    state = authors_tiny_state()
    out = convert_tiny(tmp_path, state)
    printed = capsys.readouterr().out
    assert f"converted {len(state)} tensors" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["other_top_level_entries_ignored"] == ["epoch", "optimizer"]
    assert set(report["dropped"]) == {"Qformer.bert.embeddings.position_ids", "pos_embed"}

    # the written config builds the model and loads the weights through model.init_weights
    model_args = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert model_args["prompt_style"] == "authors_inference"
    module = MIGELightningModule(**model_args)
    module.configure_model()
    ours = module.model.state_dict()

    covered = set()
    for key, targets in make_keys.authors_to_ours(make_keys.authors_keys(TINY)).items():
        src = state[key]
        for name, how in targets:
            if how == "drop":
                continue
            got = ours[name]
            if how == "copy":
                want = src
            elif how.startswith(("chunk3", "chunk2")):
                n, i = int(how[5]), int(how.split(":")[1])
                want = src.chunk(n)[i]
            elif how == "qkv_bias":  # q ⊕ zeros ⊕ v
                w = src.shape[0]
                part = slice(0, w) if key.endswith("q_bias") else slice(2 * w, 3 * w)
                got, want = got[part], src
                assert torch.equal(ours[name][w : 2 * w], torch.zeros(w)), name
            assert torch.equal(got, want), f"{key} → {name} ({how})"
            covered.add(name)
    assert covered == {k for k in ours if not k.startswith("autoencoder.")}  # every tensor of ours
    # the switches the authors' code computes with are on
    for field, value in AUTHORS_BEHAVIOUR.items():
        assert getattr(module.config, field) == value
    assert module.model.encoder.fusion.q_proj.bias is None


def test_converted_tiny_model_samples_an_edit(tmp_path):
    out = convert_tiny(tmp_path, authors_tiny_state())
    model_args = yaml.safe_load((out / "config.yaml").read_text())["model"]
    module = MIGELightningModule(**model_args)
    module.configure_model()
    module.model.eval()
    pipe = module.pipeline()
    source = PIL.Image.new("RGB", (16, 16), (200, 30, 30))
    result = pipe(
        "make the background blue <imagehere>",
        task="edit",
        images=[source],
        source=source,
        num_inference_steps=2,
    )
    assert result.images[0].size == (16, 16)
    assert result.settings[0]["prompt"].startswith("Follow the instruction to edit the image:")
    assert torch.isfinite(result.latents).all()


def test_full_size_key_list_converts_exactly_onto_the_xl_preset():
    keys = json.loads((FIXTURES / "authors_keys_xl.json").read_text())
    source = {
        k: torch.empty(v, device="meta", dtype=torch.int64 if k.endswith("position_ids") else torch.bfloat16)
        for k, v in keys.items()
    }
    config = get_config(
        "xl", None, {"t5": None, "blip2": None, "dit": None, "tokenizer": "byte", "vae": None}
    )
    model = target_model(config)
    expected = expected_shapes(model)
    conversion = convert_state_dict(source, expected, tied=tied_names(model))
    tied = tied_names(model)
    assert set(conversion.state) == set(expected) - set(tied)  # every tensor filled, nothing extra
    assert all(tuple(conversion.state[k].shape) == expected[k] for k in conversion.state)
    report = conversion.report
    assert report["source_tensors"] == 1451
    assert report["by_group"] == {
        "FFM": 23,
        "Qformer": 255,
        "dit": 437,
        "ln_vision": 2,
        "query_tokens": 1,
        "t5_model": 220,
        "t5_proj": 2,
        "visual_encoder": 511,
    }
    assert report["by_rule"] == {"copy": 1259, "drop": 2, "qkv_bias": 78, "split": 280}


def test_problems_are_listed_together_left_over_missing_and_misshapen(tmp_path):
    config = get_config("tiny", AUTHORS_BEHAVIOUR, {"tokenizer": "byte"})
    model = target_model(config)
    state = authors_tiny_state()
    state["blocks.0.extra_gate"] = torch.zeros(3)  # no rule
    del state["final_layer.linear.bias"]  # proj_out.bias gets no value
    state["t_block.1.weight"] = torch.zeros(5, 5)  # wrong shape
    with pytest.raises(ConversionError) as err:
        convert_state_dict(state, expected_shapes(model), tied=tied_names(model))
    text = str(err.value)
    assert "match no rule: ['blocks.0.extra_gate']" in text
    assert "get no value: ['dit.proj_out.bias']" in text
    assert "dit.adaln_single.linear.weight (5, 5) vs ours (192, 32)" in text
    state = authors_tiny_state()
    del state["visual_encoder.blocks.1.attn.v_bias"]
    with pytest.raises(
        ConversionError, match=r"layers\.1\.self_attn\.qkv\.bias: needs both q_bias and v_bias"
    ):
        convert_state_dict(state, expected_shapes(model), tied=tied_names(model))


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_needs_arbitrary_unpickling_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pth"
    torch.save({"state_dict": {"query_tokens": torch.zeros(1)}, "hook": _RunsCode(marker)}, path)
    with pytest.raises(ConversionError, match="refused: reading it needs arbitrary unpickling"):
        read_authors_checkpoint(path)
    assert not marker.exists()
    bare = tmp_path / "bare.pth"  # a bare state dict is accepted too
    torch.save({"query_tokens": torch.zeros(1)}, bare)
    assert list(read_authors_checkpoint(bare)[0]) == ["query_tokens"]


def test_init_weights_rejects_a_file_that_does_not_fit(tmp_path):
    out = convert_tiny(tmp_path, authors_tiny_state())
    with pytest.raises(ValueError, match="does not fit the configured model.*another shape"):
        module = MIGELightningModule(
            "tiny", overrides={"dit": {"num_layers": 2, "attention_head_dim": 8}}, init_weights=str(out)
        )
        module.configure_model()


# ---------------------------------------------------------------------------------- switches
def _pair(**switches):
    """Two tiny models with the same weights: our defaults, and with ``switches``."""
    torch.manual_seed(0)
    ours = build_mige(get_config("tiny")).eval()
    with torch.no_grad():  # zero at init: the fusion output would not depend on the visual tokens
        ours.encoder.fusion.out_proj.weight.normal_(std=0.2)
    torch.manual_seed(0)
    theirs = build_mige(get_config("tiny", switches)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    return ours, theirs


def test_fusion_tokens_without_position_table_are_the_patch_projection_alone():
    ours, theirs = _pair(fusion_position_embedding=False)
    latents = torch.randn(2, 4, 8, 8)
    plain = patch_tokens(ours.dit, latents, position=False)
    assert torch.allclose(plain + ours.dit.pos_embed.pos_embed, patch_tokens(ours.dit, latents))
    batch = make_batch(get_config("tiny"), [1, 2])
    # the same as our default model with its position table zeroed
    ours.dit.pos_embed.pos_embed.zero_()
    assert torch.allclose(encode_condition(theirs, batch)[0], encode_condition(ours, batch)[0], atol=1e-6)


def test_unscaled_reference_latents_reach_fusion_divided_by_the_vae_factor():
    ours, theirs = _pair(reference_latent_scaling=False)
    batch = make_batch(get_config("tiny"), [1, 2])
    factor = ours.autoencoder.scaling_factor
    latents = ours.encode_references(batch["ref_vae"], batch["ref_mask"], sample=False)
    args = dict(ref_pixels=batch["ref_pixels"], ref_mask=batch["ref_mask"])
    a = theirs.encode_condition(prompts_of(batch), ref_latents=latents, **args)[0]
    b = ours.encode_condition(prompts_of(batch), ref_latents=latents / factor, **args)[0]
    assert factor != 1 and torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, ours.encode_condition(prompts_of(batch), ref_latents=latents, **args)[0])


def test_null_condition_cut_to_the_prompt_length_in_training_and_guidance():
    ours, theirs = _pair(null_condition_length="prompt")
    batch = make_batch(get_config("tiny"), [2, 1])
    full_cond, full_mask = encode_condition(theirs, batch)  # nothing dropped: each prompt's own length
    lengths = full_mask.sum(1).tolist()
    assert lengths == theirs.encoder.sequence_lengths(prompts_of(batch), [2, 1])
    cond, mask = encode_condition(theirs, batch, drop=torch.tensor([True, False]))
    assert mask[0].sum() == lengths[0] < theirs.null_condition.shape[0]
    assert torch.equal(cond[0, : lengths[0]], theirs.null_condition[: lengths[0]])
    _, our_mask = encode_condition(ours, batch, drop=torch.tensor([True, False]))
    assert our_mask[0].sum() == ours.null_condition.shape[0]  # 'full': every row
    null, null_mask = theirs.null_rows_like(full_mask)  # guidance: the null branch of each sample
    assert null_mask.sum(1).tolist() == lengths and null.shape[0] == 2


def test_trainable_vision_norm_gets_gradients_and_nothing_else_of_the_vit():
    ours, theirs = _pair(train_vision_norm=True)
    vision = theirs.encoder.vision
    assert [n for n, p in vision.named_parameters() if p.requires_grad] == [
        "post_layernorm.weight",
        "post_layernorm.bias",
    ]
    batch = make_batch(get_config("tiny"), [1, 2])
    cond, _ = encode_condition(theirs, batch)
    assert torch.allclose(cond, encode_condition(ours, batch)[0], atol=1e-6)  # same forward
    cond.square().mean().backward()
    assert vision.post_layernorm.weight.grad is not None and vision.post_layernorm.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in vision.named_parameters() if not n.startswith("post_layernorm"))


def test_fusion_query_bias_can_be_left_out():
    _, theirs = _pair(fusion_query_bias=False)
    assert theirs.encoder.fusion.q_proj.bias is None


def test_predict_through_the_cli_with_the_converted_config(tmp_path, monkeypatch):
    """The written config.yaml is what `predict` needs: added after the run's configs, no --ckpt_path."""
    out = convert_tiny(tmp_path, authors_tiny_state())
    monkeypatch.chdir(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    generate(tmp_path / "world", num_samples=12, size=16, seed=0)
    written = tmp_path / "predictions"
    cli_main(
        [
            "predict",
            "--config",
            str(repo / "configs/demo.yaml"),
            "--config",
            str(repo / "configs/predict/demo.yaml"),
        ]
        # the demo's overrides cleared: config files merge model.overrides key by key
        + ["--model.overrides=null", "--config", str(out / "config.yaml")]
        + [f"--trainer.callbacks.init_args.output_dir={written}"]
        + [f"--data.requests={tmp_path}/world/heldout_requests.jsonl"]
        # the tiny fixture reads bytes into max_length=192: a subject prompt does not fit whole
        + ["--data.unseen_text=warn"]
        + [
            "--model.task_defaults={subject: {num_inference_steps: 2}, edit: {num_inference_steps: 2}, "
            "subject_edit: {num_inference_steps: 2}}"
        ]
    )
    log = [json.loads(x) for x in (written / "predictions.jsonl").read_text().splitlines()]
    assert log and all((written / e["file"]).is_file() for e in log)
    subject = [e for e in log if e["task"] == "subject"]
    assert subject and all(
        e["prompt"].startswith(
            "follow the text instruction to generate an image with the given objects' images"
        )
        for e in subject
    )

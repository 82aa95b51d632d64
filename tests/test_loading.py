"""save_pretrained → load round trips through exactly the code that loads hub ids, plus start-up errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2Model, T5Config, T5ForConditionalGeneration

from mige_lightning.models import build_mige, get_config
from mige_lightning.models.loading import build_byte_tokenizer, load_blip2_parts
from mige_lightning.sources import resolve_source

D_TEXT = 32


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random components saved the way their hub checkpoints are laid out."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pretrained")
    t5_cfg = dict(
        vocab_size=259, d_model=D_TEXT, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    t5 = T5ForConditionalGeneration(T5Config(**t5_cfg))  # full seq2seq, like google/flan-t5-xxl
    t5.save_pretrained(root / "t5")
    build_byte_tokenizer().save_pretrained(root / "t5")
    blip2 = Blip2Model(
        Blip2Config(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            qformer_config=dict(
                hidden_size=24,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=2,
                encoder_hidden_size=32,
            ),
            text_config=T5Config(**{**t5_cfg, "num_layers": 1}).to_dict(),
            num_query_tokens=6,
        )
    )
    blip2.save_pretrained(root / "blip2", max_shard_size="100KB")  # sharded + index, like the hub's
    pixart = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=8,
        caption_channels=D_TEXT,
        norm_num_groups=8,
        use_additional_conditions=False,
    )
    pixart.save_pretrained(root / "pixart" / "transformer")
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    vae.save_pretrained(root / "pixart" / "vae")
    null = torch.randn(20, D_TEXT)
    save_file({"y_embedding": null}, str(root / "null.safetensors"))
    return {"root": root, "t5": t5, "blip2": blip2, "pixart": pixart, "vae": vae, "null": null}


def test_every_component_round_trips_through_build_mige(saved):
    root = saved["root"]
    config = get_config(
        "tiny",
        overrides={"resolution": 16},
        pretrained={
            "t5": str(root / "t5"),
            "tokenizer": str(root / "t5"),
            "blip2": str(root / "blip2"),
            "dit": str(root / "pixart"),
            "dit_subfolder": "transformer",
            "vae": str(root / "pixart"),
            "vae_subfolder": "vae",
            "null_embedding": str(root / "null.safetensors"),
        },
    )
    model = build_mige(config)
    full = saved["t5"].state_dict()  # the encoder's keys are a subset of the seq2seq checkpoint's
    assert all(torch.equal(v, full[k]) for k, v in model.encoder.t5.state_dict().items())
    blip2 = saved["blip2"]
    assert _same(model.encoder.vision, blip2.vision_model)
    assert _same(model.encoder.qformer, blip2.qformer)
    assert torch.equal(model.encoder.query_tokens.data, blip2.query_tokens.data)
    assert _same(model.encoder.projection, blip2.language_projection)
    assert _same(model.autoencoder.vae, saved["vae"])
    assert torch.equal(model.null_condition, saved["null"])
    # the DiT was widened to 8 input channels; everything else is the checkpoint's
    dit_state, ref_state = model.dit.state_dict(), saved["pixart"].state_dict()
    for k, v in ref_state.items():
        if k == "pos_embed.proj.weight":
            assert torch.equal(dit_state[k][:, :4], v) and dit_state[k][:, 4:].abs().sum() == 0
        else:
            assert torch.equal(dit_state[k], v), k
    assert (
        model.encoder.tokenizer("abc", add_special_tokens=False)["input_ids"]
        == build_byte_tokenizer()("abc", add_special_tokens=False)["input_ids"]
    )
    assert model.encoder.num_query_tokens == 6


def test_blip2_reads_only_the_needed_shards(saved, monkeypatch):
    import mige_lightning.models.loading as loading

    opened = []
    real = loading.open_safetensors  # every safetensors read goes through it (checkpoint_files)
    monkeypatch.setattr(loading, "open_safetensors", lambda path: (opened.append(str(path)), real(path))[1])
    load_blip2_parts(str(saved["root"] / "blip2"))
    index = (saved["root"] / "blip2" / "model.safetensors.index.json").read_text()
    import json

    wmap = json.loads(index)["weight_map"]
    lm_only = {f for k, f in wmap.items() if k.startswith("language_model.")} - {
        f for k, f in wmap.items() if not k.startswith("language_model.")
    }
    assert lm_only, "fixture should put some LLM weights in shards of their own"
    assert not any(p.endswith(tuple(lm_only)) for p in opened)


def test_projection_width_mismatch_is_explained(saved):
    with pytest.raises(ValueError, match="language_projection"):
        build_mige(
            get_config(
                "tiny", overrides={"t5": {"d_model": 48}}, pretrained={"blip2": str(saved["root"] / "blip2")}
            )
        )


def test_missing_local_path_names_the_key(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"model\.pretrained\.dit: local pretrained path '.*nope' does not exist"
    ):
        get_config("xl", pretrained={"dit": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained\.null_embedding"):
        get_config("tiny", pretrained={"null_embedding": "missing.safetensors"})


def test_hub_ids_pass_through_unchanged():
    assert resolve_source("PixArt-alpha/PixArt-XL-2-512x512", key="k") == "PixArt-alpha/PixArt-XL-2-512x512"
    with pytest.raises(FileNotFoundError, match="k: local"):
        resolve_source("./local/thing", key="k")


def test_unknown_preset_and_keys_are_named():
    with pytest.raises(ValueError, match=r"model\.preset: unknown preset 'huge'"):
        get_config("huge")
    with pytest.raises(KeyError, match=r"model\.overrides\.ditt: unknown key"):
        get_config("tiny", overrides={"ditt": {}})
    with pytest.raises(KeyError, match=r"model\.pretrained\.clip: unknown component"):
        get_config("tiny", pretrained={"clip": "x/y"})


def test_presets_carry_the_paper_dimensions():
    xl = get_config("xl")
    assert xl.t5["d_model"] == 4096 and xl.qformer["hidden_size"] == 768 and xl.num_query_tokens == 32
    assert xl.vision["hidden_size"] == 1408 and xl.vision["num_hidden_layers"] == 39
    assert xl.dit["num_attention_heads"] * xl.dit["attention_head_dim"] == 1152 and xl.dit["num_layers"] == 28
    assert xl.max_length == 256 and xl.resolution == 512 and xl.fusion["num_heads"] == 8


def test_word_tokenizer_knows_every_word_of_the_prefixes_and_the_synthetic_world(tmp_path):
    """The demo's word-level tokenizer: one id per word, and no instruction word falls to <unk>."""
    import json

    from mige_lightning.models.loading import build_word_tokenizer, load_tokenizer
    from mige_lightning.prompt import Task, build_prompt, split_placeholders
    from mige_world.synthetic import generate

    tok = load_tokenizer("words")
    assert len(tok) == len(build_word_tokenizer())
    generate(tmp_path, num_samples=200, size=16, seed=0)
    texts = [
        build_prompt(task, rec["multi_prompt"])
        for task in Task
        for split in ("train", "heldout")
        for rec in json.loads((tmp_path / f"{split}_{task.value}.json").read_text())
    ]
    for text in texts:
        for segment in split_placeholders(text):
            ids = tok(segment, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, (segment, tok.convert_ids_to_tokens(ids))
            assert len(ids) == len(segment.replace(",", " , ").replace(":", " : ").split())
    ids = tok("make the RED circle, mauve", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["make", "the", "red", "circle", ",", "<unk>"]

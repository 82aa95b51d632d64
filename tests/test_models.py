"""Tiny-config checks of every network: shapes, placeholder layout, fusion, gradients, widening."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mige_lightning.models import build_mige
from mige_lightning.models.dit import build_dit
from mige_lightning.models.fusion import FeatureFusion
from mige_lightning.module import MIGELightningModule
from tests.helpers.batches import encode_condition, make_batch


def test_shapes_for_zero_to_four_images(tiny_model, tiny_config):
    batch = make_batch(tiny_config, [0, 1, 2, 3, 4])
    cond, mask = encode_condition(tiny_model, batch)
    d_text = tiny_model.encoder.t5.config.d_model
    assert cond.shape[0] == 5 and cond.shape[2] == d_text and mask.shape == cond.shape[:2]
    latent = tiny_config.resolution // tiny_model.autoencoder.downsample_factor
    c = tiny_model.latent_channels
    x = torch.randn(5, c, latent, latent)
    out = tiny_model(x, torch.arange(5), cond=cond, cond_mask=mask, cond_input=torch.zeros_like(x))
    assert out.shape == (5, 2 * c, latent, latent)  # prediction ⊕ learned variance


def test_batch_without_any_image_skips_vision(tiny_model, tiny_config):
    calls = []
    tiny_model.encoder.vision.register_forward_hook(lambda *a: calls.append(1))
    batch = make_batch(tiny_config, [0, 0])
    cond, mask = encode_condition(tiny_model, batch)
    assert calls == [] and cond.shape[0] == 2


def test_only_real_images_reach_the_vit(tiny_model, tiny_config):
    seen = []
    tiny_model.encoder.vision.register_forward_hook(lambda m, args, kw_out: seen.append(m.last_batch))
    tiny_model.encoder.vision.register_forward_pre_hook(
        lambda m, args, kwargs: setattr(m, "last_batch", kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    batch = make_batch(tiny_config, [1, 4, 0, 2])  # padded to M = 4 → 16 slots, 7 real
    encode_condition(tiny_model, batch)
    assert seen == [7]


def test_image_tokens_land_at_placeholders_in_order(tiny_model):
    enc = tiny_model.encoder
    q, d = enc.num_query_tokens, enc.t5.config.d_model
    prompts = ["put <imagehere> next to <ImageHere> please", "<imagehere>", "no images here"]
    counts = [2, 1, 0]
    tokens = torch.randn(3, q, d)
    out = enc.interleave(prompts, tokens, counts)
    table = enc.t5.get_input_embeddings()
    tok = enc.tokenizer

    def emb(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return table(torch.tensor(ids, dtype=torch.long))

    # sample 0: text, image 0, text, image 1, text, EOS — exactly, position by position
    expected0 = torch.cat(
        [
            emb("put "),
            tokens[0],
            emb(" next to "),
            tokens[1],
            emb(" please"),
            table.weight[[tok.eos_token_id]],
        ]
    )
    n0 = expected0.shape[0]
    assert torch.equal(out.embeds[0, :n0], expected0)
    assert out.mask[0].sum() == n0
    assert out.image_starts[0] == [
        len(tok("put ")["input_ids"]),
        len(tok("put ")["input_ids"]) + q + len(tok(" next to ")["input_ids"]),
    ]
    assert torch.equal(out.embeds[1, :q], tokens[2]) and out.image_starts[1] == [0]
    assert out.image_starts[2] == []
    assert (out.embeds[1, out.mask[1].sum() :] == 0).all()  # padding is masked zeros


def test_placeholder_count_mismatch_is_an_error(tiny_model):
    enc = tiny_model.encoder
    tokens = torch.randn(1, enc.num_query_tokens, enc.t5.config.d_model)
    with pytest.raises(ValueError, match="sample 0: 2 <imagehere> placeholder.*1 image"):
        enc.interleave(["<imagehere> and <imagehere>"], tokens, [1])


def test_long_text_is_cut_but_images_and_eos_survive(tiny_model):
    enc = tiny_model.encoder
    q, d = enc.num_query_tokens, enc.t5.config.d_model
    tokens = torch.randn(1, q, d)
    out = enc.interleave(["x" * 1000 + "<imagehere>" + "y" * 1000], tokens, [1])
    assert out.embeds.shape[1] == enc.max_length
    start = out.image_starts[0][0]
    assert torch.equal(out.embeds[0, start : start + q], tokens[0])
    eos = enc.t5.get_input_embeddings().weight[enc.tokenizer.eos_token_id]
    assert torch.equal(out.embeds[0, -1], eos)


def test_fusion_is_identity_at_init_and_not_after_a_step():
    torch.manual_seed(0)
    fusion = FeatureFusion(16, 24, num_heads=2)
    s, v = torch.randn(3, 4, 16), torch.randn(3, 10, 24)
    ln = fusion.out_norm
    identity = F.layer_norm(s, (16,), ln.weight, ln.bias, ln.eps)
    assert torch.allclose(fusion(s, v), identity, atol=1e-6)
    opt = torch.optim.SGD(fusion.parameters(), lr=0.1)
    (fusion(s, v) * torch.randn(3, 4, 16)).sum().backward()
    opt.step()
    assert not torch.allclose(fusion(s, v), identity, atol=1e-4)


def _fusion_linears(fusion: FeatureFusion) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in fusion.named_modules() if isinstance(m, torch.nn.Linear) and n != "out_proj"}


def test_fusion_linears_start_as_the_authors_trunc_normal_with_zero_biases():
    """The authors' ``FFM._init_weights``: every linear but the zero output projection draws
    ``trunc_normal_(std=0.02)`` (torch's default cut at ±2, i.e. effectively untruncated at this
    std) and zero biases; PyTorch's default (uniform ±1/sqrt(fan_in), random biases) is not it."""
    torch.manual_seed(0)
    fusion = FeatureFusion(256, 384, num_heads=4)
    linears = _fusion_linears(fusion)
    assert set(linears) == {"q_proj", "k_mlp.0", "k_mlp.2", "v_mlp.0", "v_mlp.2", "attn.out_proj"}
    for name, layer in linears.items():
        w = layer.weight
        assert w.numel() >= 256 * 256
        assert abs(w.std().item() - 0.02) < 0.02 * 0.03, name  # ~0.3 % sampling error at this size
        assert abs(w.mean().item()) < 0.02 * 0.02, name
        assert w.abs().max().item() <= 2.0, name  # trunc_normal_'s bounds
        # a normal, not cut at ±2σ like the uniform default or a 2σ-truncated draw: ~4.6 % beyond
        beyond = (w.abs() > 2 * 0.02).float().mean().item()
        assert 0.03 < beyond < 0.06, name
        assert layer.bias is None or torch.count_nonzero(layer.bias) == 0, name
    assert torch.count_nonzero(fusion.out_proj.weight) == 0 and torch.count_nonzero(fusion.out_proj.bias) == 0
    # the packed in-projection is no nn.Linear: nn.MultiheadAttention's own xavier weight, zero bias
    assert torch.count_nonzero(fusion.attn.in_proj_bias) == 0


def test_built_models_fusion_keeps_the_authors_init(tiny_model):
    """Through ``models/init.py`` (seeded per module, children first) the fusion's own rule wins."""
    fusion = tiny_model.encoder.adapter.fusion
    for name, layer in _fusion_linears(fusion).items():
        assert layer.bias is None or torch.count_nonzero(layer.bias) == 0, name
        assert 0.01 < layer.weight.std().item() < 0.03, name
    assert torch.count_nonzero(fusion.out_proj.weight) == 0


def test_fusion_init_pytorch_keeps_the_linears_own_draws(tiny_config):
    """``fusion_init: pytorch`` (the demo's choice, docs/BENCHMARKS.md): nn.Linear's defaults stay
    (non-zero biases, kaiming-uniform weights), W_o still zero; an unknown value is refused."""
    from dataclasses import replace

    model = build_mige(replace(tiny_config, fusion_init="pytorch"), seed=0)
    fusion = model.encoder.adapter.fusion
    linears = _fusion_linears(fusion)
    assert torch.count_nonzero(linears["k_mlp.0"].bias) > 0  # (MHA zeroes its own out_proj's bias)
    for name, layer in linears.items():
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=√5): U(-1/√fan_in, 1/√fan_in)
        assert layer.weight.abs().max().item() <= bound + 1e-6, name
    assert torch.count_nonzero(fusion.out_proj.weight) == 0
    with pytest.raises(ValueError, match="fusion_init: 'xavier'"):
        build_mige(replace(tiny_config, fusion_init="xavier"), seed=0)


def test_gradients_reach_trainable_parts_and_never_frozen_ones(tiny_config):
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", p_drop_condition=0, p_drop_input=0, p_drop_both=0)
    module.configure_model()
    module.model.train()
    # one step so fusion's zero-initialised output no longer blocks gradients to its attention
    batch = make_batch(module.config, [1, 2, 4, 3])
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.05)
    module.training_step(batch, 0).backward()
    opt.step()
    opt.zero_grad()
    module.training_step(batch, 0).backward()
    model = module.model

    def has_grad(mod):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())

    enc = model.encoder
    for name, part in {
        "t5": enc.t5,
        "qformer": enc.qformer,
        "fusion.attn": enc.fusion.attn,
        "fusion.k_mlp": enc.fusion.k_mlp,
        "projection": enc.projection,
        "dit": model.dit,
        "dit.patch_embed": model.dit.pos_embed,
    }.items():
        assert has_grad(part), name
    assert enc.query_tokens.grad is not None and enc.query_tokens.grad.abs().sum() > 0
    for part in (enc.vision, model.autoencoder):
        assert all(p.grad is None and not p.requires_grad for p in part.parameters())
        assert not part.training  # stays in eval mode even though the model is in train mode
    trainable = {id(p) for p in module.trainable_parameters()}
    assert not any(id(p) in trainable for p in enc.vision.parameters())
    assert not any(id(p) in trainable for p in model.autoencoder.parameters())


def test_dropped_condition_uses_null_embedding_and_skips_its_images(tiny_model, tiny_config):
    batch = make_batch(tiny_config, [2, 1])
    seen = []
    tiny_model.encoder.vision.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    cond, mask = encode_condition(tiny_model, batch, drop=torch.tensor([True, False]))
    null = tiny_model.null_condition
    assert torch.equal(cond[0, : null.shape[0]], null) and mask[0].sum() == null.shape[0]
    assert seen == [1]  # only sample 1's image was encoded
    kept, kept_mask = encode_condition(
        tiny_model, {k: v[1:] if not isinstance(v, list) else v[1:] for k, v in batch.items()}
    )
    assert torch.allclose(cond[1, : kept.shape[1]], kept[0], atol=1e-6)


def test_widened_dit_matches_four_channel_model_when_conditional_input_is_zero(tmp_path):
    torch.manual_seed(0)
    from diffusers import PixArtTransformer2DModel

    kw = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        norm_num_groups=4,
        use_additional_conditions=False,
    )
    four = PixArtTransformer2DModel(in_channels=4, out_channels=8, **kw).eval()
    four.save_pretrained(tmp_path / "dit")
    wide = build_dit(
        {}, latent_channels=4, sample_size=8, caption_channels=12, source=str(tmp_path / "dit")
    ).eval()
    assert wide.config.in_channels == 8 and wide.pos_embed.proj.weight[:, 4:].abs().sum() == 0
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    args = dict(
        encoder_hidden_states=cond,
        timestep=torch.tensor([3, 700]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    with torch.no_grad():
        ref = four(x, **args).sample
        out = wide(torch.cat([x, torch.zeros_like(x)], 1), **args).sample
        other = wide(torch.cat([x, torch.ones_like(x)], 1), **args).sample
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(other, ref, atol=1e-6)  # new channels start at zero: input ignored until trained


@pytest.mark.parametrize("seeded", [False, True], ids=["constructor-init", "seeded-init"])
def test_a_reference_image_s_content_reaches_the_condition(tiny_config, seeded):
    """Two references (red circle, blue square) under the same instruction must give different
    condition vectors. The frozen vision tower is randomly initialised here: drawn at
    transformers' BLIP-2 default scale (1e-10) it gave every image the same features, and the
    references' content never reached the DiT."""
    from mige_lightning.models import build_mige
    from mige_lightning.transforms import Transforms
    from mige_world.synthetic import Sprite, render_reference

    torch.manual_seed(0)
    model = build_mige(tiny_config, seed=0 if seeded else None).eval()
    c = tiny_config
    transforms = Transforms(c.resolution, c.vision_resolution, c.vision_mean, c.vision_std)
    images = [
        render_reference(Sprite("circle", "red", "center"), size=c.resolution),
        render_reference(Sprite("square", "blue", "center"), size=c.resolution),
    ]
    vae_pixels = torch.stack([transforms.vae(im) for im in images])  # [2, 3, H, W]
    vit_pixels = torch.stack([transforms.vit(im) for im in images])
    with torch.no_grad():
        features = model.encoder.vision(pixel_values=vit_pixels).last_hidden_state
        cond, _ = model.encode_condition(
            ["a large <imagehere> on the left"] * 2,
            ref_pixels=vit_pixels[:, None],
            ref_latents=model.autoencoder.encode(vae_pixels, sample=False),
            ref_mask=torch.ones(2, 1, dtype=torch.bool),
        )
    assert (features[0] - features[1]).abs().mean() > 0.1 * features.abs().mean()
    # at initialisation the Q-Former's cross-attention adds a small part of what it reads (≈1e-2
    # here, 1e-6 with the 1e-10 tower): training grows it only if it is there at all
    differs = (cond[0] - cond[1]).abs().amax(-1)  # per condition token
    assert int((differs > 1e-3).sum()) >= model.encoder.num_query_tokens


def test_a_random_vision_tower_at_blip2_s_default_init_scale_is_refused(tiny_config):
    from dataclasses import replace

    from mige_lightning.models import build_mige

    config = replace(tiny_config, vision={**tiny_config.vision, "initializer_range": 1e-10})
    with pytest.raises(ValueError, match=r"model.overrides.vision.initializer_range=1e-10"):
        build_mige(config)

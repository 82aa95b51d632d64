"""Sampling: guidance arithmetic on a toy ε-model, seeds independent of batching, schedulers, EMA, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from callbacks.ema import EMA
from mige_lightning.diffusion import cfg_2way, cfg_3way
from mige_lightning.models import build_mige, get_config
from mige_lightning.module import MIGELightningModule
from mige_lightning.pipeline import SCHEDULERS, MIGEPipeline
from tests.helpers.batches import make_batch

REPO = Path(__file__).resolve().parents[1]


def _img(seed=0, size=(24, 20)):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    p = MIGEPipeline.from_mige(
        build_mige(cfg).eval(),
        resolution=cfg.resolution,
        vision_mean=cfg.vision_mean,
        vision_std=cfg.vision_std,
    )
    p.set_progress_bar_config(disable=True)
    return p


class ToyEps(nn.Module):
    """ε(c, x) with known outputs: each branch's output is a distinct, checkable function of its inputs."""

    def __init__(self, null):
        super().__init__()
        self.null_condition = null
        self.calls = []

    def null_rows_like(self, cond_mask):  # MIGE's, with the whole null condition ('full')
        n, rows = cond_mask.shape[0], self.null_condition.shape[0]
        return self.null_condition.expand(n, -1, -1), torch.ones(n, rows, dtype=torch.long)

    def forward(self, noisy, t, *, cond, cond_mask, cond_input):
        self.calls.append(noisy.shape[0])
        text = (cond[:, 0, 0] * cond_mask[:, 0]).view(-1, 1, 1, 1)  # elementwise only: exact in any batch
        eps = 0.5 * noisy + 0.25 * cond_input + 0.1 * text + 0.001 * t.view(-1, 1, 1, 1)
        return torch.cat([eps, torch.full_like(eps, 7.0)], dim=1)  # variance channels must be ignored


def _toy_setup(pipe):
    torch.manual_seed(1)
    toy = ToyEps(torch.randn(6, 4))
    b = 3
    args = dict(
        latents=torch.randn(b, 4, 8, 8),
        t=torch.tensor([10, 20, 30]),
        cond=torch.randn(b, 5, 4),
        cond_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]),
        cond_input=torch.randn(b, 4, 8, 8),
    )
    return toy, args


def _direct(toy, args, *, condition: bool, source: bool):
    b = args["latents"].shape[0]
    if condition:
        cond, mask = args["cond"], args["cond_mask"]
    else:
        cond, mask = (
            toy.null_condition.expand(b, -1, -1),
            torch.ones(b, toy.null_condition.shape[0], dtype=torch.long),
        )
    x = args["cond_input"] if source else torch.zeros_like(args["cond_input"])
    return toy(args["latents"], args["t"], cond=cond, cond_mask=mask, cond_input=x)[:, :4]


def test_two_and_three_way_guidance_equal_a_direct_reference_computation(pipe, monkeypatch):
    toy, args = _toy_setup(pipe)
    monkeypatch.setattr(pipe, "_mige", toy)
    e_c_src, e_0_src, e_0_0 = (
        _direct(toy, args, condition=c, source=s) for c, s in [(True, True), (False, True), (False, False)]
    )
    toy.calls.clear()
    three = pipe.guided_prediction(**args, guidance_scale=5.0, image_guidance_scale=1.5)
    assert toy.calls == [9]  # the three branches ran as ONE batched forward
    assert torch.equal(three, e_0_0 + 1.5 * (e_0_src - e_0_0) + 5.0 * (e_c_src - e_0_src))
    two = pipe.guided_prediction(**args, guidance_scale=7.0, image_guidance_scale=None)
    assert torch.equal(two, e_0_src + 7.0 * (e_c_src - e_0_src))
    one_one = pipe.guided_prediction(**args, guidance_scale=1.0, image_guidance_scale=1.0)
    assert torch.allclose(one_one, e_c_src, atol=1e-6)  # s_y = s_s = 1 → the fully conditional prediction


def test_guidance_branches_with_zero_weight_are_not_run(pipe, monkeypatch):
    """s_s = 1 cancels the (∅, 0) branch, s_y = 1 as well leaves (c, src) alone: fewer rows per
    forward, the same result as the full 3-way / 2-way combination."""
    toy, args = _toy_setup(pipe)
    monkeypatch.setattr(pipe, "_mige", toy)
    e_c_src, e_0_src, e_0_0 = (
        _direct(toy, args, condition=c, source=s) for c, s in [(True, True), (False, True), (False, False)]
    )
    full = {
        (5.0, 1.0): cfg_3way(e_0_0, e_0_src, e_c_src, guidance_scale=5.0, image_guidance_scale=1.0),
        (1.0, 1.0): cfg_3way(e_0_0, e_0_src, e_c_src, guidance_scale=1.0, image_guidance_scale=1.0),
        (1.0, None): cfg_2way(e_0_src, e_c_src, 1.0),
        (5.0, 1.5): cfg_3way(e_0_0, e_0_src, e_c_src, guidance_scale=5.0, image_guidance_scale=1.5),
    }
    rows = {(5.0, 1.0): 6, (1.0, 1.0): 3, (1.0, None): 3, (5.0, 1.5): 9}
    for (s_y, s_s), expected in full.items():
        toy.calls.clear()
        got = pipe.guided_prediction(**args, guidance_scale=s_y, image_guidance_scale=s_s)
        assert toy.calls == [rows[(s_y, s_s)]], (s_y, s_s, toy.calls)
        assert torch.allclose(got, expected, atol=1e-5), (s_y, s_s)
    assert torch.allclose(cfg_2way(e_0_src, e_c_src, 1.0), e_c_src, atol=1e-6)
    assert torch.allclose(
        cfg_3way(e_0_0, e_0_src, e_c_src, guidance_scale=0.0, image_guidance_scale=0.0), e_0_0
    )


@pytest.mark.parametrize("name", ["dpm++", "dpm++sde"])  # the stochastic one draws noise at every step
def test_sample_alone_equals_sample_inside_a_batch_of_25_bitwise(pipe, name):
    refs = [[_img(i)] for i in range(25)]
    texts = [f"a <imagehere> number {i}" + " extra" * (i % 4) for i in range(25)]
    pipe.set_scheduler(name)
    try:
        batch = pipe(texts, task="subject", images=refs, num_inference_steps=3, seed=100, output_type="pt")
        # one forward per step for the whole batch: the same draws (up to kernel rounding)
        fused = pipe(
            texts,
            task="subject",
            images=refs,
            num_inference_steps=3,
            seed=100,
            output_type="pt",
            batch_invariant=False,
        )
        alone = {
            i: pipe(
                texts[i],
                task="subject",
                images=refs[i],
                num_inference_steps=3,
                seeds=[100 + i],
                output_type="pt",
            )
            for i in (0, 7, 24)
        }
        again = pipe(
            texts[0], task="subject", images=refs[0], num_inference_steps=3, seeds=[101], output_type="pt"
        )
    finally:
        pipe.set_scheduler("dpm++")
    for i, out in alone.items():
        assert torch.equal(out.latents[0], batch.latents[i]), i
        assert torch.allclose(out.latents[0], fused.latents[i], rtol=1e-3, atol=1e-3), i
        assert torch.equal(out.images[0], batch.images[i]), i  # the decoded image too
    assert not torch.equal(batch.latents[0], batch.latents[1])
    assert not torch.equal(again.latents[0], alone[0].latents[0])  # another seed, another sample


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_returns_finite_images_of_the_requested_size(pipe, name):
    pipe.set_scheduler(name)
    try:
        out = pipe(
            ["make <imagehere> red", "make <imagehere> blue"],
            task="edit",
            images=[[_img(1)], [_img(2)]],
            source=[_img(1), _img(2, (40, 30))],
            num_inference_steps=4,
            resize_to_source=True,
        )
    finally:
        pipe.set_scheduler("dpm++")
    assert [im.size for im in out.images] == [(24, 20), (40, 30)]  # resized back to each source
    assert torch.isfinite(out.latents).all() and out.settings[0]["scheduler"] == SCHEDULERS[name].__name__
    assert all(np.isfinite(np.asarray(im, dtype=np.float32)).all() for im in out.images)
    plain = pipe("make <imagehere> red", task="edit", images=[_img(1)], source=_img(1), num_inference_steps=2)
    assert plain.images[0].size == (16, 16)  # model resolution without resize_to_source


def test_bad_inputs_are_refused_before_any_compute(pipe):
    with pytest.raises(ValueError, match="1 <imagehere> placeholder.*0 image"):
        pipe("a <imagehere>", task="subject")
    with pytest.raises(ValueError, match="needs a source"):
        pipe("make <imagehere> red", task="edit", images=[_img()])


def test_pipeline_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "mige")
    loaded = MIGEPipeline.from_pretrained(tmp_path / "mige")
    loaded.set_progress_bar_config(disable=True)
    kw = dict(
        task="subject_edit",
        images=[_img(3), _img(4)],
        source=_img(4),
        num_inference_steps=3,
        output_type="latent",
    )
    a = pipe("replace the cat in <imagehere> with <imagehere>", **kw)
    b = loaded("replace the cat in <imagehere> with <imagehere>", **kw)
    assert torch.equal(a.latents, b.latents)
    assert json.loads((tmp_path / "mige" / "model_index.json").read_text())["resolution"] == 16


def test_ema_differs_from_raw_weights_and_is_what_predict_samples_with(tmp_path):
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", warmup_steps=1, lr=1e-2)
    ema = EMA(decay=0.9)
    batch = make_batch(module.config, [1, 2])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        callbacks=[ema],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    raw = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert any(not torch.allclose(ema.shadow[n], raw[n]) for n in raw)
    restored = MIGELightningModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert all(
        torch.equal(p, raw[n]) for n, p in restored.named_parameters() if p.requires_grad
    )  # raw by default
    restored.on_predict_start()  # what `predict` does first
    assert restored._sampling_with_ema
    for n, p in restored.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ema.shadow[n].to(p.dtype))
    dit_weight = restored._pipe.transformer.proj_out.weight
    assert torch.equal(
        dit_weight, ema.shadow["model.dit.proj_out.weight"]
    )  # the pipeline holds the EMA weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_recovers_x0_from_an_oracle_of_each_prediction_type(
    pipe, monkeypatch, name, prediction_type
):
    """With the exact prediction for one known x₀, every sampler must land on that x₀: guards the
    scheduler configuration (prediction type, schedule, input scaling) against the training target."""
    from mige_lightning.diffusion import GaussianDiffusion
    from mige_lightning.pipeline import make_scheduler

    diff = GaussianDiffusion(prediction_type=prediction_type)
    x0 = torch.rand(1, 4, 8, 8) * 1.6 - 0.8

    def oracle(latents, t, **_):
        t = t.long()
        a = diff._at(diff.sqrt_alphas_cumprod, t, latents)
        s = diff._at(diff.sqrt_one_minus_alphas_cumprod, t, latents)
        eps = (latents - a * x0) / s
        return {"epsilon": eps, "sample": x0.expand_as(latents), "v_prediction": a * eps - s * x0}[
            prediction_type
        ]

    monkeypatch.setattr(pipe, "guided_prediction", oracle)
    monkeypatch.setattr(pipe, "scheduler", make_scheduler(name, prediction_type=prediction_type))
    out = pipe("a <imagehere>", task="subject", images=[_img()], num_inference_steps=10, output_type="latent")
    assert torch.allclose(out.latents, x0, atol=1e-3), (out.latents - x0).abs().max()


def test_a_placeholder_beyond_the_word_limit_is_refused_before_sampling(pipe):
    with pytest.raises(
        ValueError, match=r"instruction 0: the instruction has 93 words and the 88-word limit cuts 1"
    ):
        pipe("word " * 90 + "put <imagehere> here", task="subject", images=[_img(0)])

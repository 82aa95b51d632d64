"""``model.protocol: authors``: one switch for sampling and scoring as the authors' release does,
each part also its own option — and each part checked against what the authors' code does, on
small inputs built here (their procedures restated from their public scripts: resize and crop
with torchvision / PIL, ``.jpg`` files written by torchvision's ``save_image``, a LayerNorm with
torch's default eps, timesteps cast to bf16, a posterior sample mean + std·ε)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import transforms as T

from datamodules.benchmarks import BenchmarkDataModule, BenchmarkDataset, open_image, read_benchmark
from mige_lightning.evaluation import (
    BenchmarkEvaluator,
    crop_with_mask,
    crop_with_mask_on_black,
    resolve_crop_fn,
)
from mige_lightning.module import MIGELightningModule
from mige_lightning.pipeline import (
    LATENT_SAMPLE_SEED_OFFSET,
    SOURCE_SAMPLE_SEED_OFFSET,
    AuthorsGridDPMSolverScheduler,
    make_scheduler,
)
from mige_lightning.protocol import PROTOCOLS, resolve_protocol
from mige_lightning.transforms import Transforms
from tests.helpers.benchmark_layouts import make_dreambench


def picture(seed: int, size=(40, 30)) -> PIL.Image.Image:
    """A smooth random picture (what JPEG and resampling see in a photo), ``size`` = (w, h)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(2, 9) * y + rng.uniform(0, 6)) for _ in range(3)]
    pixels = (np.stack(channels, -1) * 0.45 + 0.5) * 255 + rng.normal(0, 6, (h, w, 3))
    return PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def tiny_module(**options) -> MIGELightningModule:
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", **options)
    module.configure_model()
    module.model.eval()
    return module


def tiny_pipe(**options):
    pipe = tiny_module(**options).pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------ the one switch
def test_protocol_authors_turns_on_every_part_and_an_explicit_option_wins():
    authors = tiny_module(protocol="authors")
    pipe = authors.pipeline()
    assert isinstance(pipe.scheduler, AuthorsGridDPMSolverScheduler)
    assert (pipe.config.timestep_dtype, pipe.config.condition_latents, pipe.config.image_resize) == (
        "bfloat16",
        "sample",
        "authors",
    )
    assert pipe.transforms.resize == "authors"
    assert authors.model.encoder.vision.post_layernorm.eps == 1e-5
    evaluator = authors.build_evaluator()
    assert evaluator.jpeg_quality == 75 and evaluator.crop is crop_with_mask_on_black
    data = BenchmarkDataModule({"name": "dreambench", "root": "unused"})
    authors.connect_datamodule(data)
    assert data.reference_prep == "mask_file"

    project = tiny_module()  # the default: this project's choices, every one
    pipe = project.pipeline()
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (pipe.config.timestep_dtype, pipe.config.condition_latents, pipe.config.image_resize) == (
        "float32",
        "mode",
        "project",
    )
    assert project.model.encoder.vision.post_layernorm.eps == 1e-6
    evaluator = project.build_evaluator()
    assert evaluator.jpeg_quality is None and evaluator.crop is crop_with_mask
    data = BenchmarkDataModule({"name": "dreambench", "root": "unused"})
    project.connect_datamodule(data)
    assert data.reference_prep == "raw"

    # each part is its own option, and one given explicitly wins over the protocol
    mixed = tiny_module(
        protocol="authors",
        condition_latents="mode",
        eval_metrics={"jpeg_quality": 0, "crop_fn": "mask"},
        overrides={"vision_norm_eps": 1e-6},
    )
    assert mixed.pipeline().config.condition_latents == "mode"
    assert mixed.build_evaluator().jpeg_quality is None and mixed.build_evaluator().crop is crop_with_mask
    assert mixed.model.encoder.vision.post_layernorm.eps == 1e-6
    assert mixed.protocol.changed() == [
        "jpeg_quality",
        "subject_crop",
        "condition_latents",
        "vision_norm_eps",
    ]
    data = BenchmarkDataModule({"name": "dreambench", "root": "unused", "reference_prep": "raw"})
    mixed.connect_datamodule(data)
    assert data.reference_prep == "raw"  # the data's own option wins too
    single = tiny_module(timestep_dtype="bfloat16")  # one part alone, under the project protocol
    assert single.pipeline().config.timestep_dtype == "bfloat16"
    assert single.pipeline().config.condition_latents == "mode"


def test_bad_protocol_settings_are_refused_naming_the_choices():
    with pytest.raises(
        ValueError, match=r"model\.protocol: unknown protocol 'paper'; choose one of \['authors', 'project'\]"
    ):
        MIGELightningModule("tiny", protocol="paper")
    with pytest.raises(
        ValueError, match=r"model\.condition_latents: 'mean'; choose one of \('mode', 'sample'\)"
    ):
        MIGELightningModule("tiny", condition_latents="mean")
    with pytest.raises(ValueError, match=r"model\.image_resize: 'bilinear'; choose one of"):
        MIGELightningModule("tiny", image_resize="bilinear")
    with pytest.raises(ValueError, match=r"model\.sampler_time_grid: 'karras'; choose one of"):
        MIGELightningModule("tiny", sampler_time_grid="karras")
    with pytest.raises(ValueError, match=r"jpeg_quality: 101"):
        MIGELightningModule("tiny", eval_metrics={"jpeg_quality": 101})
    with pytest.raises(ValueError, match=r"crop_fn: expected one of \['mask', 'mask_black'\]"):
        resolve_crop_fn("black")
    # the authors' grid is a DPM-Solver++ grid: asked for with another sampler, an error; the
    # protocol's own default falls back to diffusers' grid there
    with pytest.raises(ValueError, match="sampler_time_grid: authors is the authors' DPM-Solver"):
        tiny_module(sampler="ddim", sampler_time_grid="authors").pipeline()
    assert (
        type(tiny_module(protocol="authors", sampler="ddim").pipeline().scheduler).__name__ == "DDIMScheduler"
    )


def test_the_converted_checkpoints_config_names_the_authors_protocol(tmp_path):
    import yaml

    from tests.helpers.authors import authors_tiny_state, convert_tiny

    out = convert_tiny(tmp_path, authors_tiny_state())
    model_args = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert model_args["protocol"] == "authors" and float(model_args["overrides"]["vision_norm_eps"]) == 1e-5
    module = MIGELightningModule(**model_args)
    assert module.protocol == PROTOCOLS["authors"]


# --------------------------------------------------------------- (a) DreamBench references on black
def test_authors_protocol_feeds_dreambench_subjects_segmented_on_black(tmp_path):
    make_dreambench(tmp_path)
    photo = tmp_path / "dataset" / "dog" / "00.jpg"
    original = np.asarray(open_image(str(photo)))
    mask = np.zeros(original.shape[:2], np.uint8)
    mask[4:22, 9:31] = 255
    PIL.Image.fromarray(mask).save(photo.with_name("00_mask.png"))
    spec = {"name": "dreambench", "root": str(tmp_path), "images_per_prompt": 1}

    def fed_dog(data: BenchmarkDataModule) -> np.ndarray:
        items = read_benchmark({**data.benchmark, "reference_prep": data.reference_prep})
        dog = next(i for i, it in enumerate(items) if it.meta["subject"] == "dog")
        sample = BenchmarkDataset(items)[dog]
        assert np.array_equal(np.asarray(sample.images["reference"]), original)  # metrics: the photo
        return np.asarray(sample.images["references"][0])

    data = BenchmarkDataModule(spec)
    data.use_protocol(resolve_protocol("authors"))
    # the authors' references: the subject's pixels, every other pixel black
    expected = np.where(mask[..., None] > 127, original, 0)
    assert np.array_equal(fed_dog(data), expected)
    data.use_protocol(resolve_protocol("project"))
    assert np.array_equal(fed_dog(data), original)


# ------------------------------------------------------------------ (b) JPEG-75 before scoring
def test_jpeg_round_trip_scores_what_the_authors_scorer_reads_back(tmp_path):
    from torchvision.utils import save_image

    from mige_lightning.prompt import Task

    class Item:  # the fields the scorer reads
        id, task, instruction, caption, input_caption, output_caption, source, meta = (
            "0",
            Task.EDIT,
            "x",
            None,
            None,
            None,
            None,
            {},
        )

    generated = picture(1, (48, 40))
    reference = picture(2, (48, 40))
    # the authors' inference scripts save each decoded sample with torchvision's save_image as
    # {idx}.jpg (PIL's default quality), their scorer opens that file and takes L1 against the reference
    as_tensor = torch.from_numpy(np.array(generated)).permute(2, 0, 1).float() / 255 * 2 - 1
    save_image(as_tensor, tmp_path / "0.jpg", nrow=1, normalize=True, value_range=(-1, 1))
    read_back = PIL.Image.open(tmp_path / "0.jpg").convert("RGB")
    gt = T.ToTensor()(reference)
    theirs = torch.nn.L1Loss()(T.ToTensor()(read_back.resize(reference.size)), gt).item()

    def l1(**kw) -> float:
        evaluator = BenchmarkEvaluator(dino=None, clip_model="unused", clip_pretrained=None, **kw)
        return evaluator.update([generated], [Item()], [{"reference": reference}])[0]["l1"]

    assert l1(jpeg_quality=75) == pytest.approx(theirs, abs=1e-6)
    assert abs(l1() - theirs) > 1e-4  # lossless scoring is not what they measured


# ------------------------------------------------------------- (c) timesteps cast to bf16
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_dit_embeds_bf16_timesteps_as_the_authors_bf16_model(dtype):
    pipe = tiny_pipe(timestep_dtype=dtype)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"][0].item()), with_kwargs=True
    )
    pipe("a red ball", task="subject", num_inference_steps=12, guidance_scale=1.0)
    grid = pipe.scheduler.timesteps.float()
    if dtype == "float32":
        assert seen == grid.tolist()
        return
    # their model casts t to its weights' dtype (bf16) before the sinusoidal embedding
    assert seen == grid.to(torch.bfloat16).float().tolist() and seen != grid.tolist()
    assert all(t % 4 == 0 for t in seen if t >= 512) and seen[0] == 1000.0  # 999 → 1000


# ------------------------------------------------- (d) posterior samples, seeded from the request
def record_encodes(pipe, monkeypatch) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    calls = []
    ae = pipe.model.autoencoder
    encode = ae.encode

    def spy(pixels, **kwargs):
        out = encode(pixels, **kwargs)
        calls.append((pixels.clone(), kwargs, out.clone()))
        return out

    monkeypatch.setattr(ae, "encode", spy)
    return calls


def posterior_draw(ae, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """mean + std·ε with ε from ``seed``, in the latent scale (what the authors' vae_encode returns)."""
    dist = ae.vae.encode(pixels).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(seed))
    return (dist.mean + dist.std * noise) * ae.scaling_factor


def test_references_and_source_are_a_posterior_sample_seeded_by_the_request(monkeypatch):
    pipe = tiny_pipe(condition_latents="sample")
    ae = pipe.model.autoencoder
    calls = record_encodes(pipe, monkeypatch)
    ref, src = picture(3), picture(4)
    run = pipe(
        "put <imagehere> into <imagehere>",
        task="subject_edit",
        images=[ref, src],
        source=src,
        seed=7,
        num_inference_steps=2,
    )
    (ref_pixels, ref_kwargs, ref_latents), (src_pixels, _, src_latents) = calls
    assert ref_kwargs["sample"] is True
    # the references of a request draw in order from its seed's stream; the source from its own
    stream = torch.Generator().manual_seed(7 + LATENT_SAMPLE_SEED_OFFSET)
    for k in range(2):
        dist = ae.vae.encode(ref_pixels[k : k + 1]).latent_dist
        expected = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=stream)) * ae.scaling_factor
        torch.testing.assert_close(ref_latents[k : k + 1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        src_latents, posterior_draw(ae, src_pixels, 7 + SOURCE_SAMPLE_SEED_OFFSET), rtol=1e-5, atol=1e-6
    )
    mode = ae.vae.encode(ref_pixels).latent_dist.mode() * ae.scaling_factor
    assert (ref_latents - mode).abs().max() > 1e-3  # a sample, not the mode
    # the same request, the same draw (and image); another seed, another draw
    calls.clear()
    again = pipe(
        "put <imagehere> into <imagehere>",
        task="subject_edit",
        images=[ref, src],
        source=src,
        seed=7,
        num_inference_steps=2,
    )
    assert torch.equal(calls[0][2], ref_latents) and torch.equal(again.latents, run.latents)
    calls.clear()
    pipe(
        "put <imagehere> into <imagehere>",
        task="subject_edit",
        images=[ref, src],
        source=src,
        seed=8,
        num_inference_steps=2,
    )
    assert not torch.equal(calls[0][2], ref_latents)

    # edit: the authors' script encodes the one image once and uses that draw as reference and source
    calls.clear()
    pipe("make <imagehere> blue", task="edit", images=[src], source=src, seed=7, num_inference_steps=2)
    (_, _, as_reference), (pixels, _, as_source) = calls
    assert torch.equal(as_reference, as_source)
    torch.testing.assert_close(
        as_source, posterior_draw(ae, pixels, 7 + LATENT_SAMPLE_SEED_OFFSET), rtol=1e-5, atol=1e-6
    )

    # default: the posterior's mode
    pipe = tiny_pipe()
    calls = record_encodes(pipe, monkeypatch)
    pipe("make <imagehere> blue", task="edit", images=[src], source=src, seed=7, num_inference_steps=2)
    assert all(kwargs["sample"] is False for _, kwargs, _ in calls)


# --------------------------------------------------- (e) the authors' resize and letterbox
def letterboxed_on_black(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """The longer side to ``size`` (bicubic, the shorter rounded down), centred on a black square."""
    w, h = image.size
    new = (size, int(size * h / w)) if w > h else (int(size * w / h), size)
    canvas = PIL.Image.new("RGB", (size, size))
    canvas.paste(image.resize(new, PIL.Image.BICUBIC), ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def same_pixels(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding of the [-1, 1] scaling (one pixel level is 2/255)."""
    return a.shape == b.shape and bool((a - b).abs().max() < 1e-6)


@pytest.mark.parametrize("size", [(40, 30), (23, 41), (32, 32)])
def test_authors_resize_is_bilinear_and_subject_references_are_letterboxed(size):
    image = picture(5, size)
    res = 16
    to_vae = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])])
    authors = Transforms(res, 8, (0.5,) * 3, (0.5,) * 3, resize="authors")
    # edit / subject_edit images: torchvision's Resize (bilinear by default) + centre crop
    expected = to_vae(T.CenterCrop(res)(T.Resize(res)(image)))
    assert same_pixels(authors.vae(image), expected)
    assert same_pixels(authors.vae_reference("subject_edit")(image), expected)
    # subject references: letterboxed on black
    assert same_pixels(authors.vae_reference("subject")(image), to_vae(letterboxed_on_black(image, res)))
    project = Transforms(res, 8, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(project.vae_reference("subject")(image), project.vae(image))
    bicubic = to_vae(T.CenterCrop(res)(T.Resize(res, interpolation=T.InterpolationMode.BICUBIC)(image)))
    assert same_pixels(project.vae(image), bicubic)
    assert not same_pixels(project.vae(image), expected)
    assert torch.equal(authors.vit(image), project.vit(image))  # the vision tower's is BLIP-2's in both


def test_the_sampler_encodes_what_the_authors_resize_gives(monkeypatch):
    pipe = tiny_pipe(image_resize="authors")
    calls = record_encodes(pipe, monkeypatch)
    image = picture(6, (40, 24))
    pipe("a <imagehere> on the beach", task="subject", images=[image], num_inference_steps=2)
    res = pipe.config.resolution
    letterbox = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])])(letterboxed_on_black(image, res))
    assert same_pixels(calls[0][0][0], letterbox)
    calls.clear()
    pipe("make <imagehere> blue", task="edit", images=[image], source=image, num_inference_steps=2)
    bilinear = T.Compose([T.Resize(res), T.CenterCrop(res), T.ToTensor(), T.Normalize([0.5], [0.5])])(image)
    assert same_pixels(calls[0][0][0], bilinear) and same_pixels(calls[1][0][0], bilinear)


# --------------------------------------------------------- (f) MIGEBench subject crop on black
def test_subject_crop_on_black_is_the_authors_crop():
    image = picture(7, (40, 30))
    mask = np.zeros((30, 40), np.uint8)
    mask[6:20, 10:17] = 255
    mask[12:25, 15:30] = 255  # an L-shaped subject: its box holds background
    # theirs: every pixel outside the subject's mask zeroed, then the subject's box cropped
    pixels = np.asarray(image).copy()
    pixels[mask == 0] = 0
    ys, xs = np.nonzero(mask)
    expected = PIL.Image.fromarray(pixels).crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    crop = resolve_crop_fn("mask_black")(image, PIL.Image.fromarray(mask))
    assert np.array_equal(np.asarray(crop), np.asarray(expected))
    kept = np.asarray(crop_with_mask(image, PIL.Image.fromarray(mask)))
    assert kept.shape == np.asarray(crop).shape and not np.array_equal(kept, np.asarray(crop))


# ----------------------------------------------------------------- (g) ln_vision eps 1e-5
@pytest.mark.parametrize("protocol", ["authors", "project"])
def test_vision_norm_is_blip2s_ln_vision_with_torchs_default_eps(protocol):
    vision = tiny_module(protocol=protocol).model.encoder.vision
    seen = {}
    # the first call normalises the hidden states (transformers normalises the pooled token again)
    vision.post_layernorm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    out = vision(pixel_values=torch.randn(2, 3, 32, 32) * 3).last_hidden_state
    ln_vision = torch.nn.LayerNorm(vision.config.hidden_size)  # theirs: LayerNorm(num_features)
    ln_vision.load_state_dict(vision.post_layernorm.state_dict())
    theirs = ln_vision(seen["x"].float())
    if protocol == "authors":
        torch.testing.assert_close(out, theirs, rtol=0, atol=0)
    else:
        assert not torch.equal(out, theirs)


# ------------------------------------------------------- item 2: the authors' DPM-Solver++ grid
N = 1000


def authors_reference_sampler(model, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Multistep DPM-Solver++ (order 2, their 'dpmsolver' update) on a discrete-time model written
    from its equations, in float64: uniform continuous times t from 1 to 1/N, fed to the model as
    (t − 1/N)·N; log ᾱ linear between the training steps; first order at the first step and, below
    10 steps, at the last."""
    betas = np.linspace(1e-4, 0.02, N)
    log_alpha = 0.5 * np.cumsum(np.log(1 - betas))
    times = np.linspace(N - 1, 0, steps + 1)

    def coefficients(t):
        la = np.interp(t, np.arange(N), log_alpha)
        alpha, sigma = np.exp(la), np.sqrt(1 - np.exp(2 * la))
        return alpha, sigma, la - np.log(sigma)

    x = x.double()
    previous = None
    for k in range(steps):
        a_s, s_s, l_s = coefficients(times[k])
        a_t, s_t, l_t = coefficients(times[k + 1])
        x0 = (x - s_s * model(x.float(), torch.tensor(times[k], dtype=torch.float32)).double()) / a_s
        h = l_t - l_s
        d = x0
        if previous is not None and not (steps < 10 and k == steps - 1):
            r = (l_s - previous[1]) / h
            d = x0 + 0.5 / r * (x0 - previous[0])
        x = s_t / s_s * x - a_t * np.expm1(-h) * d
        previous = (x0, l_s)
    return x.float()


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(0.7 * x) * torch.cos(t / 170.0) + 0.2 * x


def run_scheduler(scheduler, x: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, t.float()), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [6, 12, 60])
def test_authors_time_grid_is_their_dpm_solver_discretisation(steps):
    scheduler = make_scheduler("dpm++", time_grid="authors")
    scheduler.set_timesteps(steps)
    times = np.linspace(1.0, 1.0 / N, steps + 1)  # their continuous times
    torch.testing.assert_close(
        scheduler.timesteps, torch.tensor((times[:-1] - 1 / N) * N, dtype=torch.float32)
    )
    assert scheduler.sigmas[-1] > 0  # ends at t = 1/N, not at σ = 0

    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    ours = run_scheduler(scheduler, x.clone(), steps)
    theirs = authors_reference_sampler(toy_model, x.clone(), steps)
    torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=2e-5)
    diffusers_grid = run_scheduler(make_scheduler("dpm++"), x.clone(), steps)
    assert (diffusers_grid - theirs).abs().max() > 1e-3
    # the grid is kept when the pipeline switches back to dpm++, and only then
    pipe = tiny_pipe(sampler_time_grid="authors")
    pipe.set_scheduler("dpm++")
    assert isinstance(pipe.scheduler, AuthorsGridDPMSolverScheduler)
    pipe.set_scheduler("euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_a_saved_pipeline_samples_with_the_protocol_it_was_saved_with(tmp_path):
    from mige_lightning.pipeline import MIGEPipeline

    pipe = tiny_pipe(protocol="authors")
    pipe.save_pretrained(tmp_path / "mige")
    loaded = MIGEPipeline.from_pretrained(tmp_path / "mige")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, AuthorsGridDPMSolverScheduler)
    assert loaded.vision_model.post_layernorm.eps == 1e-5
    kw = dict(
        task="subject_edit", images=[picture(3), picture(4)], source=picture(4), num_inference_steps=3, seed=3
    )
    a = pipe("replace the cat in <imagehere> with <imagehere>", **kw)
    b = loaded("replace the cat in <imagehere> with <imagehere>", **kw)
    assert torch.equal(a.latents, b.latents)

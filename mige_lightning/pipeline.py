"""Sampling: instruction (+ images, + source) → images, with 2-/3-way classifier-free guidance.

``MIGEPipeline`` is a diffusers ``DiffusionPipeline``: ``save_pretrained`` / ``from_pretrained``
work on the whole model. It uses the same prompt function (``prompt.build_prompt``) and the same
image transforms as training. Initial noise depends only on each sample's seed (base seed +
sample index, or an explicit per-sample seed), never on the batch size or the batch's contents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PixArtTransformer2DModel,
    SchedulerMixin,  # also how MIGEPipeline.from_pretrained recognises AuthorsGridDPMSolverScheduler
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from transformers import Blip2QFormerModel, Blip2VisionModel, PreTrainedTokenizerBase, T5EncoderModel

from mige_lightning.diffusion import cfg_2way, cfg_3way
from mige_lightning.models.adapter import ConditionAdapter
from mige_lightning.models.autoencoder import KLAutoencoder, PixelAutoencoder
from mige_lightning.models.encoder import MultimodalEncoder
from mige_lightning.models.mige import MIGE
from mige_lightning.prompt import (
    PROMPT_STYLES,
    PROMPT_VERSION,
    Task,
    build_prompt,
    count_placeholders,
    placeholders_cut,
)
from mige_lightning.protocol import CONDITION_LATENTS, TIME_GRIDS, TIMESTEP_DTYPES
from mige_lightning.transforms import RESIZES, Transforms

# the authors' defaults: steps, instruction scale (the paper's s_y: guidance_scale), input scale
# (its s_s: image_guidance_scale) — one name each along the whole path
TASK_DEFAULTS: dict[Task, dict[str, float | int | None]] = {
    Task.SUBJECT: {"num_inference_steps": 50, "guidance_scale": 7.0, "image_guidance_scale": None},
    Task.EDIT: {"num_inference_steps": 60, "guidance_scale": 5.0, "image_guidance_scale": 1.0},
    Task.SUBJECT_EDIT: {"num_inference_steps": 60, "guidance_scale": 5.0, "image_guidance_scale": 1.0},
}
SCHEDULERS = {
    "dpm++": DPMSolverMultistepScheduler,
    "dpm++sde": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
}
# the stochastic sampler's fresh noise per step: from each sample's own stream (its seed + this), so a
# sample draws the same alone or in any batch
STEP_NOISE_SEED_OFFSET = 1_000_003
# condition_latents: sample — the posterior draws of a sample's references (in order) come from its
# seed + this; a subject_edit source has its own stream (+ the second), an edit's source shares its
# reference's first draw (the authors' edit script encodes the one image once and uses it twice)
LATENT_SAMPLE_SEED_OFFSET = 2_000_003
SOURCE_SAMPLE_SEED_OFFSET = 3_000_017


class AuthorsGridDPMSolverScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++ (diffusers' solver) on the authors' time grid: their continuous-time
    DPM-Solver steps uniformly in t from 1 to 1/N (N training steps), so the model sees the
    fractional times (t − 1/N)·N = N−1 … 0 in ``num_inference_steps`` equal steps, ᾱ between the
    training steps is interpolated linearly in log ᾱ, the last step ends at the first training
    step's noise level (not at σ = 0), and the last step is first order only below 10 steps.
    diffusers' own grid rounds the times to integers and ends at σ = 0 with a first-order step."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu=None, timesteps=None):
        if num_inference_steps is None or timesteps is not None or mu is not None:
            raise ValueError("the authors' time grid takes num_inference_steps only")
        # the solver's state (history, step index) reset as by diffusers; the grid replaced below
        super().set_timesteps(num_inference_steps, device=device)
        n = self.config.num_train_timesteps
        times = np.linspace(n - 1, 0, num_inference_steps + 1)
        log_alpha = 0.5 * np.log(self.alphas_cumprod.double().numpy())
        alphas_cumprod = np.exp(2 * np.interp(times, np.arange(n), log_alpha))
        self.sigmas = torch.from_numpy(np.sqrt((1 - alphas_cumprod) / alphas_cumprod).astype(np.float32))
        self.timesteps = torch.from_numpy(times[:-1].astype(np.float32)).to(device)
        # diffusers lowers the last step's order below 15 steps, the authors' solver below 10
        self.register_to_config(lower_order_final=num_inference_steps < 10)


def make_scheduler(
    name: str = "dpm++",
    *,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    time_grid: str = "diffusers",
) -> SchedulerMixin:
    """A diffusers sampler on the training noise schedule; ``dpm++`` = DPM-Solver++ multistep, order 2;
    ``dpm++sde`` its stochastic form (SDE-DPM-Solver++, fresh noise at every step); ``ddim``; ``euler``.
    ``prediction_type`` must be what the model was trained to predict (``epsilon`` / ``v_prediction``
    / ``sample``).

    ``clip_sample`` keeps predicted x₀ inside [-1, 1] (dynamic thresholding for DPM-Solver++, clipping
    for DDIM): right for pixel-space models, whose data lives there; latent models (PixArt) don't clip.

    ``time_grid`` (``dpm++`` only): ``diffusers`` (its integer grid, ending at σ = 0) or ``authors``
    (``AuthorsGridDPMSolverScheduler``: the authors' fractional grid, ending at t = 1/N).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    if time_grid not in TIME_GRIDS:
        raise ValueError(f"model.sampler_time_grid: {time_grid!r}; choose one of {TIME_GRIDS}")
    if time_grid == "authors" and name != "dpm++":
        raise ValueError(
            f"model.sampler_time_grid: authors is the authors' DPM-Solver++ grid; sampler {name!r} "
            "takes only diffusers'"
        )
    kwargs = dict(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
    )
    if name in ("dpm++", "dpm++sde"):
        kwargs.update(algorithm_type="dpmsolver++" if name == "dpm++" else "sde-dpmsolver++", solver_order=2)
        if clip_sample:
            kwargs.update(thresholding=True, sample_max_value=1.0)
    elif name == "ddim" and clip_sample:
        kwargs.update(clip_sample=True, clip_sample_range=1.0)
    elif name == "ddim":
        kwargs.update(clip_sample=False)
    if time_grid == "authors":  # their last step ends at the first training step's noise level
        return AuthorsGridDPMSolverScheduler(**kwargs, final_sigmas_type="sigma_min")
    return SCHEDULERS[name](**kwargs)


def check_task_defaults(value: dict | None) -> dict[str, dict]:
    """``{task: {num_inference_steps, guidance_scale, image_guidance_scale}}`` overriding
    ``TASK_DEFAULTS`` per task (a model trained with its own recipe samples best with its own)."""
    out = {}
    for task, settings in (value or {}).items():
        Task.parse(task)
        unknown = set(settings or {}) - set(TASK_DEFAULTS[Task.SUBJECT])
        if unknown:
            raise ValueError(
                f"task_defaults.{task}: unknown keys {sorted(unknown)}; expected {sorted(TASK_DEFAULTS[Task.SUBJECT])}"
            )
        out[task] = dict(settings or {})
    return out


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], *, device, dtype) -> torch.Tensor:
    """One CPU generator per sample: sample i's noise is the same alone or in any batch."""
    noise = [
        torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ]
    return torch.stack(noise).to(device=device, dtype=dtype)


@dataclass
class MIGEPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    latents: torch.Tensor
    settings: list[dict]  # what each image was generated with (task, seed, scales, steps, scheduler)


def _own_eps(vision: Blip2VisionModel) -> float | None:
    """The final LayerNorm's eps where it differs from the vision config's (else None)."""
    eps = float(vision.post_layernorm.eps)
    return None if eps == float(vision.config.layer_norm_eps) else eps


def _as_list(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} instructions")
        return list(value)
    return [value] * n


class MIGEPipeline(DiffusionPipeline):
    _optional_components = ["vae"]  # None: the model works in pixel space

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: T5EncoderModel,
        vision_model: Blip2VisionModel,
        qformer: Blip2QFormerModel,
        adapter: ConditionAdapter,
        transformer: PixArtTransformer2DModel,
        vae: AutoencoderKL | None,
        scheduler: DPMSolverMultistepScheduler,
        resolution: int = 512,
        vision_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        vision_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        max_length: int = 256,
        prompt_version: int = PROMPT_VERSION,
        task_defaults: dict[str, dict] | None = None,
        prompt_style: str = "training",
        timestep_dtype: str = "float32",
        condition_latents: str = "mode",
        image_resize: str = "project",
        vision_norm_eps: float | None = None,
    ):
        super().__init__()
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style: {prompt_style!r}; choose one of {PROMPT_STYLES}")
        for key, value, choices in (
            ("timestep_dtype", timestep_dtype, TIMESTEP_DTYPES),
            ("condition_latents", condition_latents, CONDITION_LATENTS),
            ("image_resize", image_resize, RESIZES),
        ):
            if value not in choices:
                raise ValueError(f"{key}: {value!r}; choose one of {choices}")
        if prompt_version != PROMPT_VERSION:
            raise ValueError(
                f"pipeline was saved with prompt version {prompt_version}; this code builds {PROMPT_VERSION}"
            )
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vision_model=vision_model,
            qformer=qformer,
            adapter=adapter,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
        )
        self.register_to_config(
            resolution=resolution,
            vision_mean=list(vision_mean),
            vision_std=list(vision_std),
            max_length=max_length,
            prompt_version=prompt_version,
            task_defaults=check_task_defaults(task_defaults),
            prompt_style=prompt_style,
            # the authors' sampling (model.protocol: authors, mige_lightning/protocol.py): t cast to
            # bf16 before the DiT embeds it; posterior samples, not modes, for references and
            # source; their resize and letterbox on the autoencoder path
            timestep_dtype=timestep_dtype,
            condition_latents=condition_latents,
            image_resize=image_resize,
            # the ViT's final LayerNorm's eps when it is not its config's (model.overrides.vision_norm_eps):
            # kept here so that a saved pipeline loads with it
            vision_norm_eps=vision_norm_eps,
        )
        if vision_norm_eps is not None:
            vision_model.post_layernorm.eps = float(vision_norm_eps)
        self._mige: MIGE | None = None
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    @classmethod
    def from_mige(
        cls,
        model: MIGE,
        *,
        resolution: int,
        vision_mean,
        vision_std,
        scheduler=None,
        task_defaults=None,
        prompt_style: str = "training",
        timestep_dtype: str = "float32",
        condition_latents: str = "mode",
        image_resize: str = "project",
    ) -> MIGEPipeline:
        enc = model.encoder
        vae = model.autoencoder.vae if isinstance(model.autoencoder, KLAutoencoder) else None
        pipe = cls(
            tokenizer=enc.tokenizer,
            text_encoder=enc.t5,
            vision_model=enc.vision,
            qformer=enc.qformer,
            adapter=enc.adapter,
            transformer=model.dit,
            vae=vae,
            scheduler=scheduler or make_scheduler(),
            resolution=resolution,
            vision_mean=vision_mean,
            vision_std=vision_std,
            max_length=enc.max_length,
            task_defaults=task_defaults,
            prompt_style=prompt_style,
            timestep_dtype=timestep_dtype,
            condition_latents=condition_latents,
            image_resize=image_resize,
            vision_norm_eps=_own_eps(enc.vision),
        )
        pipe._mige = model
        return pipe

    @property
    def model(self) -> MIGE:
        """The components assembled as the training-time ``MIGE`` module (no copies)."""
        if self._mige is None:
            encoder = MultimodalEncoder(
                vision=self.vision_model,
                qformer=self.qformer,
                adapter=self.adapter,
                t5=self.text_encoder,
                tokenizer=self.tokenizer,
                max_length=self.config.max_length,
            )
            autoencoder = KLAutoencoder(self.vae) if self.vae is not None else PixelAutoencoder()
            self._mige = MIGE(encoder=encoder, dit=self.transformer, autoencoder=autoencoder).eval()
        return self._mige

    @property
    def transforms(self) -> Transforms:
        return Transforms(
            self.config.resolution,
            int(self.vision_model.config.image_size),
            self.config.vision_mean,
            self.config.vision_std,
            resize=self.config.image_resize,
        )

    def set_scheduler(self, name: str) -> None:
        """Switch sampler, keeping the noise schedule, prediction type and clipping of the current one
        (and the authors' time grid where the new one is ``dpm++`` too)."""
        cfg = self.scheduler.config
        authors_grid = isinstance(self.scheduler, AuthorsGridDPMSolverScheduler) and name == "dpm++"
        self.scheduler = make_scheduler(
            name,
            **{
                k: cfg[k]
                for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
            },
            clip_sample=bool(cfg.get("thresholding") or cfg.get("clip_sample")),
            time_grid="authors" if authors_grid else "diffusers",
        )

    # ------------------------------------------------------------------------------- the model
    def guided_prediction(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        *,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        cond_input: torch.Tensor,
        guidance_scale: float,
        image_guidance_scale: float | None,
    ) -> torch.Tensor:
        """All guidance branches in ONE batched forward; returns the guided prediction [B, C, h, w] (ε, v or x₀: the model's ``prediction_type``).

        2-way (``image_guidance_scale`` None): branches (c, input), (∅, input).
        3-way: (c, src), (∅, src), (∅, 0) — condition rows of ``cond`` are followed by the null rows.
        Branches whose weight is zero are not run: with image_guidance_scale = 1 the (∅, 0) branch
        cancels out (3-way = 2-way on the source), and with guidance_scale = 1 as well only (c, src)
        is left.
        """
        b, c = latents.shape[:2]
        if image_guidance_scale is not None and image_guidance_scale == 1.0:
            image_guidance_scale = None  # e(∅,0) + 1·(e(∅,src) − e(∅,0)) = e(∅,src): 2-way on the source
        if image_guidance_scale is None and guidance_scale == 1.0:
            out = self.model(latents, t, cond=cond, cond_mask=cond_mask, cond_input=cond_input)
            return out[:, :c]  # e(∅) + 1·(e(c) − e(∅)) = e(c): the conditional branch alone
        null, null_mask = self.model.null_rows_like(cond_mask)  # [B, L, D], [B, L]
        length = max(cond.shape[1], null.shape[1])
        k = 2 if image_guidance_scale is None else 3
        conds = cond.new_zeros(k * b, length, cond.shape[2])
        masks = cond_mask.new_zeros(k * b, length)
        conds[:b, : cond.shape[1]], masks[:b, : cond.shape[1]] = cond, cond_mask
        conds[b:, : null.shape[1]] = null.to(cond.dtype).repeat(k - 1, 1, 1)
        masks[b:, : null.shape[1]] = null_mask.to(masks.dtype).repeat(k - 1, 1)
        inputs = (
            [cond_input, cond_input] if k == 2 else [cond_input, cond_input, torch.zeros_like(cond_input)]
        )
        out = self.model(
            latents.repeat(k, 1, 1, 1), t.repeat(k), cond=conds, cond_mask=masks, cond_input=torch.cat(inputs)
        )
        pred = out[:, :c].chunk(k)  # learned-variance channels are not used by these samplers
        if k == 2:
            return cfg_2way(pred[1], pred[0], guidance_scale)
        return cfg_3way(
            pred[2],
            pred[1],
            pred[0],
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
        )

    # ---------------------------------------------------------------------------------- sample
    @torch.no_grad()
    def __call__(
        self,
        instruction: str | list[str],
        *,
        task: Task | str,
        images: list[PIL.Image.Image] | list[list[PIL.Image.Image]] | None = None,
        source: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        seed: int = 0,
        seeds: list[int] | None = None,
        resize_to_source: bool = False,
        batch_invariant: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate or edit. ``images``: the images filling each instruction's placeholders;
        ``source``: the image to edit (edit / subject_edit). Steps and scales default per task
        (``TASK_DEFAULTS``, the paper's, updated by the pipeline's ``task_defaults``). ``seeds`` (default ``seed + i``) fix each sample's initial noise;
        ``batch_invariant`` (default) runs samples one at a time so a sample is bitwise identical
        alone or in any batch — set it False to batch all samples into each forward for speed."""
        # 1. inputs → per-sample lists, checked before any compute
        task = Task.parse(task)
        defaults = {**TASK_DEFAULTS[task], **(self.config.task_defaults or {}).get(task.value, {})}
        steps = int(num_inference_steps or defaults["num_inference_steps"])
        guidance_scale = float(defaults["guidance_scale"] if guidance_scale is None else guidance_scale)
        if image_guidance_scale is None:
            image_guidance_scale = defaults["image_guidance_scale"]
        if task is Task.SUBJECT:
            image_guidance_scale = None  # no conditional input to guide on
        instructions = [instruction] if isinstance(instruction, str) else list(instruction)
        n = len(instructions)
        if images is None:
            refs = [[] for _ in range(n)]
        elif n == 1 and images and isinstance(images[0], PIL.Image.Image):
            refs = [list(images)]
        else:
            refs = [list(r) for r in _as_list(images, n, "images")]
        sources = _as_list(source, n, "source")
        for i, (text, r) in enumerate(zip(instructions, refs, strict=True)):
            if count_placeholders(text) != len(r):
                raise ValueError(
                    f"instruction {i}: {count_placeholders(text)} <imagehere> placeholder(s) but {len(r)} image(s)"
                )
            if (cut := placeholders_cut(text)) is not None:
                raise ValueError(f"instruction {i}: {cut}")
        if task.uses_source and any(s is None for s in sources):
            raise ValueError(f"task '{task.value}' needs a source image for every instruction")
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(n)]
        if len(seeds) != n:
            raise ValueError(f"seeds: {len(seeds)} values for {n} instructions")
        # 2.–6. run each sample on its own (batch_invariant: bitwise the same whatever it is batched
        # with — CPU conv / attention kernels otherwise pick batch-size-dependent paths), or all at once
        chunks = [[i] for i in range(n)] if batch_invariant else [list(range(n))]
        latents = torch.cat(
            [
                self._denoise(
                    [instructions[i] for i in c],
                    task=task,
                    refs=[refs[i] for i in c],
                    sources=[sources[i] for i in c],
                    seeds=[seeds[i] for i in c],
                    steps=steps,
                    guidance_scale=guidance_scale,
                    image_guidance_scale=image_guidance_scale,
                )
                for c in chunks
            ]
        )
        model = self.model
        prompts = [build_prompt(task, text, style=self.config.prompt_style) for text in instructions]
        # 7. decode and post-process
        pixels = torch.cat([model.autoencoder.decode(latents[c]) for c in chunks])  # per chunk, like the rest
        # non-finite weights or a diverged sampler give NaN, which casts to black: never an image
        finite = torch.isfinite(pixels.flatten(1)).all(1) & torch.isfinite(latents.flatten(1)).all(1)
        if not finite.all():
            bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
            raise FloatingPointError(
                f"sampling gave non-finite values (NaN / inf) for {len(bad)} of {n} instruction(s) "
                f"(positions {bad[:10]}); no image is written. Check the weights (a NaN tensor in the "
                "checkpoint or init_weights) and the sampling settings"
            )
        settings = [
            {
                "task": task.value,
                "seed": s,
                "num_inference_steps": steps,
                "guidance_scale": guidance_scale,
                "image_guidance_scale": image_guidance_scale,
                "scheduler": type(self.scheduler).__name__,
                "prompt": p,
            }
            for s, p in zip(seeds, prompts, strict=True)
        ]
        if output_type == "latent":
            result = latents
        else:
            result = self.image_processor.postprocess(pixels.float(), output_type=output_type)
            if resize_to_source and output_type == "pil" and task.uses_source:
                result = [
                    img.resize(s.size, PIL.Image.BICUBIC) for img, s in zip(result, sources, strict=True)
                ]
        if not return_dict:
            return result, latents
        return MIGEPipelineOutput(images=result, latents=latents, settings=settings)

    def _denoise(
        self, instructions, *, task, refs, sources, seeds, steps, guidance_scale, image_guidance_scale
    ) -> torch.Tensor:
        model, tf = self.model, self.transforms
        device, dtype = self.transformer.device, self.transformer.dtype
        n = len(instructions)

        # 2. references: ViT inputs and VAE latents of the real images only
        m = max((len(r) for r in refs), default=0)
        ref_mask = torch.zeros(n, m, dtype=torch.bool, device=device)
        ref_pixels = torch.zeros(
            n, m, 3, tf.vision_resolution, tf.vision_resolution, device=device, dtype=dtype
        )
        flat, streams = [], []
        vae_reference = tf.vae_reference(task)  # image_resize authors: a subject's letterboxed
        for i, r in enumerate(refs):
            stream = self._latent_stream(seeds[i], LATENT_SAMPLE_SEED_OFFSET)
            for j, img in enumerate(r):
                ref_mask[i, j] = True
                ref_pixels[i, j] = tf.vit(img.convert("RGB")).to(device, dtype)
                flat.append(vae_reference(img.convert("RGB")))
                streams.append(stream)  # one stream per sample: its references draw in order
        ref_latents = self._latents(torch.stack(flat).to(device, dtype), streams) if flat else None

        # 3. the multimodal condition, through the training prompt function
        prompts = [build_prompt(task, text, style=self.config.prompt_style) for text in instructions]
        if ref_latents is None:
            ref_latents = torch.zeros(0, model.latent_channels, 1, 1, device=device, dtype=dtype)
        cond, cond_mask = model.encode_condition(
            prompts, ref_pixels=ref_pixels, ref_latents=ref_latents, ref_mask=ref_mask, pad_to_max_length=True
        )

        # 4. the conditional input: source latent (edit, subject_edit) or zeros (subject)
        size = tf.resolution // model.autoencoder.downsample_factor
        shape = (model.latent_channels, size, size)
        if task.uses_source:
            src = torch.stack([tf.vae(s.convert("RGB")) for s in sources]).to(device, dtype)
            offset = LATENT_SAMPLE_SEED_OFFSET if task is Task.EDIT else SOURCE_SAMPLE_SEED_OFFSET
            cond_input = self._latents(src, [self._latent_stream(s, offset) for s in seeds])
        else:
            cond_input = torch.zeros(n, *shape, device=device, dtype=dtype)

        # 5. initial noise from per-sample seeds
        self.scheduler.set_timesteps(steps, device=device)
        latents = initial_noise(seeds, shape, device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        # 6. denoising loop: one batched forward per step for all guidance branches
        stochastic = str(getattr(self.scheduler.config, "algorithm_type", "")).startswith("sde")
        streams = (
            [torch.Generator("cpu").manual_seed(int(s) + STEP_NOISE_SEED_OFFSET) for s in seeds]
            if stochastic
            else []
        )
        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(latents, timestep)
            t_batch = timestep.reshape(1).to(device).expand(n)
            if self.config.timestep_dtype == "bfloat16":  # as the authors' bf16 model casts its t
                t_batch = t_batch.to(torch.bfloat16).float()
            pred = self.guided_prediction(
                model_in,
                t_batch,
                cond=cond,
                cond_mask=cond_mask,
                cond_input=cond_input,
                guidance_scale=guidance_scale,
                image_guidance_scale=image_guidance_scale,
            )
            step_noise = {}
            if stochastic:
                noise = [torch.randn(shape, generator=g) for g in streams]
                step_noise["variance_noise"] = torch.stack(noise).to(device=device, dtype=dtype)
            latents = self.scheduler.step(pred, timestep, latents, return_dict=False, **step_noise)[0]

        return latents

    def _latent_stream(self, seed: int, offset: int) -> torch.Generator | None:
        """The CPU generator a sample's posterior draws come from (``condition_latents: sample``)."""
        if self.config.condition_latents != "sample":
            return None
        return torch.Generator("cpu").manual_seed(int(seed) + offset)

    def _latents(self, pixels: torch.Tensor, streams: list[torch.Generator | None]) -> torch.Tensor:
        """The autoencoder's latents of ``pixels``: its posterior's mode, or (``condition_latents:
        sample``, the authors') a draw mean + std·ε with image k's ε from ``streams[k]``."""
        if self.config.condition_latents != "sample":
            return self.model.autoencoder.encode(pixels, sample=False)
        return self.model.autoencoder.encode(pixels, sample=True, generator=list(streams))

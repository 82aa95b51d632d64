"""MIGE as one plain ``nn.Module``: multimodal encoder + conditional DiT + frozen autoencoder.

``build_mige`` turns a ``MIGEConfig`` into the model, deriving every cross-component dimension.
The module knows nothing of Lightning, losses or data files; guidance belongs to the sampler.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import PixArtTransformer2DModel
from torch import nn
from transformers import (
    Blip2Config,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    T5Config,
    T5EncoderModel,
)

from mige_lightning.checkpoint_files import refuse_nonfinite
from mige_lightning.models.adapter import ConditionAdapter
from mige_lightning.models.autoencoder import KLAutoencoder, PixelAutoencoder, build_autoencoder
from mige_lightning.models.dit import build_dit, patch_tokens
from mige_lightning.models.encoder import MultimodalEncoder, in_graph_zero
from mige_lightning.models.init import initialize_model, module_seed, skip_prefixes
from mige_lightning.models.loading import (
    BYTE_TOKENIZER,
    Blip2Parts,
    load_blip2_parts,
    load_tensor_file,
    load_tokenizer,
)
from mige_lightning.models.presets import MIN_VISION_INIT_RANGE, VISION_INIT_RANGE, MIGEConfig
from mige_lightning.sources import resolve_source


class MIGE(nn.Module):
    def __init__(
        self,
        *,
        encoder: MultimodalEncoder,
        dit: PixArtTransformer2DModel,
        autoencoder: KLAutoencoder | PixelAutoencoder,
    ):
        super().__init__()
        self.encoder = encoder
        self.dit = dit
        self.autoencoder = autoencoder

    @property
    def run_every_branch(self) -> bool:
        """Run every sub-network on every call, even for a batch with no reference image or with
        every condition dropped (one stand-in image or sample, whose output is discarded but kept
        in the autograd graph). Sharded data parallel needs it: each rank must gather and reduce
        the same parameters in the same order."""
        return self.encoder.run_every_branch

    @run_every_branch.setter
    def run_every_branch(self, value: bool) -> None:
        self.encoder.run_every_branch = bool(value)

    @property
    def null_condition(self) -> torch.Tensor:
        """The fixed null condition, [L, D] (a buffer in PixArt's ``y_embedding`` slot, but MIGE's own:
        the authors draw a fresh ``randn / sqrt(D)`` when building for training, never PixArt's):
        replaces the encoder *output* when the condition is dropped, which is what classifier-free
        guidance samples against."""
        return self.encoder.adapter.null_condition

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    def encode_condition(
        self,
        prompts: list[str],
        *,
        ref_pixels: torch.Tensor,
        ref_latents: torch.Tensor,
        ref_mask: torch.Tensor,
        drop: torch.Tensor | None = None,
        pad_to_max_length: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition vectors for a batch.

        ref_pixels: [B, M, 3, Hv, Wv] ViT inputs; ref_mask: [B, M] bool, True for real images (M is
        the batch's largest count; padding never reaches a network); ref_latents: [N, C, h, w] the
        real images' latents in ``ref_mask`` order (N = ref_mask.sum(), see ``encode_references``).
        drop: [B] bool, samples whose condition is the null embedding (their images are not encoded).
        Returns cond [B, T, D] and mask [B, T].
        """
        batch = len(prompts)
        keep = torch.ones(batch, dtype=torch.bool, device=ref_mask.device) if drop is None else ~drop
        kept = keep.nonzero().flatten().tolist()
        refs = dict(ref_pixels=ref_pixels, ref_latents=ref_latents, ref_mask=ref_mask)
        if not kept:
            cond, ones = self.null_rows(self._null_lengths(prompts, ~keep, ref_mask))
            if not self.run_every_branch:
                return cond, ones
            # every rank runs the encoder: encode sample 0 as a stand-in and keep none of it
            ghost = torch.zeros_like(keep)
            ghost[0] = True
            hidden, _ = self._encode_kept(prompts, ghost, **refs, pad_to_max_length=pad_to_max_length)
            return cond + in_graph_zero(hidden).to(cond.dtype), ones
        hidden, hidden_mask = self._encode_kept(prompts, keep, **refs, pad_to_max_length=pad_to_max_length)
        if len(kept) == batch:
            return hidden, hidden_mask
        null, null_mask = self.null_rows(self._null_lengths(prompts, ~keep, ref_mask))
        length = max(hidden.shape[1], null.shape[1])
        cond = hidden.new_zeros(batch, length, hidden.shape[2])
        cond_mask = hidden_mask.new_zeros(batch, length)
        cond[keep, : hidden.shape[1]] = hidden
        cond_mask[keep, : hidden.shape[1]] = hidden_mask
        cond[~keep, : null.shape[1]] = null.to(hidden.dtype)
        cond_mask[~keep, : null.shape[1]] = null_mask.to(cond_mask.dtype)
        return cond, cond_mask

    def _null_lengths(self, prompts: list[str], dropped: torch.Tensor, ref_mask: torch.Tensor) -> list[int]:
        """For the dropped samples: their prompts' condition lengths ('prompt' null condition) or
        the whole null condition's ('full')."""
        index = dropped.nonzero().flatten().tolist()
        if self.encoder.adapter.config.null_condition_length != "prompt":
            return [self.null_condition.shape[0]] * len(index)
        counts = ref_mask.sum(1).tolist()
        return self.encoder.sequence_lengths([prompts[i] for i in index], [counts[i] for i in index])

    def null_rows(self, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The null condition for samples whose condition is dropped: [B, L, D] rows and a [B, L]
        mask that keeps the first ``lengths[b]`` rows (all of them in 'full' mode)."""
        null = self.null_condition
        rows = torch.as_tensor(lengths, device=null.device).clamp(max=null.shape[0])
        mask = (torch.arange(null.shape[0], device=null.device) < rows[:, None]).long()
        return null.expand(len(lengths), -1, -1), mask

    def null_rows_like(self, cond_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Null rows for guidance, one per row of a conditional batch's mask [B, T]: in 'prompt'
        mode each cut to that prompt's length, as the condition it is contrasted with."""
        if self.encoder.adapter.config.null_condition_length == "prompt":
            lengths = cond_mask.sum(1).tolist()
        else:
            lengths = [self.null_condition.shape[0]] * cond_mask.shape[0]
        return self.null_rows(lengths)

    def _encode_kept(
        self,
        prompts: list[str],
        keep: torch.Tensor,
        *,
        ref_pixels: torch.Tensor,
        ref_latents: torch.Tensor,
        ref_mask: torch.Tensor,
        pad_to_max_length: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder over the samples where ``keep`` [B] is True → hidden [B', T, D], mask [B', T]."""
        if ref_latents.shape[0] != int(ref_mask.sum()):
            raise ValueError(
                f"{ref_latents.shape[0]} reference latents for {int(ref_mask.sum())} real images"
            )
        kept = keep.nonzero().flatten().tolist()
        mask = ref_mask[kept]  # [B', M]
        pixels = ref_pixels[kept][mask]  # [N', 3, Hv, Wv] real images, sample-major order
        latents = ref_latents[keep.repeat_interleave(ref_mask.sum(1))]  # [N', C, h, w]
        config = self.encoder.adapter.config
        if not config.reference_latent_scaling:  # the authors fuse raw (unscaled) VAE latents
            latents = latents / self.autoencoder.scaling_factor
        position = config.fusion_position_embedding
        if latents.shape[0]:
            visual = patch_tokens(self.dit, latents, position=position)
        elif self.run_every_branch:  # no image here, maybe on other ranks: a zero latent, none kept
            size = self.dit.config.sample_size
            ghost = latents.new_zeros(1, self.latent_channels, size, size)
            visual = patch_tokens(self.dit, ghost, position=position)[:0]  # [0, L, D], still in the graph
        else:
            visual = latents.new_zeros(0, 1, 1)
        return self.encoder(
            [prompts[i] for i in kept],
            pixels=pixels,
            visual_tokens=visual,
            counts=mask.sum(1).tolist(),
            pad_to_max_length=pad_to_max_length,
        )

    def encode_references(
        self, ref_vae: torch.Tensor, ref_mask: torch.Tensor, *, sample: bool = True
    ) -> torch.Tensor:
        """[B, M, 3, H, W] pixels + [B, M] mask → latents of the real images only, [N, C, h, w]."""
        pixels = ref_vae[ref_mask]
        if pixels.shape[0] == 0:  # no reference in the batch (padded shape may be degenerate)
            return ref_vae.new_zeros(0, self.latent_channels, 1, 1)
        return self.autoencoder.encode(pixels, sample=sample)

    def forward(
        self,
        noisy: torch.Tensor,
        timestep: torch.Tensor,
        *,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        cond_input: torch.Tensor,
    ) -> torch.Tensor:
        """noisy, cond_input: [B, C, h, w]; timestep: [B] → the prediction (ε, v or x₀, as the run's
        ``prediction_type``) ⊕ variance values [B, 2C, h, w]."""
        hidden = torch.cat([noisy, cond_input], dim=1)  # [B, 2C, h, w]
        return self.dit(
            hidden,
            encoder_hidden_states=cond,
            encoder_attention_mask=cond_mask,
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample


@contextmanager
def parameters_on_meta():
    """Every parameter registered inside lands on the meta device as it is registered, so the
    initialisers that constructors run afterwards cost nothing; buffers (position tables, the
    null condition) are computed for real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_mige(config: MIGEConfig, *, seed: int | None = None, skeleton: bool = False) -> MIGE:
    """Build every component from its pretrained source when one is given, else from config.

    seed: when given, each randomly initialised module draws its weights from this seed and its
        own name (``models/init.py``), whatever the global random state and however the model is
        built; ``None`` keeps the constructors' draws from the global generator.
    skeleton: the shapes only (for ``sharding.build_sharded_mige``, which materialises, initialises
        and loads the weights one FSDP unit at a time): parameters on the meta device, pretrained
        components built from their configs without reading their weights; buffers and the frozen
        autoencoder are real. Needs ``seed``.
    """
    if skeleton and seed is None:
        raise ValueError("build_mige(skeleton=True) needs a seed: the weights are drawn later, per unit")
    if seed is None:
        return _build(config, skeleton=False, autoencoder=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(seed, "autoencoder"))
        autoencoder = build_autoencoder(
            config.vae, source=config.pretrained.vae, subfolder=config.pretrained.vae_subfolder
        )
    if skeleton:
        with parameters_on_meta(), torch.random.fork_rng(devices=[]):
            return _build(config, skeleton=True, autoencoder=autoencoder)
    parts: list[Blip2Parts] = []
    with torch.random.fork_rng(devices=[]):
        model = _build(config, skeleton=False, autoencoder=autoencoder, blip2_parts_out=parts)
    initialize_model(model, seed, skip=skip_prefixes(config))
    # pretrained values inside the otherwise random adapter go in after its random draw
    _load_adapter_parts(model.encoder.adapter, config, parts[0] if parts else None)
    return model


def _build(
    config: MIGEConfig,
    *,
    skeleton: bool,
    autoencoder: KLAutoencoder | PixelAutoencoder | None,
    blip2_parts_out: list[Blip2Parts] | None = None,
) -> MIGE:
    """The components; ``blip2_parts_out`` (a list) receives the BLIP-2 parts instead of their
    being copied into the adapter here (``build_mige`` copies them after the seeded draw)."""
    src = config.pretrained
    # 1. text side: T5 encoder and its tokenizer
    if src.t5 is not None and skeleton:
        t5 = T5EncoderModel(T5Config.from_pretrained(resolve_source(src.t5, key="model.pretrained.t5")))
    elif src.t5 is not None:
        t5 = T5EncoderModel.from_pretrained(resolve_source(src.t5, key="model.pretrained.t5"))
    else:
        t5 = T5EncoderModel(T5Config(**config.t5))
    tokenizer = load_tokenizer(src.tokenizer or src.t5 or BYTE_TOKENIZER)
    if len(tokenizer) > t5.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but T5's vocab_size is {t5.config.vocab_size}"
        )
    d_text = t5.config.d_model

    # 2. image side: BLIP-2 vision tower, Q-Former, query tokens, language projection
    if src.blip2 is not None and skeleton:
        blip2 = Blip2Config.from_pretrained(resolve_source(src.blip2, key="model.pretrained.blip2"))
        vision, qformer = Blip2VisionModel(blip2.vision_config), Blip2QFormerModel(blip2.qformer_config)
        num_queries = blip2.num_query_tokens
    elif src.blip2 is not None:
        pretrained_parts = load_blip2_parts(src.blip2)
        vision, qformer = pretrained_parts.vision, pretrained_parts.qformer
        num_queries = pretrained_parts.query_tokens.shape[1]
    else:
        vision_config = Blip2VisionConfig(**config.vision)
        if vision_config.initializer_range < MIN_VISION_INIT_RANGE:
            raise ValueError(
                f"model.overrides.vision.initializer_range={vision_config.initializer_range:g}: a randomly "
                "initialised vision tower drawn at this scale gives every image the same features, so "
                "reference images would not reach the condition (transformers' BLIP-2 default, 1e-10, "
                f"is meant for loading pretrained weights); use {VISION_INIT_RANGE} or give "
                "model.pretrained.blip2"
            )
        vision = Blip2VisionModel(vision_config)
        qformer_kwargs = {"encoder_hidden_size": vision.config.hidden_size, **config.qformer}
        qformer = Blip2QFormerModel(Blip2QFormerConfig(**qformer_kwargs))
        num_queries = config.num_query_tokens
    if config.vision_norm_eps is not None:  # the final LayerNorm only (BLIP-2's ln_vision)
        vision.post_layernorm.eps = float(config.vision_norm_eps)

    # 3. frozen autoencoder, then the DiT whose channels and sample size follow from it
    if autoencoder is None:
        autoencoder = build_autoencoder(config.vae, source=src.vae, subfolder=src.vae_subfolder)
    if config.resolution % autoencoder.downsample_factor:
        raise ValueError(f"model.resolution={config.resolution} is not divisible by the VAE factor")
    dit = build_dit(
        config.dit,
        latent_channels=autoencoder.latent_channels,
        sample_size=config.resolution // autoencoder.downsample_factor,
        caption_channels=d_text,
        source=src.dit,
        subfolder=src.dit_subfolder,
        weights=not skeleton,
    )

    # 4. what MIGE adds: queries, fusion, projection, null condition
    adapter = ConditionAdapter(
        num_query_tokens=num_queries,
        query_dim=qformer.config.hidden_size,
        visual_dim=dit.config.num_attention_heads * dit.config.attention_head_dim,
        text_dim=d_text,
        num_heads=config.fusion.get("num_heads", 8),
        null_length=config.max_length,
        init_std=qformer.config.initializer_range,
        fusion_query_bias=config.fusion_query_bias,
        fusion_init=config.fusion_init,
        reference_latent_scaling=config.reference_latent_scaling,
        fusion_position_embedding=config.fusion_position_embedding,
        null_condition_length=config.null_condition_length,
    )
    parts = pretrained_parts if src.blip2 is not None and not skeleton else None
    if blip2_parts_out is not None:
        blip2_parts_out.extend([parts] if parts is not None else [])
        parts = None
    # a skeleton's adapter takes the null condition (a real buffer) here, its weights later
    _load_adapter_parts(adapter, config, parts)
    if not skeleton:  # components read by from_pretrained: a NaN / inf weight names its source
        for key, source, module in (("t5", src.t5, t5), ("dit", src.dit, dit), ("vae", src.vae, autoencoder)):
            if source is not None:
                refuse_nonfinite(module.state_dict(), f"model.pretrained.{key} ({source})")

    encoder = MultimodalEncoder(
        vision=vision,
        qformer=qformer,
        adapter=adapter,
        t5=t5,
        tokenizer=tokenizer,
        max_length=config.max_length,
        train_vision_norm=config.train_vision_norm,
        train_text_encoder=config.train_text_encoder,
    )
    return MIGE(encoder=encoder, dit=dit, autoencoder=autoencoder)


@torch.no_grad()
def _load_adapter_parts(adapter: ConditionAdapter, config: MIGEConfig, parts: Blip2Parts | None) -> None:
    """Pretrained values of the adapter: BLIP-2's query tokens and projection, the null caption."""
    src = config.pretrained
    d_text = adapter.config.text_dim
    if parts is not None:
        adapter.query_tokens.copy_(parts.query_tokens)
        projection_state = parts.language_projection
        if projection_state:
            if projection_state["weight"].shape != adapter.projection.weight.shape:
                raise ValueError(
                    f"model.pretrained.blip2: language_projection is {tuple(projection_state['weight'].shape)}, "
                    f"but Q-Former → T5 needs {tuple(adapter.projection.weight.shape)}; "
                    "use a BLIP-2 built on the same LLM width"
                )
            adapter.projection.load_state_dict(projection_state)
    if src.null_embedding is not None:
        null = load_tensor_file(src.null_embedding)
        if null.ndim == 3:
            null = null[0]
        if null.shape[-1] != d_text:
            raise ValueError(f"model.pretrained.null_embedding: width {null.shape[-1]} != T5 width {d_text}")
        adapter.null_condition = null.float().clone()
        adapter.register_to_config(null_length=null.shape[0])

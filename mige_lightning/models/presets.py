"""Size presets, defined once and used by tests, the demo and the paper configs alike.

A preset gives the constructor kwargs of every component; dimensions that connect components
(Q-Former width → fusion, DiT width → fusion, T5 width → projection and DiT caption channels,
latent channels → DiT in/out channels, resolution → DiT sample size) are *derived* when the model
is built (``models/mige.py``), never repeated here. A component with a pretrained source takes its
configuration from the checkpoint instead.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mige_lightning.models.loading import PretrainedSources

NULL_CONDITION_LENGTHS = ("full", "prompt")
# Weight std of a randomly initialised BLIP-2 vision tower. transformers' Blip2VisionConfig defaults
# to 1e-10 (its weights are always loaded from a checkpoint); drawn at that scale the tower gives
# every image the same features, so no reference image's content would reach the condition.
VISION_INIT_RANGE = 0.02
# below this a random tower's features no longer tell images apart (checked in build_mige)
MIN_VISION_INIT_RANGE = 1e-4
# What the authors' released code computes (read from Eureka-Maggie/MIGE): a checkpoint converted
# from theirs reproduces their outputs only with these values.
AUTHORS_BEHAVIOUR: dict[str, Any] = {
    "reference_latent_scaling": False,
    "fusion_position_embedding": False,
    "fusion_query_bias": False,
    "null_condition_length": "prompt",
    "train_vision_norm": True,
    "vision_norm_eps": 1e-5,
}


@dataclass
class MIGEConfig:
    """Everything needed to build a MIGE model. All values are JSON-able."""

    vision: dict[str, Any]  # transformers.Blip2VisionConfig kwargs
    qformer: dict[str, Any]  # transformers.Blip2QFormerConfig kwargs
    t5: dict[str, Any]  # transformers.T5Config kwargs
    dit: dict[str, Any]  # diffusers.PixArtTransformer2DModel kwargs (channels/sizes derived)
    vae: dict[str, Any]  # {"kind": "kl", **AutoencoderKL kwargs} or {"kind": "pixel"}
    fusion: dict[str, Any] = field(default_factory=lambda: {"num_heads": 8})
    num_query_tokens: int = 32
    max_length: int = 256  # T5 sequence length (text + image tokens + EOS)
    resolution: int = 512  # image size on the VAE / DiT path
    max_images: int = 4  # reference images per instruction
    vision_mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    vision_std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)
    # How the reference images' VAE tokens reach the fusion module and what the null condition is.
    # The defaults are this project's; the authors' release does the opposite of each (the ``xl``
    # preset follows the authors, see AUTHORS_BEHAVIOUR and docs/AUTHORS_CHECKPOINT.md).
    reference_latent_scaling: bool = True  # VAE-scaled latents (×0.18215) into fusion; authors: raw
    fusion_position_embedding: bool = True  # sin-cos position table on fusion tokens; authors: none
    fusion_query_bias: bool = True  # bias on the fusion module's query projection; authors: none
    # how a fresh fusion module's linears are drawn: "authors" (trunc-normal std 0.02, zero biases:
    # their FFM._init_weights) or "pytorch" (nn.Linear's defaults); W_o is zero either way
    fusion_init: str = "authors"
    null_condition_length: str = "full"  # "full" rows, or "prompt": the first L rows, L = the prompt's length
    train_vision_norm: bool = False  # the ViT's final LayerNorm trains with the rest; authors: yes
    # eps of that LayerNorm: None keeps the vision config's (transformers' BLIP-2: 1e-6); the authors'
    # (BLIP-2's ln_vision, a torch LayerNorm with its default): 1e-5
    vision_norm_eps: float | None = None
    # T5 trains with the rest (paper §3.3); false keeps a pretrained text encoder as loaded
    train_text_encoder: bool = True
    pretrained: PretrainedSources = field(default_factory=PretrainedSources)

    def __post_init__(self) -> None:
        if self.vision_norm_eps is not None:  # YAML 1.1 reads 1e-05 (JSON's spelling) as a string
            try:
                self.vision_norm_eps = float(self.vision_norm_eps)
            except (TypeError, ValueError):
                raise ValueError(
                    f"model.overrides.vision_norm_eps: {self.vision_norm_eps!r}; a number (e.g. 1e-5) or null"
                ) from None
        if self.null_condition_length not in NULL_CONDITION_LENGTHS:
            raise ValueError(
                f"model.overrides.null_condition_length: {self.null_condition_length!r}; "
                f"choose one of {NULL_CONDITION_LENGTHS}"
            )

    @property
    def vision_resolution(self) -> int:
        return int(self.vision.get("image_size", 224))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tiny() -> MIGEConfig:
    return MIGEConfig(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            initializer_range=VISION_INIT_RANGE,
        ),
        qformer=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
        ),
        t5=dict(vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        dit=dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, norm_num_groups=8),
        vae=dict(
            kind="kl",
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[8, 16],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
        ),
        fusion={"num_heads": 2},
        num_query_tokens=4,
        max_length=192,  # byte-level tokens: the subject prefix alone is ~110
        resolution=16,
        pretrained=PretrainedSources(tokenizer="byte"),
    )


def _mid() -> MIGEConfig:
    """A CPU-benchmarkable middle size (~60 M trainable parameters), 256 px through an f/8 VAE."""
    return MIGEConfig(
        vision=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
            initializer_range=VISION_INIT_RANGE,
        ),
        qformer=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            cross_attention_frequency=2,
        ),
        t5=dict(
            vocab_size=259,
            d_model=384,
            d_kv=64,
            d_ff=1024,
            num_layers=4,
            num_heads=6,
            feed_forward_proj="gated-gelu",
        ),
        dit=dict(num_attention_heads=6, attention_head_dim=64, num_layers=8),
        vae=dict(
            kind="kl",
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[32, 64, 64, 64],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
        ),
        fusion={"num_heads": 4},
        num_query_tokens=16,
        max_length=160,
        resolution=256,
        pretrained=PretrainedSources(tokenizer="byte"),
    )


def _xl() -> MIGEConfig:
    """The paper's model: EVA ViT-g/14 + Q-Former, Flan-T5-XXL encoder, PixArt-α XL/2 at 512 px."""
    return MIGEConfig(
        # BLIP-2 (EVA-CLIP ViT-g/14) and Q-Former dimensions; replaced by the checkpoint's own when loaded.
        vision=dict(
            hidden_size=1408,
            intermediate_size=6144,
            num_hidden_layers=39,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            initializer_range=VISION_INIT_RANGE,
        ),
        qformer=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            cross_attention_frequency=2,
        ),
        t5=dict(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            feed_forward_proj="gated-gelu",
        ),
        dit=dict(num_attention_heads=16, attention_head_dim=72, num_layers=28),
        vae=dict(
            kind="kl",
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=4,
            scaling_factor=0.18215,
        ),
        fusion={"num_heads": 8},
        num_query_tokens=32,
        max_length=256,
        resolution=512,
        pretrained=PretrainedSources(
            t5="google/flan-t5-xxl",
            blip2="Salesforce/blip2-flan-t5-xxl",
            dit="PixArt-alpha/PixArt-XL-2-512x512",
            dit_subfolder="transformer",
            vae="stabilityai/sd-vae-ft-ema",
        ),
        **AUTHORS_BEHAVIOUR,  # the paper's model computes what the authors' release computes
    )


PRESETS = {"tiny": _tiny, "mid": _mid, "xl": _xl}


def _merge(base: dict[str, Any], override: dict[str, Any], key: str, *, strict: bool) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for name, value in override.items():
        if strict and name not in base:
            raise KeyError(f"{key}.{name}: unknown key; expected one of {sorted(base)}")
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            # component kwargs may add new library arguments, so only the top level is strict
            out[name] = _merge(out[name], value, f"{key}.{name}", strict=False)
        else:
            out[name] = value
    return out


def get_config(
    preset: str,
    overrides: dict[str, Any] | None = None,
    pretrained: dict[str, str | None] | None = None,
    *,
    key: str = "model",
) -> MIGEConfig:
    """Preset + overrides (+ pretrained sources replacing the preset's), with errors naming the key."""
    if preset not in PRESETS:
        raise ValueError(f"{key}.preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]()
    if overrides:
        merged = _merge(
            {f.name: getattr(config, f.name) for f in fields(config) if f.name != "pretrained"},
            dict(overrides),
            f"{key}.overrides",
            strict=True,
        )
        config = MIGEConfig(**merged, pretrained=config.pretrained)
    if pretrained:
        # merged field by field into the preset's sources: set a component to null to random-init it
        known = {f.name for f in fields(PretrainedSources)}
        for name in pretrained:
            if name not in known:
                raise KeyError(f"{key}.pretrained.{name}: unknown component; expected one of {sorted(known)}")
        config.pretrained = PretrainedSources(**{**asdict(config.pretrained), **pretrained})
    config.pretrained.validate(f"{key}.pretrained")
    if not config.train_text_encoder and config.pretrained.t5 is None:
        raise ValueError(
            f"{key}.overrides.train_text_encoder: false needs a pretrained T5 ({key}.pretrained.t5); "
            "a frozen, randomly initialised text encoder would never learn"
        )
    return config

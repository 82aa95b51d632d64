"""Random pretrained components of a preset's sizes, saved the way their hub checkpoints are laid
out (T5 seq2seq; BLIP-2 with its LLM, sharded with an index; a 4-channel PixArt in a
``transformer`` subfolder, widened on load; a KL VAE; a null caption), for tests that load
through the real ``from_pretrained`` / safetensors paths."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2Model, T5Config, T5ForConditionalGeneration

from mige_lightning.models import MIGEConfig
from mige_lightning.models.loading import build_byte_tokenizer


def save_components(root: Path, config: MIGEConfig, *, seed: int = 0) -> dict[str, str]:
    """Write every component for ``config``'s sizes under ``root``; returns ``model.pretrained``."""
    torch.manual_seed(seed)
    t5_cfg = {**config.t5, "decoder_start_token_id": 0}
    T5ForConditionalGeneration(T5Config(**t5_cfg)).save_pretrained(root / "t5")
    build_byte_tokenizer().save_pretrained(root / "t5")
    blip2 = Blip2Model(
        Blip2Config(
            vision_config=dict(config.vision),
            qformer_config={**config.qformer, "encoder_hidden_size": config.vision["hidden_size"]},
            text_config=T5Config(**{**t5_cfg, "num_layers": 1}).to_dict(),
            num_query_tokens=config.num_query_tokens,
        )
    )
    blip2.save_pretrained(root / "blip2", max_shard_size="200KB")  # sharded + index
    vae_kwargs = {k: v for k, v in config.vae.items() if k != "kind"}
    vae = AutoencoderKL(**vae_kwargs)
    vae.save_pretrained(root / "pixart" / "vae")
    factor = 2 ** (len(vae_kwargs["block_out_channels"]) - 1)
    dit_kwargs = dict(config.dit)
    inner = dit_kwargs["num_attention_heads"] * dit_kwargs["attention_head_dim"]
    PixArtTransformer2DModel(
        **{"cross_attention_dim": inner, "use_additional_conditions": False, **dit_kwargs},
        in_channels=4,  # a text-to-image PixArt: widened to 8 input channels on load
        out_channels=8,
        sample_size=config.resolution // factor,
        caption_channels=config.t5["d_model"],
    ).save_pretrained(root / "pixart" / "transformer")
    save_file({"y_embedding": torch.randn(20, config.t5["d_model"])}, str(root / "null.safetensors"))
    return {
        "t5": str(root / "t5"),
        "tokenizer": str(root / "t5"),
        "blip2": str(root / "blip2"),
        "dit": str(root / "pixart"),
        "dit_subfolder": "transformer",
        "vae": str(root / "pixart"),
        "vae_subfolder": "vae",
        "null_embedding": str(root / "null.safetensors"),
    }

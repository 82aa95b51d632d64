"""Tiny random DINO / CLIP backbones saved to disk, loaded back through the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import ViTConfig, ViTModel

TINY_CLIP = "mige-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_tiny_backbones(root: Path) -> dict[str, str]:
    import open_clip

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    dino = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=224,
            patch_size=32,
        ),
        add_pooling_layer=False,
    )
    dino.save_pretrained(root / "dino")
    (root / "clip_cfg").mkdir(exist_ok=True)
    (root / "clip_cfg" / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(root / "clip_cfg")
    clip = open_clip.create_model(TINY_CLIP, pretrained=None)
    torch.save(clip.state_dict(), root / "clip.pt")
    return {
        "dino": str(root / "dino"),
        "clip_model": TINY_CLIP,
        "clip_pretrained": str(root / "clip.pt"),
        "clip_cfg": str(root / "clip_cfg"),
    }

"""Shared tiny builders: every component from the ``tiny`` preset, random init, on CPU."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mige_lightning.models import build_mige, get_config  # noqa: E402
from mige_lightning.prompt import PLACEHOLDER, build_prompt  # noqa: E402

# configs/demo.yaml starts from the demo world's shipped pretrained components (T5, vision bridge,
# text-to-image DiT, made by `pretrain-world` for data/demo's world: fit refuses them for another
# world). Tests that train the demo model on a world of their own append these arguments after their
# configs: every component drawn at random, as before the world was pre-trained.
FROM_SCRATCH = (
    "--model.pretrained.t5=null",
    "--model.pretrained.blip2=null",
    "--model.pretrained.dit=null",
    "--model.pretrained.null_embedding=null",
    "--model.overrides.train_text_encoder=true",
)


@pytest.fixture
def tiny_config():
    return get_config("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_mige(tiny_config).eval()  # eval: T5 / Q-Former dropout off, so outputs compare exactly


def make_batch(config, counts: list[int], *, seed: int = 0) -> dict:
    """A synthetic training batch with ``counts[b]`` reference images in sample b."""
    gen = torch.Generator().manual_seed(seed)
    b, m, res, vres = len(counts), max(counts), config.resolution, config.vision_resolution
    tasks = ["subject" if c % 2 == 0 else "subject_edit" for c in counts]
    mask = torch.zeros(b, m, dtype=torch.bool)
    for i, c in enumerate(counts):
        mask[i, :c] = True
    return {
        "target": torch.rand(b, 3, res, res, generator=gen) * 2 - 1,
        "source": torch.rand(b, 3, res, res, generator=gen) * 2 - 1,
        "has_source": torch.tensor([t != "subject" for t in tasks]),
        "ref_pixels": torch.randn(b, m, 3, vres, vres, generator=gen),
        "ref_vae": torch.rand(b, m, 3, res, res, generator=gen) * 2 - 1,
        "ref_mask": mask,
        "instruction": [
            " and ".join([f"object {j} {PLACEHOLDER}" for j in range(c)]) or "a red ball" for c in counts
        ],
        "task": tasks,
    }


def prompts_of(batch: dict) -> list[str]:
    return [build_prompt(t, i) for t, i in zip(batch["task"], batch["instruction"], strict=True)]


class LinearModule(L.LightningModule):
    """The smallest trainable LightningModule, for tests of callbacks and loop behaviour."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 1), batch_size=2)


def bare_trainer(root, **kwargs) -> L.Trainer:
    """A CPU Trainer with no logger, progress bar, model summary or checkpointing."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        **kwargs,
    )

"""The smallest trainable module, a bare CPU Trainer, and the arguments that train the demo's
model from scratch."""

from __future__ import annotations

import lightning as L
import torch

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

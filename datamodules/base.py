"""What the three data modules share: the model's settings, bound late.

One data module per path, each with only the arguments its path needs (the CLI picks one through
``data.class_path``; ``fit`` / ``validate`` default to the training one):

- ``TrainingDataModule`` (``datamodules/training_data.py``): manifests / synthetic world →
  task-balanced training batches, and the held-out requests of Lightning's validation loop;
- ``RequestDataModule`` (``datamodules/requests.py``): a JSONL request file for ``predict``;
- ``BenchmarkDataModule`` (``datamodules/benchmarks.py``): a benchmark's test set for ``test``.

The model hands every one of them its image sizes, reference limit and VAE identity through
``connect()`` (called from the LightningModule's ``configure_model``), so data and model cannot
disagree.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L


class MIGEDataModule(L.LightningDataModule):
    """The base every data module here derives from (the CLI's ``data`` type)."""

    def __init__(self, *, num_workers: int = 0):
        super().__init__()
        self.num_workers = num_workers
        self.max_images: int | None = None
        self.vae_identity: str | None = None
        self.check_instructions: Callable | None = None

    def connect(
        self,
        *,
        max_images: int | None = None,
        vae_identity: str | None = None,
        check_instructions: Callable | None = None,
        **image_settings,
    ) -> None:
        """Late-bind the model's settings (litgpt-style): the module passes them all (``resolution``,
        ``vision_resolution``, ``vision_mean``, ``vision_std`` too); this base keeps the reference
        limit, the VAE identity and ``check_instructions`` (tasks, instructions, image counts → what
        of each instruction the model would not see), the training data module also the image settings."""
        self.max_images = max_images
        self.vae_identity = vae_identity
        self.check_instructions = check_instructions

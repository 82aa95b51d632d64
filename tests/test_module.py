"""The LightningModule: optimiser contents, warm-up, checkpoint metadata and reload."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from mige_lightning.module import MIGELightningModule
from mige_lightning.prompt import PROMPT_VERSION
from tests.conftest import make_batch


def test_optimiser_holds_exactly_the_trainable_parameters_with_spec_defaults():
    module = MIGELightningModule("tiny")
    module.configure_model()
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = list(module.model.encoder.vision.parameters()) + list(module.model.autoencoder.parameters())
    assert params and not any(id(p) in params for p in frozen)
    expected = {id(p) for p in module.model.parameters() if p.requires_grad}
    assert params == expected
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["eps"]) == (3e-2, 1e-10)
    lrs = []
    for _ in range(1500):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and abs(lrs[500] - 0.5e-5) < 1e-12 and lrs[1000] == lrs[1499] == 1e-5  # linear warm-up


def test_checkpoint_round_trip_restores_weights_and_records_prompt_version(tmp_path):
    torch.manual_seed(0)
    module = MIGELightningModule("tiny", warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    batch = make_batch(module.config, [1, 2])
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["mige"]["prompt_version"] == PROMPT_VERSION
    restored = MIGELightningModule.load_from_checkpoint(path)
    a, b = module.model.state_dict(), restored.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt["mige"]["prompt_version"] = PROMPT_VERSION + 1
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="prompt version"):
        MIGELightningModule.load_from_checkpoint(path)

"""Dataset transforms and collate: center-crop on the VAE path, batch-local reference padding."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from datamodules.dataset import MIGEDataset, collate
from datamodules.records import read_manifest
from mige_lightning.transforms import Transforms
from mige_world.synthetic import generate


def test_vae_path_resizes_short_side_then_center_crops_and_vit_path_squashes(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # wide image: left quarter red, right quarter blue
    arr[:, :10] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    arr[:, 10:30] = (0, 255, 0)
    t = Transforms(10, 8, (0.0,) * 3, (1.0,) * 3)
    img = Image.fromarray(arr)
    vae = t.vae(img)
    assert vae.shape == (3, 10, 10)
    assert torch.allclose(
        vae[:, 5, 5], torch.tensor([-1.0, 1.0, -1.0]), atol=0.05
    )  # the crop keeps the green centre
    assert (vae[0] < 0).all()  # no red column survives the centre crop
    vit = t.vit(img)
    assert vit.shape == (3, 8, 8) and vit[0, 4, 0] > 0.9 and vit[2, 4, 7] > 0.9  # whole image, squashed


def test_collate_pads_to_the_batch_maximum_with_a_mask(tmp_path):
    specs = generate(tmp_path, num_samples=40, size=16, seed=1)
    recs = [r for s in specs["train"] for r in read_manifest(s["path"], task=s["task"])[0]]
    ds = MIGEDataset(recs, Transforms(16, 8, (0.5,) * 3, (0.5,) * 3))
    one = [i for i, r in enumerate(recs) if len(r.references) == 1][:2]
    two = [i for i, r in enumerate(recs) if len(r.references) == 2][:1]
    single = collate([ds[i] for i in one])
    assert single["ref_mask"].shape == (2, 1) and single["ref_pixels"].shape == (2, 1, 3, 8, 8)
    mixed = collate([ds[i] for i in one + two])
    assert mixed["ref_mask"].tolist() == [[True, False], [True, False], [True, True]]
    assert mixed["ref_vae"].shape == (3, 2, 3, 16, 16) and mixed["ref_vae"][0, 1].abs().sum() == 0
    assert mixed["index"].tolist() == one + two
    assert mixed["has_source"].tolist() == [recs[i].source is not None for i in one + two]
    assert mixed["target"].min() >= -1 and mixed["target"].max() <= 1

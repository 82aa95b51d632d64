"""Fixtures shared by the tests: the ``tiny`` preset's config and a model built from it (random
init, on CPU). Helpers that are not fixtures live in ``tests/helpers/``."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mige_lightning.models import build_mige, get_config  # noqa: E402


@pytest.fixture
def tiny_config():
    return get_config("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_mige(tiny_config).eval()  # eval: T5 / Q-Former dropout off, so outputs compare exactly

"""Start a built model from a weights file (``model.init_weights``): safetensors only, no pickle.

Accepted: a ``model.safetensors`` written by ``convert-authors`` (keys of ``MIGE``) or by ``export``
(keys of the LightningModule, ``model.`` in front), or the folder holding it. Every tensor in the
file must land on a tensor of the model with the same shape; every tensor of the model must be in
the file, except the frozen autoencoder's (the authors' checkpoint has none: it then comes from
``model.pretrained.vae``) and weights tied to one that is (T5's input embedding).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mige_lightning.checkpoint_files import (
    dtype_problem,
    load_safetensors,
    nonfinite_message,
    nonfinite_problems,
)

log = logging.getLogger(__name__)

EXPORT_PREFIX = "model."


def weights_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"model.init_weights: '{path}' does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"model.init_weights: '{path}' is not a .safetensors file; convert the authors' .pth with "
            "`python -m mige_lightning convert-authors`, a training checkpoint with `export`"
        )
    return path


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter name that shares its tensor with an earlier one → that earlier name."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def load_weights(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Copy the file's tensors into ``model`` (float ones cast to its float dtype); returns the
    names of the model's tensors the file did not have (autoencoder only). Anything else — an
    unreadable file, a tensor of another shape or kind (integer / bool for float), NaN / inf — is
    an error naming the file and the keys."""
    file = weights_file(path)
    state = load_safetensors(file)
    if state and all(k.startswith(EXPORT_PREFIX) for k in state):
        state = {k[len(EXPORT_PREFIX) :]: v for k, v in state.items()}
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    kinds = [
        p for k in sorted(set(state) & set(own)) if (p := dtype_problem(k, state[k].dtype, own[k].dtype))
    ]
    # a tensor shared under several names is filled when the file has any one of them
    tied = tied_names(model)
    given = {tied.get(k, k) for k in state}
    missing = sorted(k for k in own if tied.get(k, k) not in given)
    not_vae = [k for k in missing if not k.startswith("autoencoder.")]
    if unexpected or wrong or not_vae or kinds:
        problems = []
        if unexpected:
            problems.append(f"{len(unexpected)} tensor(s) the model does not have: {unexpected[:5]}")
        if wrong:
            problems.append(
                f"{len(wrong)} of another shape: "
                + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5])
            )
        if not_vae:
            problems.append(f"{len(not_vae)} of the model's tensor(s) missing: {not_vae[:5]}")
        if kinds:
            problems.append(f"{len(kinds)} of another kind: " + ", ".join(kinds[:5]))
        raise ValueError(
            f"model.init_weights: {file} does not fit the configured model: " + "; ".join(problems)
        )
    nonfinite = nonfinite_problems(state)
    if nonfinite:
        raise ValueError(nonfinite_message(f"model.init_weights: {file}", nonfinite))
    model.load_state_dict(state, strict=False)
    if missing:
        log.info("model.init_weights: %s has no autoencoder; it comes from model.pretrained.vae", file)
    return missing

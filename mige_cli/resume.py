"""``fit --ckpt_path``: a resumed run continues the checkpoint's run.

LightningCLI replaces the model options with the checkpoint's saved hyper-parameters, so ``fit
--ckpt_path X --model.lr 0.5`` trained at the checkpoint's lr, and a changed architecture was
replaced by the checkpoint's, without a word. Here, before anything is built, every model option
the user gave (config files and command line) is compared with the checkpoint's:

- how to sample and score (``MIGELightningModule.RUNTIME_OPTIONS``) and how to run it (memory,
  speed, safety: ``ENGINEERING_OPTIONS``) may differ: the given values are used;
- anything else (the architecture, the pretrained sources, the diffusion and optimiser recipe,
  ``lr`` included) that differs is an error naming each key with both values. The optimiser's
  state (AdamW moments, the learning rate in its parameter groups, the schedule's position) is
  restored with the weights: a resumed run continues at the checkpoint's lr. Training on with
  another recipe is a new run from the checkpoint's weights (``export``, then
  ``fit --model.init_weights``).

Options the user did not give take the checkpoint's values, as before (``fit --config data.yaml
--ckpt_path X``). A sharded checkpoint (a folder), whose hyper-parameters LightningCLI does not
read, is compared with its ``meta.pt``: there the model is built from this run's config, so every
option (defaults included) must match. Keys a checkpoint predates are not compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mige_cli.config_overlays import leaves
from mige_lightning.module import MIGELightningModule

# how to run, not what is trained: the given value is used on resume
ENGINEERING_OPTIONS = (
    "gradient_checkpointing",
    "compile_dit",
    "meta_init",
    "fsdp_mixed_precision",
    "max_nonfinite_steps",
)
APPLIED_ON_RESUME = (*MIGELightningModule.RUNTIME_OPTIONS, *ENGINEERING_OPTIONS)


def _plain(value):
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


def _section_keys(section: Any) -> set[str]:
    if not isinstance(section, dict):
        return set()
    if isinstance(section.get("init_args"), dict):
        section = section["init_args"]
    return {k for k in section if k not in ("class_path", "init_args")}


def _file_model_keys(path: str) -> set[str]:
    """The model options a config file sets (nothing when it cannot be read: the parser says why)."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return set()
    section = config.get("model") if isinstance(config, dict) else None
    if isinstance(section, str):  # `model: model.yaml`, relative to the config file
        return _file_model_keys(str(Path(path).parent / section))
    return _section_keys(section)


def given_model_keys(argv: list[str]) -> set[str]:
    """The model options named in ``--config`` files and ``--model.…`` arguments."""
    keys: set[str] = set()
    argv = [str(a) for a in argv]
    for i, token in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if token in ("-c", "--config"):
            keys |= _file_model_keys(value)
        elif token.startswith("--config="):
            keys |= _file_model_keys(token.split("=", 1)[1])
        elif token.startswith("--model."):
            name = token[len("--model.") :].split("=", 1)[0].removeprefix("init_args.")
            keys.add(name.split(".", 1)[0].rstrip("+"))
        elif token == "--model" or token.startswith("--model="):
            given = token.split("=", 1)[1] if "=" in token else value
            try:
                loaded = yaml.safe_load(given)
            except yaml.YAMLError:
                loaded = None
            keys |= _file_model_keys(given) if isinstance(loaded, str) else _section_keys(loaded)
    return keys


def _saved_hparams(ckpt_path: str) -> dict | None:
    """A sharded checkpoint folder's saved hyper-parameters (its ``meta.pt``)."""
    import torch

    meta = Path(ckpt_path) / "meta.pt"
    if not meta.is_file():
        return None
    return torch.load(meta, map_location="cpu", weights_only=True).get("hyper_parameters")


def _differences(key: str, saved: Any, given: Any, label: str = "given") -> list[str]:
    saved, given = _plain(saved), _plain(given)
    if saved == given:
        return []
    if isinstance(saved, dict) and isinstance(given, dict):
        a, b = leaves(saved), leaves(given)
        return [
            f"model.{key}.{k}: the checkpoint's {json.dumps(a[k]) if k in a else '(unset)'}, "
            f"{label} {json.dumps(b[k]) if k in b else '(unset)'}"
            for k in dict.fromkeys([*a, *b])
            if a.get(k, ...) != b.get(k, ...)
        ]
    return [f"model.{key}: the checkpoint's {json.dumps(saved)}, {label} {json.dumps(given)}"]


def check_resume(section, given_config: dict, given_keys: set[str]) -> None:
    """``section``: fit's config after LightningCLI applied the checkpoint's hyper-parameters;
    ``given_config``: its model options before. Options to apply are set back to the given values;
    any other given option that differs from the checkpoint's is an error naming each."""
    model = section["model"]
    ckpt_path = str(section["ckpt_path"])
    saved = _saved_hparams(ckpt_path) if Path(ckpt_path).is_dir() else None
    problems = []
    for key in sorted(given_keys & set(given_config)):
        if key in APPLIED_ON_RESUME:
            model[key] = given_config[key]
        elif saved is None:  # a file: LightningCLI replaced the given values with the checkpoint's
            problems += _differences(key, model[key], given_config[key])
    if saved is not None:  # a sharded folder: nothing was replaced, the model is built from this config
        for key in sorted(set(saved) & set(given_config) - set(APPLIED_ON_RESUME)):
            label = "given" if key in given_keys else "this run's default"
            problems += _differences(key, saved[key], given_config[key], label)
    if problems:
        raise ValueError(
            f"--ckpt_path {ckpt_path}: a resumed run continues the checkpoint's run (its architecture and "
            "recipe; the optimiser's state, its learning rate included, is restored with the weights), "
            "but these options differ from the ones it was trained with:\n  "
            + "\n  ".join(problems)
            + "\nGive the checkpoint's values (or leave the options out) to resume it. To train on with "
            "these, start a new run from its weights: `python -m mige_lightning export --ckpt_path … "
            "--output <dir>` (with the run's config), then `fit --model.init_weights=<dir>` without "
            f"--ckpt_path. These may differ and are applied on resume: {', '.join(APPLIED_ON_RESUME)}."
        )

"""``python -m mige_lightning export``: a training checkpoint → one ``safetensors`` file + config.

    python -m mige_lightning export --config configs/mige_xl.yaml --config configs/trainer/fsdp.yaml \\
        --ckpt_path runs/mige_xl/slurm_123/checkpoints/last.ckpt --output exports/mige_xl [--weights ema] \
        [--overwrite]

The checkpoint is a sharded folder (``ModelParallelStrategy``: ``.distcp`` shards + ``meta.pt``) or
a single ``.ckpt`` file; it is read in one process, whatever the world size that wrote it. The
config describes the model, as for ``fit`` (a checkpoint of another architecture is an error
naming the field). Writes ``<output>/model.safetensors`` (the module's whole state dict, full
tensors; tied weights once) and ``<output>/config.json`` (hyper-parameters, the resolved
``MIGEConfig``, which weights, the step). An output folder that exists and is not empty is
refused unless ``--overwrite``. A checkpoint holding NaN / inf weights is refused naming them.
``load_exported(<output>)`` rebuilds the module on one device; ``module.pipeline()`` samples from it.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from mige_cli.cli import CLI_CLASSES, MIGECLI
from mige_lightning.checkpoint_files import open_safetensors, refuse_nonfinite
from mige_lightning.checkpoint_state import EMA_PREFIX, SHARDED_EMA_KEY, load_checkpoint_file
from mige_lightning.module import MIGELightningModule
from mige_lightning.prompt import PROMPT_VERSION

FORMAT = "mige_cli.export/1"
WEIGHTS = ("auto", "raw", "ema")


class _ModelOnlyCLI(MIGECLI):
    """Parses fit's config and builds the model and data module, but no Trainer (no devices needed)."""

    def instantiate_trainer(self, **kwargs):
        return None


def read_checkpoint(module: MIGELightningModule, path: Path) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Load the checkpoint's weights into ``module`` (built, unsharded); returns its metadata and
    the EMA weights (full tensors) when it has them."""
    params = dict(module.named_parameters())
    if (path / "meta.pt").is_file():  # sharded: read every rank's shards here, in one process
        meta = load_checkpoint_file(path / "meta.pt")
        _check_same_model(module, meta, path)
        _load_shards(module.state_dict(), path)
        ema = None
        if meta.get(SHARDED_EMA_KEY):
            ema = {EMA_PREFIX + n: torch.empty_like(params[n]) for n in meta[SHARDED_EMA_KEY]}
            _load_shards(ema, path)
            ema = {n[len(EMA_PREFIX) :]: t for n, t in ema.items()}
        refuse_nonfinite(
            {**module.state_dict(), **{f"ema.{n}": t for n, t in (ema or {}).items()}}, str(path)
        )
        return meta, ema
    if path.is_file():
        ckpt = load_checkpoint_file(path)
        _check_same_model(module, ckpt, path)
        refuse_nonfinite(
            {**ckpt["state_dict"], **{f"ema.{n}": t for n, t in (ckpt.get("ema") or {}).items()}}, str(path)
        )
        module.load_state_dict(ckpt.pop("state_dict"))
        return ckpt, ckpt.pop("ema", None)
    raise FileNotFoundError(
        f"--ckpt_path: '{path}' is neither a checkpoint file nor a sharded checkpoint folder"
    )


def _load_shards(state: dict[str, torch.Tensor], path: Path) -> None:
    """Fill ``state`` (full tensors, in place) from the ``state_dict`` shards of every rank."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "torch.distributed is disabled … single process": intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"state_dict": state}, checkpoint_id=str(path), no_dist=True)


def _check_same_model(module: MIGELightningModule, meta: dict, path: Path) -> None:
    saved = meta.get("mige", {})
    if saved.get("prompt_version", PROMPT_VERSION) != PROMPT_VERSION:
        raise ValueError(
            f"{path}: trained with prompt version {saved['prompt_version']}, this code builds {PROMPT_VERSION}"
        )
    mine = module.config.to_dict()
    for field, value in saved.get("config", {}).items():
        if field != "pretrained" and _plain(mine.get(field)) != _plain(value):
            raise ValueError(
                f"model.{field}: the config builds {mine.get(field)!r} but {path} was trained with {value!r}"
            )


def _plain(value):
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(value))


def check_output(output: str | Path, *, overwrite: bool) -> None:
    """An existing, non-empty output folder (or a file there) is refused unless ``overwrite``."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output: {output} is a file, not a folder")
    if not overwrite and output.is_dir() and any(output.iterdir()):
        held = sorted(p.name for p in output.iterdir())
        raise FileExistsError(
            f"--output: {output} is not empty ({', '.join(held[:5])}{', …' if len(held) > 5 else ''}); "
            "choose another folder, or give --overwrite to write model.safetensors and config.json into it"
        )


def export_checkpoint(
    module: MIGELightningModule,
    ckpt_path: str | Path,
    output: str | Path,
    *,
    weights: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write ``output/model.safetensors`` + ``output/config.json``; returns the safetensors path."""
    if weights not in WEIGHTS:
        raise ValueError(f"--weights: {weights!r}; choose one of {WEIGHTS}")
    check_output(output, overwrite=overwrite)
    ckpt_path, output = Path(ckpt_path), Path(output)
    module.configure_model()
    meta, ema = read_checkpoint(module, ckpt_path)
    if weights == "ema" and not ema:
        raise ValueError(f"--weights ema: {ckpt_path} has no EMA weights (train with callbacks.ema.EMA)")
    use_ema = weights == "ema" or (weights == "auto" and bool(ema))
    if use_ema:
        module._ema_weights = ema
        module.use_ema_weights()
    output.mkdir(parents=True, exist_ok=True)
    target = output / "model.safetensors"
    save_model(module, str(target), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "hparams": _plain({k: v for k, v in module.hparams.items() if not k.startswith("_")}),
        "mige_config": _plain(module.config.to_dict()),
        "weights": "ema" if use_ema else "raw",
        "global_step": meta.get("global_step"),
        "prompt_version": PROMPT_VERSION,
        "checkpoint": str(ckpt_path),
    }
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def load_exported(directory: str | Path, *, device: str | torch.device = "cpu") -> MIGELightningModule:
    """An exported model on one device, in eval mode (``.pipeline()`` samples from it)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{directory}/config.json: not a {FORMAT} export")
    if config["prompt_version"] != PROMPT_VERSION:
        raise ValueError(
            f"{directory}: exported with prompt version {config['prompt_version']}, this code builds {PROMPT_VERSION}"
        )
    module = MIGELightningModule(**config["hparams"])
    module.configure_model()
    weights = directory / "model.safetensors"
    with open_safetensors(weights):  # an unreadable file: named, with the reason
        pass
    load_model(module, str(weights), strict=True, device=str(device))
    return module.to(device).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mige_lightning export",
        description="Write one safetensors file + config.json from a (sharded) training checkpoint. "
        "Other arguments (--config …, --model.…) describe the model, as for `fit`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="sharded checkpoint folder or .ckpt file")
    parser.add_argument("--output", required=True, help="directory for model.safetensors + config.json")
    parser.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS,
        help="auto: the EMA weights when the checkpoint has them",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into an --output folder that is not empty"
    )
    return parser


def export_main(argv: list[str]) -> Path:
    args, rest = build_parser().parse_known_args(argv)
    check_output(args.output, overwrite=args.overwrite)  # before the model is built
    with warnings.catch_warnings():  # LightningCLI warns when args and sys.argv both exist
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ModelOnlyCLI(**CLI_CLASSES, args=rest, run=False)
    target = export_checkpoint(
        cli.model, args.ckpt_path, args.output, weights=args.weights, overwrite=args.overwrite
    )
    print(f"wrote {target} and {target.parent / 'config.json'}")
    return target

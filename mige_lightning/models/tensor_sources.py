"""Where each pretrained tensor of MIGE lives on disk, and reading just the rows a rank owns.

Used by the sharded start (``mige_lightning/sharding.py::build_sharded_mige``): the model is a
skeleton until its shards exist, so instead of ``from_pretrained`` each of its parameters is mapped
to a tensor in a safetensors file — of ``model.init_weights`` when given (every tensor), else of the
component's pretrained source (T5, the BLIP-2 vision tower / Q-Former / query tokens / language
projection, the PixArt DiT) — and each rank reads the rows of its own shard with
``safe_open(...).get_slice``. A tensor missing from its file, of another shape or kind (integer /
bool where the model's is float), or a file that is not safetensors is an error naming the file and
the key; rows holding NaN / inf are reported by ``load_local_rows``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, Shard
from transformers.utils import cached_file

from mige_lightning.checkpoint_files import dtype_problem, nonfinite_count, open_safetensors
from mige_lightning.models.weights import EXPORT_PREFIX, tied_names, weights_file
from mige_lightning.sources import resolve_source


@dataclass(frozen=True)
class TensorSource:
    file: str
    key: str
    widen: bool = False  # the DiT's patch embedding: the file's input channels first, the rest zero


def safetensors_keys(source: str, *, config_key: str, subfolder: str | None, filename: str) -> dict[str, str]:
    """Key → file for a (possibly sharded) safetensors checkpoint: a hub id or a local folder."""
    source = resolve_source(source, key=config_key)
    kwargs = dict(subfolder=subfolder, _raise_exceptions_for_missing_entries=False)
    index = cached_file(source, filename + ".index.json", **kwargs)
    if index is not None:
        weight_map: dict[str, str] = json.loads(Path(index).read_text())["weight_map"]
        files = {f: cached_file(source, f, subfolder=subfolder) for f in set(weight_map.values())}
        return {k: files[f] for k, f in weight_map.items()}
    single = cached_file(source, filename, **kwargs)
    if single is None:
        where = f"{source}/{subfolder}" if subfolder else source
        raise FileNotFoundError(
            f"{config_key}: '{where}' has no {filename} (or its .index.json); the sharded start reads "
            "safetensors only — convert the checkpoint, or set model.meta_init: false"
        )
    with open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), single)  # noqa: SIM118 (safe_open is not a dict)


def tensor_sources(
    config, model: torch.nn.Module, *, init_weights: str | None = None
) -> dict[str, TensorSource]:
    """Parameter or buffer name of ``model`` → where its pretrained value is. Names absent from the
    result are drawn at random (or, for the frozen autoencoder, were built whole)."""
    if init_weights is not None:
        return _from_weights_file(model, init_weights)
    names = [n for n, _ in model.named_parameters()]
    src = config.pretrained
    components: list[tuple[str, str, dict[str, str], str]] = []  # (our prefix, file prefix, keys, config key)
    if src.t5 is not None:
        keys = safetensors_keys(
            src.t5, config_key="model.pretrained.t5", subfolder=None, filename="model.safetensors"
        )
        components.append(("encoder.t5.", "", keys, "model.pretrained.t5"))
    if src.blip2 is not None:
        keys = safetensors_keys(
            src.blip2, config_key="model.pretrained.blip2", subfolder=None, filename="model.safetensors"
        )
        components += [
            ("encoder.vision.", "vision_model.", keys, "model.pretrained.blip2"),
            ("encoder.qformer.", "qformer.", keys, "model.pretrained.blip2"),
            ("encoder.adapter.query_tokens", "query_tokens", keys, "model.pretrained.blip2"),
        ]
        if "language_projection.weight" in keys:
            components.append(
                ("encoder.adapter.projection.", "language_projection.", keys, "model.pretrained.blip2")
            )
    if src.dit is not None:
        keys = safetensors_keys(
            src.dit,
            config_key="model.pretrained.dit",
            subfolder=src.dit_subfolder,
            filename="diffusion_pytorch_model.safetensors",
        )
        components.append(("dit.", "", keys, "model.pretrained.dit"))
    aliases = defaultdict(list)  # a tied weight may be saved under any of its names
    for name, first in tied_names(model).items():
        aliases[first].append(name)
    shapes = dict(model.named_parameters())
    out: dict[str, TensorSource] = {}
    headers: dict[str, dict] = {}
    problems = []
    for prefix, file_prefix, keys, config_key in components:
        for name in names:
            if not (name == prefix or (prefix.endswith(".") and name.startswith(prefix))):
                continue
            candidates = [
                file_prefix + n[len(prefix) :] for n in [name, *aliases[name]] if n.startswith(prefix)
            ]
            key = next((k for k in candidates if k in keys), None)
            if key is None:
                problems.append(f"{config_key}: no tensor '{candidates[0]}' (for {name})")
                continue
            out[name] = TensorSource(keys[key], key, widen=name == "dit.pos_embed.proj.weight")
            problems += _shape_problem(out[name], shapes[name], config_key, headers)
    if problems:
        raise ValueError("pretrained weights do not fit the model: " + "; ".join(problems[:8]))
    return out


def _shape_problem(
    source: TensorSource, target: torch.Tensor, config_key: str, headers: dict[str, dict]
) -> list[str]:
    """The file's tensor against the model's ``target`` (shape and kind of dtype). ``headers``:
    file → its tensors' shapes and dtypes, filled as files are first met (one read each)."""
    if source.file not in headers:
        with open_safetensors(source.file) as f:
            headers[source.file] = {
                k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                for k in f.keys()  # noqa: SIM118
            }
    file_shape, file_dtype = headers[source.file][source.key]
    shape = tuple(target.shape)
    kind = dtype_problem(source.key, file_dtype, target.dtype)
    if kind:
        return [f"{config_key}: {source.file} {kind}"]
    fits = file_shape == shape or (
        source.widen
        and len(file_shape) == len(shape)
        and file_shape[0] == shape[0]
        and file_shape[1] <= shape[1]
        and file_shape[2:] == shape[2:]
    )
    if fits:
        return []
    return [f"{config_key}: {source.file} '{source.key}' is {file_shape}, the model needs {shape}"]


def _from_weights_file(model: torch.nn.Module, path: str) -> dict[str, TensorSource]:
    """Every tensor from one ``model.safetensors`` (same rules as ``weights.load_weights``)."""
    file = str(weights_file(path))
    with open_safetensors(file) as f:
        keys = list(f.keys())  # noqa: SIM118
    prefix = EXPORT_PREFIX if keys and all(k.startswith(EXPORT_PREFIX) for k in keys) else ""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tied = tied_names(model)
    out, problems, headers = {}, [], {}
    for key in keys:
        name = tied.get(key[len(prefix) :], key[len(prefix) :])
        if name not in own:
            problems.append(f"a tensor the model does not have: {key}")
            continue
        out[name] = TensorSource(file, key)
        problems += _shape_problem(out[name], own[name], "model.init_weights", headers)
    missing = [n for n, _ in model.named_parameters() if n not in out and not n.startswith("autoencoder.")]
    if missing:
        problems.append(f"{len(missing)} of the model's tensor(s) missing: {missing[:5]}")
    if problems:
        raise ValueError(
            f"model.init_weights: {file} does not fit the configured model: " + "; ".join(problems[:8])
        )
    return out


def local_rows(tensor: torch.Tensor) -> tuple[int, int]:
    """The rows of dim 0 this rank holds: FSDP2 shards dim 0 as ``torch.chunk`` does."""
    rows = tensor.shape[0] if tensor.ndim else 1
    if not isinstance(tensor, DTensor):
        return 0, rows
    if tensor.placements != (Shard(0),):
        raise ValueError(f"expected a dim-0 shard, got placements {tensor.placements}")
    mesh = tensor.device_mesh
    chunk = math.ceil(rows / mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if tensor.to_local().shape[0] != stop - start:
        raise RuntimeError(f"local shard has {tensor.to_local().shape[0]} rows, expected {stop - start}")
    return start, stop


@torch.no_grad()
def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def load_local_rows(model: torch.nn.Module, sources: dict[str, TensorSource]) -> list[str]:
    """Copy each source's rows for this rank into the model's (local shard of the) tensor; returns
    what was read holding NaN / inf (file, key, rows), for the caller to refuse on every rank.

    The file is opened per tensor: safetensors maps it into memory, and the pages a rank has read
    count as its resident memory until the mapping closes — per file, that would add the rank's
    part of a whole multi-GB shard file to its peak instead of one tensor's rows.
    """
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    nonfinite = []
    for name, source in sources.items():
        target = tensors[name]
        start, stop = local_rows(target)
        local = local_part(target)
        if stop == start:
            continue
        with open_safetensors(source.file) as f:
            rows = f.get_tensor(source.key) if local.ndim == 0 else f.get_slice(source.key)[start:stop]
        rows = rows.to(local.dtype)  # a float cast (other kinds were refused by tensor_sources)
        if count := nonfinite_count(rows):
            where = "" if local.ndim == 0 else f" rows {start}:{stop}"
            nonfinite.append(f"{source.file} '{source.key}'{where} (for {name}): {count}")
            continue
        if local.ndim == 0:
            local.copy_(rows)
            continue
        if source.widen and rows.shape[1] < local.shape[1]:
            local.zero_()
            local[:, : rows.shape[1]].copy_(rows)
        else:
            local.copy_(rows)
    return nonfinite

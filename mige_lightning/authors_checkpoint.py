"""The authors' released ``model.pth`` → our model (``python -m mige_lightning convert-authors``,
whose command line is ``mige_cli/convert_authors.py``).

The authors' file is a ``torch.save``d dict whose ``state_dict`` holds their whole ``MIGE`` module
(LAVIS EVA ViT-g and Q-Former, T5-XXL encoder, fusion module, original-PixArt DiT names) with no
prefix, in bf16. It is read with ``weights_only=True`` (memory-mapped): a file that needs arbitrary
unpickling is refused, never executed. Every tensor is renamed (and, where the layouts differ,
split or joined) onto our modules by ``authors_to_ours``; the conversion fails unless every source
tensor is used exactly once, every tensor of our model (bar the autoencoder, which the authors'
file does not hold) is filled, and every shape matches the model ``--preset`` builds. Written:

- ``model.safetensors`` — our ``MIGE`` tensors, in the file's dtype (tied T5 embedding once);
- ``config.yaml`` — the ``model:`` section that loads it (``init_weights``), with the authors'
  behaviour switches (``AUTHORS_BEHAVIOUR``), their tokenizer, the VAE and their inference prompts;
- ``report.json`` — what was mapped how, per group, what was dropped and why, and the check of the
  saved DiT position table against the one recomputed here.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from mige_lightning.checkpoint_files import CodeInCheckpoint, dtype_name, load_torch_file, nonfinite_count
from mige_lightning.models.presets import AUTHORS_BEHAVIOUR, MIGEConfig, get_config
from mige_lightning.models.weights import tied_names

FORMAT = "mige_lightning.authors/1"

# authors' key pattern → our key template; "how" says how the tensor is placed:
#   copy; drop (no counterpart, reason given); qkv_bias:q / qkv_bias:v (EVA keeps separate q and v
#   biases, the k bias is zero: ours is one fused bias = q ⊕ 0 ⊕ v); split:i/n (the i-th of n equal
#   parts along dim 0: PixArt's fused qkv / kv projections → diffusers' to_q / to_k / to_v)
_VIT = r"visual_encoder\.blocks\.(\d+)\."
_OUR_VIT = r"encoder.vision.encoder.layers.\1."
_BLOCK = r"blocks\.(\d+)\."
_OUR_BLOCK = r"dit.transformer_blocks.\1."
_FUSION = "encoder.adapter.fusion."
RULES: list[tuple[str, list[tuple[str, str]]]] = [
    # EVA ViT-g (LAVIS) → transformers Blip2VisionModel
    (r"visual_encoder\.cls_token", [("encoder.vision.embeddings.class_embedding", "copy")]),
    (r"visual_encoder\.pos_embed", [("encoder.vision.embeddings.position_embedding", "copy")]),
    (
        r"visual_encoder\.patch_embed\.proj\.(\w+)",
        [(r"encoder.vision.embeddings.patch_embedding.\1", "copy")],
    ),
    (_VIT + r"norm([12])\.(\w+)", [(_OUR_VIT + r"layer_norm\2.\3", "copy")]),
    (_VIT + r"attn\.qkv\.weight", [(_OUR_VIT + "self_attn.qkv.weight", "copy")]),
    (_VIT + r"attn\.q_bias", [(_OUR_VIT + "self_attn.qkv.bias", "qkv_bias:q")]),
    (_VIT + r"attn\.v_bias", [(_OUR_VIT + "self_attn.qkv.bias", "qkv_bias:v")]),
    (_VIT + r"attn\.proj\.(\w+)", [(_OUR_VIT + r"self_attn.projection.\2", "copy")]),
    (_VIT + r"mlp\.(fc[12])\.(\w+)", [(_OUR_VIT + r"mlp.\2.\3", "copy")]),
    (r"ln_vision\.(\w+)", [(r"encoder.vision.post_layernorm.\1", "copy")]),
    # Q-Former (LAVIS BertModel) → transformers Blip2QFormerModel
    (r"Qformer\.bert\.embeddings\.position_ids", [("", "drop:an index buffer; transformers has none")]),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(\w+)", [(r"encoder.qformer.layernorm.\1", "copy")]),
    (
        r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(.+)",
        [(r"encoder.qformer.encoder.layer.\1.\2.attention.\3", "copy")],
    ),
    (r"Qformer\.bert\.encoder\.(.+)", [(r"encoder.qformer.encoder.\1", "copy")]),
    (r"query_tokens", [("encoder.adapter.query_tokens", "copy")]),
    # T5 encoder: the same names under another prefix
    (r"t5_model\.(.+)", [(r"encoder.t5.\1", "copy")]),
    (r"t5_proj\.(\w+)", [(r"encoder.adapter.projection.\1", "copy")]),
    # fusion module
    (r"FFM\.q_proj_1\.(\w+)", [(_FUSION + r"q_proj.\1", "copy")]),
    (r"FFM\.([kv])_proj_1\.(\d)\.(\w+)", [(_FUSION + r"\1_mlp.\2.\3", "copy")]),
    (r"FFM\.ln_([qkv])_1\.(\w+)", [(_FUSION + r"\1_norm.\2", "copy")]),
    (r"FFM\.ln_out\.(\w+)", [(_FUSION + r"out_norm.\1", "copy")]),
    (r"FFM\.clip_attn\.(.+)", [(_FUSION + r"attn.\1", "copy")]),
    (r"FFM\.mlp\.(\w+)", [(_FUSION + r"out_proj.\1", "copy")]),
    # DiT: original PixArt names → diffusers PixArtTransformer2DModel
    (r"pos_embed", [("", "drop:a fixed sin-cos table diffusers recomputes (compared in the report)")]),
    (r"y_embedder\.y_embedding", [("encoder.adapter.null_condition", "copy")]),
    (r"x_embedder\.proj\.(\w+)", [(r"dit.pos_embed.proj.\1", "copy")]),
    (r"t_embedder\.mlp\.0\.(\w+)", [(r"dit.adaln_single.emb.timestep_embedder.linear_1.\1", "copy")]),
    (r"t_embedder\.mlp\.2\.(\w+)", [(r"dit.adaln_single.emb.timestep_embedder.linear_2.\1", "copy")]),
    (r"t_block\.1\.(\w+)", [(r"dit.adaln_single.linear.\1", "copy")]),
    (r"y_embedder\.y_proj\.fc([12])\.(\w+)", [(r"dit.caption_projection.linear_\1.\2", "copy")]),
    (_BLOCK + r"scale_shift_table", [(_OUR_BLOCK + "scale_shift_table", "copy")]),
    (
        _BLOCK + r"attn\.qkv\.(\w+)",
        [(_OUR_BLOCK + f"attn1.to_{c}." + r"\2", f"split:{i}/3") for i, c in enumerate("qkv")],
    ),
    (_BLOCK + r"attn\.proj\.(\w+)", [(_OUR_BLOCK + r"attn1.to_out.0.\2", "copy")]),
    (_BLOCK + r"cross_attn\.q_linear\.(\w+)", [(_OUR_BLOCK + r"attn2.to_q.\2", "copy")]),
    (
        _BLOCK + r"cross_attn\.kv_linear\.(\w+)",
        [(_OUR_BLOCK + f"attn2.to_{c}." + r"\2", f"split:{i}/2") for i, c in enumerate("kv")],
    ),
    (_BLOCK + r"cross_attn\.proj\.(\w+)", [(_OUR_BLOCK + r"attn2.to_out.0.\2", "copy")]),
    (_BLOCK + r"mlp\.fc1\.(\w+)", [(_OUR_BLOCK + r"ff.net.0.proj.\2", "copy")]),
    (_BLOCK + r"mlp\.fc2\.(\w+)", [(_OUR_BLOCK + r"ff.net.2.\2", "copy")]),
    (r"final_layer\.scale_shift_table", [("dit.scale_shift_table", "copy")]),
    (r"final_layer\.linear\.(\w+)", [(r"dit.proj_out.\1", "copy")]),
]
_COMPILED = [(re.compile(pattern), targets) for pattern, targets in RULES]
GROUPS = ("visual_encoder", "ln_vision", "Qformer", "query_tokens", "t5_model", "t5_proj", "FFM")


def authors_to_ours(key: str) -> list[tuple[str, str]] | None:
    """The authors' tensor name → ``[(our name, how), …]`` (see ``RULES``); None if no rule fits."""
    for pattern, targets in _COMPILED:
        match = pattern.fullmatch(key)
        if match:
            return [(match.expand(ours) if ours else "", how) for ours, how in targets]
    return None


def group_of(key: str) -> str:
    head = key.split(".", 1)[0]
    return head if head in GROUPS else "dit"


@dataclass
class Conversion:
    state: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)


class ConversionError(ValueError):
    pass


def convert_state_dict(
    source: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    *,
    tied: dict[str, str] | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
) -> Conversion:
    """Map the authors' tensors onto ours. ``expected``: our model's tensor shapes (autoencoder
    left out); ``tied``: our names that share a tensor with an earlier name (written once);
    ``dtypes``: our tensors' dtypes (an integer / bool tensor of the file for a float one of ours
    is a problem, not a cast). A tensor of the file holding NaN / inf is a problem too (unless
    dropped). Raises ``ConversionError`` listing every problem at once."""
    tied = tied or {}
    problems: list[str] = []
    out: dict[str, torch.Tensor] = {}
    made_from: dict[str, str] = {}
    how_counts: Counter = Counter()
    per_group: Counter = Counter()
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in source.items():
        targets = authors_to_ours(key)
        if targets is None:
            unknown.append(key)
            continue
        per_group[group_of(key)] += 1
        for ours, how in targets:
            how_counts[how.split(":")[0]] += 1
            if how.startswith("drop"):
                dropped[key] = how.split(":", 1)[1]
                continue
            wanted = (dtypes or {}).get(ours)
            if wanted is not None and tensor.is_floating_point() != wanted.is_floating_point:
                kind = "float" if wanted.is_floating_point else dtype_name(wanted)
                problems.append(
                    f"{key} is {dtype_name(tensor.dtype)} where our {kind} tensor {ours} is expected"
                )
            if how.startswith("qkv_bias"):
                qkv_parts.setdefault(ours, {})[how.split(":")[1]] = tensor
                continue
            if ours in made_from:
                problems.append(f"{ours} would be filled twice (from {made_from[ours]} and {key})")
                continue
            made_from[ours] = key
            if how.startswith("split"):
                i, n = map(int, how.split(":")[1].split("/"))
                if tensor.shape[0] % n:
                    problems.append(f"{key}: {tuple(tensor.shape)} does not split into {n} along dim 0")
                    continue
                out[ours] = tensor.chunk(n, dim=0)[i]
            else:
                out[ours] = tensor
    for ours, parts in qkv_parts.items():
        if set(parts) != {"q", "v"}:
            problems.append(f"{ours}: needs both q_bias and v_bias, the file has only {sorted(parts)}_bias")
            continue
        made_from[ours] = "q_bias + v_bias"
        out[ours] = torch.cat([parts["q"], torch.zeros_like(parts["q"]), parts["v"]])
    # tied tensors are written once: a later name must equal the first
    for name, first in tied.items():
        if name in out and first in out:
            if out[name].device.type != "meta" and not torch.equal(out[name], out[first]):
                problems.append(f"{name} and {first} are one tensor in our model but differ in the file")
            out.pop(name)
        elif name in out:
            out[first] = out.pop(name)
    need = {k: v for k, v in expected.items() if k not in tied}
    missing = sorted(set(need) - set(out))
    extra = sorted(set(out) - set(need))
    shapes = sorted(k for k in set(out) & set(need) if tuple(out[k].shape) != tuple(need[k]))
    nonfinite = [
        f"{key} ({count})"
        for key, tensor in source.items()
        if key not in dropped and key not in unknown and (count := nonfinite_count(tensor))
    ]
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensor(s) of the file are not finite: {', '.join(nonfinite[:8])}")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) of the file match no rule: {unknown[:8]}")
    if missing:
        problems.append(f"{len(missing)} of our tensor(s) get no value: {missing[:8]}")
    if extra:
        problems.append(
            f"{len(extra)} converted tensor(s) the configured model does not have: "
            + ", ".join(f"{k} (from {made_from.get(k)})" for k in extra[:8])
        )
    if shapes:
        problems.append(
            f"{len(shapes)} shape mismatch(es): "
            + ", ".join(f"{k} {tuple(out[k].shape)} vs ours {tuple(need[k])}" for k in shapes[:8])
        )
    if problems:
        raise ConversionError(
            "the authors' checkpoint does not convert onto this model:\n- " + "\n- ".join(problems)
        )
    report = {
        "source_tensors": len(source),
        "written_tensors": len(out),
        "by_group": dict(sorted(per_group.items())),
        "by_rule": dict(sorted(how_counts.items())),
        "dropped": dropped,
        "tied_written_once": {n: f for n, f in tied.items() if f in out},
    }
    return Conversion(out, report)


def read_authors_checkpoint(
    path: str | Path, *, key: str = "state_dict"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of the authors' file (under ``key``, or the whole file when it is a bare state
    dict) and the names of its other top-level entries. Only ``weights_only`` loading: a file
    whose unpickling could run code is refused."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--input: '{path}' does not exist")
    try:  # memory-mapped; unreadable files are named with the reason (checkpoint_files)
        obj = load_torch_file(path, mmap=True)
    except CodeInCheckpoint as err:
        raise ConversionError(
            f"{path}: refused: reading it needs arbitrary unpickling, which can run code from the file. "
            "Only tensors, containers and plain numbers are read (weights_only=True). "
            f"First reason given by torch: {str(err).rsplit(': ', 1)[-1]}"
        ) from None
    if not isinstance(obj, dict):
        raise ConversionError(
            f"{path}: expected a dict (the authors save {{'state_dict': …}}), found {type(obj).__name__}"
        )
    if key in obj and isinstance(obj[key], dict):
        state, others = obj[key], sorted(k for k in obj if k != key)
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, others = obj, []
    else:
        raise ConversionError(f"{path}: no '{key}' entry; top-level entries: {sorted(obj)[:10]}")
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConversionError(f"{path}: '{key}' holds non-tensor entries: {bad[:5]}")
    return state, others


def target_model(config: MIGEConfig) -> torch.nn.Module:
    """Our model for ``config`` on the meta device: its tensor names and shapes, no memory."""
    from dataclasses import replace

    from mige_lightning.models.loading import PretrainedSources
    from mige_lightning.models.mige import build_mige

    shapes_only = replace(config, pretrained=PretrainedSources(tokenizer="byte"))
    with torch.device("meta"):
        return build_mige(shapes_only)


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict(keep_vars=True).items()
        if not k.startswith("autoencoder.")
    }


def position_table_check(model: torch.nn.Module, saved: torch.Tensor | None) -> dict:
    """Compare the file's DiT position table with the one diffusers computes for our model.

    On the authors' real file the table is bf16, so ``max_abs_diff`` reads about 0.002 (bf16
    rounding of values in [0.5, 1): up to 2**-9), not 0; only a float32 file gives ~0."""
    if saved is None:
        return {"present": False}
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    embed = model.dit.pos_embed
    ours = get_2d_sincos_pos_embed(
        saved.shape[-1],
        (embed.height, embed.width),
        base_size=embed.base_size,
        interpolation_scale=embed.interpolation_scale,
        output_type="pt",
    ).float()
    if tuple(saved.shape[-2:]) != tuple(ours.shape):
        return {"present": True, "shape": list(saved.shape), "ours": list(ours.shape), "max_abs_diff": None}
    return {
        "present": True,
        "shape": list(saved.shape),
        "max_abs_diff": float((saved.float().reshape(ours.shape) - ours).abs().max()),
    }


def model_config_yaml(
    *, preset: str, overrides: dict, weights: Path, tokenizer: str | None, vae: str | None, source: Path
) -> str:
    """The ``model:`` section that builds our model and loads the converted weights into it."""
    model = {
        "preset": preset,
        "overrides": overrides,
        # every source named (config files merge model.pretrained key by key): none of the run
        # config's own (e.g. a null_embedding) carries over onto the converted weights
        "pretrained": {
            "t5": None,
            "blip2": None,
            "dit": None,
            "dit_subfolder": None,
            "tokenizer": tokenizer,
            "vae": vae,
            "vae_subfolder": None,
            "null_embedding": None,
        },
        "init_weights": str(weights.resolve()),
        "prompt_style": "authors_inference",
        # sample and score as the authors' release does (mige_lightning/protocol.py)
        "protocol": "authors",
    }
    header = (
        f"# Written by `python -m mige_lightning convert-authors` from {source}.\n"
        "# Add after the run's own config, e.g.\n"
        "#   python -m mige_lightning predict --config configs/mige_xl.yaml --config <this file> ...\n"
        "# Config files merge model.overrides key by key: after a config with overrides of its own,\n"
        "# clear them first (--model.overrides=null --config <this file>).\n"
        "# The overrides make the model compute what the authors' code computes; prompt_style\n"
        "# authors_inference samples with their inference scripts' prompts (training is unaffected);\n"
        "# protocol authors samples and scores as their release does (bf16 timesteps, posterior samples,\n"
        "# their resize and DPM-Solver grid; JPEG-75 outputs, subjects on black: mige_lightning/protocol.py).\n"
    )
    return header + json.dumps({"model": model}, indent=2) + "\n"  # JSON is YAML


def convert_authors(
    input_path: str | Path,
    output: str | Path,
    *,
    preset: str = "xl",
    overrides: dict | None = None,
    tokenizer: str | None = "google/t5-v1_1-xxl",
    vae: str | None = "stabilityai/sd-vae-ft-ema",
    key: str = "state_dict",
) -> dict:
    """Convert, check and write; returns the report (also written as ``report.json``)."""
    input_path, output = Path(input_path).expanduser(), Path(output)
    overrides = {**AUTHORS_BEHAVIOUR, **(overrides or {})}
    config = get_config(
        preset, overrides, {"t5": None, "blip2": None, "dit": None, "tokenizer": "byte", "vae": None}
    )
    state, others = read_authors_checkpoint(input_path, key=key)
    model = target_model(config)
    dtypes = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    conversion = convert_state_dict(state, expected_shapes(model), tied=tied_names(model), dtypes=dtypes)
    report = {
        "format": FORMAT,
        "input": str(input_path),
        "entry": key,
        "other_top_level_entries_ignored": others,
        "preset": preset,
        "overrides": overrides,
        **conversion.report,
        "pos_embed_check": position_table_check(model, state.get("pos_embed")),
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in conversion.state.values())),
    }
    created = not output.exists()  # every check passed: only now is anything written
    output.mkdir(parents=True, exist_ok=True)
    try:
        weights = output / "model.safetensors"
        # safetensors needs each tensor contiguous and not sharing memory with another
        shared = _shared(conversion.state)
        save_file(
            {
                k: v.clone() if v.untyped_storage().data_ptr() in shared else v.contiguous()
                for k, v in conversion.state.items()
            },
            str(weights),
            metadata={"format": FORMAT, "source": str(input_path)},
        )
        (output / "config.yaml").write_text(
            model_config_yaml(
                preset=preset,
                overrides=overrides,
                weights=weights,
                tokenizer=tokenizer,
                vae=vae,
                source=input_path,
            )
        )
        (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    except BaseException:  # e.g. disk full: no half-written folder left behind
        if created:
            shutil.rmtree(output)
        raise
    return report


def _shared(state: dict[str, torch.Tensor]) -> set[int]:
    """Storage pointers used by more than one tensor (a split's parts share their source's)."""
    seen = Counter(t.untyped_storage().data_ptr() for t in state.values())
    return {ptr for ptr, n in seen.items() if n > 1}

"""FSDP2 for MIGE: one shard group per transformer block, then the component roots.

Groups, innermost first (each ``fully_shard`` call takes the parameters not already in a group):

1. the frozen ViT, per layer and then the tower: its own groups, so it is sharded too but holds no
   gradients and no optimiser state (``requires_grad`` is False);
2. the trainable blocks: Q-Former layers, T5 blocks, DiT blocks;
3. the DiT's patch projection (``pos_embed.proj``), which the encoder also calls on reference
   latents outside the DiT's ``forward`` — through its ``PatchEmbed`` parent, or directly when
   fusion tokens take no position table (the authors' way), hence a unit of its own;
4. the encoder (embeddings, learned queries, fusion, projection, norms) and the DiT (timestep and
   caption embedders, output layers);
5. the root, ``MIGE``, with ``encode_condition`` registered as a forward method. The frozen
   autoencoder is left out (``ignored_params``): it is replicated on every rank and is called
   through ``encode`` / ``decode``, which no FSDP hook sees.

Every rank must run the same groups in the same order, so sharding also turns on
``MIGE.run_every_branch`` (a batch without reference images still runs the ViT / Q-Former on a
stand-in whose output is discarded).
"""

from __future__ import annotations

import ctypes
import sys
import warnings
from collections.abc import Callable

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from mige_lightning.models import MIGE, MIGEConfig, build_mige
from mige_lightning.models.init import initialize, owners, post_order, skip_prefixes, under
from mige_lightning.models.tensor_sources import load_local_rows, local_part, tensor_sources

# T5 blocks return views (the position bias); FSDP2 warns in case one is changed in place. T5 does
# not (tests/test_sharding.py compares the sharded gradients with the unsharded ones).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPT5Block\) returned a view tensor")


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh FSDP shards over: the mesh itself, or Lightning's ``data_parallel`` dimension
    when its ``tensor_parallel`` dimension has size 1 (MIGE uses no tensor parallelism)."""
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "data_parallel" not in names:
        raise ValueError(f"device mesh has dimensions {names}; expected a 'data_parallel' dimension")
    others = {n: mesh[n].size() for n in names if n != "data_parallel"}
    if any(size != 1 for size in others.values()):
        raise ValueError(
            f"trainer.strategy.init_args.tensor_parallel_size: MIGE shards with FSDP2 only, got mesh "
            f"{dict(zip(names, mesh.shape, strict=True))}; set tensor_parallel_size: 1 and "
            "data_parallel_size to the world size (num_nodes × devices)"
        )
    return mesh["data_parallel"]


def mixed_precision_policy(enabled: bool, *, root: bool = False) -> MixedPrecisionPolicy:
    """bf16 parameters and compute, fp32 gradient reduction (and fp32 outputs from the root, so the
    loss is computed in fp32); the sharded master weights and optimiser state stay fp32."""
    if not enabled:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16,
        reduce_dtype=torch.float32,
        output_dtype=torch.float32 if root else None,
    )


def enable_activation_checkpointing(model: MIGE) -> None:
    """Recompute each DiT / T5 / Q-Former block's activations in the backward pass. The libraries
    checkpoint inside the block's call (non-reentrant), so FSDP's per-block hooks compose with it."""
    model.dit.enable_gradient_checkpointing()
    model.encoder.t5.activation_checkpointing_enable()
    model.encoder.qformer.activation_checkpointing_enable()


def fsdp_units(model: MIGE) -> list[torch.nn.Module]:
    """The modules ``fully_shard`` is applied to, innermost first (the module docstring's groups)."""
    enc, dit = model.encoder, model.dit
    return [
        *enc.vision.encoder.layers,  # 1. frozen ViT
        enc.vision,
        *enc.qformer.encoder.layer,  # 2. trainable blocks
        *enc.t5.encoder.block,
        *dit.transformer_blocks,
        # 3. the patch projection, shared by the reference tokens and the DiT input; its own unit
        # (not its PatchEmbed parent) because fusion tokens without the position table (the
        # authors' way) call the projection directly, and a unit's hooks run only on its forward
        dit.pos_embed.proj,
        enc,  # 4. what remains of each component
        dit,
        model,  # 5. the root; the frozen autoencoder stays whole on every rank
    ]


def shard_mige(
    model: MIGE,
    mesh: DeviceMesh,
    *,
    mixed_precision: bool = False,
    activation_checkpointing: bool = False,
    before_unit: Callable[[torch.nn.Module], None] | None = None,
) -> MIGE:
    """Apply FSDP2 to ``model`` in place (see the module docstring for the groups); returns it.
    ``before_unit(unit)`` runs just before each unit is sharded (``build_sharded_mige`` gives the
    unit its weights there)."""
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    dp_mesh = data_parallel_mesh(mesh)
    for unit in fsdp_units(model):
        if before_unit is not None:
            before_unit(unit)
        if unit is model:
            fully_shard(
                model,
                mesh=dp_mesh,
                mp_policy=mixed_precision_policy(mixed_precision, root=True),
                ignored_params=set(model.autoencoder.parameters()),
            )
        else:
            fully_shard(unit, mesh=dp_mesh, mp_policy=mixed_precision_policy(mixed_precision))
    register_fsdp_forward_method(model, "encode_condition")
    model.run_every_branch = True
    return model


def build_sharded_mige(
    config: MIGEConfig,
    mesh: DeviceMesh,
    *,
    seed: int,
    init_weights: str | None = None,
    mixed_precision: bool = False,
    activation_checkpointing: bool = False,
) -> MIGE:
    """Build MIGE sharded without ever holding the whole model on one rank.

    1. the skeleton on the meta device (``build_mige(skeleton=True)``: shapes, real buffers, real
       frozen autoencoder);
    2. per FSDP unit, innermost first: its parameters materialised full-size on the CPU, drawn
       from ``seed`` per module (``models/init.py``: the values ``build_mige(config, seed=seed)``
       gives), then sharded — the full-size copy is freed, so a rank holds its shards of the units
       done so far plus one whole unit;
    3. pretrained weights (``init_weights``, else the pretrained sources) read into the local
       shards: each rank reads only its own rows of each tensor from the safetensors files.
    Every parameter must end up drawn or read: one left as allocated is an error naming it; rows
    read holding NaN / inf are an error naming the file and key. Both are decided over all ranks
    (each sees only its rows), so every rank stops together.
    """
    model = build_mige(config, seed=seed, skeleton=True)
    sources = tensor_sources(config, model, init_weights=init_weights)
    skip = skip_prefixes(config)
    owner_of = owners(model)
    name_of = {id(m): n for n, m in model.named_modules()}
    done: list[str] = []  # units already sharded (their modules are not re-visited)
    earlier: dict[int, torch.nn.Parameter] = {}  # their meta parameters (kept alive: ids stay unique)

    def materialise_and_draw(unit: torch.nn.Module) -> None:
        release_freed_host_memory()  # the previous unit's full-size copy, freed by its sharding
        unit_name = name_of[id(unit)]
        mine = [
            (n, m)
            for n, m in post_order(unit, unit_name)
            if not under(n, tuple(done)) and not n.startswith("autoencoder")
        ]
        # this unit's full-size parameters by the meta one each replaces (a tied weight is made
        # once); local to this call, so once the unit is sharded only its shards stay alive
        fresh: dict[int, torch.nn.Parameter] = {}
        for name, module in mine:
            for key, param in module._parameters.items():
                if param is None or not param.is_meta:
                    continue
                if id(param) in earlier and id(param) not in fresh:
                    raise RuntimeError(
                        f"'{name}.{key}' is tied to a weight of an FSDP unit sharded before it"
                    )
                if id(param) not in fresh:
                    earlier[id(param)] = param
                    fresh[id(param)] = torch.nn.Parameter(
                        torch.full(param.shape, float("nan"), dtype=param.dtype),
                        requires_grad=param.requires_grad,
                    )
                module._parameters[key] = fresh[id(param)]
        if init_weights is None:  # with init_weights every tensor is read from the file
            initialize(((n, m) for n, m in mine if not under(n, skip)), seed, owner_of)
        done.append(unit_name)

    shard_mige(
        model,
        mesh,
        mixed_precision=mixed_precision,
        activation_checkpointing=activation_checkpointing,
        before_unit=materialise_and_draw,
    )
    release_freed_host_memory()
    nonfinite = load_local_rows(model, sources)
    unset = [n for n, p in model.named_parameters() if local_part(p).isnan().any()]
    nonfinite, unset = _on_every_rank(nonfinite, unset)
    if nonfinite:
        raise ValueError(
            f"build_sharded_mige: non-finite values in {len(nonfinite)} tensor(s) read: "
            + "; ".join(nonfinite[:8])
            + "; refusing to load them"
        )
    if unset:
        raise RuntimeError(
            f"build_sharded_mige: {len(unset)} parameter(s) neither drawn nor loaded: {unset[:5]}"
        )
    return model


def _on_every_rank(*lists: list[str]) -> list[list[str]]:
    """Each list joined over all ranks (every rank builds the model; first seen first), so all
    ranks decide alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(lists)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lists)
    return [list(dict.fromkeys(x for rank in gathered for x in rank[i])) for i in range(len(lists))]


def _libc():
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:  # not glibc
        return None


_LIBC = _libc()


def release_freed_host_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere). glibc keeps
    freed blocks below its mmap threshold (up to 32 MB) in the heap, so without it each unit's
    freed full-size copy would leave holes that count as the rank's resident memory."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)

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

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from mige_lightning.models import MIGE

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


def shard_mige(
    model: MIGE,
    mesh: DeviceMesh,
    *,
    mixed_precision: bool = False,
    activation_checkpointing: bool = False,
) -> MIGE:
    """Apply FSDP2 to ``model`` in place (see the module docstring for the groups); returns it."""
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    dp_mesh = data_parallel_mesh(mesh)
    policy = mixed_precision_policy(mixed_precision)
    enc, dit = model.encoder, model.dit

    # 1. frozen ViT
    for layer in enc.vision.encoder.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy)
    fully_shard(enc.vision, mesh=dp_mesh, mp_policy=policy)
    # 2. trainable blocks
    for block in [*enc.qformer.encoder.layer, *enc.t5.encoder.block, *dit.transformer_blocks]:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    # 3. the patch projection, shared by the reference tokens and the DiT input; sharded as its
    # own unit (not its PatchEmbed parent) because fusion tokens without the position table
    # (the authors' way) call the projection directly, and a unit's hooks run only on its forward
    fully_shard(dit.pos_embed.proj, mesh=dp_mesh, mp_policy=policy)
    # 4. what remains of each component
    fully_shard(enc, mesh=dp_mesh, mp_policy=policy)
    fully_shard(dit, mesh=dp_mesh, mp_policy=policy)
    # 5. the root; the frozen autoencoder stays whole on every rank
    fully_shard(
        model,
        mesh=dp_mesh,
        mp_policy=mixed_precision_policy(mixed_precision, root=True),
        ignored_params=set(model.autoencoder.parameters()),
    )
    register_fsdp_forward_method(model, "encode_condition")
    model.run_every_branch = True
    return model

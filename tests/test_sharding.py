"""FSDP2 sharding of MIGE (``mige_lightning/sharding.py``) in 2 CPU processes (gloo), against the
same model unsharded: the ranks take different branches (no references, every condition
dropped), accumulate two micro-batches with activation checkpointing, and clip by global norm."""

from __future__ import annotations

import os
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from mige_lightning.models import build_mige, get_config
from mige_lightning.models.presets import AUTHORS_BEHAVIOUR
from mige_lightning.sharding import data_parallel_mesh, enable_activation_checkpointing, shard_mige
from tests.helpers.batches import make_batch, prompts_of
from tests.helpers.processes import free_port, spawn

WORLD = 2
MAX_NORM = 1e-3  # well below the gradient norm: clipping is active
# per rank, per micro-batch: references per sample, dropped conditions
STEPS = [
    [([0, 0], None), ([1, 2], [False, True])],  # rank 0: no reference at all, then a mix
    [([1, 2], [True, True]), ([2, 0], None)],  # rank 1: every condition dropped, then a mix
]


def _model(switches: dict | None = None):
    torch.manual_seed(0)
    model = build_mige(get_config("tiny", switches))
    enable_activation_checkpointing(model)
    return model.train()  # dropout on: activation checkpointing must replay it exactly


def _loss(model, rank: int, micro: int) -> torch.Tensor:
    counts, drop = STEPS[rank][micro]
    cfg = get_config("tiny")
    batch = make_batch(cfg, counts, seed=10 * rank + micro)
    mask = batch["ref_mask"]
    latents = model.encode_references(batch["ref_vae"], mask, sample=False)
    torch.manual_seed(100 + 10 * rank + micro)  # the same dropout draws sharded or not
    cond, cond_mask = model.encode_condition(
        prompts_of(batch),
        ref_pixels=batch["ref_pixels"],
        ref_latents=latents,
        ref_mask=mask,
        drop=None if drop is None else torch.tensor(drop),
    )
    gen = torch.Generator().manual_seed(rank * 10 + micro)
    x = torch.randn(len(counts), 4, 8, 8, generator=gen)
    out = model(x, torch.tensor([10, 500]), cond=cond, cond_mask=cond_mask, cond_input=torch.zeros_like(x))
    return out.pow(2).mean()


def _worker(rank: int, port: int, out: str, mixed_precision: bool, switches: dict | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank skipping a collective fails in a minute instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        model = _model(switches)
        model.run_every_branch = False  # shard_mige must turn it on
        shard_mige(model, init_device_mesh("cpu", (WORLD,)), mixed_precision=mixed_precision)
        for micro in range(2):
            _loss(model, rank, micro).backward()
        named = dict(model.named_parameters())
        trainable = {n: p for n, p in named.items() if p.requires_grad}
        grads = {n: p.grad.full_tensor() for n, p in trainable.items()}
        norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), MAX_NORM)
        result = {
            "grads": grads,
            "norm": norm.full_tensor() if isinstance(norm, DTensor) else norm,
            "clipped": {n: p.grad.full_tensor() for n, p in trainable.items()},
            "local": sum(p.to_local().numel() for p in trainable.values()),
            "vision_sharded_frozen": all(
                isinstance(p, DTensor) and not p.requires_grad and p.grad is None
                for n, p in model.encoder.vision.named_parameters()
                if not (
                    n.startswith("post_layernorm.")
                    and model.encoder.vision.post_layernorm.weight.requires_grad
                )
            ),
            "autoencoder_plain": all(not isinstance(p, DTensor) for p in model.autoencoder.parameters()),
            "trainable_all_sharded": all(isinstance(p, DTensor) for p in trainable.values()),
            "dtypes": {str(t.dtype) for p in trainable.values() for t in (p, p.grad)},
        }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, *, mixed_precision: bool, switches: dict | None = None) -> list[dict]:
    spawn(_worker, (free_port(), str(tmp_path), mixed_precision, switches), nprocs=WORLD, timeout=240)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _reference(switches: dict | None = None) -> dict[str, torch.nn.Parameter]:
    """The unsharded model's trainable parameters, with the gradient FSDP should produce."""
    model = _model(switches)
    model.run_every_branch = True  # the same branches (and dropout draws) as the sharded ranks
    for rank in range(WORLD):
        for micro in range(2):
            (_loss(model, rank, micro) / WORLD).backward()  # FSDP averages over ranks, sums micro-batches
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("switches", [None, AUTHORS_BEHAVIOUR], ids=["ours", "authors"])
def test_fsdp2_matches_the_unsharded_mean_gradient_across_divergent_ranks(tmp_path, switches):
    """Also with the authors' behaviour (the xl preset's): fusion tokens from the patch
    projection alone must still go through FSDP's hooks."""
    results = _run(tmp_path, mixed_precision=False, switches=switches)
    trainable = _reference(switches)
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing  # every sub-network took part on every rank
    for res in results:
        assert res["grads"].keys() == trainable.keys()
        for name, param in trainable.items():
            torch.testing.assert_close(res["grads"][name], param.grad, rtol=1e-5, atol=1e-8, msg=name)
    norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), MAX_NORM)
    assert norm > 10 * MAX_NORM
    for res in results:
        torch.testing.assert_close(res["norm"], norm, rtol=1e-5, atol=0)
        for name, param in trainable.items():
            torch.testing.assert_close(res["clipped"][name], param.grad, rtol=1e-5, atol=1e-9, msg=name)
        assert res["vision_sharded_frozen"] and res["autoencoder_plain"] and res["trainable_all_sharded"]
    total = sum(p.numel() for p in trainable.values())
    locals_ = [r["local"] for r in results]
    assert sum(locals_) == total and all(abs(n / total - 0.5) < 0.02 for n in locals_)


@pytest.mark.parametrize(
    ("counts", "drop"), [([0, 0], None), ([1, 2], [True, True]), ([0, 1], [False, True])], ids=str
)
def test_run_every_branch_changes_no_output_and_reaches_every_encoder_weight(counts, drop):
    """The switch sharding turns on: same condition vectors and gradients, but the ViT / Q-Former /
    patch embedding also run (zero gradient) when no kept sample has a reference image."""
    torch.manual_seed(0)
    model = build_mige(get_config("tiny")).eval()
    batch = make_batch(get_config("tiny"), counts)
    mask = batch["ref_mask"]
    latents = model.encode_references(batch["ref_vae"], mask, sample=False)
    results = {}
    for flag in (False, True):
        model.zero_grad(set_to_none=True)
        model.run_every_branch = flag
        cond, _ = model.encode_condition(
            prompts_of(batch),
            ref_pixels=batch["ref_pixels"],
            ref_latents=latents,
            ref_mask=mask,
            drop=None if drop is None else torch.tensor(drop),
        )
        if cond.requires_grad:
            cond.pow(2).sum().backward()
        results[flag] = cond.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (plain, plain_grads), (every, every_grads) = results[False], results[True]
    assert torch.equal(plain, every)
    untouched = [n for n, g in plain_grads.items() if g is None and not n.startswith("dit.")]
    assert untouched  # without the switch these weights take no part in this batch
    for name, grad in every_grads.items():
        if name.startswith("dit.") and "pos_embed" not in name:
            continue  # the rest of the DiT is not used by the condition
        assert grad is not None, name
        want = plain_grads[name] if plain_grads[name] is not None else torch.zeros_like(grad)
        assert torch.equal(grad, want), name


class FakeMesh:
    """What ``data_parallel_mesh`` reads from Lightning's 2-D mesh."""

    ndim, mesh_dim_names = 2, ("data_parallel", "tensor_parallel")

    def __init__(self, dp: int, tp: int):
        self.shape = (dp, tp)

    def __getitem__(self, name: str):
        size = self.shape[self.mesh_dim_names.index(name)]
        return SimpleNamespace(size=lambda: size, name=name)


def test_data_parallel_mesh_takes_the_dp_dimension_and_refuses_tensor_parallel():
    assert data_parallel_mesh(FakeMesh(4, 1)).name == "data_parallel"
    with pytest.raises(ValueError, match=r"tensor_parallel_size: MIGE shards with FSDP2 only"):
        data_parallel_mesh(FakeMesh(2, 2))


@pytest.mark.slow
def test_bf16_policy_keeps_fp32_master_weights_and_gradients(tmp_path):
    results = _run(tmp_path, mixed_precision=True)
    trainable = _reference()
    want = torch.cat([p.grad.flatten() for p in trainable.values()])
    for res in results:
        assert res["dtypes"] == {"torch.float32"}  # shards and their gradients; bf16 only in compute
        got = torch.cat([res["grads"][n].flatten() for n in trainable])
        assert torch.isfinite(got).all() and not torch.equal(got, want)  # bf16 compute did happen
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99
        assert abs(got.norm() / want.norm() - 1) < 0.05

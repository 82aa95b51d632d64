"""Sharded start without the whole model on any rank (``sharding.build_sharded_mige``), 2 CPU
processes (gloo): built on the meta device, materialised and drawn one FSDP unit at a time, the
pretrained parts read row-slice by row-slice — and equal, tensor by tensor, to the eager
``build_mige`` with the same seed, for ``tiny`` and ``mid``, random or from pretrained files."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mige_lightning.models import build_mige, get_config
from mige_lightning.models.weights import load_weights
from tests.helpers.pretrained_parts import save_components
from tests.helpers.processes import free_port, spawn

WORLD = 2
SEED = 7


def _worker(rank: int, port: int, out: str, config, init_weights) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        from mige_lightning.sharding import build_sharded_mige

        torch.manual_seed(1000 + rank)  # the global state must not matter
        model = build_sharded_mige(
            config, init_device_mesh("cpu", (WORLD,)), seed=SEED, init_weights=init_weights
        )
        sharded = all(
            isinstance(p, DTensor) for n, p in model.named_parameters() if not n.startswith("autoencoder.")
        )
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"state": state, "sharded": sharded}, f"{out}/state.pt")
        # both ranks tear gloo down together: rank 1 closing its connections while rank 0 still
        # saves aborted a worker now and then (SIGABRT: a glibc heap check, or std::terminate)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _sharded_state(tmp_path, config, init_weights=None) -> dict[str, torch.Tensor]:
    spawn(_worker, (free_port(), str(tmp_path), config, init_weights), nprocs=WORLD, timeout=300)
    result = torch.load(tmp_path / "state.pt")
    assert result["sharded"]
    return result["state"]


def _assert_same(sharded: dict, eager: torch.nn.Module) -> None:
    reference = eager.state_dict()
    assert sharded.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(sharded[k], reference[k])]
    assert not different, different[:10]


CASES = [("tiny", False), ("tiny", True), ("mid", False), ("mid", True)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "pretrained"), CASES, ids=[f"{p}-{'pretrained' if q else 'random'}" for p, q in CASES]
)
def test_meta_built_sharded_model_equals_the_eager_build(tmp_path, preset, pretrained):
    sources = save_components(tmp_path / "parts", get_config(preset)) if pretrained else None
    config = get_config(preset, pretrained=sources)
    state = _sharded_state(tmp_path, config)
    torch.manual_seed(0)
    eager = build_mige(config, seed=SEED)
    _assert_same(state, eager)
    # the rules the construction keeps: fusion starts as the identity, the widened channels are zero
    assert not state["encoder.adapter.fusion.out_proj.weight"].any()
    if pretrained:
        assert not state["dit.pos_embed.proj.weight"][:, 4:].any()
        assert state["dit.pos_embed.proj.weight"][:, :4].any()
    # and the seed is what decides: another seed, other weights
    other = build_mige(config, seed=SEED + 1).state_dict()
    assert (
        not torch.equal(
            other["dit.transformer_blocks.0.attn1.to_q.weight"],
            state["dit.transformer_blocks.0.attn1.to_q.weight"],
        )
        or pretrained
    )
    assert not torch.equal(
        other["encoder.adapter.fusion.q_proj.weight"], state["encoder.adapter.fusion.q_proj.weight"]
    )


@pytest.mark.slow
def test_meta_built_sharded_model_reads_init_weights(tmp_path):
    config = get_config("tiny")
    source = build_mige(config, seed=123)
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith("autoencoder.")}
    weights.pop("encoder.t5.encoder.embed_tokens.weight", None)  # tied to shared: saved once
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    state = _sharded_state(tmp_path, config, init_weights=str(tmp_path))
    eager = build_mige(config, seed=SEED)
    load_weights(eager, tmp_path)
    _assert_same(state, eager)


# ---- what the sharded start refuses, before any rank reads a row (one process, no sharding) ----


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return root, save_components(root, get_config("tiny"))


def _skeleton(config):
    from mige_lightning.models.tensor_sources import tensor_sources

    model = build_mige(config, seed=0, skeleton=True)
    return lambda **kw: tensor_sources(config, model, **kw)


def test_a_pretrained_folder_without_safetensors_is_refused_with_the_way_out(tiny_parts):
    root, sources = tiny_parts
    dit = root / "pixart" / "transformer" / "diffusion_pytorch_model.safetensors"
    moved = dit.with_suffix(".moved")
    dit.rename(moved)
    try:
        config = get_config("tiny", pretrained={**sources, "dit": str(root / "pixart")})
        with pytest.raises(
            FileNotFoundError,
            match=r"model.pretrained.dit.*diffusion_pytorch_model.safetensors.*meta_init: false",
        ):
            # the skeleton reads only the config; the rows are what is missing
            _skeleton(config)()
    finally:
        moved.rename(dit)


def test_a_tensor_of_another_shape_names_the_file_and_key(tmp_path):
    wide = get_config("tiny", overrides={"t5": {"d_model": 48}})
    sources = save_components(tmp_path, wide)  # a BLIP-2 whose projection goes to a 48-wide LLM
    config = get_config("tiny", pretrained={"blip2": sources["blip2"]})  # our T5 is 32 wide
    with pytest.raises(
        ValueError,
        match=r"model.pretrained.blip2: .*safetensors 'language_projection.weight' is \(48, 32\), "
        r"the model needs \(32, 32\)",
    ):
        _skeleton(config)()


def test_init_weights_missing_a_tensor_is_refused(tmp_path):
    config = get_config("tiny")
    state = {
        k: v for k, v in build_mige(config, seed=1).state_dict().items() if not k.startswith("autoencoder.")
    }
    state.pop("encoder.t5.encoder.embed_tokens.weight")
    state.pop("dit.proj_out.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"model.init_weights: .*1 of the model's tensor\(s\) missing: \['dit.proj_out.weight'\]",
    ):
        _skeleton(config)(init_weights=str(tmp_path))

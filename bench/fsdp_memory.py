"""Per-rank memory of parameters, gradients and AdamW state under FSDP2 (issue 6 benchmark).

    .venv/bin/python -m bench.fsdp_memory [--preset mid] [--gpus 8 16 32 64]

1. Measured on CPU (gloo): the ``--preset`` model sharded by ``shard_mige`` over 1 and 2
   processes, one AdamW step, then the bytes of every tensor storage each rank holds (parameter
   shards incl. the frozen ViT, the replicated VAE, gradient shards, optimiser state), next to
   what the formula below predicts.
2. Computed for the paper's ``xl`` preset at ``--gpus`` ranks, from parameter counts of the model
   built on the ``meta`` device (no memory allocated): fp32 master weights, fp32 gradients
   (``reduce_dtype``) and AdamW's two fp32 moments, sharded over N ranks; the frozen ViT sharded
   (fp32, no gradients, no optimiser state); the frozen VAE replicated. Activations are not
   included; "gather" is the transient of the largest FSDP unit: bf16 parameters for it and one
   prefetched unit, plus its unsharded fp32 gradient before the reduce-scatter.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mige_lightning.models import build_mige, get_config

GB = 1024**3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shards padded as FSDP allocates them)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = _local(t).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _measure(rank: int, world: int, port: int, preset: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from mige_lightning.module import MIGELightningModule
    from mige_lightning.sharding import shard_mige
    from tests.helpers.batches import make_batch

    warnings.filterwarnings("ignore")  # self.log without a Trainer, FSDP view notes
    torch.manual_seed(0)
    module = MIGELightningModule(preset, p_drop_condition=0, p_drop_input=0, p_drop_both=0, warmup_steps=1)
    module.configure_model()
    shard_mige(module.model, init_device_mesh("cpu", (world,)))
    module.model.train()
    opt = module.configure_optimizers()["optimizer"]
    batch = make_batch(module.config, [1, 1], seed=rank)
    module.training_step(batch, 0).backward()
    opt.step()
    params = list(module.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    row = {
        "trainable_params": sum(_local(p).numel() for p in trainable),
        "params": _bytes(trainable),
        "frozen": _bytes(p for p in params if not p.requires_grad),
        "grads": _bytes(p.grad for p in trainable if p.grad is not None),
        "optimizer": _bytes(state),
    }
    torch.save(row, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def measure(preset: str, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_measure, args=(world, _free_port(), preset, out), nprocs=world)
        return [torch.load(f"{out}/rank{r}.pt") for r in range(world)]


def counts(preset: str) -> dict[str, int]:
    """Parameter counts of a preset, built on the meta device (random-init architecture)."""
    sources = {"t5": None, "blip2": None, "dit": None, "vae": None, "tokenizer": "byte"}
    with torch.device("meta"):
        m = build_mige(get_config(preset, pretrained=sources))
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    units = [*m.encoder.t5.encoder.block, *m.dit.transformer_blocks, *m.encoder.qformer.encoder.layer]
    return {
        "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
        "vit": n(m.encoder.vision),
        "vae": n(m.autoencoder),
        "largest_unit": max(n(u) for u in units),
    }


def predicted(c: dict[str, int], world: int) -> dict[str, float]:
    """Bytes per rank (fp32 everything, AdamW: 2 moments), sharded over ``world`` ranks."""
    shard = lambda n: 4 * -(-n // world)  # noqa: E731 — FSDP pads each shard to equal size
    return {
        "params": shard(c["trainable"]),
        "grads": shard(c["trainable"]),
        "optimizer": 2 * shard(c["trainable"]),
        "frozen": shard(c["vit"]) + 4 * c["vae"],
        "gather": (2 * 2 + 4) * c["largest_unit"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mid", help="measured on CPU with 1 and 2 ranks")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()

    c = counts(args.preset)
    print(f"## {args.preset}: measured per rank after one AdamW step (CPU, gloo) vs predicted, MB\n")
    print(
        "| ranks | trainable params on rank | params | grads | AdamW | frozen (ViT shard + VAE) | predicted params / grads / AdamW / frozen |"
    )
    print("|---|---|---|---|---|---|---|")
    for world in (1, 2):
        p = predicted(c, world)
        for r, row in enumerate(measure(args.preset, world)):
            mb = {k: row[k] / 1e6 for k in ("params", "grads", "optimizer", "frozen")}
            print(
                f"| {world} (rank {r}) | {row['trainable_params'] / 1e6:.2f} M | {mb['params']:.1f} | {mb['grads']:.1f} "
                f"| {mb['optimizer']:.1f} | {mb['frozen']:.1f} | {p['params'] / 1e6:.1f} / {p['grads'] / 1e6:.1f} / "
                f"{p['optimizer'] / 1e6:.1f} / {p['frozen'] / 1e6:.1f} |"
            )

    x = counts("xl")
    print(
        f"\n## xl: computed per GPU, GiB (trainable {x['trainable'] / 1e9:.3f} B, frozen ViT {x['vit'] / 1e9:.3f} B, "
        f"VAE {x['vae'] / 1e6:.1f} M, largest unit {x['largest_unit'] / 1e6:.1f} M)\n"
    )
    print("| GPUs | params | grads | AdamW | frozen | total | + gather |")
    print("|---|---|---|---|---|---|---|")
    for world in [1, *args.gpus]:
        p = predicted(x, world)
        total = p["params"] + p["grads"] + p["optimizer"] + p["frozen"]
        print(
            f"| {world} | {p['params'] / GB:.2f} | {p['grads'] / GB:.2f} | {p['optimizer'] / GB:.2f} "
            f"| {p['frozen'] / GB:.2f} | {total / GB:.2f} | {p['gather'] / GB:.2f} |"
        )


if __name__ == "__main__":
    main()

"""Train-step time, peak memory, FLOPs and MFU (issue 2 benchmark; FLOPs / MFU from issue 12).

    .venv/bin/python -m bench.train_step [--presets tiny mid] [--steps 10] [--batch 4]
    python -m bench.train_step --device cuda --presets xl --batch 8 \
        --overrides '{"t5": {"num_layers": 8}}'     # FSDP2 (1 rank) + bf16 + activation checkpointing

FLOPs are counted by ``FlopCounterMode`` on one real step (forward + backward; with activation
checkpointing the recomputation is counted too, so the ratio is then HFU). The ratio divides the
achieved FLOP/s by the peak: on a CPU the matrix-product throughput measured here (fp32), on a GPU
its dense bf16 peak (``mige_lightning/flops.py``).

One "step" = encode the batch (VAE, ViT, Q-Former, fusion, T5), DiT forward, hybrid loss,
backward and an AdamW update. Peak memory is the process's max RSS growth over the run
(ru_maxrss), which on CPU includes parameters, optimiser state and activations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import warnings

import torch

from mige_lightning.flops import StepFlops, peak_flops
from mige_lightning.module import MIGELightningModule
from tests.helpers.batches import make_batch

warnings.filterwarnings("ignore", message="You are trying to `self.log")  # no Trainer here, by design


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_on_device(
    preset: str, overrides: dict | None, device: str, compile_dit: bool = False
) -> MIGELightningModule:
    """The module on ``device``; on a GPU built there, sharded with FSDP2 over one rank (bf16
    compute, fp32 master weights) with activation checkpointing, as the paper config trains."""
    kwargs = dict(
        p_drop_condition=0,
        p_drop_input=0,
        p_drop_both=0,
        warmup_steps=1,
        overrides=overrides,
        compile_dit=compile_dit,
    )
    if device == "cpu":
        module = MIGELightningModule(preset, **kwargs)
        module.configure_model()
        return module
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mige_lightning.models import build_mige
    from mige_lightning.sharding import shard_mige

    pretrained = dict(t5=None, blip2=None, dit=None, vae=None, tokenizer="byte")  # random init, no network
    module = MIGELightningModule(preset, pretrained=pretrained, fsdp_mixed_precision=True, **kwargs)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    with torch.device(device):
        module.model = build_mige(module.config)
    module.to(device)
    shard_mige(
        module.model, init_device_mesh(device, (1,)), mixed_precision=True, activation_checkpointing=True
    )
    if compile_dit:
        for block in module.model.dit.transformer_blocks:
            block.compile()
    return module


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def bench(
    preset: str,
    *,
    steps: int,
    batch: int,
    images: int,
    device: str = "cpu",
    overrides=None,
    compile_dit=False,
) -> dict:
    torch.manual_seed(0)
    before = rss_mb()
    module = build_on_device(preset, overrides, device, compile_dit)
    module.model.train()
    opt = module.configure_optimizers()["optimizer"]
    data = to_device(make_batch(module.config, [images] * batch), device)
    cuda = device.startswith("cuda")
    trainable = sum(p.numel() for p in module.trainable_parameters())
    total = sum(p.numel() for p in module.model.parameters())
    times = []
    counter = StepFlops()
    first_two = time.perf_counter()
    for i in range(steps + 2):
        if cuda:
            torch.cuda.synchronize()
        if i == 0:
            counter.start()  # the first (warm-up) step: FLOPs do not depend on timing
        t0 = time.perf_counter()
        loss = module.training_step(data, i)
        loss.backward()
        if i == 0:
            counter.stop()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i == 1:
            first_two = time.perf_counter() - first_two  # includes compilation with --compile
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = peak_flops(torch.device(device), dtype)
    step = statistics.median(times)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "step_gflop": counter.total / 1e9,
        "achieved_tflops": counter.total / step / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": counter.total / step / peak if peak else None,
        "peak_gpu_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "preset": preset,
        "params_total_M": total / 1e6,
        "params_trainable_M": trainable / 1e6,
        "resolution": module.config.resolution,
        "batch": batch,
        "refs_per_sample": images,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "warmup_two_steps_s": first_two,
        "compile_dit": compile_dit,
        "peak_rss_growth_MB": rss_mb() - before,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--images", type=int, default=2, help="reference images per sample")
    ap.add_argument(
        "--device", default="cpu", help="cpu, or cuda: FSDP2 (1 rank) + bf16 + activation checkpointing"
    )
    ap.add_argument(
        "--overrides", default=None, help="JSON model.overrides, e.g. fewer T5 blocks to fit one GPU"
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile each DiT block (model.compile_dit)")
    args = ap.parse_args()
    overrides = json.loads(args.overrides) if args.overrides else None
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, overrides {overrides}"
    )
    if args.device != "cpu":
        for preset in args.presets:
            r = bench(
                preset,
                steps=args.steps,
                batch=args.batch,
                images=args.images,
                device=args.device,
                overrides=overrides,
                compile_dit=args.compile,
            )
            print(json.dumps(r, indent=1), flush=True)
        return
    print(
        "| preset | params (trainable / total) | res | batch | refs | step s (median / min) | peak RSS growth "
        "| GFLOP per step | achieved / measured matmul GFLOP/s = ratio | DiT compiled | first two steps s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        r = bench(preset, steps=args.steps, batch=args.batch, images=args.images, compile_dit=args.compile)
        print(
            f"| {r['preset']} | {r['params_trainable_M']:.2f} M / {r['params_total_M']:.2f} M | {r['resolution']} "
            f"| {r['batch']} | {r['refs_per_sample']} | {r['step_s_median']:.3f} / {r['step_s_min']:.3f} "
            f"| {r['peak_rss_growth_MB']:.0f} MB | {r['step_gflop']:.1f} | {r['achieved_tflops'] * 1e3:.1f} "
            f"/ {r['peak_tflops'] * 1e3:.0f} = {r['mfu']:.1%} | {r['compile_dit']} | {r['warmup_two_steps_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

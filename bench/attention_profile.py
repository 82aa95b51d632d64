"""Which attention kernel each attention of a training step runs (issue 12 benchmark).

    .venv/bin/python -m bench.attention_profile [--preset mid] [--device cpu] [--eval]

The forward of one real training step (``MIGELightningModule.training_step``: VAE, ViT, Q-Former,
fusion, T5, DiT) runs under ``mige_lightning.attention.attention_calls``, which attributes every
fused SDPA kernel, SDPA math fallback and hand-written softmax to the module it ran in; the table
groups them by module position and class. ``--eval``: eval mode without gradients, as sampling
runs. (Backward kernels follow the forward's choice.)
"""

from __future__ import annotations

import argparse
import warnings

import torch

from mige_lightning.attention import attention_calls
from mige_lightning.module import MIGELightningModule
from tests.helpers.batches import make_batch

warnings.filterwarnings("ignore", message="You are trying to `self.log")  # no Trainer here, by design


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--authors", action="store_true", help="the authors' behaviour switches (xl's)")
    parser.add_argument("--eval", action="store_true", help="eval mode, no gradients: as in sampling")
    args = parser.parse_args()
    from mige_lightning.models.presets import AUTHORS_BEHAVIOUR

    torch.manual_seed(0)
    overrides = dict(AUTHORS_BEHAVIOUR) if args.authors else None
    module = MIGELightningModule(args.preset, overrides=overrides, warmup_steps=1)
    module.configure_model()
    module.to(args.device).train(not args.eval)
    batch = make_batch(module.config, [1, 2], seed=0)
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.set_grad_enabled(not args.eval), attention_calls(module.model) as calls:
        module.training_step(batch, 0)
    mode = "eval mode, no gradients (as sampling)" if args.eval else "train mode"
    print(f"## {args.preset}: attention calls in one training step's forward, {mode}, {args.device}\n")
    print("| module | class | fused SDPA | SDPA math fallback | hand-written softmax | ATen ops |")
    print("|---|---|---|---|---|---|")
    for row in calls.table():
        ops = ", ".join(sorted(row["ops"]))
        print(
            f"| {row['group']} | {row['class']} | {row['sdpa']} | {row['math']} | {row['softmax']} | {ops} |"
        )
    rows = calls.table()
    print(
        f"\nmodule groups: {len(rows)}; with SDPA's math fallback: {sum(bool(r['math']) for r in rows)}; "
        f"with a hand-written softmax: {sum(bool(r['softmax']) for r in rows)}"
    )


if __name__ == "__main__":
    main()

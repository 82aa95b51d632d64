"""How much margin the memorisation test has: train its model with several training-noise
streams and report, per scheduler, the worst L1 of the samples it gives back.

    python -m bench.memorise_seeds --steps 600 900 --seeds 0 1 2

(~80 s per 600 steps on 2 cores.) The test (``tests/test_memorise.py``) requires every sample
within L1 0.05 with every scheduler; its step count is chosen from this table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mige_lightning.pipeline import SCHEDULERS
from tests.helpers.memorise import sample_back, train_memoriser


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[600, 900])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    print("| steps | seed | " + " | ".join(sorted(SCHEDULERS)) + " | train + sample |")
    print("|---|---|" + "---|" * len(SCHEDULERS) + "---|")
    for steps in args.steps:
        for seed in args.seeds:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                module, truth = train_memoriser(
                    Path(tmp) / "world", Path(tmp) / "run", steps=steps, seed=seed
                )
                worst = {s: max(l1 for *_, l1 in sample_back(module, truth, s)) for s in sorted(SCHEDULERS)}
            row = " | ".join(f"{worst[s]:.3f}" for s in sorted(SCHEDULERS))
            print(f"| {steps} | {seed} | {row} | {time.perf_counter() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    main()

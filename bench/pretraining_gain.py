"""What each pretrained component buys the demo: the demo's fine-tuning (configs/demo.yaml, its steps,
batch and validation) started from none, some or all of the world's shipped components.

    .venv/bin/python -m bench.pretraining_gain             # = make bench-pretraining (~35 min)
    .venv/bin/python -m bench.pretraining_gain --rows scratch_lr1e-3 --runs runs/gain_extra

Each row is one `fit` of the demo with ``model.pretrained.*`` set to null for the components it
goes without (a component made without its T5 would read another T5's input space, so the bridge
and the DiT come only with the T5 they were trained against). The held-out scene / element accuracy
per task is the demo's own end-of-run validation (EMA weights, task defaults, judged from pixels),
read from the run's TensorBoard events. Writes the table into ``docs/RESULTS.md`` (between its
``pretraining-gain`` markers) and every run's numbers into ``runs/pretraining_gain/results.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ("subject", "edit", "subject_edit")
NONE = {"t5": "null", "blip2": "null", "dit": "null", "null_embedding": "null"}
# row → (label, components set to null, extra arguments)
ROWS = {
    "scratch": ("from scratch", NONE, []),
    "scratch_lr1e-3": ("from scratch, lr 1e-3 (its own best rate)", NONE, ["--model.lr=1e-3"]),
    "t5": ("+ T5", {k: v for k, v in NONE.items() if k != "t5"}, []),
    "t5_bridge": ("+ T5 + vision bridge", {"dit": "null", "null_embedding": "null"}, []),
    "t5_dit": ("+ T5 + text-to-image DiT", {"blip2": "null"}, []),
    "all": ("all three (the demo)", {}, []),
}


def train(row: str, runs: Path) -> tuple[Path, float]:
    _label, nulls, extra = ROWS[row]
    args = [sys.executable, "-m", "mige_lightning", "fit", "--config", "configs/demo.yaml"]
    args += [f"--model.pretrained.{k}={v}" for k, v in nulls.items()]
    args += [
        *extra,
        f"--trainer.logger.init_args.save_dir={runs}",
        f"--trainer.logger.init_args.name={row}",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_progress_bar=false",
    ]
    log_dir = runs / row / "version_0"
    if log_dir.exists():
        raise SystemExit(f"{log_dir} exists: move it away or pass another --runs")
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return log_dir, time.perf_counter() - start


def final_validation(log_dir: Path) -> dict:
    """The last logged val/<task>/{scene_acc,element_acc} (and per kind) of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        parts = tag.split("/")
        if parts[0] == "val" and parts[-1] in ("scene_acc", "element_acc") and "baseline" not in parts:
            out["/".join(parts[1:])] = round(events.Scalars(tag)[-1].value, 4)
    if not out:
        raise SystemExit(f"{log_dir}: no validation metrics logged")
    return out


def write_table(results: dict, meta: dict, path: Path) -> str:
    head = (
        "| start | "
        + " | ".join(TASKS)
        + " | edit kinds (recolour / remove / move / background) | subject_edit kinds (add / replace) |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for row, r in results.items():
        cells = [f"{r[f'{t}/scene_acc']:.2f} / {r[f'{t}/element_acc']:.2f}" for t in TASKS]
        kinds = " / ".join(
            f"{r.get(f'edit/{k}/scene_acc', float('nan')):.2f}"
            for k in ("recolour", "remove", "move", "background")
        )
        adds = " / ".join(
            f"{r.get(f'subject_edit/{k}/scene_acc', float('nan')):.2f}" for k in ("add", "replace")
        )
        lines.append(f"| {ROWS[row][0]} | " + " | ".join(cells) + f" | {kinds} | {adds} |")
    table = "\n".join(lines)
    start, end = "<!-- pretraining-gain:start -->", "<!-- pretraining-gain:end -->"
    block = (
        f"{start}\n_Written by `make bench-pretraining` on {meta['date']} ({meta['minutes']:.0f} min on "
        f"this machine): the demo's fine-tuning ({meta['steps']} steps) from each start; held-out scene / "
        f"element accuracy per task (kinds: scene accuracy), EMA weights, task defaults._\n\n{table}\n{end}"
    )
    text = path.read_text() if path.is_file() else ""
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return table


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", nargs="+", default=[r for r in ROWS if r != "scratch_lr1e-3"], choices=list(ROWS)
    )
    ap.add_argument("--runs", default="runs/pretraining_gain")
    ap.add_argument("--results", default="docs/RESULTS.md")
    args = ap.parse_args()
    runs = (REPO / args.runs).resolve()
    start = time.perf_counter()
    results, every = {}, {}
    for row in args.rows:
        log_dir, seconds = train(row, runs)
        results[row] = final_validation(log_dir)
        every[row] = {"fit_s": round(seconds, 1), **results[row]}
        scores = " ".join(f"{t} {results[row][f'{t}/scene_acc']:.2f}" for t in TASKS)
        print(f"{ROWS[row][0]}: {seconds:.0f} s, scene accuracy {scores}", flush=True)
    (runs / "results.json").write_text(json.dumps(every, indent=2))
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.perf_counter() - start) / 60,
        "steps": demo["trainer"]["max_steps"],
    }
    print(write_table(results, meta, REPO / args.results))


if __name__ == "__main__":
    main()

"""Where a demo model's samples go wrong: its one-step x₀ estimate, judged, per noise level.

    .venv/bin/python -m bench.denoise_diagnosis --ckpt runs/demo/version_0/checkpoints/last.ckpt

For each held-out request of the synthetic world (``data/demo``), the target is noised to step t and
the model (EMA weights, the demo's config) predicts x₀ from it in one forward pass. Printed:

1. the pixel judge's scene / element accuracy of those one-step estimates per task and t — compare
   with the sampled accuracies: a sampler can only refine what the high-noise estimates decide;
2. how much the model uses its condition: mean L1 of the x₀ estimate (images in [-1, 1]) with the
   sample's own condition, with another sample's condition of the same task, and with the null
   condition, next to the L1 of copying the source (``--split train`` by default: 48 per task);
3. what reaches the condition: how much the condition vectors and the x₀ estimate at t = 700 change
   when only a request's reference images, or only its instruction's text, come from another
   request — and when only its slot word (``left`` / ``center`` / ``right``, the first one in the
   instruction) names the next slot: whether the model knows *where* its instruction says;
4. a picture (``--out``): per request, source | target | estimate at t = 950, 700, 400.

Any other argument goes to the CLI that builds the model from ``--config`` (e.g.
``--model.pretrained.t5=null --model.overrides.train_text_encoder=true`` for a checkpoint trained
with a from-scratch T5).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from datamodules.dataset import MIGEDataset, collate
from datamodules.records import read_manifest
from mige_cli.main import main as cli_main
from mige_lightning.checkpoint_state import load_checkpoint_file
from mige_world.scene_judge import SceneAccuracy, load_truth, world_size
from mige_world.synthetic import DEFAULT_WORLD_ROOT, POSITIONS, manifest_specs

TASKS = ("subject", "edit", "subject_edit")
JUDGED_T = (0, 50, 200, 400, 700, 950)
CONDITION_T = (50, 400, 700, 950)


def load_module(config: str, ckpt: Path, cli_args: list[str] | None = None):
    cli = cli_main(["--config", config, *(cli_args or []), "--trainer.logger=false"], run=False)
    module = cli.model
    module.configure_model()
    state = load_checkpoint_file(ckpt)
    module.load_state_dict(state["state_dict"])
    module._ema_weights = state.get("ema")
    module.use_ema_weights()
    module.eval()
    module.connect_datamodule(cli.datamodule)
    return module, cli.datamodule


def records_by_task(root: str, split: str, limit: int | None) -> dict[str, list]:
    records = []
    for spec in manifest_specs(root, split):
        found, _ = read_manifest(
            spec["path"], task=spec.get("task"), subtask=spec.get("subtask"), base=spec.get("base")
        )
        records += found
    random.Random(0).shuffle(records)
    out = {task: [r for r in records if r.task.value == task] for task in TASKS}
    return {task: recs[:limit] for task, recs in out.items()}


def batch_of(records, transforms) -> dict:
    dataset = MIGEDataset(records, transforms)
    return collate([dataset[i] for i in range(len(records))])


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def swap_part(records: list, field: str) -> list:
    """Each record with ``field`` (``references`` or ``instruction``) taken from the next record that
    has as many reference images (so the placeholders still match); the rest kept."""
    out = []
    for i, record in enumerate(records):
        count = len(record.references)
        donors = [r for r in records[i + 1 :] + records[:i] if len(r.references) == count]
        out.append(dataclasses.replace(record, **{field: getattr(donors[0], field)}) if donors else record)
    return out


SLOT_WORD = re.compile(r"\b(" + "|".join(POSITIONS) + r")\b")


def move_slot_word(records: list) -> tuple[list, list[int]]:
    """Each record whose instruction names a slot with its first slot word naming the next slot
    instead (left → center → right → left); returns the records and the indices changed."""
    slots = list(POSITIONS)
    out, changed = [], []
    for i, record in enumerate(records):
        found = SLOT_WORD.search(record.instruction)
        if found is None:
            out.append(record)
            continue
        moved = slots[(slots.index(found.group(1)) + 1) % len(slots)]
        text = record.instruction[: found.start()] + moved + record.instruction[found.end() :]
        out.append(dataclasses.replace(record, instruction=text))
        changed.append(i)
    return out, changed


@torch.no_grad()
def module_inputs(module, records: list, transforms) -> tuple:
    return module.encode_batch(batch_of(records, transforms))


@torch.no_grad()
def estimate(module, encoded, t: int, *, cond=None, seed: int = 0) -> torch.Tensor:
    """The one-step x₀ estimate from the target noised to step t (``encoded``: ``encode_batch``'s
    output; ``cond``: another (condition, mask) than the batch's own)."""
    x0, cond_input, own, own_mask = encoded
    c, mask = cond if cond is not None else (own, own_mask)
    steps = torch.full((len(x0),), t)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x_t = module.diffusion.add_noise(x0, noise, steps)
    out = module.model(x_t, steps, cond=c, cond_mask=mask, cond_input=cond_input)
    prediction = out[:, : x0.shape[1]]
    return module.diffusion.predict_xstart(prediction, x_t, steps).clamp(-1, 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--world", default=DEFAULT_WORLD_ROOT)
    ap.add_argument("--split", default="train", help="records for the condition-use table")
    ap.add_argument("--out", type=Path, default=Path("bench/denoise_diagnosis.png"))
    # any other argument goes to the CLI that builds the model (e.g. --model.pretrained.t5=...)
    args, cli_args = ap.parse_known_args(argv)
    module, data = load_module(args.config, args.ckpt, cli_args)
    truth = {str(s.target): s for s in load_truth(args.world, "heldout").values()}
    size = world_size(args.world)

    heldout = records_by_task(args.world, "heldout", None)
    print("| task (held-out n) | " + " | ".join(f"t = {t}" for t in JUDGED_T) + " |")
    print("|---|" + "---|" * len(JUDGED_T))
    for task, records in heldout.items():
        encoded = module_inputs(module, records, data.transforms)
        samples = [truth[str(r.target)] for r in records]
        cells = []
        for t in JUDGED_T:
            x0_hat = estimate(module, encoded, t)
            judge = SceneAccuracy(size=size)
            judge.update([to_pil(x) for x in x0_hat], [s.scene for s in samples], [s.kind for s in samples])
            acc = judge.compute()[task]
            cells.append(f"{acc['scene_acc']:.2f} / {acc['element_acc']:.2f}")
        print(f"| {task} ({len(records)}) | " + " | ".join(cells) + " |")

    print()
    print(f"x₀ L1 ({args.split}, 48 per task): own condition / another sample's / null; copy the source")
    print("| task | t | own | another's | null | copy source |")
    print("|---|---|---|---|---|---|")
    for task, records in records_by_task(args.world, args.split, 48).items():
        batch = batch_of(records, data.transforms)
        n = len(records)
        with torch.no_grad():
            encoded = module.encode_batch(batch)
            null = module.encode_batch(batch, drop_condition=torch.ones(n, dtype=torch.bool))[2:]
        x0, cond_input, cond, mask = encoded
        other = torch.roll(torch.arange(n), 1)
        for t in CONDITION_T:
            row = []
            for c in (None, (cond[other], mask[other]), null):
                x0_hat = estimate(module, encoded, t, cond=c, seed=t)
                row.append((x0_hat - x0).abs().mean().item())
            copy = (cond_input - x0).abs().mean().item()
            print(f"| {task} | {t} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {copy:.3f} |")

    print()
    print(
        f"what reaches the condition ({args.split}, 48 per task): mean |Δ| of the condition vectors and of "
        "the x₀ estimate at t = 700 when only the reference images, or only the instruction's text, "
        "come from another sample with as many images; and of the x₀ estimate when only the first slot "
        "word names the next slot (over the n requests that name one)"
    )
    print(
        "| task | Δ condition, images swapped | Δ x₀, images swapped | Δ condition, text swapped "
        "| Δ x₀, text swapped | Δ x₀, slot word moved (n) |"
    )
    print("|---|---|---|---|---|---|")
    for task, records in records_by_task(args.world, args.split, 48).items():
        own = module_inputs(module, records, data.transforms)
        own_estimate = estimate(module, own, 700)
        cells = []
        for swapped in (swap_part(records, "references"), swap_part(records, "instruction")):
            other = module_inputs(module, swapped, data.transforms)
            width = min(own[2].shape[1], other[2].shape[1])
            cells.append((own[2][:, :width] - other[2][:, :width]).abs().mean().item())
            mixed = estimate(module, (*own[:2], *other[2:]), 700)
            cells.append((own_estimate - mixed).abs().mean().item())
        moved, changed = move_slot_word(records)
        slot_cell = "— (0)"
        if changed:
            other = module_inputs(module, [moved[i] for i in changed], data.transforms)
            subset = tuple(x[changed] for x in own)  # the same noise draw for both estimates
            delta = estimate(module, (*subset[:2], *other[2:]), 700) - estimate(module, subset, 700)
            slot_cell = f"{delta.abs().mean().item():.4f} ({len(changed)})"
        print(f"| {task} | " + " | ".join(f"{v:.4f}" for v in cells) + f" | {slot_cell} |")

    tiles = []
    for task in TASKS:
        records = heldout[task][:6]
        encoded = module_inputs(module, records, data.transforms)
        x0, cond_input = encoded[:2]
        estimates = [estimate(module, encoded, t) for t in (950, 700, 400)]
        for i in range(len(records)):
            tiles += [cond_input[i], x0[i]] + [e[i] for e in estimates]
    grid = make_grid((torch.stack(tiles).clamp(-1, 1) + 1) / 2, nrow=5, padding=2, pad_value=1)
    save_image(torch.nn.functional.interpolate(grid[None], scale_factor=3, mode="nearest")[0], args.out)
    print(f"\npicture (source | target | estimate at t = 950, 700, 400): {args.out}")


if __name__ == "__main__":
    main()

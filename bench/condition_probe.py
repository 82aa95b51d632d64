"""How fast a fresh demo model learns to follow one task's instructions where a sample's scene is
decided — at high noise — and which part of the model is the slow one.

    .venv/bin/python -m bench.condition_probe --task edit --steps 800 --batch-size 8 --bf16
    .venv/bin/python -m bench.condition_probe --task edit --steps 800 --batch-size 8 --bf16 --condition words
    .venv/bin/python -m bench.condition_probe --task edit ... --override t5.num_layers=1
    .venv/bin/python -m bench.condition_probe --task edit ... --pretrained t5=null \
        --override train_text_encoder=true        # the demo's T5 from scratch instead of pre-trained

A model of the config (``configs/demo.yaml`` by default, with its frozen T5 from
``data/demo/text_encoder``: ``make text-encoder`` writes it; ``--override key=value`` edits its
``model.overrides``, ``--pretrained component=source`` its ``model.pretrained``) is trained on the chosen task's training requests of a generated world, with
t drawn uniformly from [--min-t, 1000) and no condition dropout. Every --every steps its one-step
x₀ estimates at t = 950 — made from near-pure noise, so only the condition and the source decide
them, as they decide a sample's scene — are read back by the pixel judge on the held-out requests
plus --extra-eval training requests that are kept out of training; printed per kind
(scene / element accuracy).

``--condition words`` (edit only) replaces the multimodal encoder's output by fixed random vectors,
one per word of the instruction plus one per position (``<imagehere>`` is a word: the source
reaches the DiT on its input channels anyway): an encoder that knows every word and its place from
the first step. The gap between it and ``--condition encoder`` at equal steps is what the
from-scratch encoder costs. ``--no-word-positions`` drops the position vectors (the same word
vectors otherwise); ``--word-prefix`` gives the words of the task prefix too, as T5 gets them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path

import torch
import yaml

from bench.denoise_diagnosis import batch_of, records_by_task, to_pil
from mige_cli.main import main as cli_main
from mige_lightning.prompt import build_prompt
from mige_world.scene_judge import SceneAccuracy, load_truth, world_size
from mige_world.synthetic import DEFAULT_WORLD_ROOT

JUDGED_T = 950


def model_section(config: str, key: str) -> dict:
    """``model.<key>`` of a config file (empty when absent)."""
    return dict(yaml.safe_load(Path(config).read_text())["model"].get(key) or {})


def model_overrides(config: str, overrides: list[str]) -> dict:
    """The config's ``model.overrides`` with each ``dotted.key=yaml value`` applied."""
    merged = model_section(config, "overrides")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override {item!r}: expected dotted.key=value, e.g. t5.num_layers=1")
        *parents, leaf = key.split(".")
        node = merged
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return merged


def model_pretrained(config: str, sources: list[str]) -> dict:
    """The config's ``model.pretrained`` with each ``component=source`` set (e.g. t5=<dir>;
    ``t5=null``: random init)."""
    merged = model_section(config, "pretrained")
    for item in sources:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--pretrained {item!r}: expected component=source, e.g. t5=data/demo/t5")
        merged[key] = None if value == "null" else value
    return merged


class WordCondition:
    """Fixed random vectors in place of the encoder: one per word, one per position (seeded)."""

    def __init__(self, dim: int, *, seed: int = 5, max_length: int = 64, positions: bool = True):
        self.dim, self.max_length = dim, max_length
        self.generator = torch.Generator().manual_seed(seed)
        self.positions = torch.randn(max_length, dim, generator=self.generator)
        if not positions:  # drawn all the same, so the word vectors are the ones of the default
            self.positions.zero_()
        self.vocab: dict[str, torch.Tensor] = {}

    def words(self, instruction: str) -> list[str]:
        return instruction.replace("<imagehere>", " <imagehere> ").replace(",", " , ").split()

    def __call__(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for text in instructions:
            words = self.words(text)
            if len(words) > self.max_length:
                raise ValueError(f"instruction of {len(words)} words > {self.max_length}: {text!r}")
            for w in words:
                if w not in self.vocab:
                    self.vocab[w] = torch.randn(self.dim, generator=self.generator)
            rows.append(torch.stack([self.vocab[w] + self.positions[i] for i, w in enumerate(words)]))
        width = max(len(r) for r in rows)
        cond = torch.zeros(len(rows), width, self.dim)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            cond[i, : len(row)], mask[i, : len(row)] = row, 1
        return cond, mask


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument(
        "--world", default=DEFAULT_WORLD_ROOT, help="a generated world (make demo writes data/demo)"
    )
    ap.add_argument("--task", default="edit", choices=("subject", "edit", "subject_edit"))
    ap.add_argument("--condition", default="encoder", choices=("encoder", "words"))
    ap.add_argument("--override", action="append", default=[], help="model.overrides key=value (repeatable)")
    ap.add_argument(
        "--pretrained", action="append", default=[], help="model.pretrained key=source (repeatable)"
    )
    ap.add_argument("--no-word-positions", action="store_true", help="word vectors only, no position vectors")
    ap.add_argument("--word-prefix", action="store_true", help="words of the task prefix too (what T5 sees)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-t", type=int, default=600)
    ap.add_argument("--every", type=int, default=400)
    ap.add_argument("--extra-eval", type=int, default=150, help="training requests judged, not trained on")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (1.5x faster on a bf16 CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.condition == "words" and args.task != "edit":
        raise SystemExit("--condition words: edit only (a subject's reference images are not words)")
    if (args.no_word_positions or args.word_prefix) and args.condition != "words":
        raise SystemExit("--no-word-positions / --word-prefix: only with --condition words")

    overrides = json.dumps(model_overrides(args.config, args.override))
    pretrained = json.dumps(model_pretrained(args.config, args.pretrained))
    cli = cli_main(
        [
            *("--config", args.config, "--trainer.logger=false"),
            *(f"--model.overrides={overrides}", f"--model.pretrained={pretrained}"),
        ],
        run=False,
    )
    module, data = cli.model, cli.datamodule
    module.configure_model()
    module.connect_datamodule(data)
    torch.manual_seed(args.seed)

    truth = {
        str(s.target): s for split in ("heldout", "train") for s in load_truth(args.world, split).values()
    }
    train = records_by_task(args.world, "train", None)[args.task]
    evaluated = records_by_task(args.world, "heldout", None)[args.task] + train[: args.extra_eval]
    train = train[args.extra_eval :]
    words = None
    if args.condition == "words":
        words = WordCondition(module.model.dit.config.caption_channels, positions=not args.no_word_positions)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    optimiser = torch.optim.AdamW(module.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    rng, size, start, rows = random.Random(args.seed), world_size(args.world), time.time(), []

    def encode(records):
        x0, source, cond, mask = module.encode_batch(batch_of(records, data.transforms))
        if words is None:
            return x0, source, cond, mask
        texts = [build_prompt(r.task, r.instruction) if args.word_prefix else r.instruction for r in records]
        return x0, source, *words(texts)

    def evaluate(step: int) -> None:
        module.eval()
        with torch.no_grad(), autocast():
            x0, source, cond, mask = encode(evaluated)
            t = torch.full((len(x0),), JUDGED_T)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
            x_t = module.diffusion.add_noise(x0, noise, t)
            out = module.model(x_t, t, cond=cond, cond_mask=mask, cond_input=source)
            x0_hat = module.diffusion.predict_xstart(out.float()[:, : x0.shape[1]], x_t, t).clamp(-1, 1)
        module.train()
        judge = SceneAccuracy(size=size)
        samples = [truth[str(r.target)] for r in evaluated]
        judge.update([to_pil(x) for x in x0_hat], [s.scene for s in samples], [s.kind for s in samples])
        acc = judge.compute()
        row = {"step": step, "seconds": round(time.time() - start), **acc}
        rows.append(row)
        cells = " | ".join(f"{g} {a['scene_acc']:.2f} / {a['element_acc']:.2f}" for g, a in acc.items())
        print(f"step {step:5d} | {row['seconds']:4d} s | {cells}", flush=True)

    print(
        f"{args.task}: {len(train)} training requests, {len(evaluated)} judged; condition: {args.condition}"
    )
    module.train()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            evaluate(step)
        if step == args.steps:
            break
        with autocast():
            x0, source, cond, mask = encode(rng.sample(train, args.batch_size))
            t = torch.randint(args.min_t, 1000, (len(x0),))
            noise = torch.randn_like(x0)
            x_t = module.diffusion.add_noise(x0, noise, t)
            out = module.model(x_t, t, cond=cond, cond_mask=mask, cond_input=source)
            losses = module.diffusion.training_losses(out.float(), x_start=x0, x_t=x_t, t=t, noise=noise)
        optimiser.zero_grad()
        losses["loss"].mean().backward()
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)
        optimiser.step()
    return rows


if __name__ == "__main__":
    main()

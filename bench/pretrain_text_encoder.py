"""Pre-train a config's T5 text encoder on a generated world's instruction texts, so that a model
can start from a text encoder that already tells its words apart (the paper's Flan-T5 arrives
pretrained; the CPU demo's is random).

    .venv/bin/python bench/pretrain_text_encoder.py --world data/demo --out data/demo/text_encoder
    python -m mige_lightning fit --config configs/demo.yaml \\
        --model.pretrained='{"tokenizer": "words", "t5": "data/demo/text_encoder"}' \\
        [--model.overrides=<...with train_text_encoder: false to keep it as loaded>]

The objective is T5's own kind — denoising with an encoder-decoder: each word of a training
instruction (task prefix + instruction, exactly the text the model's encoder sees) is replaced by a
mask id with probability --mask, and a small decoder must write the whole original sequence back,
so the encoder's outputs have to carry every word and its order. Each ``<imagehere>`` stands as
``num_query_tokens`` copies of one image-slot id (where the model splices in the image's tokens),
so distances between words are the ones the model will see. Only the training split's texts are
used; held-out texts are only read to report token accuracy. The encoder (no decoder) is written
with ``save_pretrained`` and loads through ``model.pretrained.t5`` like any pretrained T5.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from denoise_diagnosis import records_by_task  # noqa: E402

from mige_lightning.models.loading import load_tokenizer  # noqa: E402
from mige_lightning.models.presets import get_config  # noqa: E402
from mige_lightning.prompt import build_prompt, split_placeholders  # noqa: E402


def token_rows(texts: list[str], tokenizer, *, num_queries: int, image_id: int) -> list[list[int]]:
    """Token ids as the model's encoder lays them out: text, ``num_queries`` image slots per
    placeholder, EOS."""
    rows = []
    for text in texts:
        segments = tokenizer(split_placeholders(text), add_special_tokens=False)["input_ids"]
        row: list[int] = []
        for j, ids in enumerate(segments):
            if j:
                row += [image_id] * num_queries
            row += ids
        rows.append([*row, tokenizer.eos_token_id])
    return rows


def corrupt(rows: list[list[int]], *, mask_id: int, keep: set[int], p: float, rng: random.Random, pad: int):
    """(input ids, attention mask, labels): words masked with probability p, labels = the rows."""
    width = max(map(len, rows))
    inputs = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        noisy = [mask_id if t not in keep and rng.random() < p else t for t in row]
        inputs[i, : len(row)] = torch.tensor(noisy)
        labels[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    return inputs, attention, labels


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml", help="its model.preset / overrides / tokenizer")
    ap.add_argument("--world", default="data/demo", help="a generated world (make demo writes data/demo)")
    ap.add_argument("--out", required=True, help="directory for the encoder (save_pretrained)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mask", type=float, default=0.25, help="probability that a word is masked")
    ap.add_argument("--decoder-layers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model_cfg = yaml.safe_load(Path(args.config).read_text())["model"]
    config = get_config(
        model_cfg.get("preset", "tiny"), model_cfg.get("overrides"), model_cfg.get("pretrained")
    )
    if config.pretrained.t5 is not None:
        raise SystemExit(
            f"{args.config}: model.pretrained.t5 is set; this pre-trains a random T5 from its config"
        )
    tokenizer = load_tokenizer(config.pretrained.tokenizer or "byte")
    image_id, mask_id = len(tokenizer), len(tokenizer) + 1
    t5 = dict(config.t5)
    if t5.get("vocab_size", 32128) < mask_id + 1:
        raise SystemExit(
            f"T5 vocab_size {t5.get('vocab_size')} < {mask_id + 1}: no room for image-slot and mask ids"
        )

    def texts(split: str) -> list[str]:
        return [
            build_prompt(r.task, r.instruction)
            for recs in records_by_task(args.world, split, None).values()
            for r in recs
        ]

    q = config.num_query_tokens
    train = token_rows(texts("train"), tokenizer, num_queries=q, image_id=image_id)
    heldout = token_rows(texts("heldout"), tokenizer, num_queries=q, image_id=image_id)
    if not train:
        raise SystemExit(f"{args.world}: no training instructions")
    keep = {image_id, tokenizer.eos_token_id}
    pad = tokenizer.pad_token_id
    torch.manual_seed(args.seed)
    t5_config = T5Config(
        **t5,
        num_decoder_layers=args.decoder_layers,
        decoder_start_token_id=pad,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = T5ForConditionalGeneration(t5_config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng, eval_rng = random.Random(args.seed), random.Random(args.seed + 1)

    def accuracy(rows: list[list[int]]) -> dict:
        model.eval()
        with torch.no_grad():
            inputs, attention, labels = corrupt(
                rows, mask_id=mask_id, keep=keep, p=args.mask, rng=eval_rng, pad=pad
            )
            guess = model(input_ids=inputs, attention_mask=attention, labels=labels).logits.argmax(-1)
        model.train()
        real, masked = labels != -100, inputs == mask_id
        return {
            "token_acc": round((guess == labels)[real].float().mean().item(), 4),
            "masked_acc": round((guess == labels)[masked].float().mean().item(), 4),
        }

    print(
        f"{len(train)} training texts, {len(heldout)} held-out; T5 {t5_config.num_layers} layers d {t5_config.d_model}"
    )
    start, log = time.time(), []
    for step in range(args.steps + 1):
        if step % 200 == 0 or step == args.steps:
            acc = accuracy(heldout or train[:256])
            log.append({"step": step, "seconds": round(time.time() - start, 1), **acc})
            print(
                f"step {step:5d} | {log[-1]['seconds']:6.1f} s | held-out tokens {acc['token_acc']:.3f}, masked words {acc['masked_acc']:.3f}",
                flush=True,
            )
        if step == args.steps:
            break
        inputs, attention, labels = corrupt(
            rng.sample(train, min(args.batch_size, len(train))),
            mask_id=mask_id,
            keep=keep,
            p=args.mask,
            rng=rng,
            pad=pad,
        )
        loss = model(input_ids=inputs, attention_mask=attention, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    encoder = T5EncoderModel(T5Config(**t5, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id))
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("shared.", "encoder."))}
    missing, _ = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "encoder.embed_tokens.weight"]  # tied to shared.weight
    if missing:
        raise RuntimeError(f"encoder weights not copied: {missing[:5]}")
    out = Path(args.out)
    encoder.save_pretrained(out)
    summary = {"world": args.world, "config": args.config, "steps": args.steps, "mask": args.mask, "log": log}
    (out / "pretraining.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()

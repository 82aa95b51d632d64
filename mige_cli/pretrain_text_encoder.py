"""``python -m mige_lightning pretrain-text-encoder --config …``: pre-train a config's T5 on the
instruction texts of its synthetic world, so that training starts from a text encoder that already
tells its words and their order apart (the paper's Flan-T5 arrives pretrained; a T5 of the CPU
demo's size has no public checkpoint).

    python -m mige_lightning pretrain-text-encoder --config configs/demo.yaml   # make demo runs this
    python -m mige_lightning fit --config configs/demo.yaml

Takes ``fit``'s config (any number of ``--config`` files and ``--section.key=value`` overrides,
parsed by the same LightningCLI parser): the T5's shape comes from ``model.preset`` /
``model.overrides`` / ``model.pretrained.tokenizer``, the texts from ``data.synthetic`` (the world is
generated first when it is not there yet, as ``fit`` would), and the encoder is written where
``model.pretrained.t5`` points (or ``--out``). Nothing is done when that directory already holds an
encoder pre-trained with the same settings; one pre-trained with other settings is replaced, and a
directory that this command did not write is never touched. The encoder is written beside the
target and moved into place when complete, so an interrupted run leaves nothing half-written there.

The objective is T5's own kind, denoising with an encoder-decoder: each word of a training
instruction (task prefix + instruction, exactly the text the model's encoder sees) is replaced by a
mask id with probability ``--mask``, and a small decoder must write the whole original sequence
back, so the encoder's outputs have to carry every word and its order. Each ``<imagehere>`` stands
as ``num_query_tokens`` copies of one image-slot id (where the model splices in the image's
tokens), so distances between words are the ones the model will see. Only the training split's
texts are used; held-out texts are only read to report token accuracy. The encoder alone is saved
with ``save_pretrained`` (plus ``pretraining.json``: settings and accuracy log) and loads through
``model.pretrained.t5`` like any pretrained T5.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

from datamodules.records import read_manifest
from datamodules.training_data import TrainingDataModule
from mige_cli.cli import CLI_CLASSES, MIGECLI
from mige_lightning.models.loading import load_tokenizer
from mige_lightning.models.presets import get_config
from mige_lightning.prompt import build_prompt, split_placeholders
from mige_lightning.synthetic import manifest_specs

RECORD = "pretraining.json"


class _ParsedConfig(MIGECLI):
    """The LightningCLI's parsing (config files, overrides, interpolation) without building the
    model: the model would refuse a ``model.pretrained.t5`` that this command has yet to write."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def fit_config(cli_args: list[str]) -> dict[str, Any]:
    """``fit``'s parsed config (model and data sections) as plain dicts."""
    cli = _ParsedConfig(**CLI_CLASSES, args=cli_args, run=False)
    config = cli.config.as_dict()
    data = config.get("data") or {}
    return {"model": config["model"], "data": data.get("init_args", data)}


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


def world_texts(root: str | Path, split: str) -> list[str]:
    """Every instruction of a synthetic world's split as the encoder sees it (task prefix + text)."""
    texts = []
    for spec in manifest_specs(root, split):
        records, problems = read_manifest(
            spec["path"], task=spec.get("task"), subtask=spec.get("subtask"), base=spec.get("base")
        )
        if problems:
            raise ValueError(f"{spec['path']}: {problems[0]}")
        texts += [build_prompt(r.task, r.instruction) for r in records]
    return texts


def settings_of(mige, world: dict, args: argparse.Namespace) -> dict[str, Any]:
    """What the saved encoder depends on (its T5 config, tokenizer and image slots, the world, the
    recipe); a directory with the same settings is up to date."""
    return {
        "t5": dict(mige.t5),
        "tokenizer": mige.pretrained.tokenizer,
        "num_query_tokens": mige.num_query_tokens,
        "world": dict(world),
        **{k: getattr(args, k) for k in ("steps", "batch_size", "lr", "mask", "decoder_layers", "seed")},
    }


def pretrain(args: argparse.Namespace, cli_args: list[str]) -> dict[str, Any]:
    config = fit_config(cli_args)
    model_cfg, data_cfg = config["model"], config["data"]
    world = dict(data_cfg.get("synthetic") or {})
    if not world:
        raise SystemExit(
            "pretrain-text-encoder: data.synthetic is not set; the texts come from a synthetic world"
        )
    pretrained = dict(model_cfg.get("pretrained") or {})
    out = Path(args.out or pretrained.get("t5") or "")
    if not str(out) or str(out) == ".":
        raise SystemExit(
            "pretrain-text-encoder: give --out or set model.pretrained.t5 to the directory to write"
        )
    overrides = {k: v for k, v in (model_cfg.get("overrides") or {}).items() if k != "train_text_encoder"}
    # the T5 to pre-train is the config's random one: its shape, not its (still missing) weights
    mige = get_config(model_cfg.get("preset", "tiny"), overrides, {**pretrained, "t5": None})
    settings = json.loads(json.dumps(settings_of(mige, world, args)))  # as it reads back from disk
    if out.exists():
        record = out / RECORD
        if not record.is_file():
            raise SystemExit(
                f"{out} exists and holds no {RECORD}: not written by this command, left as it is"
            )
        saved = json.loads(record.read_text())
        if saved.get("settings") == settings:
            print(f"{out}: already pre-trained with these settings; nothing to do")
            return saved
        print(f"{out}: pre-trained with other settings; training it again")

    TrainingDataModule(synthetic=dict(world)).prepare_data()  # generates the world when missing
    root = Path(world.get("root", "data/demo"))

    tokenizer = load_tokenizer(mige.pretrained.tokenizer or "byte")
    image_id, mask_id = len(tokenizer), len(tokenizer) + 1
    t5 = dict(mige.t5)
    if t5.get("vocab_size", 32128) < mask_id + 1:
        raise SystemExit(
            f"T5 vocab_size {t5.get('vocab_size')} < {mask_id + 1}: no room for image-slot and mask ids"
        )
    q = mige.num_query_tokens
    train = token_rows(world_texts(root, "train"), tokenizer, num_queries=q, image_id=image_id)
    heldout = token_rows(world_texts(root, "heldout"), tokenizer, num_queries=q, image_id=image_id)
    if not train:
        raise SystemExit(f"{root}: no training instructions")
    keep, pad = {image_id, tokenizer.eos_token_id}, tokenizer.pad_token_id
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
        f"{len(train)} training texts, {len(heldout)} held-out; "
        f"T5 {t5_config.num_layers} layers, d_model {t5_config.d_model}",
        flush=True,
    )
    start, log = time.time(), []
    for step in range(args.steps + 1):
        if step % 100 == 0 or step == args.steps:
            acc = accuracy(heldout or train[:256])
            log.append({"step": step, "seconds": round(time.time() - start, 1), **acc})
            print(
                f"step {step:5d} | {log[-1]['seconds']:6.1f} s | held-out: tokens written back "
                f"{acc['token_acc']:.3f}, masked words {acc['masked_acc']:.3f}",
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
    # written beside, moved into place when complete: an interrupted run leaves no half directory
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    encoder.save_pretrained(partial)
    summary = {"settings": settings, "log": log}
    (partial / RECORD).write_text(json.dumps(summary, indent=1))
    if out.exists():  # our own, with other settings (checked above)
        shutil.rmtree(out)
    partial.rename(out)
    print(f"wrote {out} (load it with model.pretrained.t5: {out})")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m mige_lightning pretrain-text-encoder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other argument (--config FILE, --model.*, --data.*) is fit's.",
    )
    ap.add_argument("--out", help="directory for the encoder (default: the config's model.pretrained.t5)")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mask", type=float, default=0.25, help="probability that a word is masked")
    ap.add_argument("--decoder-layers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args, cli_args = ap.parse_known_args(argv)
    return pretrain(args, cli_args)

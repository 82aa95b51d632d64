"""``python -m mige_lightning pretrain-world --config configs/demo.yaml``: make the world's
pretrained components, where the config's ``model.pretrained`` points.

    t5      the text encoder (Flan-T5's place)            → model.pretrained.t5
    bridge  vision tower + queries + Q-Former + projection → model.pretrained.blip2 (BLIP-2's layout)
    dit     the text-to-image DiT, no source channels      → model.pretrained.dit, and the null caption
                                                             it was trained with → model.pretrained.null_embedding;
            its early tokens aligned (REPA) to the bridge's frozen vision tower (--dit-repa-weight 0: off)

Takes ``fit``'s config (any number of ``--config`` files and ``--section.key=value`` overrides): the
components' shapes come from ``model.preset`` / ``model.overrides``, the diffusion settings from
``model``, the data from ``data.synthetic`` (generated first when missing, as ``fit`` would). Only
the world's training split is read, less every scene a held-out record shows (target or source);
held-out images and captions are read only to measure each stage.

Each stage is a LightningModule run by Lightning's Trainer (progress bar, TensorBoard under
``runs/pretrain_world/<stage>``, checkpoints), deterministic given ``--seed``, and writes its
component beside its target, moving it into place when complete (an interrupted run leaves
nothing half-written). Beside each component, ``pretraining.json`` records the settings it was made
with (the component's shape, the stage's recipe, the world's settings and hash, the components it
was trained against) and its measure; a stage whose component is up to date is skipped, and the
stages after a re-made one are re-made. ``provenance.json`` in the components' common folder sums
it up: command, commit, seeds, world hash, measures, durations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import save_file
from transformers import Blip2Config

from mige_lightning.models.presets import MIGEConfig, get_config
from mige_lightning.prompt import build_prompt
from mige_lightning.transforms import Transforms
from mige_world.describe import (
    Described,
    caption,
    heldout_scene_keys,
    read_split,
    record_images,
    scene_key,
    training_scenes,
    worded,
)
from mige_world.stages import (
    LM_FOLDER,
    BridgePairs,
    DescribedImages,
    TextCorpus,
    TextEncoderPretraining,
    TextToImagePretraining,
    VisionBridgePretraining,
    collate_images,
    collate_pairs,
    seeded_loader,
    text_ids,
)
from mige_world.synthetic import DEFAULT_WORLD_ROOT

RECORD = "pretraining.json"
PROVENANCE = "provenance.json"
STAGES = ("t5", "bridge", "dit")
NULL_FILE = "null_caption.safetensors"
DIFFUSION_KEYS = ("num_train_timesteps", "beta_schedule", "prediction_type", "snr_gamma", "timestep_sampling")


# ----------------------------------------------------------------------------------------- config
def world_hash(world: dict) -> str:
    """The world's identity: its generator settings (the generator is deterministic in them)."""
    keys = ("num_samples", "size", "seed", "heldout_fraction")
    return hashlib.sha256(json.dumps({k: world.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[
        :16
    ]


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def component_hash(directory: Path) -> str:
    """A component's identity: the hash of its weights files."""
    files = sorted(directory.rglob("*.safetensors"))
    return hashlib.sha256("".join(file_hash(p) for p in files).encode()).hexdigest()[:16]


def targets(model_cfg: dict) -> dict[str, Path]:
    pretrained = dict(model_cfg.get("pretrained") or {})
    missing = [k for k in ("t5", "blip2", "dit", "null_embedding") if not pretrained.get(k)]
    if missing:
        raise SystemExit(
            f"pretrain-world: set model.pretrained.{{{', '.join(missing)}}} to where the components go"
        )
    return {
        "t5": Path(pretrained["t5"]),
        "bridge": Path(pretrained["blip2"]),
        "dit": Path(pretrained["dit"]),
        "null": Path(pretrained["null_embedding"]),
    }


def recorded(directory: Path) -> dict | None:
    record = directory / RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def replace_dir(partial: Path, out: Path) -> None:
    """Move a finished component into place (ours only: a folder without a record is refused)."""
    if out.exists():
        if recorded(out) is None:
            raise SystemExit(
                f"{out} exists and holds no {RECORD}: not written by pretrain-world, left as it is"
            )
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(out)


def trainer(
    stage: str, args: argparse.Namespace, *, steps: int, val_every: int, precision: str, ema: float = 0.0
) -> L.Trainer:
    """The stage's Trainer; ``ema`` > 0: Lightning's EMA of the weights (decay ``ema``), used for
    the stage's validation and saved as the component."""
    return L.Trainer(
        callbacks=[EMAWeightAveraging(decay=ema)] if ema > 0 else None,
        accelerator="cpu" if args.accelerator == "cpu" else "auto",
        devices=1,
        max_steps=steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        precision=precision,
        logger=TensorBoardLogger(save_dir=args.log_dir, name="pretrain_world", version=stage),
        enable_model_summary=False,
        log_every_n_steps=20,
        deterministic=False,
    )


def check_components(pretrained: dict, world: dict | None) -> None:
    """Before ``fit`` builds anything: every pretrained component that ``pretrain-world`` made
    (its folder holds ``pretraining.json``) must have been made for this run's synthetic world."""
    if not world:
        return
    want = world_hash(world)
    for key in ("t5", "blip2", "dit"):
        source = pretrained.get(key)
        record = recorded(Path(source)) if source and Path(source).is_dir() else None
        if record is None:
            continue
        made_for = record.get("settings", {}).get("world", {})
        if made_for.get("hash") != want:
            raise SystemExit(
                f"model.pretrained.{key}: {source} was pre-trained on another synthetic world "
                f"({made_for.get('settings')}) than data.synthetic ({world}); make this world's "
                "components with `python -m mige_lightning pretrain-world --config <the same configs>`"
            )


# ----------------------------------------------------------------------------------------- data
def heldout_items(root: Path) -> tuple[list[Described], list[Described]]:
    """Held-out images (references and sources, one per distinct content) and held-out scenes
    (targets and sources): what the bridge and the DiT are measured on."""
    images: dict[str, Described] = {}
    scenes: dict[str, Described] = {}
    for _task, record in read_split(root, "heldout"):
        for item in record_images(record, root):
            images.setdefault(item.kind + item.words, item)
        scenes.setdefault(
            scene_key(record["scene"]),
            Described(root / record["image"], caption(record["scene"]), "scene", record["scene"]),
        )
        if record.get("source_scene") is not None:
            src = record["source_scene"]
            scenes.setdefault(
                scene_key(src), Described(root / record["source_path"][0], caption(src), "scene", src)
            )
    return list(images.values()), list(scenes.values())


def training_records(root: Path) -> list[tuple[str, dict]]:
    """Training records that show no held-out scene (target or source)."""
    excluded = heldout_scene_keys(root)
    out = []
    for task, record in read_split(root, "train"):
        shown = [record["scene"]] + ([record["source_scene"]] if record.get("source_scene") else [])
        if not any(scene_key(s) in excluded for s in shown):
            out.append((task, record))
    return out


def check_unseen(training: list[Described], heldout_keys: frozenset[str]) -> None:
    """Refuse to train on a held-out scene (the stages' data are built to exclude them)."""
    leaked = [
        item.words for item in training if item.kind == "scene" and scene_key(item.scene) in heldout_keys
    ]
    if leaked:
        raise RuntimeError(f"{len(leaked)} held-out scenes in pre-training data, e.g. {leaked[0]!r}")


# ----------------------------------------------------------------------------------------- stages
def text_rows(texts: list[str], tokenizer, *, num_queries: int, image_id: int) -> list[list[int]]:
    """Token ids as MIGE's encoder lays them out: text, ``num_queries`` image slots per
    placeholder, EOS."""
    from mige_lightning.prompt import split_placeholders

    rows = []
    for text in texts:
        row: list[int] = []
        for j, ids in enumerate(text_ids(tokenizer, split_placeholders(text))):
            if j:
                row += [image_id] * num_queries
            row += ids
        rows.append([*row, tokenizer.eos_token_id])
    return rows


def t5_corpus(root: Path, records: list[tuple[str, dict]]) -> list[str]:
    """The texts the T5 learns: training instructions as the model sees them (prefix + text), the
    same with each image's words in its place, every training scene's caption and sprite name."""
    texts = []
    for task, record in records:
        texts.append(build_prompt(task, record["multi_prompt"]))
        texts.append(build_prompt(task, worded(record, record_images(record, root))))
    scenes = training_scenes(root)
    texts += [item.words for item in scenes]
    texts += sorted({s["colour"] + " " + s["shape"] for item in scenes for s in item.scene["sprites"]})
    return texts


def stage_t5(mige: MIGEConfig, root: Path, out: Path, args) -> dict:
    from mige_lightning.models.loading import load_tokenizer

    tokenizer = load_tokenizer(mige.pretrained.tokenizer or "byte")
    image_id, mask_id = len(tokenizer), len(tokenizer) + 1
    t5 = dict(mige.t5)
    if t5.get("vocab_size", 32128) < mask_id + 1:
        raise SystemExit(
            f"T5 vocab_size {t5.get('vocab_size')} < {mask_id + 1}: no room for image-slot and mask ids"
        )
    q = mige.num_query_tokens
    train = text_rows(t5_corpus(root, training_records(root)), tokenizer, num_queries=q, image_id=image_id)
    heldout = text_rows(
        [build_prompt(t, r["multi_prompt"]) for t, r in read_split(root, "heldout")],
        tokenizer,
        num_queries=q,
        image_id=image_id,
    )
    L.seed_everything(args.seed, verbose=False)
    module = TextEncoderPretraining(
        t5=t5,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        mask_id=mask_id,
        image_id=image_id,
        decoder_layers=args.t5_decoder_layers,
        mask=args.t5_mask,
        lr=args.t5_lr,
        seed=args.seed,
    )
    print(f"[t5] {len(train)} training texts, {len(heldout)} held-out", flush=True)
    fit = trainer("t5", args, steps=args.t5_steps, val_every=args.t5_steps, precision="32-true")
    fit.fit(
        module,
        seeded_loader(
            TextCorpus(train), batch_size=args.t5_batch, seed=args.seed, shuffle=True, collate_fn=list
        ),
        seeded_loader(TextCorpus(heldout), batch_size=256, seed=args.seed, shuffle=False, collate_fn=list),
    )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    module.encoder().save_pretrained(partial)
    module.model.save_pretrained(partial / LM_FOLDER)  # the bridge stage reads back through its decoder
    return {"partial": partial, "measure": module.measure}


def stage_bridge(mige: MIGEConfig, root: Path, out: Path, t5_dir: Path, args) -> dict:
    transforms = Transforms(mige.resolution, mige.vision_resolution, mige.vision_mean, mige.vision_std)
    images: dict[str, int] = {}
    described: list[Described] = []

    def index(item: Described) -> int:
        key = item.kind + ":" + (scene_key(item.scene) if item.kind == "scene" else item.words)
        if key not in images:
            images[key] = len(described)
            described.append(item)
        return images[key]

    pairs = []
    for task, record in training_records(root):
        pairs.append(
            (build_prompt(task, record["multi_prompt"]), [index(i) for i in record_images(record, root)])
        )
    for item in training_scenes(root):  # every training scene alone, too
        pairs.append(("<imagehere>", [index(item)]))
    # each sprite kind alone as often as a scene is: 12 kinds would otherwise be 0.1 % of the pairs
    alone = [("<imagehere>", [i]) for i in range(len(described)) if described[i].kind == "reference"]
    pairs += alone * max(1, round(len(pairs) / max(1, len(alone)) * args.bridge_reference_share))
    heldout_keys = heldout_scene_keys(root)
    check_unseen(described, heldout_keys)
    heldout, _ = heldout_items(root)
    L.seed_everything(args.seed, verbose=False)
    module = VisionBridgePretraining(
        t5=str(t5_dir),
        tokenizer=mige.pretrained.tokenizer or "byte",
        vision=dict(mige.vision),
        qformer=dict(mige.qformer),
        num_query_tokens=mige.num_query_tokens,
        align_weight=args.bridge_align_weight,
        lr=args.bridge_lr,
        warmup_steps=args.warmup,
        seed=args.seed,
    )
    data = BridgePairs(pairs, described, transforms)
    print(
        f"[bridge] {len(pairs)} training pairs over {len(described)} distinct images; {len(heldout)} held-out images",
        flush=True,
    )
    fit = trainer(
        "bridge", args, steps=args.bridge_steps, val_every=args.bridge_val_every, precision="32-true"
    )
    fit.fit(
        module,
        seeded_loader(
            data, batch_size=args.bridge_batch, seed=args.seed, shuffle=True, collate_fn=collate_pairs
        ),
        seeded_loader(
            DescribedImages(heldout, transforms.vit),
            batch_size=256,
            seed=0,
            shuffle=False,
            collate_fn=collate_images,
        ),
    )
    for words, read in module.examples[:8]:
        print(f"[bridge] held-out image of {words!r} read back as {read!r}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    t5_config = json.loads((t5_dir / "config.json").read_text())
    config = Blip2Config(
        vision_config=module.vision.config.to_dict(),
        qformer_config=module.qformer.config.to_dict(),
        text_config={
            k: v for k, v in t5_config.items() if k not in ("architectures", "transformers_version")
        },
        num_query_tokens=mige.num_query_tokens,
    )
    config.save_pretrained(partial)
    tensors = {f"vision_model.{k}": v for k, v in module.vision.state_dict().items()}
    tensors |= {f"qformer.{k}": v for k, v in module.qformer.state_dict().items()}
    tensors |= {f"language_projection.{k}": v for k, v in module.projection.state_dict().items()}
    tensors["query_tokens"] = module.query_tokens.detach()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial / "model.safetensors"))
    return {"partial": partial, "measure": module.measure}


def stage_dit(
    mige: MIGEConfig, model_cfg: dict, root: Path, out: Path, t5_dir: Path, bridge_dir: Path, args
) -> dict:
    transforms = Transforms(mige.resolution, mige.vision_resolution, mige.vision_mean, mige.vision_std)
    train = training_scenes(root)
    check_unseen(train, heldout_scene_keys(root))
    _, heldout = heldout_items(root)
    L.seed_everything(args.seed, verbose=False)
    module = TextToImagePretraining(
        t5=str(t5_dir),
        tokenizer=mige.pretrained.tokenizer or "byte",
        dit=dict(mige.dit),
        vae=dict(mige.vae),
        resolution=mige.resolution,
        diffusion=diffusion_settings(model_cfg),
        null_length=mige.max_length,
        lr=args.dit_lr,
        warmup_steps=args.warmup,
        lr_schedule=args.dit_lr_schedule,
        p_uncond=args.dit_p_uncond,
        seed=args.seed,
        repa_encoder=str(bridge_dir) if args.dit_repa_weight > 0 else None,
        repa_weight=args.dit_repa_weight,
        repa_depth=args.dit_repa_depth,
        repa_until=args.dit_repa_until,
        vision_mean=tuple(mige.vision_mean),
        vision_std=tuple(mige.vision_std),
    )
    print(f"[dit] {len(train)} training scenes, {len(heldout)} held-out scenes", flush=True)
    fit = trainer(
        "dit",
        args,
        steps=args.dit_steps,
        val_every=args.dit_val_every,
        precision=args.dit_precision,
        ema=args.dit_ema,
    )
    fit.fit(
        module,
        seeded_loader(
            DescribedImages(train, transforms.vae),
            batch_size=args.dit_batch,
            seed=args.seed,
            shuffle=True,
            collate_fn=collate_images,
        ),
        seeded_loader(
            DescribedImages(heldout, transforms.vae),
            batch_size=64,
            seed=0,
            shuffle=False,
            collate_fn=collate_images,
        ),
    )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    module.dit.save_pretrained(partial)
    save_file({"y_embedding": module.null_condition.contiguous()}, str(partial / NULL_FILE))
    sheet = contact_sheet(module.examples, size=mige.resolution)
    sheet.save(partial / "heldout_samples.png")
    return {"partial": partial, "measure": module.measure}


def contact_sheet(examples, *, size: int, columns: int = 16):
    """Held-out samples in a grid, a red frame around a scene judged wrong."""
    from PIL import Image, ImageDraw

    rows = (len(examples) + columns - 1) // columns
    pad = 2
    sheet = Image.new("RGB", (columns * (size + pad), rows * (size + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, _caption, right) in enumerate(examples):
        x, y = (i % columns) * (size + pad), (i // columns) * (size + pad)
        sheet.paste(image, (x, y))
        if not right:
            draw.rectangle([x, y, x + size - 1, y + size - 1], outline=(255, 0, 0))
    return sheet


def diffusion_settings(model_cfg: dict) -> dict:
    """The fit config's diffusion settings (the MIGE module's defaults where unset)."""
    import inspect

    from mige_lightning.module import MIGELightningModule

    defaults = inspect.signature(MIGELightningModule.__init__).parameters
    return {k: model_cfg.get(k, defaults[k].default) for k in DIFFUSION_KEYS}


# ----------------------------------------------------------------------------------------- command
# options added after components were shipped: recorded only when used, so a component made
# without them (the same computation) stays up to date
RECORDED_WHEN_USED = {"dit_ema": 0.0, "dit_lr_schedule": "constant"}


def recipe(args: argparse.Namespace, stage: str) -> dict:
    prefix = {"t5": "t5_", "bridge": "bridge_", "dit": "dit_"}[stage]
    out = {
        k: v
        for k, v in vars(args).items()
        if k.startswith(prefix) and not (k in RECORDED_WHEN_USED and v == RECORDED_WHEN_USED[k])
    }
    return {**out, "seed": args.seed, "warmup": args.warmup}


def git_commit() -> str | None:
    """The code's commit; ``+ uncommitted changes`` when the work tree differs from it."""
    here = Path(__file__).parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            check=True,
            cwd=here.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha} + uncommitted changes" if dirty else sha


def pretrain_world(args: argparse.Namespace, config: dict[str, Any], command: list[str]) -> dict:
    """Run the stages; ``config``: fit's parsed ``model`` and ``data`` sections (the world already
    generated); ``command``: the arguments, recorded in the provenance."""
    model_cfg, data_cfg = config["model"], config["data"]
    world = dict(data_cfg.get("synthetic") or {})
    if not world:
        raise SystemExit("pretrain-world: data.synthetic is not set; the components learn a synthetic world")
    paths = targets(model_cfg)
    root = Path(world.get("root", DEFAULT_WORLD_ROOT))
    if not (root / "world.json").is_file():
        raise SystemExit(f"pretrain-world: {root} holds no generated world")
    overrides = {k: v for k, v in (model_cfg.get("overrides") or {}).items() if k != "train_text_encoder"}
    pretrained = dict(model_cfg.get("pretrained") or {})
    mige = get_config(model_cfg.get("preset", "tiny"), overrides, {"tokenizer": pretrained.get("tokenizer")})
    world_id = {"settings": world, "hash": world_hash(world)}
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"pretrain-world: unknown stage(s) {unknown}; choose from {list(STAGES)}")

    summary: dict[str, Any] = {}
    remade = False
    for stage in STAGES:
        out = paths[stage]
        settings: dict[str, Any] = {"world": world_id, "recipe": recipe(args, stage)}
        if stage == "t5":
            settings["component"] = {
                "t5": dict(mige.t5),
                "tokenizer": mige.pretrained.tokenizer,
                "num_query_tokens": mige.num_query_tokens,
            }
        elif stage == "bridge":
            settings["component"] = {
                "vision": dict(mige.vision),
                "qformer": dict(mige.qformer),
                "num_query_tokens": mige.num_query_tokens,
            }
        else:
            settings["component"] = {
                "dit": dict(mige.dit),
                "vae": dict(mige.vae),
                "resolution": mige.resolution,
                "diffusion": diffusion_settings(model_cfg),
                "null_length": mige.max_length,
            }
        if stage != "t5":
            if not (paths["t5"] / RECORD).is_file():
                raise SystemExit(f"pretrain-world: stage {stage} needs the t5 stage's {paths['t5']} first")
            settings["trained_against"] = {"t5": component_hash(paths["t5"])}
            if stage == "dit" and args.dit_repa_weight > 0:  # aligned to the bridge's vision tower
                if (paths["bridge"] / RECORD).is_file():
                    settings["trained_against"]["bridge"] = component_hash(paths["bridge"])
                elif stage in stages:
                    raise SystemExit(
                        f"pretrain-world: the dit stage's alignment needs the bridge stage's {paths['bridge']} first"
                    )
        settings = json.loads(json.dumps(settings))  # as it reads back from disk
        previous = recorded(out) if out.exists() else None
        up_to_date = previous is not None and previous.get("settings") == settings and not remade
        if stage not in stages or (up_to_date and not args.force):
            if previous is None:
                print(f"[{stage}] {out} is missing: run the {stage} stage")
                continue
            summary[stage] = previous
            print(
                f"[{stage}] {out}: up to date ({previous.get('measure')})"
                if up_to_date
                else f"[{stage}] kept as it is"
            )
            continue
        start = time.time()
        if stage == "t5":
            result = stage_t5(mige, root, out, args)
        elif stage == "bridge":
            result = stage_bridge(mige, root, out, paths["t5"], args)
        else:
            result = stage_dit(mige, model_cfg, root, out, paths["t5"], paths["bridge"], args)
        record = {
            "settings": settings,
            "measure": result["measure"],
            "seconds": round(time.time() - start, 1),
        }
        (result["partial"] / RECORD).write_text(json.dumps(record, indent=1))
        replace_dir(result["partial"], out)
        if stage == "dit":
            paths["null"].parent.mkdir(parents=True, exist_ok=True)
            if paths["null"].resolve() != (out / NULL_FILE).resolve():
                shutil.copyfile(out / NULL_FILE, paths["null"])
        print(f"[{stage}] wrote {out} in {record['seconds']} s: {result['measure']}", flush=True)
        summary[stage] = record
        remade = True

    if len(summary) < len(STAGES):
        return {"components": summary}
    common = paths["t5"].parent  # the components' folder (the demo keeps all three side by side)
    if not remade and (common / PROVENANCE).is_file():
        # nothing made: the provenance stays that of the run that made them (its command, commit)
        return json.loads((common / PROVENANCE).read_text())
    provenance = {
        "command": "python -m mige_lightning pretrain-world " + shlex.join(command),
        "commit": git_commit(),
        "world": world_id,
        "components": {
            s: {"path": str(paths[s]), "hash": component_hash(paths[s]), **summary[s]} for s in STAGES
        },
    }
    (common / PROVENANCE).write_text(json.dumps(provenance, indent=1))
    return provenance

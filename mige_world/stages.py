"""The world's pretraining stages, each a LightningModule that Lightning's Trainer runs.

They make, from the world's training split only, the small stand-ins for what the paper loads:

- ``TextEncoderPretraining`` (Flan-T5's place): a T5 encoder-decoder learns to write back
  instructions and captions whose words were masked; the encoder is kept.
- ``VisionBridgePretraining`` (BLIP-2's place): a vision tower, the query tokens, the Q-Former and
  the projection into the T5's input space learn, through the frozen T5, that an image's query
  tokens spliced in where ``<imagehere>`` stands give the T5 outputs that the image's words give.
- ``TextToImagePretraining`` (PixArt-α's place): the DiT, without source channels, learns to draw
  a scene from its caption through the frozen T5.

Each stage validates on the held-out split with its own measure (tokens written back; attributes
read back from the bridged T5 outputs; scenes drawn from held-out captions and judged from pixels).
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    get_cosine_schedule_with_warmup,
)
from transformers.modeling_outputs import BaseModelOutput

from mige_lightning.diffusion import GaussianDiffusion
from mige_lightning.models.adapter import null_caption
from mige_lightning.models.autoencoder import PixelAutoencoder, build_autoencoder
from mige_lightning.models.dit import build_dit
from mige_lightning.models.loading import load_blip2_parts, load_tokenizer
from mige_lightning.models.repa import RepresentationAlignment, block_output
from mige_lightning.pipeline import initial_noise, make_scheduler
from mige_lightning.prompt import split_placeholders
from mige_lightning.transforms import Transforms
from mige_world.describe import Described, scene_key
from mige_world.scene_judge import judge

LM_FOLDER = "lm"  # beside the saved T5 encoder: the whole encoder-decoder it was pre-trained in


def warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, *, cosine_steps: int | None = None
) -> dict:
    """AdamW's learning rate rises linearly over ``warmup_steps`` optimiser steps, then holds — or,
    with ``cosine_steps``, follows a half cosine down to 0 at that step (transformers' schedule)."""
    if cosine_steps:
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, cosine_steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps))
        )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def text_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens, one list per text."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def pad_rows(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids → [B, T] ids and attention mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


# ======================================================================================= text encoder
class TextCorpus(Dataset):
    """Token rows (the text as the model's encoder lays it out: image slots, EOS)."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        return self.rows[i]


class TextEncoderPretraining(L.LightningModule):
    """T5's own objective, denoising: each word of a row is replaced by a mask id with probability
    ``mask``; a small decoder writes the whole row back, so the encoder's outputs must carry every
    word and its order. Image slots and EOS are never masked."""

    def __init__(
        self,
        *,
        t5: dict[str, Any],
        pad_id: int,
        eos_id: int,
        mask_id: int,
        image_id: int,
        decoder_layers: int = 1,
        mask: float = 0.25,
        lr: float = 1e-3,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        config = T5Config(
            **t5,
            num_decoder_layers=decoder_layers,
            decoder_start_token_id=pad_id,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        self.model = T5ForConditionalGeneration(config)

    def corrupt(self, rows: list[list[int]], generator: torch.Generator):
        hp = self.hparams
        labels_ids, attention = pad_rows(rows, hp.pad_id)
        keep = (labels_ids == hp.image_id) | (labels_ids == hp.eos_id) | (attention == 0)
        masked = (torch.rand(labels_ids.shape, generator=generator) < hp.mask) & ~keep
        inputs = labels_ids.masked_fill(masked, hp.mask_id)
        labels = labels_ids.masked_fill(attention == 0, -100)
        return inputs.to(self.device), attention.to(self.device), labels.to(self.device), masked

    def on_train_start(self) -> None:
        self._train_gen = torch.Generator().manual_seed(self.hparams.seed)

    def training_step(self, rows: list[list[int]], batch_idx: int) -> torch.Tensor:
        inputs, attention, labels, _ = self.corrupt(rows, self._train_gen)
        loss = self.model(input_ids=inputs, attention_mask=attention, labels=labels).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(rows))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_gen = torch.Generator().manual_seed(self.hparams.seed + 1)
        self._val_counts = torch.zeros(4)  # correct tokens, tokens, correct masked, masked

    def validation_step(self, rows: list[list[int]], batch_idx: int) -> None:
        inputs, attention, labels, masked = self.corrupt(rows, self._val_gen)
        guess = self.model(input_ids=inputs, attention_mask=attention, labels=labels).logits.argmax(-1)
        right, real = (guess == labels).cpu(), (labels != -100).cpu()
        self._val_counts += torch.tensor(
            [(right & real).sum(), real.sum(), (right & masked).sum(), masked.sum()], dtype=torch.float
        )

    def on_validation_epoch_end(self) -> None:
        c = self._val_counts
        self.measure = {
            "token_acc": round((c[0] / c[1]).item(), 4),
            "masked_acc": round((c[2] / c[3].clamp(min=1)).item(), 4),
        }
        self.log("val/token_acc", self.measure["token_acc"], prog_bar=True)
        self.log("val/masked_acc", self.measure["masked_acc"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    def encoder(self) -> T5EncoderModel:
        """The trained encoder alone (its shared embedding included)."""
        config = T5Config(
            **self.hparams.t5, pad_token_id=self.hparams.pad_id, eos_token_id=self.hparams.eos_id
        )
        encoder = T5EncoderModel(config)
        state = {k: v for k, v in self.model.state_dict().items() if k.startswith(("shared.", "encoder."))}
        missing, _ = encoder.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "encoder.embed_tokens.weight"]  # tied to shared.weight
        if missing:
            raise RuntimeError(f"encoder weights not copied: {missing[:5]}")
        return encoder


# ======================================================================================= shared data
def load_pixels(items: list[Described], transform) -> torch.Tensor:
    """Every item's image through ``transform`` (a torchvision transform of a PIL image), stacked."""
    out = []
    for item in items:
        with PIL.Image.open(item.path) as img:
            out.append(transform(img.convert("RGB")))
    return torch.stack(out)


def frozen_t5(source: str) -> T5EncoderModel:
    return T5EncoderModel.from_pretrained(source).requires_grad_(False).eval()


def encode_texts(t5: T5EncoderModel, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain texts → frozen T5 outputs [B, T, D] and mask [B, T], laid out as MIGE's encoder lays
    out a text without images (the words, then EOS)."""
    rows = [[*ids, tokenizer.eos_token_id] for ids in text_ids(tokenizer, texts)]
    ids, mask = pad_rows(rows, tokenizer.pad_token_id)
    device = t5.device
    hidden = t5(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    return hidden, mask.to(device)


class DescribedImages(Dataset):
    """(pixels through ``transform``, index) per described image; pixels read once, kept in memory.
    A module finds what an image shows (its words, its scene) in ``items[index]``."""

    def __init__(self, items: list[Described], transform):
        self.items = items
        self.pixels = load_pixels(items, transform)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.pixels[i], i


def collate_images(batch):
    pixels, index = zip(*batch, strict=True)
    return torch.stack(pixels), list(index)


# ======================================================================================= text to image
class TextToImagePretraining(L.LightningModule):
    """The plain DiT (noisy latent in; no source channels) trained to draw a scene from its caption
    through the frozen pre-trained T5, with the fit config's diffusion settings; a caption is
    replaced by the fixed null caption with probability ``p_uncond`` (so guidance works later).

    Validation samples the held-out captions (``num_inference_steps``, DPM-Solver++, one seed per
    caption) and judges the images from their pixels: ``val/scene_acc`` / ``val/element_acc``.

    ``repa_weight > 0``: representation alignment (REPA) — the tokens after ``repa_depth`` DiT blocks
    are pulled, through a projector trained alongside, towards the frozen vision tower's per-patch
    features (``repa_encoder``: the bridge's BLIP-2-layout checkpoint) of the clean image, for the
    first ``repa_until`` optimiser steps (all of them when ``None``). Only the DiT is saved.
    """

    def __init__(
        self,
        *,
        t5: str,
        tokenizer: str,
        dit: dict[str, Any],
        vae: dict[str, Any],
        resolution: int,
        diffusion: dict[str, Any],
        null_length: int,
        lr: float = 1e-3,
        warmup_steps: int = 50,
        lr_schedule: str = "constant",
        p_uncond: float = 0.1,
        num_inference_steps: int = 20,
        seed: int = 0,
        repa_encoder: str | None = None,
        repa_weight: float = 0.0,
        repa_depth: int = 1,
        repa_until: int | None = None,
        vision_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        vision_std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ):
        super().__init__()
        self.save_hyperparameters()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule: {lr_schedule!r}; choose 'constant' or 'cosine'")
        self.t5 = frozen_t5(t5)
        self.tokenizer = load_tokenizer(tokenizer)
        self.autoencoder = build_autoencoder(vae)
        d_text = self.t5.config.d_model
        self.dit = build_dit(
            dit,
            latent_channels=self.autoencoder.latent_channels,
            sample_size=resolution // self.autoencoder.downsample_factor,
            caption_channels=d_text,
            conditional_input=False,
        )
        self.diffusion = GaussianDiffusion(**diffusion)
        self.register_buffer("null_condition", null_caption(null_length, d_text))
        self.encoder = self.alignment = None
        if repa_weight > 0:
            if repa_encoder is None:
                raise ValueError("repa_weight > 0 needs repa_encoder (a BLIP-2-layout checkpoint)")
            self.encoder = (
                load_blip2_parts(repa_encoder, key="repa_encoder").vision.requires_grad_(False).eval()
            )
            self.alignment = RepresentationAlignment(self.dit.inner_dim, self.encoder.config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.t5.eval()
        if self.encoder is not None:
            self.encoder.eval()
        return self

    @torch.no_grad()
    def encoder_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clean images in [-1, 1] → the frozen vision tower's patch features [B, N, E] (no CLS)."""
        size = self.encoder.config.image_size
        x = (pixels.float() + 1) / 2
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(self.hparams.vision_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.hparams.vision_std, device=x.device).view(1, 3, 1, 1)
        return self.encoder(pixel_values=(x - mean) / std).last_hidden_state[:, 1:]

    def aligning(self) -> bool:
        until = self.hparams.repa_until
        return self.alignment is not None and (until is None or self.global_step < until)

    def condition(self, captions: list[str], drop: torch.Tensor | None = None):
        """Captions → T5 outputs [B, T, D] and mask; dropped rows get the whole null caption."""
        with torch.no_grad():
            hidden, mask = encode_texts(self.t5, self.tokenizer, captions)
        if drop is None or not drop.any():
            return hidden, mask
        null = self.null_condition
        width = max(hidden.shape[1], null.shape[0])
        cond = hidden.new_zeros(hidden.shape[0], width, hidden.shape[2])
        cond_mask = mask.new_zeros(hidden.shape[0], width)
        cond[:, : hidden.shape[1]], cond_mask[:, : hidden.shape[1]] = hidden, mask
        cond[drop] = 0
        cond[drop, : null.shape[0]] = null.to(cond.dtype)
        cond_mask[drop] = 0
        cond_mask[drop, : null.shape[0]] = 1
        return cond, cond_mask

    def forward(self, x_t, t, cond, cond_mask) -> torch.Tensor:
        return self.dit(
            x_t,
            encoder_hidden_states=cond,
            encoder_attention_mask=cond_mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        pixels, index = batch
        items = self.trainer.train_dataloader.dataset.items
        captions = [items[i].words for i in index]
        n = len(captions)
        drop = torch.rand(n, device=self.device) < self.hparams.p_uncond
        cond, cond_mask = self.condition(captions, drop)
        x_start = self.autoencoder.encode(pixels)
        t = self.diffusion.sample_timesteps(n, device=self.device)
        noise = torch.randn_like(x_start)
        x_t = self.diffusion.add_noise(x_start, noise, t)
        aligning = self.aligning()
        capture = (
            block_output(self.dit.transformer_blocks, self.hparams.repa_depth)
            if aligning
            else nullcontext({})
        )
        with capture as captured:
            out = self(x_t, t, cond, cond_mask)
        losses = self.diffusion.training_losses(out, x_start=x_start, x_t=x_t, t=t, noise=noise)
        loss = losses["loss"].mean()
        self.log("train/mse", losses["mse"].mean(), batch_size=n)
        if aligning:
            align = self.alignment(captured["tokens"], self.encoder_features(pixels))
            self.log("train/repa", align, batch_size=n)
            loss = loss + self.hparams.repa_weight * align
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    @torch.no_grad()
    def sample(self, captions: list[str], seeds: list[int]) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] drawn from the captions (no guidance)."""
        scheduler = make_scheduler(
            "dpm++",
            num_train_timesteps=self.diffusion.num_timesteps,
            beta_schedule=self.hparams.diffusion.get("beta_schedule", "linear"),
            prediction_type=self.diffusion.prediction_type,
            clip_sample=isinstance(self.autoencoder, PixelAutoencoder),
        )
        cond, cond_mask = self.condition(captions)
        size = self.hparams.resolution // self.autoencoder.downsample_factor
        shape = (self.autoencoder.latent_channels, size, size)
        latents = initial_noise(seeds, shape, device=self.device, dtype=torch.float32)
        scheduler.set_timesteps(self.hparams.num_inference_steps, device=self.device)
        latents = latents * scheduler.init_noise_sigma
        channels = shape[0]
        for timestep in scheduler.timesteps:
            t = timestep.reshape(1).to(self.device).expand(len(captions))
            out = self(scheduler.scale_model_input(latents, timestep), t, cond, cond_mask)[:, :channels]
            latents = scheduler.step(out, timestep, latents, return_dict=False)[0]
        return self.autoencoder.decode(latents).clamp(-1, 1)

    def on_validation_epoch_start(self) -> None:
        self._judged: list[tuple[int, int, bool]] = []  # (correct elements, elements, scene right)
        self.examples: list[tuple[PIL.Image.Image, str, bool]] = []

    def validation_step(self, batch, batch_idx: int) -> None:
        _pixels, index = batch
        scenes = self.trainer.val_dataloaders.dataset.items
        images = self.sample([scenes[i].words for i in index], [self.hparams.seed + i for i in index])
        for image, i in zip(to_pil(images), index, strict=True):
            verdict = judge(image, scenes[i].scene, size=self.hparams.resolution)
            self._judged.append((verdict.correct, verdict.total, verdict.scene_correct))
            if len(self.examples) < 64:
                self.examples.append((image, scenes[i].words, verdict.scene_correct))

    def on_validation_epoch_end(self) -> None:
        judged = np.array(self._judged, dtype=float)
        self.measure = {
            "scene_acc": round(float(judged[:, 2].mean()), 4),
            "element_acc": round(float(judged[:, 0].sum() / judged[:, 1].sum()), 4),
            "scenes": len(judged),
        }
        self.log("val/scene_acc", self.measure["scene_acc"], prog_bar=True)
        self.log("val/element_acc", self.measure["element_acc"])

    def configure_optimizers(self):
        params = list(self.dit.parameters())
        if self.alignment is not None:
            params += list(self.alignment.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=0.0)
        cosine = self.hparams.lr_schedule == "cosine"
        return warmup_schedule(
            optimizer, self.hparams.warmup_steps, cosine_steps=self.trainer.max_steps if cosine else None
        )


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """[B, 3, H, W] in [-1, 1] → PIL images."""
    array = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [PIL.Image.fromarray(a.permute(1, 2, 0).numpy()) for a in array]


# ======================================================================================= vision bridge
class BridgePairs(Dataset):
    """(instruction with ``<imagehere>``, the indices of its images) per pair. Images are kept once
    per distinct content (a reference per sprite kind, a source per scene): ``pixels[k]`` on the
    vision tower's path, ``names[k]`` their words."""

    def __init__(self, pairs: list[tuple[str, list[int]]], images: list[Described], transforms: Transforms):
        self.pairs = pairs
        self.pixels = load_pixels(images, transforms.vit)
        self.names = [item.words for item in images]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[str, list[int]]:
        return self.pairs[i]


def collate_pairs(batch):
    prompts, images = zip(*batch, strict=True)
    return list(prompts), list(images)


def bridge_layouts(tokenizer, num_queries: int, prompts: list[str], words_per_image: list[list[str]]):
    """Both T5 inputs of each pair: (image-version rows of ids, with -1 for a query slot;
    word-version rows; per pair the matching text positions in both and the spans of each image
    in both)."""
    tok, q = tokenizer, num_queries
    image_rows, word_rows, text_pos, spans = [], [], [], []
    for prompt, names in zip(prompts, words_per_image, strict=True):
        segments = text_ids(tok, split_placeholders(prompt))
        described = text_ids(tok, names)
        img_row, word_row, img_text, word_text, pair_spans = [], [], [], [], []
        for j, seg in enumerate(segments):
            if j:
                name = described[j - 1]
                pair_spans.append(
                    ((len(img_row), len(img_row) + q), (len(word_row), len(word_row) + len(name)))
                )
                img_row += [-1] * q
                word_row += name
            img_text += range(len(img_row), len(img_row) + len(seg))
            word_text += range(len(word_row), len(word_row) + len(seg))
            img_row += seg
            word_row += seg
        img_text.append(len(img_row))
        word_text.append(len(word_row))
        image_rows.append([*img_row, tok.eos_token_id])
        word_rows.append([*word_row, tok.eos_token_id])
        text_pos.append((img_text, word_text))
        spans.append(pair_spans)
    return image_rows, word_rows, text_pos, spans


class VisionBridgePretraining(L.LightningModule):
    """BLIP-2's second stage in the world: images into the language model's input space.

    The vision tower, the query tokens, the Q-Former and the projection (Q-Former width → T5 width)
    are trained; the T5 — encoder and the decoder it was pre-trained with — is frozen. Between
    Q-Former and projection sits what MIGE's feature fusion computes when it starts (its output
    LayerNorm: fusion starts as the identity), so the projection is trained on exactly what it
    will see in MIGE.

    Loss, per pair (an instruction with its images spliced in where ``<imagehere>`` stands, and the
    same instruction with the images' words in their place):
    - language modelling, BLIP-2's own objective for an encoder-decoder LM: from the T5 encoder's
      outputs of the image version, the frozen decoder must write the word version;
    - alignment (weight ``align_weight``): the encoder outputs of the image version equal those of
      the word version at every text position (the words around each image, EOS), and, per image,
      the mean over its query tokens equals the mean over its words — what the DiT, which reads
      these outputs, needs.

    Validation (the stage's measure): each held-out image alone (``<imagehere>``) is read back by
    the frozen decoder from its bridged T5 outputs, greedily, and the words parsed back into a
    sprite (references) or a scene (sources): per attribute accuracy.
    """

    def __init__(
        self,
        *,
        t5: str,
        tokenizer: str,
        vision: dict[str, Any],
        qformer: dict[str, Any],
        num_query_tokens: int,
        align_weight: float = 1.0,
        lr: float = 1e-3,
        warmup_steps: int = 50,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.lm = T5ForConditionalGeneration.from_pretrained(str(Path(t5) / LM_FOLDER)).requires_grad_(False)
        self.lm.eval()
        self.tokenizer = load_tokenizer(tokenizer)
        self.vision = Blip2VisionModel(Blip2VisionConfig(**vision))
        self.qformer = Blip2QFormerModel(
            Blip2QFormerConfig(encoder_hidden_size=self.vision.config.hidden_size, **qformer)
        )
        width = self.qformer.config.hidden_size
        init = self.qformer.config.initializer_range
        self.query_tokens = torch.nn.Parameter(torch.randn(1, num_query_tokens, width) * init)
        self.projection = torch.nn.Linear(width, self.lm.config.d_model)

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()
        return self

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, Hv, Wv] → [N, Q, D_t5], as MIGE's encoder computes them with a fresh fusion."""
        features = self.vision(pixel_values=pixels).last_hidden_state
        queries = self.query_tokens.expand(pixels.shape[0], -1, -1)
        semantic = self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        fused = F.layer_norm(semantic, semantic.shape[-1:], eps=1e-6)  # FeatureFusion at its start
        return self.projection(fused)

    def layouts(self, prompts: list[str], words_per_image: list[list[str]]):
        return bridge_layouts(self.tokenizer, self.hparams.num_query_tokens, prompts, words_per_image)

    def bridged(self, image_rows: list[list[int]], tokens: torch.Tensor):
        """T5 encoder outputs [B, T, D] (and mask) of rows whose -1 slots take ``tokens``
        ([N, Q, D], in row order)."""
        ids, mask = pad_rows([[max(t, 0) for t in row] for row in image_rows], self.tokenizer.pad_token_id)
        slots = pad_rows([[int(t < 0) for t in row] for row in image_rows], 0)[0].bool()
        embeds = self.lm.get_input_embeddings()(ids.to(self.device))
        embeds = embeds.masked_scatter(slots.to(self.device)[..., None], tokens.reshape(-1, tokens.shape[-1]))
        mask = mask.to(self.device)
        return self.lm.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask

    def worded(self, word_rows: list[list[int]]) -> torch.Tensor:
        ids, mask = pad_rows(word_rows, self.tokenizer.pad_token_id)
        with torch.no_grad():
            return self.lm.encoder(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).last_hidden_state

    def pair_loss(self, prompts, image_index, words_per_image, pixels) -> dict[str, torch.Tensor]:
        flat = [i for row in image_index for i in row]
        tokens = self.image_tokens(pixels[flat].to(self.device))
        image_rows, word_rows, text_pos, spans = self.layouts(prompts, words_per_image)
        h_img, mask = self.bridged(image_rows, tokens)
        h_word = self.worded(word_rows)
        text_err, slot_err = [], []
        for b, ((pi, pw), pair_spans) in enumerate(zip(text_pos, spans, strict=True)):
            text_err.append(((h_img[b, pi] - h_word[b, pw]) ** 2).mean(-1))
            for (a0, a1), (w0, w1) in pair_spans:
                slot_err.append(((h_img[b, a0:a1].mean(0) - h_word[b, w0:w1].mean(0)) ** 2).mean()[None])
        align = torch.cat(text_err).mean() + torch.cat(slot_err).mean()
        labels, label_mask = pad_rows(word_rows, self.tokenizer.pad_token_id)
        labels = labels.masked_fill(label_mask == 0, -100).to(self.device)
        lm = self.lm(encoder_outputs=(h_img,), attention_mask=mask, labels=labels).loss
        return {"loss": lm + self.hparams.align_weight * align, "lm": lm, "align": align}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        prompts, image_index = batch
        data = self.trainer.train_dataloader.dataset
        names = [[data.names[i] for i in row] for row in image_index]
        losses = self.pair_loss(prompts, image_index, names, data.pixels)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(prompts))
        return losses["loss"]

    # ------------------------------------------------------------------ the measure
    @torch.no_grad()
    def read_back(self, pixels: torch.Tensor, max_new_tokens: int = 40) -> list[str]:
        """Each image alone (``<imagehere>``) → the words the frozen decoder writes from its bridged
        T5 outputs (greedy)."""
        q = self.hparams.num_query_tokens
        tokens = self.image_tokens(pixels.to(self.device))
        hidden, mask = self.bridged([[-1] * q + [self.tokenizer.eos_token_id]] * pixels.shape[0], tokens)
        out = self.lm.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def on_validation_epoch_start(self) -> None:
        self._read: list[tuple[dict, dict | None, str]] = []  # (truth, read, kind)
        self.examples: list[tuple[str, str]] = []

    def validation_step(self, batch, batch_idx: int) -> None:
        pixels, index = batch
        items = [self.trainer.val_dataloaders.dataset.items[i] for i in index]
        for text, item in zip(self.read_back(pixels), items, strict=True):
            got = parse_reference(text) if item.kind == "reference" else parse_caption(text)
            self._read.append((item.scene, got, item.kind))
            if len(self.examples) < 20:
                self.examples.append((item.words, text))

    def on_validation_epoch_end(self) -> None:
        self.measure = bridge_accuracy(self._read)
        for name, value in self.measure.items():
            self.log(f"val/{name}", value, prog_bar=name in ("reference_acc", "scene_acc"))

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if not n.startswith("lm.")]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=0.0)
        return warmup_schedule(optimizer, self.hparams.warmup_steps)


_SPRITE = re.compile(r"^(red|green|blue|yellow) (circle|square|triangle)$")
_PLACED = re.compile(
    r"^a (small|large) (red|green|blue|yellow) (circle|square|triangle) on the (left|center|right)$"
)
_BACKGROUND = re.compile(r"^(?:(.*), on )?a (white|gray|black|pink) background$")


def _words(text: str) -> str:
    return " ".join(text.replace(",", " , ").split()).replace(" , ", ", ")


def parse_reference(text: str) -> dict | None:
    """``red circle`` → a one-sprite scene; anything else → None (read wrong)."""
    m = _SPRITE.match(_words(text))
    if m is None:
        return None
    return {
        "background": None,
        "sprites": [{"colour": m[1], "shape": m[2], "position": "center", "size": "large"}],
    }


def parse_caption(text: str) -> dict | None:
    """A caption (``describe.caption``'s grammar) → its scene; anything else → None."""
    m = _BACKGROUND.match(_words(text))
    if m is None:
        return None
    sprites = []
    for phrase in m[1].split(" and ") if m[1] else []:
        p = _PLACED.match(phrase)
        if p is None:
            return None
        sprites.append({"size": p[1], "colour": p[2], "shape": p[3], "position": p[4]})
    return {"background": m[2], "sprites": sprites}


def bridge_accuracy(read: list[tuple[dict, dict, str]]) -> dict[str, float]:
    """Attribute accuracies of images read back: references (colour, shape), scenes (background,
    per slot presence, colour, shape, size, and the whole scene)."""
    counts: dict[str, list[int]] = {}

    def score(name: str, ok: bool) -> None:
        c = counts.setdefault(name, [0, 0])
        c[0] += int(ok)
        c[1] += 1

    for truth, got, kind in read:
        if kind == "reference":
            t = truth["sprites"][0]
            g = got["sprites"][0] if got else {}
            score("reference_colour", t["colour"] == g.get("colour"))
            score("reference_shape", t["shape"] == g.get("shape"))
            score("reference_acc", (t["colour"], t["shape"]) == (g.get("colour"), g.get("shape")))
            continue
        # words that are no caption: every attribute read wrong
        score("scene_background", got is not None and truth["background"] == got["background"])
        at_t = {s["position"]: s for s in truth["sprites"]}
        at_g = {s["position"]: s for s in got["sprites"]} if got else {}
        for slot in ("left", "center", "right"):
            score("scene_presence", got is not None and (slot in at_t) == (slot in at_g))
            if slot in at_t:
                g = at_g.get(slot, {})
                for attr in ("colour", "shape", "size"):
                    score(f"scene_{attr}", at_t[slot][attr] == g.get(attr))
        score("scene_acc", got is not None and scene_key(truth) == scene_key(got))
    return {k: round(c[0] / c[1], 4) for k, c in sorted(counts.items())}


def seeded_loader(dataset: Dataset, *, batch_size: int, seed: int, shuffle: bool, collate_fn) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=collate_fn,
        num_workers=0,
        drop_last=shuffle,
    )

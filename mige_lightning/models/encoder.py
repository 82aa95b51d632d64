"""Multimodal encoder: an instruction with ``<imagehere>`` placeholders → T5 condition vectors.

Per reference image: frozen BLIP-2 ViT → Q-Former with learned queries → fusion with the image's
VAE patch tokens → projection to T5's width. The instruction's text segments are embedded with
T5's own input embeddings, each placeholder is replaced by its image's tokens (in order), EOS ends
the sequence and T5's encoder runs on the interleaved embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2QFormerModel, Blip2VisionModel, PreTrainedTokenizerBase, T5EncoderModel

from mige_lightning.models.adapter import ConditionAdapter
from mige_lightning.prompt import split_placeholders


def in_graph_zero(tensor: torch.Tensor) -> torch.Tensor:
    """An exact 0 that depends on ``tensor``: adding it keeps the sub-network that made ``tensor``
    in the autograd graph (its parameters get zero gradients instead of none)."""
    return tensor.flatten()[:0].sum()


@dataclass
class Interleaved:
    embeds: torch.Tensor  # [B, T, D] T5 input embeddings, zero padding
    mask: torch.Tensor  # [B, T] 1 = real token
    image_starts: list[list[int]]  # per sample, where each image's Q tokens start


@dataclass(frozen=True)
class TextLoss:
    """What of one prompt's text the encoder does not see (``MultimodalEncoder.text_losses``)."""

    cut_tokens: int  # tokens past max_length, dropped from the end
    cut_text: str  # those tokens decoded
    unknown_words: tuple[str, ...]  # words that became the tokenizer's unknown token
    max_length: int

    def cut_message(self) -> str | None:
        if not self.cut_tokens:
            return None
        tail = self.cut_text if len(self.cut_text) <= 120 else "…" + self.cut_text[-119:]
        return (
            f"the instruction does not fit the encoder's max_length={self.max_length} tokens: "
            f"{self.cut_tokens} token(s) at its end never reach the model ({tail!r}); shorten it"
        )

    def unknown_message(self) -> str | None:
        if not self.unknown_words:
            return None
        words = ", ".join(repr(w) for w in self.unknown_words[:10])
        more = f" and {len(self.unknown_words) - 10} more" if len(self.unknown_words) > 10 else ""
        return f"word(s) unknown to the tokenizer, read as its unknown token: {words}{more}; reword them"


class MultimodalEncoder(nn.Module):
    def __init__(
        self,
        *,
        vision: Blip2VisionModel,
        qformer: Blip2QFormerModel,
        adapter: ConditionAdapter,
        t5: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        train_vision_norm: bool = False,
        train_text_encoder: bool = True,
    ):
        super().__init__()
        self.vision = vision.requires_grad_(False).eval()  # frozen (paper §3.3)
        # the ViT's final LayerNorm (BLIP-2's ln_vision) is trained in the authors' release
        self.vision.post_layernorm.requires_grad_(train_vision_norm)
        self.qformer = qformer
        self.adapter = adapter  # learned queries, fusion, projection, null condition
        self.t5 = t5.requires_grad_(train_text_encoder)  # frozen: still carries gradients to image tokens
        self.tokenizer = tokenizer  # not a module: no parameters, not sharded
        self.max_length = max_length
        self.run_every_branch = False  # see MIGE.run_every_branch

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # frozen ViT stays in eval mode (no dropout / stochastic depth)
        return self

    @property
    def query_tokens(self) -> nn.Parameter:
        return self.adapter.query_tokens

    @property
    def fusion(self) -> nn.Module:
        return self.adapter.fusion

    @property
    def projection(self) -> nn.Linear:
        return self.adapter.projection

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def image_tokens(self, pixels: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """pixels: [N, 3, Hv, Wv] ViT-normalised; visual_tokens: [N, L, Dv] → [N, Q, D_t5]."""
        # with a trainable final LayerNorm the graph starts there: nothing before it requires grad,
        # so the frozen blocks still save no activations
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and self.vision.post_layernorm.weight.requires_grad
        ):
            features = self.vision(pixel_values=pixels).last_hidden_state  # [N, P, Dvit]
        queries = self.query_tokens.expand(pixels.shape[0], -1, -1)  # [N, Q, Dq]
        semantic = self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        fused = self.fusion(semantic, visual_tokens)  # [N, Q, Dq]
        return self.projection(fused)  # [N, Q, D_t5]

    def _segment_ids(self, prompts: list[str], counts: list[int]) -> list[list[list[int]]]:
        """Per sample, the token ids of the text around its placeholders, over-long text cut from
        the end so that text + image tokens + EOS fit ``max_length``."""
        if len(prompts) != len(counts):
            raise ValueError(f"{len(prompts)} prompts but {len(counts)} image counts")
        segments = [split_placeholders(p) for p in prompts]
        for i, (prompt, segs, count) in enumerate(zip(prompts, segments, counts, strict=True)):
            if len(segs) - 1 != count:
                raise ValueError(
                    f"sample {i}: {len(segs) - 1} <imagehere> placeholder(s) but {count} image(s): {prompt!r}"
                )
        flat = [s for segs in segments for s in segs]
        ids = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        q = self.num_query_tokens
        per_sample: list[list[list[int]]] = []
        cursor = 0
        for i, segs in enumerate(segments):
            seg_ids = [list(x) for x in ids[cursor : cursor + len(segs)]]
            cursor += len(segs)
            budget = self.max_length - 1 - q * counts[i]
            if budget < 0:
                raise ValueError(
                    f"sample {i}: {counts[i]} images × {q} tokens + EOS exceed max_length={self.max_length}"
                )
            excess = sum(map(len, seg_ids)) - budget
            for seg in reversed(seg_ids):  # cut trailing text first
                if excess <= 0:
                    break
                cut = min(excess, len(seg))
                del seg[len(seg) - cut :]
                excess -= cut
            per_sample.append(seg_ids)
        return per_sample

    def text_losses(self, prompts: list[str], counts: list[int]) -> list[TextLoss]:
        """Per prompt, what of its text never reaches T5: the tail cut at ``max_length`` (text +
        image tokens + EOS) and the words the tokenizer reads as its unknown token. Same
        tokenisation as ``interleave``; no network runs."""
        unk = self.tokenizer.unk_token_id
        q = self.num_query_tokens
        out = []
        for prompt, count in zip(prompts, counts, strict=True):
            segments = split_placeholders(prompt)
            ids = self.tokenizer(segments, add_special_tokens=False)["input_ids"]
            flat = [t for seg in ids for t in seg]
            budget = max(self.max_length - 1 - q * count, 0)
            cut = flat[budget:]
            unknown: list[str] = []
            if unk is not None and unk in flat:
                for word in " ".join(segments).split():
                    if (
                        unk in self.tokenizer(word, add_special_tokens=False)["input_ids"]
                        and word not in unknown
                    ):
                        unknown.append(word)
            out.append(
                TextLoss(
                    cut_tokens=len(cut),
                    cut_text=self.tokenizer.decode(cut).strip() if cut else "",
                    unknown_words=tuple(unknown),
                    max_length=self.max_length,
                )
            )
        return out

    def sequence_lengths(self, prompts: list[str], counts: list[int]) -> list[int]:
        """How many condition tokens each prompt becomes (text + image tokens + EOS), without
        running a network: the length of a null condition cut to the prompt's length."""
        q = self.num_query_tokens
        per_sample = self._segment_ids(prompts, counts)
        return [sum(map(len, segs)) + q * n + 1 for segs, n in zip(per_sample, counts, strict=True)]

    def interleave(
        self,
        prompts: list[str],
        image_tokens: torch.Tensor,
        counts: list[int],
        *,
        pad_to_max_length: bool = False,
    ) -> Interleaved:
        """Text embeddings with each placeholder replaced by its image's tokens, then EOS.

        ``image_tokens`` holds the real images of all samples in order ([N, Q, D], N = sum(counts)).
        Over-long text is cut from the end; image tokens and EOS are never cut. ``pad_to_max_length``
        makes the shape independent of the other prompts in the batch (the sampler's choice, so a
        sample's result does not depend on what it is batched with).
        """
        per_sample = self._segment_ids(prompts, counts)
        q = self.num_query_tokens

        table = self.t5.get_input_embeddings()
        eos_id = self.tokenizer.eos_token_id
        device = table.weight.device
        lengths = [len(seg) for segs in per_sample for seg in segs]
        all_ids = [t for segs in per_sample for seg in segs for t in seg] + [eos_id]
        text = table(torch.tensor(all_ids, dtype=torch.long, device=device))  # [sum + 1, D]
        eos, text = text[-1:], text[:-1]
        text_pieces = list(torch.split(text, lengths))
        image_tokens = image_tokens.to(text.dtype)

        rows, starts = [], []
        piece, image = 0, 0
        for segs in per_sample:
            parts, sample_starts, pos = [], [], 0
            for j in range(len(segs)):
                if j > 0:  # placeholder j-1 sits before segment j
                    sample_starts.append(pos)
                    parts.append(image_tokens[image])
                    image += 1
                    pos += q
                parts.append(text_pieces[piece])
                pos += text_pieces[piece].shape[0]
                piece += 1
            parts.append(eos)
            rows.append(torch.cat(parts))
            starts.append(sample_starts)
        width = self.max_length if pad_to_max_length else max(r.shape[0] for r in rows)
        embeds = text.new_zeros(len(rows), width, text.shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            embeds[b, : row.shape[0]] = row
            mask[b, : row.shape[0]] = 1
        return Interleaved(embeds, mask, starts)

    def forward(
        self,
        prompts: list[str],
        *,
        pixels: torch.Tensor,
        visual_tokens: torch.Tensor,
        counts: list[int],
        pad_to_max_length: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B), real images only (pixels [N, 3, Hv, Wv], visual_tokens [N, L, Dv]),
        counts[b] = images of sample b → hidden states [B, T, D_t5] and mask [B, T]."""
        if pixels.shape[0] != sum(counts):
            raise ValueError(f"{pixels.shape[0]} images given but counts add up to {sum(counts)}")
        ghost = pixels.shape[0] == 0 and self.run_every_branch
        if pixels.shape[0] > 0:
            tokens = self.image_tokens(pixels, visual_tokens)
        elif ghost:  # no image here, maybe on other ranks: ViT / Q-Former on one zero image, none kept
            channels = self.vision.embeddings.patch_embedding.in_channels
            size = (1, channels, self.vision.config.image_size, self.vision.config.image_size)
            visual = visual_tokens.new_zeros(1, *visual_tokens.shape[1:]) + in_graph_zero(visual_tokens)
            tokens = self.image_tokens(pixels.new_zeros(size), visual)[:0]
        else:  # no image in the whole batch: skip the ViT / Q-Former entirely
            tokens = self.projection.weight.new_zeros(0, self.num_query_tokens, self.projection.out_features)
        inputs = self.interleave(prompts, tokens, counts, pad_to_max_length=pad_to_max_length)
        embeds = inputs.embeds + in_graph_zero(tokens) if ghost else inputs.embeds
        hidden = self.t5(inputs_embeds=embeds, attention_mask=inputs.mask).last_hidden_state
        return hidden, inputs.mask

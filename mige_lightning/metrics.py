"""Evaluation metrics as ``torchmetrics.Metric``s, exactly as the authors' metric code.

All scores are plain per-sample means of raw cosine similarities (no ×100, no clamp) or pixel
errors. Images are PIL images; preprocessing is part of the protocol:

| metric  | backbone                          | preprocessing                                         |
|---------|-----------------------------------|-------------------------------------------------------|
| DINO    | ViT-S/16 (``facebook/dino-vits16``), CLS of the last hidden state (after the final LayerNorm) | short side → 256 bicubic, center-crop 224, ImageNet mean/std |
| CLIP-I  | open_clip ``ViT-B-32-quickgelu`` / ``openai`` (OpenAI's ViT-B/32, QuickGELU) | short side → 224 bicubic, center-crop 224, CLIP mean/std |
| CLIP-T  | same; text padded/truncated to 77 tokens | as CLIP-I                                        |
| CLIPdir | same; samples with identical captions skipped (0/0) | as CLIP-I                               |
| L1 / L2 | —                                 | output resized to the reference's size (PIL bicubic), [0, 1]; L2 is the MSE |

Backbones load from a hub id or a local path, are frozen, and are loaded once per process and
shared between metrics. They are never part of a metric's ``state_dict``.

CLIP's activation follows its weights: OpenAI's CLIP was trained with QuickGELU, and open_clip
builds ``ViT-B-32`` with plain GELU even for the ``openai`` tag (it only warns), which changes every
CLIP score. ``load_clip`` therefore forces QuickGELU whenever the pretrained tag says so; the
default model name is ``ViT-B-32-quickgelu``, which also holds for a local copy of OpenAI's weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchvision.transforms import v2
from transformers import ViTModel
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from mige_lightning.sources import resolve_source

log = logging.getLogger(__name__)
DINO_RESIZE, DINO_CROP = 256, 224
CLIP_RESIZE, CLIP_CROP = 224, 224
CLIP_CONTEXT = 77


def resize_center_crop(image: PIL.Image.Image, resize: int, crop: int) -> PIL.Image.Image:
    """Short side → ``resize`` (bicubic, aspect kept), then the central ``crop`` × ``crop``."""
    image = v2.functional.resize(image.convert("RGB"), resize, interpolation=v2.InterpolationMode.BICUBIC)
    return v2.functional.center_crop(image, crop)


def _to_normalised(images: Sequence[PIL.Image.Image], mean, std) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # [N, H, W, 3]
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class DinoEmbedder(torch.nn.Module):
    def __init__(self, model: ViTModel):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        crops = [resize_center_crop(im, DINO_RESIZE, DINO_CROP) for im in images]
        x = _to_normalised(crops, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).to(
            self.model.device, self.model.dtype
        )
        out = self.model(pixel_values=x, interpolate_pos_encoding=True)
        return out.last_hidden_state[:, 0].float()  # CLS token after the final LayerNorm, not pooler_output


class ClipEmbedder(torch.nn.Module):
    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        crops = [resize_center_crop(im, CLIP_RESIZE, CLIP_CROP) for im in images]
        x = _to_normalised(crops, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(self.device)
        return self.model.encode_image(x).float()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), context_length=CLIP_CONTEXT).to(self.device)
        return self.model.encode_text(tokens).float()


@cache
def load_dino(source: str = "facebook/dino-vits16") -> DinoEmbedder:
    """DINO ViT-S/16 from a hub id or a local directory (loaded once per process)."""
    model = ViTModel.from_pretrained(resolve_source(source, key="metrics.dino"), add_pooling_layer=False)
    return DinoEmbedder(model)


DEFAULT_CLIP_MODEL = "ViT-B-32-quickgelu"  # OpenAI's ViT-B/32 as trained: QuickGELU activations


def force_quick_gelu(model_name: str, pretrained: str) -> bool:
    """Whether ``model_name`` must be built with QuickGELU to match ``pretrained``: True when the
    pretrained tag was trained with QuickGELU (OpenAI's weights) and the model config lacks it.
    A local checkpoint file carries no tag: the model config decides (name a ``-quickgelu`` config
    for a local copy of OpenAI's weights)."""
    import open_clip

    if pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        return False
    tag_quick = bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
    model_quick = bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))
    return tag_quick and not model_quick


@cache
def load_clip(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = "openai") -> ClipEmbedder:
    """open_clip model by name with a pretrained tag (``openai``) or a local checkpoint file, with
    the activation its weights were trained with (``force_quick_gelu``)."""
    import open_clip

    if pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        resolve_source(pretrained, key="metrics.clip.pretrained")  # a local file must exist
    model = open_clip.create_model(
        model_name, pretrained=pretrained, force_quick_gelu=force_quick_gelu(model_name, pretrained)
    )
    return ClipEmbedder(model, open_clip.get_tokenizer(model_name))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)  # raw cosine: no ×100, no clamp


def _pixels(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


# ------------------------------------------------------------------------------------- metrics
class MeanScore(Metric):
    """Mean of per-sample scores; sums and counts sync across ranks. ``last`` holds the latest
    batch's per-sample values (NaN where a sample was skipped) for per-sample reports."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.last = torch.empty(0)

    def _accumulate(self, values: torch.Tensor) -> None:
        values = values.detach().double().cpu()
        self.last = values
        keep = ~torch.isnan(values)
        self.total += values[keep].sum().to(self.total.device)
        self.count += int(keep.sum())

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class _Backbone(MeanScore):
    def __init__(self, embedder, **kwargs):
        super().__init__(**kwargs)
        self.__dict__["embedder"] = embedder  # shared, frozen, not a registered submodule / state


class DINOScore(_Backbone):
    """cos(DINO(output), DINO(reference)) per sample."""

    def update(self, outputs: Sequence[PIL.Image.Image], references: Sequence[PIL.Image.Image]) -> None:
        if len(outputs):  # a rank with nothing to score still syncs its (empty) sums
            self._accumulate(_cos(self.embedder(outputs), self.embedder(references)))


class CLIPImageScore(_Backbone):
    """cos(CLIP(output), CLIP(reference)) per sample."""

    def update(self, outputs: Sequence[PIL.Image.Image], references: Sequence[PIL.Image.Image]) -> None:
        if len(outputs):
            self._accumulate(_cos(self.embedder.images(outputs), self.embedder.images(references)))


class CLIPTextScore(_Backbone):
    """cos(CLIP image embedding, CLIP caption embedding) per sample."""

    def update(self, outputs: Sequence[PIL.Image.Image], captions: Sequence[str]) -> None:
        if len(outputs):
            self._accumulate(_cos(self.embedder.images(outputs), self.embedder.texts(captions)))


class CLIPDirectionalScore(_Backbone):
    """n(n(E(out)) − n(E(src))) · n(n(T(out_cap)) − n(T(in_cap))); identical captions are skipped."""

    def update(
        self,
        sources: Sequence[PIL.Image.Image],
        outputs: Sequence[PIL.Image.Image],
        input_captions: Sequence[str],
        output_captions: Sequence[str],
    ) -> None:
        if not len(outputs):
            return
        e = self.embedder
        img = F.normalize(
            F.normalize(e.images(outputs), dim=-1) - F.normalize(e.images(sources), dim=-1), dim=-1
        )
        txt = F.normalize(
            F.normalize(e.texts(output_captions), dim=-1) - F.normalize(e.texts(input_captions), dim=-1),
            dim=-1,
        )
        values = (img * txt).sum(-1)
        same = torch.tensor([a == b for a, b in zip(input_captions, output_captions, strict=True)])
        self._accumulate(torch.where(same, torch.full_like(values, float("nan")), values))


def clip_t_caption(input_caption: str | None, output_caption: str | None) -> str | None:
    """The text CLIP-T scores an output against: the output caption, or none where it equals the
    input caption — such a row describes no change, and the authors leave it out of CLIP-T as well
    as CLIPdir. A row without an input caption (subject-driven generation) keeps its output caption."""
    return None if output_caption == input_caption else output_caption


def update_caption_scores(
    metrics,
    outputs: Sequence[PIL.Image.Image],
    sources: Sequence[PIL.Image.Image | None],
    captions: Sequence[str | None],
    input_captions: Sequence[str | None],
    output_captions: Sequence[str | None],
) -> dict[str, list[float]]:
    """One batch's CLIP-T and CLIPdir, as ``test`` and the validation loop score them: CLIP-T on the
    rows with a caption (``clip_t_caption``), CLIPdir on the rows with a source and both captions
    (identical ones skipped by the metric). Per-sample values of the metrics present in ``metrics``
    (a name → metric mapping), NaN where a row is not scored; rows with nothing to score add nothing."""
    n = len(outputs)
    rows: dict[str, list[float]] = {}
    if "clip_t" in metrics:
        rows["clip_t"] = [float("nan")] * n
        cap = [i for i in range(n) if captions[i]]
        if cap:
            metrics["clip_t"].update([outputs[i] for i in cap], [captions[i] for i in cap])
            for j, i in enumerate(cap):
                rows["clip_t"][i] = metrics["clip_t"].last[j].item()
    if "clip_dir" in metrics:
        rows["clip_dir"] = [float("nan")] * n
        dirs = [i for i in range(n) if input_captions[i] and output_captions[i] and sources[i] is not None]
        if dirs:
            metrics["clip_dir"].update(
                [sources[i] for i in dirs],
                [outputs[i] for i in dirs],
                [input_captions[i] for i in dirs],
                [output_captions[i] for i in dirs],
            )
            for j, i in enumerate(dirs):
                rows["clip_dir"][i] = metrics["clip_dir"].last[j].item()
    return rows


class _PixelError(MeanScore):
    higher_is_better = False
    power = 1

    def update(self, outputs: Sequence[PIL.Image.Image], references: Sequence[PIL.Image.Image]) -> None:
        values = []
        for out, ref in zip(outputs, references, strict=True):
            out = out.convert("RGB").resize(ref.size, PIL.Image.BICUBIC)  # output → reference's size
            values.append((_pixels(out) - _pixels(ref)).abs().pow(self.power).mean())
        if values:
            self._accumulate(torch.stack(values))


class L1Distance(_PixelError):
    """Mean absolute error over C×H×W, pixels in [0, 1]."""

    power = 1


class L2Distance(_PixelError):
    """Mean squared error over C×H×W (no square root), pixels in [0, 1]."""

    power = 2


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:  # one clear line per process, however many metric sets are built
        _warned.add(message)
        log.warning(message)


def build_metrics(
    *, dino: str | None = None, clip_model: str = DEFAULT_CLIP_MODEL, clip_pretrained: str | None = None
) -> dict[str, Metric]:
    """Name → metric in the paper's column order. Backbone metrics are left out — with one log
    line saying so — when no backbone is configured; they are never computed on random weights."""
    metrics: dict[str, Metric] = {}
    if dino:
        metrics["dino"] = DINOScore(load_dino(dino))
    else:
        _warn_once("metrics: no DINO backbone configured (model.eval_metrics.dino); DINO is disabled")
    if clip_pretrained:
        clip = load_clip(clip_model, clip_pretrained)
        metrics["clip_i"] = CLIPImageScore(clip)
        metrics["clip_t"] = CLIPTextScore(clip)
        metrics["clip_dir"] = CLIPDirectionalScore(clip)
    else:
        _warn_once(
            "metrics: no CLIP backbone configured (model.eval_metrics.clip_pretrained); CLIP-I / CLIP-T / CLIPdir are disabled"
        )
    metrics["l1"] = L1Distance()
    metrics["l2"] = L2Distance()
    return metrics


COLUMN_NAMES = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "clip_dir": "CLIPdir",
    "l1": "L1",
    "l2": "L2",
}

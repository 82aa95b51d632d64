"""Where pretrained components come from: a hub id *or* a local directory, through one code path.

Tests exercise exactly these functions by saving tiny random components with ``save_pretrained``
to a temporary directory and loading them back, so the hub path and the local path share code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2QFormerModel,
    Blip2VisionModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import cached_file

from mige_lightning.checkpoint_files import (
    load_torch_file,
    nonfinite_message,
    nonfinite_problems,
    open_safetensors,
    refuse_nonfinite,
)
from mige_lightning.sources import resolve_source

BYTE_TOKENIZER = "byte"  # a tokenizer built in code (tiny preset, offline demo)
WORD_TOKENIZER = "words"  # a word-level tokenizer built in code over BASIC_WORDS (the CPU demo)
BUILT_IN_TOKENIZERS = (BYTE_TOKENIZER, WORD_TOKENIZER)
# Every word of the task prefixes and of the synthetic world's instructions (tests check both),
# plus a few common ones; anything else is <unk>. One id per word, as a pretrained T5 vocabulary
# has for these common words, so a tiny model learns from words rather than spelling them out.
BASIC_WORDS = (
    "a an the of in on to with and or by from at into as is it its this that these those "
    "follow text instruction generate image images given objects object preserving subject's subject "
    "identity edit editing subject-driven make remove move change add replace put turn set "
    "background colour color left right center centre middle top bottom small large big "
    "red green blue yellow white gray grey black pink orange purple brown "
    "circle square triangle shape sprite"
).split()


@dataclass
class PretrainedSources:
    """Hub ids or local directories for each pretrained component; ``None`` = random init from config.

    ``blip2`` is a full BLIP-2 checkpoint (e.g. ``Salesforce/blip2-flan-t5-xxl``): its vision tower,
    Q-Former, query tokens and ``language_projection`` are read from it without loading its LLM.
    """

    t5: str | None = None
    tokenizer: str | None = None  # defaults to the t5 source
    blip2: str | None = None
    dit: str | None = None
    dit_subfolder: str | None = None
    vae: str | None = None
    vae_subfolder: str | None = None
    null_embedding: str | None = None  # file (.safetensors / .pt) holding the [L, D] null caption

    def validate(self, key: str = "model.pretrained") -> None:
        """Fail at start-up (not hours later) on a local path that does not exist."""
        for name in ("t5", "tokenizer", "blip2", "dit", "vae"):
            value = getattr(self, name)
            if value is None or value in BUILT_IN_TOKENIZERS:
                continue
            try:
                resolve_source(value, key=f"{key}.{name}")
            except FileNotFoundError as err:
                if name == "tokenizer":
                    raise
                # the demo world's small components have no public checkpoint: this project makes them
                raise FileNotFoundError(
                    f"{err}; a synthetic world's own components are made by `python -m mige_lightning "
                    "pretrain-world --config <the same configs>` (make pretrain-world)"
                ) from err
        if self.null_embedding is not None and not Path(self.null_embedding).expanduser().is_file():
            raise FileNotFoundError(f"{key}.null_embedding: file '{self.null_embedding}' does not exist")


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer made in code (no files, no network); ids follow T5: pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[char] = i + 3
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def build_word_tokenizer(words=BASIC_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer made in code: lower-cased words and punctuation marks, one id each
    (ids follow T5: pad 0, eos 1, unk 2); a word outside ``words`` is <unk>."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for token in [*words, *",.!?;:'\"-()"]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # split on whitespace and on punctuation, except inside words like subject's / subject-driven
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w'-]"), behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def load_tokenizer(source: str, *, key: str = "model.pretrained.tokenizer") -> PreTrainedTokenizerBase:
    if source == BYTE_TOKENIZER:
        return build_byte_tokenizer()
    if source == WORD_TOKENIZER:
        return build_word_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(source, key=key))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{key}: tokenizer from '{source}' has no EOS token; the encoder needs one")
    return tokenizer


def _checkpoint_tensors(source: str, prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only the tensors under ``prefixes`` from a (possibly sharded) safetensors checkpoint.

    Only the shards that hold them are fetched, so a BLIP-2 checkpoint's 11 B-parameter LLM is
    never downloaded or loaded just to get its vision tower and Q-Former.
    """
    prefixes = tuple(prefixes)
    index = cached_file(source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        weight_map: dict[str, str] = json.loads(Path(index).read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k.startswith(prefixes)})
    else:
        shards = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    nonfinite = []
    for shard in shards:
        path = cached_file(source, shard)
        with open_safetensors(path) as f:
            read = {name: f.get_tensor(name) for name in f.keys() if name.startswith(prefixes)}  # noqa: SIM118
        nonfinite += [f"{path} {problem}" for problem in nonfinite_problems(read)]
        tensors.update(read)
    if nonfinite:
        raise ValueError(nonfinite_message(f"BLIP-2 checkpoint '{source}'", nonfinite))
    return tensors


def _load_prefixed(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: str
) -> None:
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Buffers such as position_ids are not saved by transformers; anything else missing is an error.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"BLIP-2 checkpoint '{source}' does not match under '{prefix}': "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


@dataclass
class Blip2Parts:
    vision: Blip2VisionModel
    qformer: Blip2QFormerModel
    query_tokens: torch.Tensor  # [1, Q, Dq]
    language_projection: dict[str, torch.Tensor]  # weight / bias of the Dq → D_llm map


def load_blip2_parts(source: str, *, key: str = "model.pretrained.blip2") -> Blip2Parts:
    """Vision tower, Q-Former, query tokens and language projection from a BLIP-2 checkpoint."""
    source = resolve_source(source, key=key)
    config = Blip2Config.from_pretrained(source)
    vision = Blip2VisionModel(config.vision_config)
    qformer = Blip2QFormerModel(config.qformer_config)
    tensors = _checkpoint_tensors(
        source, ("vision_model.", "qformer.", "query_tokens", "language_projection.")
    )
    _load_prefixed(vision, tensors, "vision_model.", source)
    _load_prefixed(qformer, tensors, "qformer.", source)
    if "query_tokens" not in tensors:
        raise ValueError(f"{key}: BLIP-2 checkpoint '{source}' has no query_tokens")
    projection = {
        k.removeprefix("language_projection."): v
        for k, v in tensors.items()
        if k.startswith("language_projection.")
    }
    return Blip2Parts(vision, qformer, tensors["query_tokens"], projection)


def load_tensor_file(path: str) -> torch.Tensor:
    """A single tensor from ``.safetensors`` (the only tensor, or the one named ``y_embedding``) or ``.pt``."""
    path_obj = Path(path).expanduser()
    if path_obj.suffix == ".safetensors":
        with open_safetensors(path_obj) as f:
            names = list(f.keys())
            name = "y_embedding" if "y_embedding" in names else names[0] if len(names) == 1 else None
            if name is None:
                raise ValueError(f"{path}: expected one tensor or one named 'y_embedding', found {names}")
            obj = f.get_tensor(name)
    else:
        obj = load_torch_file(path_obj)
        name = "y_embedding"
        if isinstance(obj, dict):
            name = "y_embedding" if "y_embedding" in obj else "uncond_prompt_embeds"
            obj = obj.get(name)
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor or a dict with 'y_embedding'")
    if not obj.is_floating_point():
        raise ValueError(
            f"{path}: '{name}' is {str(obj.dtype).removeprefix('torch.')}, expected a float tensor"
        )
    refuse_nonfinite({name: obj}, str(path))
    return obj

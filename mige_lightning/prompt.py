"""The one instruction contract shared by training, inference and evaluation.

Tasks, their prefixes, prompt normalisation and the ``<imagehere>`` placeholder all live here so
that the text a model is trained on is exactly the text it is sampled with (the authors' release
normalises differently at train and inference time). ``PROMPT_VERSION`` is stored in
checkpoints: bump it whenever ``build_prompt`` changes its output.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from enum import Enum

PROMPT_VERSION = 1
PLACEHOLDER = "<imagehere>"
_PLACEHOLDER_RE = re.compile(re.escape(PLACEHOLDER), flags=re.IGNORECASE)
# BLIP's caption processor: lower-case, these characters become spaces, whitespace collapsed.
_BLIP_STRIP_RE = re.compile(r"([.!\"()*#:;~])")
_SPACES_RE = re.compile(r"\s{2,}")


class Task(str, Enum):
    """The three tasks one MIGE model is trained on jointly."""

    SUBJECT = "subject"  # subject-driven generation; conditional input is zeros
    EDIT = "edit"  # instruction-based editing; conditional input is the source latent
    SUBJECT_EDIT = "subject_edit"  # add / replace a given subject in a source image

    @classmethod
    def parse(cls, value: str | Task) -> Task:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(t.value for t in cls)
            raise ValueError(f"unknown task {value!r}; expected one of: {choices}") from None

    @property
    def uses_source(self) -> bool:
        """Whether the conditional input is a source image's latent (else zeros)."""
        return self is not Task.SUBJECT


TASK_PREFIX: dict[Task, str] = {
    Task.SUBJECT: (
        "Follow the text instruction to generate an image with the given objects, "
        "preserving the subject's identity:\n "
    ),
    Task.EDIT: "Follow the instruction to edit the image:\n ",
    Task.SUBJECT_EDIT: "Subject-driven editing:\n ",
}


def normalize_instruction(text: str, *, max_words: int = 88) -> str:
    """BLIP caption normalisation; placeholders come out as lower-case ``<imagehere>``."""
    text = _BLIP_STRIP_RE.sub(" ", text.lower())
    text = _SPACES_RE.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


# The prompt strings of the authors' inference scripts where they differ from training: the
# subject prefix is reworded, and for subject and subject_edit the prefix is normalised together
# with the instruction (lower-cased, ':' dropped). Their edit inference uses the training prompt.
AUTHORS_INFERENCE_PREFIX: dict[Task, str] = {
    Task.SUBJECT: (
        "Follow the text instruction to generate an image with the given objects' images, "
        "preserving the subject's identity:\n "
    ),
    Task.SUBJECT_EDIT: "Subject-driven editing:\n ",
}
PROMPT_STYLES = ("training", "authors_inference")


def build_prompt(task: Task | str, instruction: str, *, max_words: int = 88, style: str = "training") -> str:
    """Task prefix + normalised instruction: the exact text the encoder sees.

    ``style="training"`` (default) gives the text every model here is trained on, at training and
    at inference alike. ``"authors_inference"`` gives the strings the authors' inference scripts
    feed their released checkpoint (for a converted checkpoint, to reproduce their outputs).
    """
    task = Task.parse(task)
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}")
    if style == "authors_inference" and task in AUTHORS_INFERENCE_PREFIX:
        return normalize_instruction(AUTHORS_INFERENCE_PREFIX[task] + instruction, max_words=max_words)
    return TASK_PREFIX[task] + normalize_instruction(instruction, max_words=max_words)


def count_placeholders(text: str) -> int:
    return len(_PLACEHOLDER_RE.findall(text))


def placeholders_cut(text: str, *, max_words: int = 88) -> str | None:
    """Why the word limit of ``normalize_instruction`` would drop placeholders of ``text`` (the
    encoder would then see fewer placeholders than images), or None when they all survive."""
    total, kept = (
        count_placeholders(text),
        count_placeholders(normalize_instruction(text, max_words=max_words)),
    )
    if kept == total:
        return None
    words = len(normalize_instruction(text, max_words=sys.maxsize).split(" "))
    return (
        f"the instruction has {words} words and the {max_words}-word limit cuts {total - kept} of its "
        f"{total} <imagehere> placeholder(s); shorten it or move the placeholders earlier"
    )


def words_cut(text: str, *, max_words: int = 88) -> str | None:
    """What the word limit of ``normalize_instruction`` drops from ``text``, or None."""
    words = normalize_instruction(text, max_words=sys.maxsize).split(" ")
    if len(words) <= max_words:
        return None
    dropped = " ".join(words[max_words:])
    return (
        f"the instruction has {len(words)} words and the prompt's {max_words}-word limit drops the last "
        f"{len(words) - max_words} ({dropped[:120]!r}{'…' if len(dropped) > 120 else ''}); shorten it"
    )


@dataclass(frozen=True)
class UnseenText:
    """What of one instruction the model does not see (``MIGEModule.instruction_problems``)."""

    cut: tuple[str, ...] = ()  # text dropped by the word limit or the encoder's max_length
    unknown: tuple[str, ...] = ()  # words read as the tokenizer's unknown token

    @property
    def messages(self) -> list[str]:
        return [*self.cut, *self.unknown]


class UnseenTextTally:
    """Training instructions the encoder does not see whole, counted over an epoch (the training
    path reports them in a summary instead of stopping: one cut caption of millions is no reason
    to stop a run, but the researcher must know)."""

    def __init__(self) -> None:
        self.seen = 0
        self.cut = 0
        self.unknown = 0
        self.examples: list[str] = []

    @staticmethod
    def step_counts(unseen: list[UnseenText]) -> dict[str, float]:
        return {
            "train/instructions_cut": float(sum(bool(u.cut) for u in unseen)),
            "train/instructions_unknown_words": float(sum(bool(u.unknown) for u in unseen)),
        }

    def add(self, instructions: list[str], unseen: list[UnseenText]) -> None:
        self.seen += len(instructions)
        self.cut += sum(bool(u.cut) for u in unseen)
        self.unknown += sum(bool(u.unknown) for u in unseen)
        for text, u in zip(instructions, unseen, strict=True):
            if u.messages and len(self.examples) < 5:
                self.examples.append(f"{text[:80]!r}: " + "; ".join(u.messages))

    def summary(self, epoch: int) -> str | None:
        if not (self.cut or self.unknown):
            return None
        return (
            f"epoch {epoch}: of {self.seen} training instructions on this rank, {self.cut} were cut "
            f"(words past the limit or tokens past max_length never reach the model) and {self.unknown} "
            "had words the tokenizer reads as unknown (logged as train/instructions_cut, "
            "train/instructions_unknown_words). First: " + " | ".join(self.examples)
        )


def split_placeholders(text: str) -> list[str]:
    """Text segments around the placeholders: ``k`` placeholders give ``k + 1`` segments."""
    return _PLACEHOLDER_RE.split(text)

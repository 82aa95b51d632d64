"""Prediction requests: one JSON object per line.

Fields: ``id``, ``task``, ``instruction`` (with ``<imagehere>`` placeholders), ``images`` (paths
filling them, in order), ``source`` (path; edit / subject_edit), and optionally ``seed``,
``guidance_scale``, ``image_guidance_scale``, ``num_inference_steps``, ``resize_to_source``, and
``target`` (the expected image, read by judges, not by ``predict``); any other field is a bad
request (a misspelled option would otherwise run at its default). A request's shape follows its
task as a training record's does: an edit shows exactly its source, a subject request has none.
Relative paths resolve against the request file's folder. A bad request is reported with its
line and skipped; the others still run. ``RequestDataModule`` serves them to ``predict``.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from datamodules.base import MIGEDataModule
from datamodules.records import ManifestError, Problem, read_lines, shape_mismatch, too_deep
from mige_lightning.generate import GenerationRequest, SamplingBatch
from mige_lightning.images import ImageRefusedError, load_rgb, not_a_regular_file
from mige_lightning.prompt import Task, count_placeholders, placeholders_cut

log = logging.getLogger(__name__)
# optional per-request numbers: (JSON type, lowest, highest); no coercion from other JSON types
OPTIONAL_NUMBERS = {
    "seed": (int, 0, 2**63 - 1),
    "guidance_scale": (float, 0.0, 100.0),
    "image_guidance_scale": (float, 0.0, 100.0),
    "num_inference_steps": (int, 1, 1000),  # at most the training schedule's 1000 timesteps
}


def _number(obj: dict, name: str) -> tuple[Any, str | None]:
    kind, low, high = OPTIONAL_NUMBERS[name]
    value = obj[name]
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        return (
            None,
            f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {type(value).__name__} {value!r}",
        )
    if not (low <= value <= high):  # NaN fails this too
        return None, f"'{name}' must be in [{low}, {high}], got {value!r}"
    return kind(value), None


# an id names its output file <output_dir>/<id>.png: a plain file name, nothing that leaves the folder
ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def check_id(value: Any) -> tuple[str | None, str | None]:
    """A request id → (id, None), or (None, what is wrong). Strings and integers only."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"'id' must be a string or an integer, got {type(value).__name__} {value!r}"
    rid = str(value)
    if not ID_RE.fullmatch(rid) or rid.endswith("."):
        return None, (
            f"'id' {rid!r} is not a plain file name: use letters, digits, '_', '-' and '.' "
            "(no '/', '\\', spaces or leading '.'; at most 200 characters): it names the output PNG"
        )
    return rid, None


@dataclass(frozen=True)
class Request:
    """A request as read from its file (paths; ``images`` in the file fills ``references``)."""

    id: str
    task: Task
    instruction: str
    references: tuple[Path, ...]
    source: Path | None
    origin: str
    number: int  # position among the file's good requests of its task: the default seed offset
    options: tuple[tuple[str, Any], ...] = ()  # seed / scales / steps / resize_to_source, when given
    warnings: tuple[str, ...] = ()  # what of the instruction the model will not see (unseen_text: warn)

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)


# every field a request may hold; ``target`` (the expected image) is carried for judges, not used
REQUEST_FIELDS = (
    "id",
    "task",
    "instruction",
    "images",
    "source",
    "target",
    *OPTIONAL_NUMBERS,
    "resize_to_source",
)


def _unknown_fields(obj: dict) -> str | None:
    """A misspelled or unknown field is refused (``"guidance": 7.5`` would otherwise run at the default)."""
    unknown = [k for k in obj if k not in REQUEST_FIELDS]
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), REQUEST_FIELDS, n=1, cutoff=0.5)
        close = close or [f for f in REQUEST_FIELDS if str(key) and f.startswith(str(key))][:1]
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown field(s) {', '.join(hints)}; a request's fields are {', '.join(REQUEST_FIELDS)}"


def _parse(obj: Any, *, origin: str, base: Path) -> tuple[dict, str | None]:
    if not isinstance(obj, dict):
        return {}, f"expected a JSON object, got {type(obj).__name__}"
    if (unknown := _unknown_fields(obj)) is not None:
        return {}, unknown
    if not obj.get("instruction"):
        return {}, "missing field 'instruction'"
    if not isinstance(obj["instruction"], str):
        return {}, f"'instruction' must be a string, got {type(obj['instruction']).__name__}"
    if obj.get("task") is not None and not isinstance(obj["task"], str):
        return {}, f"'task' must be a string, got {type(obj['task']).__name__} {obj['task']!r}"
    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        return {}, f"'images' must be a list of paths (strings), got {obj.get('images')!r}"[:300]
    if obj.get("source") is not None and not (isinstance(obj["source"], str) and obj["source"]):
        return {}, f"'source' must be a path (string), got {obj['source']!r}"[:300]
    try:
        task = Task.parse(obj.get("task"))
    except ValueError as e:
        return {}, str(e)
    images = tuple(base / p for p in obj.get("images") or [])
    n = count_placeholders(obj["instruction"])
    if n != len(images):
        return {}, f"{n} <imagehere> placeholder(s) but {len(images)} image(s)"
    if (cut := placeholders_cut(obj["instruction"])) is not None:
        return {}, cut
    source = base / obj["source"] if obj.get("source") else None
    if task.uses_source and source is None:
        return {}, f"task '{task.value}' needs a 'source'"
    # the same shape rules as a training record's (an edit shows exactly its source, a subject none)
    mismatch = shape_mismatch(
        task,
        None,
        entities=[str(p.resolve()) for p in images],
        sources=[str(source.resolve())] if source else [],
        instruction=obj["instruction"],
    )
    if mismatch is not None:
        return {}, mismatch.replace("record", "request")
    for path in (*images, *((source,) if source else ())):
        why = not_a_regular_file(path)  # a FIFO is never opened: reading it would block
        if why is not None and why.startswith("does not exist"):
            return {}, f"missing image {path}{why.removeprefix('does not exist')}"
        if why is not None:
            return {}, f"{path} {why}"
        try:
            load_rgb(path)
        except ImageRefusedError as e:  # too large, extreme aspect ratio, several frames
            return {}, str(e)
        except Exception as e:  # noqa: BLE001 — reported with the line, never swallowed
            return {}, f"unreadable image {path}: {type(e).__name__}: {e}"
    options = {}
    for name in OPTIONAL_NUMBERS:
        if obj.get(name) is not None:
            value, error = _number(obj, name)
            if error is not None:
                return {}, error
            options[name] = value
    if "resize_to_source" in obj:
        if not isinstance(obj["resize_to_source"], bool):
            return {}, f"'resize_to_source' must be true or false, got {obj['resize_to_source']!r}"
        options["resize_to_source"] = obj["resize_to_source"]
    fields = dict(
        task=task,
        instruction=obj["instruction"],
        references=images,
        source=source,
        options=tuple(options.items()),
    )
    return fields, None


def read_requests(path: str | Path) -> tuple[list[Request], list[Problem]]:
    path = Path(path)
    why = not_a_regular_file(path)  # a FIFO is never opened: reading it would block
    if why is not None and why.startswith("does not exist"):
        return [], [Problem(f"{path}:0", "missing file", f"request file {why}")]
    if why is not None:
        return [], [Problem(f"{path}:0", "not a regular file", f"the request file {why}")]
    requests, problems, ids = [], [], set()
    for lineno, line, undecodable in read_lines(path):
        origin = f"{path}:{lineno}"
        if undecodable is not None:
            problems.append(Problem(origin, "not UTF-8", undecodable))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(origin, "malformed JSON", f"malformed JSON line: {e.msg}"))
            continue
        except RecursionError:
            problems.append(Problem(origin, "malformed JSON", f"malformed JSON line: {too_deep(line)}"))
            continue
        fields, error = _parse(obj, origin=origin, base=path.parent)
        rid = None
        if error is None:
            rid, error = check_id(obj.get("id", f"line{lineno}"))
        # ids differing only in case would overwrite each other on case-insensitive file systems
        if error is None and rid.lower() in ids:
            error = f"duplicate id {rid!r} (ids name output files; compared ignoring case)"
        if error is not None:
            problems.append(Problem(origin, "bad request", error))
            continue
        ids.add(rid.lower())
        number = sum(r.task is fields["task"] for r in requests)
        requests.append(Request(id=rid, origin=origin, number=number, **fields))
    return requests, problems


@dataclass(frozen=True, eq=False)
class PredictItem:
    """A request as read (``spec``: paths, origin, warnings) and as generated (``request``: images
    loaded, options applied)."""

    spec: Request
    request: GenerationRequest


def load_request(r: Request) -> PredictItem:
    options = dict(r.options)
    request = GenerationRequest(
        id=r.id,
        task=r.task,
        instruction=r.instruction,
        references=tuple(load_rgb(p) for p in r.references),
        source=load_rgb(r.source) if r.source else None,
        number=r.number,
        seed=options.get("seed"),
        num_inference_steps=options.get("num_inference_steps"),
        guidance_scale=options.get("guidance_scale"),
        image_guidance_scale=options.get("image_guidance_scale"),
        resize_to_source=bool(options.get("resize_to_source", False)),
        origin=r.origin,
    )
    return PredictItem(r, request)


class RequestDataset(Dataset):
    def __init__(self, requests: list[Request]):
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> PredictItem:
        return load_request(self.requests[i])


class RequestDataModule(MIGEDataModule):
    """``predict``: the requests of one JSONL file (format above), in file order.

    Args:
        requests: the request file; a bad request is reported with its line and skipped, as is one
            with more references than the model takes (``connect``'s reference limit).
        batch_size: requests per batch (requests that share settings are sampled together).
        num_workers: processes decoding the request images.
        unseen_text: what to do with a request whose instruction the model would not see whole
            (words past the prompt's 88-word limit, tokens past the encoder's ``max_length``, words
            the tokenizer reads as unknown): ``error`` (default) makes it a bad request, reported with
            its line and skipped; ``warn`` runs it, with a warning and a ``warnings`` entry in
            ``predictions.jsonl`` naming what was not seen.
    """

    def __init__(
        self, requests: str, *, batch_size: int = 4, num_workers: int = 0, unseen_text: str = "error"
    ):
        super().__init__(num_workers=num_workers)
        if unseen_text not in ("error", "warn"):
            raise ValueError(f"data.unseen_text: {unseen_text!r}; choose 'error' or 'warn'")
        self.requests = requests
        self.batch_size = batch_size
        self.unseen_text = unseen_text

    def _check_text(self, requests: list[Request]) -> tuple[list[Request], list[Problem]]:
        """Requests whose instruction the model sees whole; the others are bad requests (or, with
        ``unseen_text: warn``, kept with their warnings)."""
        if self.check_instructions is None or not requests:
            return requests, []
        unseen = self.check_instructions(
            [r.task.value for r in requests],
            [r.instruction for r in requests],
            [len(r.references) for r in requests],
        )
        kept, problems = [], []
        for r, u in zip(requests, unseen, strict=True):
            if not u.messages:
                kept.append(r)
            elif self.unseen_text == "error":
                detail = "; ".join(u.messages) + " (data.init_args.unseen_text: warn runs it anyway)"
                problems.append(Problem(r.origin, "instruction not seen whole", detail))
            else:
                log.warning("request %s (%s): %s", r.origin, r.id, "; ".join(u.messages))
                kept.append(replace(r, warnings=tuple(u.messages)))
        return kept, problems

    def predict_dataloader(self) -> DataLoader:
        requests, problems = read_requests(self.requests)
        if self.max_images is not None:  # more references than the model takes: that request only
            too_many = [r for r in requests if len(r.references) > self.max_images]
            problems += [
                Problem(
                    r.origin,
                    "too many references",
                    f"{len(r.references)} images; the model allows {self.max_images}",
                )
                for r in too_many
            ]
            requests = [r for r in requests if len(r.references) <= self.max_images]
        requests, unseen = self._check_text(requests)
        problems += unseen
        for p in problems:
            log.error("skipping request %s", p)
        if problems:
            log.warning("skipped %d bad request(s) of %d", len(problems), len(problems) + len(requests))
        if not requests:
            raise ManifestError(f"{self.requests}: no valid request to run", problems=problems)
        return DataLoader(
            RequestDataset(requests),
            batch_size=self.batch_size,
            collate_fn=SamplingBatch,
            num_workers=self.num_workers,
        )

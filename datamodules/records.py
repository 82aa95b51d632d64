"""Training records: the authors' manifest format (JSON list) and JSONL, read into frozen dataclasses.

Field names follow the authors' files (``image``, ``multi_prompt``, ``entity_path``,
``source_path``); the task is explicit — a ``task`` field or the manifest's task in the data
config — and never guessed from a path. Every error names ``file:line``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mige_lightning.prompt import Task, count_placeholders


class ManifestError(ValueError):
    """A bad record, reported as ``file:line: reason``."""


@dataclass(frozen=True)
class Record:
    task: Task
    target: Path
    instruction: str
    references: tuple[Path, ...]  # fill the placeholders, in order
    source: Path | None  # conditional input for edit / subject_edit
    origin: str  # "manifest.jsonl:12", for error messages
    subtask: str | None = None  # "add" / "replace" inside subject_edit


def _entries(path: Path) -> list[tuple[int, Any]]:
    """(line, object) pairs from a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        # line of each top-level element, so errors in a JSON list also point at a line
        decoder, lines, pos = json.JSONDecoder(), [], text.index("[") + 1
        for _ in items:
            while text[pos] in " \t\r\n,":
                pos += 1
            lines.append(text.count("\n", 0, pos) + 1)
            _, pos = decoder.raw_decode(text, pos)
        return list(zip(lines, items, strict=True))
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{lineno}: malformed JSON line: {e.msg}") from None
    return out


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def parse_record(obj: Any, *, origin: str, base: Path, task: Task | str | None = None) -> Record:
    if not isinstance(obj, dict):
        raise ManifestError(f"{origin}: expected a JSON object, got {type(obj).__name__}")
    for name in ("image", "multi_prompt"):
        if not obj.get(name):
            raise ManifestError(f"{origin}: missing field '{name}'")
    task_value = obj.get("task", task)
    if task_value is None:
        raise ManifestError(
            f"{origin}: no 'task' field and no task given for this manifest in the data config"
        )
    try:
        parsed_task = Task.parse(task_value)
    except ValueError as e:
        raise ManifestError(f"{origin}: {e}") from None
    refs = tuple(base / p for p in _as_list(obj.get("entity_path")))
    sources = _as_list(obj.get("source_path"))
    if len(sources) > 1:
        raise ManifestError(f"{origin}: 'source_path' holds {len(sources)} images; at most one is allowed")
    if parsed_task.uses_source and not sources:
        raise ManifestError(f"{origin}: task '{parsed_task.value}' needs a 'source_path'")
    instruction = str(obj["multi_prompt"])
    n_placeholders = count_placeholders(instruction)
    if n_placeholders != len(refs):
        raise ManifestError(
            f"{origin}: {n_placeholders} <imagehere> placeholder(s) but {len(refs)} image(s) in 'entity_path'"
        )
    return Record(
        task=parsed_task,
        target=base / obj["image"],
        instruction=instruction,
        references=refs,
        source=base / sources[0] if sources else None,
        origin=origin,
        subtask=obj.get("subtask"),
    )


def read_manifest(path: str | Path, *, task: Task | str | None = None) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file does not exist")
    records = [
        parse_record(obj, origin=f"{path}:{line}", base=path.parent, task=task)
        for line, obj in _entries(path)
    ]
    if not records:
        raise ManifestError(f"{path}: manifest holds no records")
    return records

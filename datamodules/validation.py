"""Check every record before training starts, and report all bad ones at once.

Default (``on_bad_record: error``): stop with one report listing every bad record as
``file:line: reason``. ``on_bad_record: skip``: drop them and log how many were dropped per reason.
Nothing is ever silently replaced by another sample.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from datamodules.records import ManifestError, Problem, Record
from mige_lightning.images import ImageRefusedError, load_rgb, not_a_regular_file

log = logging.getLogger(__name__)
ON_BAD_RECORD = ("error", "skip")


def _file_error(path: Path) -> tuple[str, str] | None:
    """A missing path, or one that is not a regular file (a directory, a FIFO — never opened)."""
    why = not_a_regular_file(path)
    if why is None:
        return None
    if why.startswith("does not exist"):
        return "missing file", f"missing file {path}{why.removeprefix('does not exist')}"
    return "not a regular file", f"{path} {why}"


def _image_error(path: Path) -> tuple[str, str] | None:
    if (error := _file_error(path)) is not None:
        return error
    try:
        load_rgb(path)
    except ImageRefusedError as e:  # too large, extreme aspect ratio, several frames: from the header
        return e.kind, str(e)
    except Exception as e:  # noqa: BLE001 — any decoder failure is reported, with the file, never swallowed
        return "unreadable image", f"unreadable or truncated image {path}: {type(e).__name__}: {e}"
    return None


def check_records(
    records: Iterable[Record],
    *,
    root: Path,
    max_images: int | None,
    check_images: bool = True,
    workers: int | None = None,
) -> tuple[list[Record], list[Problem]]:
    """Split records into good ones and problems (paths, reference count, decodable images).
    ``check_images: False`` skips the decoding only: every image must still be a regular file."""
    records = list(records)
    problems: dict[str, Problem] = {}
    first: dict[tuple, str] = {}
    resolved: dict[Path, Path] = {}  # each path resolved once (records share images; resolve stats)

    def resolve(path: Path) -> Path:
        if path not in resolved:
            resolved[path] = path.resolve()
        return resolved[path]

    real_root = root.resolve()
    for rec in records:
        key = (rec.task, rec.subtask, resolve(rec.target), rec.instruction, tuple(resolve(p) for p in rec.references),
               resolve(rec.source) if rec.source else None)  # fmt: skip
        if key in first:  # upsample with data.task_weights, not by repeating records
            problems[rec.origin] = Problem(
                rec.origin,
                "duplicate record",
                f"duplicate of {first[key]} (same target, instruction, images)",
            )
            continue
        first[key] = rec.origin
        if max_images is not None and len(rec.references) > max_images:
            problems[rec.origin] = Problem(
                rec.origin,
                "too many references",
                f"{len(rec.references)} reference images; the model allows {max_images}",
            )
            continue
        outside = [p for p in rec.files if not resolve(p).is_relative_to(real_root)]
        if outside:
            problems[rec.origin] = Problem(
                rec.origin, "path escapes data root", f"path {outside[0]} escapes the data root {root}"
            )
    # the decode is optional; that every image is a regular file is not (a run would otherwise
    # stop mid-epoch on a bare FileNotFoundError)
    unique = sorted({p for rec in records if rec.origin not in problems for p in rec.files})
    check = _image_error if check_images else _file_error
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        errors = dict(zip(unique, pool.map(check, unique), strict=True))
    for rec in records:
        if rec.origin in problems:
            continue
        for p in rec.files:
            if errors[p] is not None:
                kind, detail = errors[p]
                problems[rec.origin] = Problem(rec.origin, kind, detail)
                break
    good = [rec for rec in records if rec.origin not in problems]
    return good, list(problems.values())


FILE_PROBLEMS = ("missing manifest", "manifest not a regular file", "malformed manifest")


def resolve_problems(records: list[Record], problems: list[Problem], *, on_bad_record: str) -> list[Record]:
    """Raise one report of every problem, or (skip mode) log per-reason counts and return the good records."""
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"data.on_bad_record: expected one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    if not problems:
        return records
    # whole files lost: never skipped silently, whatever the mode
    fatal = [p for p in problems if p.kind in FILE_PROBLEMS]
    if on_bad_record == "skip" and fatal:
        lines = "\n".join(str(p) for p in fatal)
        raise ManifestError(
            f"{len(fatal)} manifest file(s) cannot be read (skip mode drops bad records, not whole files):\n{lines}",
            problems=fatal,
        )
    if on_bad_record == "error":
        lines = "\n".join(str(p) for p in problems)
        raise ManifestError(
            f"{len(problems)} bad record(s) (set data.on_bad_record: skip to drop them):\n{lines}",
            problems=problems,
        )
    counts = Counter(p.kind for p in problems)
    log.warning(
        "skipped %d bad record(s): %s",
        len(problems),
        ", ".join(f"{kind}: {n}" for kind, n in counts.most_common()),
    )
    for p in problems:
        log.info("skipped %s", p)
    if not records:
        raise ManifestError("no usable records left after skipping the bad ones", problems=problems)
    return records

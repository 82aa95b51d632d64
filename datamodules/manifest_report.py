"""What is in a set of manifests (``python -m mige_lightning inspect`` / ``inspect-manifest``,
whose command lines are ``mige_cli/inspect_manifests.py``).

Per manifest and per task: record counts, references per record, image sizes, the spellings of
the placeholder, problems by reason — and, for every record, the task its shape says it has
(``records.infer_task``), so a file mixing tasks without a ``task`` field can be split with
confidence before a cluster job is committed. Nothing is trained or cached; images are opened
for their headers only.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import PIL.Image
import yaml

from datamodules.records import (
    ManifestError,
    Problem,
    entries_of,
    infer_task,
    parse_record,
)
from datamodules.validation import check_records
from mige_lightning.images import not_a_regular_file, upright_size
from mige_world.synthetic import DEFAULT_WORLD_ROOT

_PLACEHOLDER_ANY_CASE = re.compile(r"<imagehere>", flags=re.IGNORECASE)


def _size(path: Path) -> tuple[int, int] | None:
    try:
        with PIL.Image.open(path) as img:
            return upright_size(img)  # as shown: a phone photo stored sideways has its EXIF orientation
    except (OSError, ValueError, PIL.Image.DecompressionBombError):
        return None


def inspect_manifest(
    path: str | Path,
    *,
    task: str | None = None,
    subtask: str | None = None,
    base: str | Path | None = None,
    check_images: bool = True,
) -> dict[str, Any]:
    """One manifest → a JSON-able summary (see the module docstring)."""
    path = Path(path)
    base_dir = Path(base).expanduser() if base is not None else path.parent
    summary: dict[str, Any] = {
        "manifest": str(path),
        "base": str(base_dir),
        "declared_task": task if subtask is None else f"{task}/{subtask}",
    }
    why = not_a_regular_file(path)  # a FIFO is never opened: reading it would block
    if why is not None:
        kind = "missing manifest" if why.startswith("does not exist") else "manifest not a regular file"
        summary.update(records=0, problems={kind: 1}, problem_lines=[f"{path}:0: {why}"])
        return summary
    entries, problems = entries_of(path)
    per_task: dict[str, dict[str, Any]] = defaultdict(lambda: {"records": 0, "refs_per_record": Counter()})
    variants: Counter = Counter()
    records, inferred_counts, disagreements = [], Counter(), []
    for number, (line, obj) in enumerate(entries, start=1):
        origin = f"{path}:{line}: record {number}"
        guess = infer_task(obj) if isinstance(obj, dict) else None
        declared = (obj.get("task") if isinstance(obj, dict) else None) or task
        declared_sub = (obj.get("subtask") if isinstance(obj, dict) else None) or subtask
        label = (
            (f"{declared}/{declared_sub}" if declared_sub else str(declared))
            if declared
            else (f"{guess} (inferred)" if guess else "unknown (inferred)")
        )
        if guess:
            inferred_counts[guess] += 1
            if declared and guess.split("/")[0] != declared:
                disagreements.append(f"{origin}: declared {declared}, its shape says {guess}")
        entry = per_task[label]
        entry["records"] += 1
        if isinstance(obj, dict):
            refs = obj.get("entity_path")
            n = len(refs) if isinstance(refs, list) else (1 if isinstance(refs, str) and refs else 0)
            entry["refs_per_record"][n] += 1
            if isinstance(obj.get("multi_prompt"), str):
                variants.update(_PLACEHOLDER_ANY_CASE.findall(obj["multi_prompt"]))
        task_for_parse = declared or (guess.split("/")[0] if guess else None)
        sub_for_parse = (
            declared_sub if declared else (guess.split("/")[1] if guess and "/" in guess else None)
        )
        try:
            rec = parse_record(obj, origin=origin, base=base_dir, task=task_for_parse, subtask=sub_for_parse)
            records.append(rec)
        except ManifestError as e:
            problems.append(Problem(origin, e.kind, str(e).removeprefix(f"{origin}: ")))
    good, bad = check_records(records, root=base_dir, max_images=None, check_images=check_images)
    problems += bad
    sizes = []
    if check_images:
        for p in sorted({p for rec in good for p in rec.files}):
            size = _size(p)
            if size is not None:
                sizes.append(size)
    summary.update(
        records=len(entries),
        usable_records=len(good),
        per_task={
            k: {"records": v["records"], "refs_per_record": dict(sorted(v["refs_per_record"].items()))}
            for k, v in sorted(per_task.items())
        },
        inferred_tasks=dict(sorted(inferred_counts.items())),
        declared_vs_shape=disagreements,
        placeholder_spellings=dict(variants.most_common()),
        problems=dict(Counter(p.kind for p in problems).most_common()),
        problem_lines=[str(p) for p in problems],
    )
    if sizes:
        by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
        summary["image_sizes"] = {
            "images": len(sizes),
            "min": list(by_area[0]),
            "median": list(by_area[len(by_area) // 2]),
            "max": list(by_area[-1]),
            "median_pixels": int(statistics.median(w * h for w, h in sizes)),
        }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text block for one manifest."""
    head = f"{summary['manifest']}  (base {summary['base']}"
    if summary.get("declared_task"):
        head += f"; declared task {summary['declared_task']}"
    head += ")"
    lines = [head]
    if "per_task" not in summary:
        lines.append(f"  {summary['problem_lines'][0]}")
        return "\n".join(lines)
    lines.append(f"  records: {summary['records']}, usable: {summary['usable_records']}")
    width = max([len(k) for k in summary["per_task"]] + [4])
    lines.append(f"  {'task':<{width}}  records  references per record")
    for label, v in summary["per_task"].items():
        hist = ", ".join(f"{n} refs: {c}" for n, c in v["refs_per_record"].items())
        lines.append(f"  {label:<{width}}  {v['records']:>7}  {hist}")
    if summary["inferred_tasks"]:
        lines.append(
            "  task by shape: " + ", ".join(f"{k} {n}" for k, n in summary["inferred_tasks"].items())
        )
    for line in summary["declared_vs_shape"][:10]:
        lines.append(f"  ! {line}")
    if "image_sizes" in summary:
        s = summary["image_sizes"]
        lines.append(
            f"  image sizes ({s['images']} images): min {s['min'][0]}×{s['min'][1]}, median "
            f"{s['median'][0]}×{s['median'][1]}, max {s['max'][0]}×{s['max'][1]}"
        )
    spellings = ", ".join(f"{k} ×{n}" for k, n in summary["placeholder_spellings"].items()) or "none"
    lines.append(f"  placeholders: {spellings}")
    if summary["problems"]:
        lines.append("  problems: " + ", ".join(f"{k}: {n}" for k, n in summary["problems"].items()))
        for line in summary["problem_lines"][:10]:
            lines.append(f"    {line}")
        if len(summary["problem_lines"]) > 10:
            lines.append(f"    … {len(summary['problem_lines']) - 10} more (--json lists all)")
    else:
        lines.append("  problems: none")
    return "\n".join(lines)


def specs_from_configs(paths: list[str]) -> list[dict[str, Any]]:
    """``data.manifests`` (and the synthetic world's) of LightningCLI YAML configs, later ones
    replacing earlier ones, as ``fit`` would read them."""
    data: dict[str, Any] = {}
    for path in paths:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        data.update(loaded.get("data") or {})
    specs = [dict(s) for s in data.get("manifests") or []]
    if data.get("root"):
        for spec in specs:
            spec.setdefault("base", data["root"])
    if data.get("synthetic"):
        from mige_world.synthetic import manifest_specs

        specs += manifest_specs(data["synthetic"].get("root", DEFAULT_WORLD_ROOT), "train")
    if not specs:
        raise ValueError(f"no data.manifests (or data.synthetic) in {paths}")
    return specs

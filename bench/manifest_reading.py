"""Reading a large JSON-list manifest: seconds per stage, for N records (the reliability issue's
quadratic reader took 16 s for 20,000 records and never finished 200,000).

    .venv/bin/python -m bench.manifest_reading [--records 200000 1000000] [--no-check]

Writes, in a temporary folder, a pretty-printed JSON list (``json.dumps(indent=4)``, as the
authors' files are) of N records in the authors' field names — one subject, edit or replace record
after another, each with its ``task`` — each with a target file of its own (hard links to one tiny
JPEG per folder of 1,000) and references / sources from a pool of 64 files. Then times, per N:

- ``entries_of``: the file → (line, object) pairs;
- ``read_manifest``: the same plus every record's fields checked (``parse_record``);
- ``check_records`` without decoding (``check_images: false``): duplicates, paths inside the data
  root, every image a regular file — what ``fit`` does before training, less the decode.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from datamodules.records import entries_of, read_manifest
from datamodules.validation import check_records

POOL = 64  # distinct reference / source images the records share


def target(i: int) -> str:
    return f"targets/{i // 1000:04d}/{i:07d}.jpg"


def record(i: int) -> dict:
    img = lambda k: f"images/{(i + k) % POOL:03d}.jpg"  # noqa: E731
    shape = i % 3
    if shape == 0:
        return {
            "image": target(i),
            "width": 512,
            "height": 384,
            "entity_path": [img(1), img(2)],
            "multi_prompt": f"a poached<imagehere>are several<imagehere>spears on a plate, take {i}",
            "source_path": [],
            "task": "subject",
        }
    if shape == 1:
        return {
            "image": target(i),
            "width": 512,
            "height": 512,
            "entity_path": [img(1)],
            "multi_prompt": f"Delete the person in the blue jacket from<imagehere>and repair the background {i}",
            "source_path": [img(1)],
            "task": "edit",
        }
    return {
        "image": target(i),
        "width": 640,
        "height": 480,
        "entity_path": [img(1), img(2)],
        "multi_prompt": f"replace the plaid skirt in<imagehere>with<imagehere>, number {i}",
        "source_path": [img(1)],
        "task": "subject_edit",
        "subtask": "replace",
    }


def timed(fn, *args, **kwargs):
    """(fn's result, seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--no-check", action="store_true", help="time entries_of only")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        for k in range(POOL):
            Image.new("RGB", (8, 8), (k * 4, 100, 200)).save(root / "images" / f"{k:03d}.jpg")
        made = 0
        for n in sorted(args.records):
            t0 = time.perf_counter()
            for i in range(made, n):  # the targets: hard links, one source file per 1,000-file folder
                folder = (root / target(i)).parent  # (a file system caps the links to one inode)
                if i % 1000 == 0:
                    folder.mkdir(parents=True)
                    shutil.copyfile(root / "images" / "000.jpg", folder / "source.jpg")
                os.link(folder / "source.jpg", root / target(i))
            made = max(made, n)
            print(f"{n} records: target files linked in {time.perf_counter() - t0:.1f} s", flush=True)
            manifest = root / f"manifest_{n}.json"
            t0 = time.perf_counter()
            manifest.write_text(json.dumps([record(i) for i in range(n)], indent=4))
            write_s = time.perf_counter() - t0
            size_mb = manifest.stat().st_size / 1e6
            print(f"{n} records: {size_mb:.0f} MB written in {write_s:.1f} s", flush=True)
            (entries, problems), read_s = timed(entries_of, manifest)
            assert not problems and len(entries) == n, problems[:3]
            row = {"records": n, "mb": size_mb, "entries_of": read_s}
            if not args.no_check:
                (records, problems), parse_s = timed(read_manifest, manifest)
                assert not problems and len(records) == n, problems[:3]
                (good, bad), check_s = timed(
                    check_records, records, root=root, max_images=4, check_images=False
                )
                assert not bad and len(good) == n, bad[:3]
                row |= {"read_manifest": parse_s, "check_records": check_s}
            rows.append(row)
            print(f"  {row}", flush=True)
            manifest.unlink()
    checked = not args.no_check
    print()
    print(
        "| records | file (MB) | `entries_of` (s) |"
        + (
            " `read_manifest` (s) | `check_records`, no decode (s) | records/s, read + check |"
            if checked
            else ""
        )
    )
    print("|---|---|---|" + ("---|---|---|" if checked else ""))
    for r in rows:
        line = f"| {r['records']:,} | {r['mb']:.0f} | {r['entries_of']:.2f} |"
        if checked:
            total = r["read_manifest"] + r["check_records"]
            line += f" {r['read_manifest']:.2f} | {r['check_records']:.2f} | {r['records'] / total:,.0f} |"
        print(line)


if __name__ == "__main__":
    main()

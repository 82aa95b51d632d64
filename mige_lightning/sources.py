"""Where a pretrained path comes from: a local directory or file, or a hub id.

Used by the networks (``models/``) and by the metrics' backbones alike; it imports nothing of
the project, so the metrics do not depend on the model package.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_source(source: str, *, key: str) -> str:
    """Return an existing local directory, or ``source`` unchanged when it is a hub id.

    A string that can only be a path (absolute, ``./``, ``~``, more than one ``/``) and does not
    exist is an error naming the config key, instead of a confusing hub lookup failure later.
    """
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    if source.startswith((".", "/", "~")) or "\\" in source or not _HUB_ID_RE.match(source):
        raise FileNotFoundError(f"{key}: local pretrained path '{source}' does not exist")
    return source

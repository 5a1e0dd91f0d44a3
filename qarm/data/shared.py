"""Where the real public datasets live: ``../shared/data`` beside the checkout (see its README.md)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "QARM_SHARED_DATA"


def find_shared_data() -> Path | None:
    """The shared data folder: ``$QARM_SHARED_DATA``, else the first ``shared/data`` found walking up
    from the working directory and from this package. ``None`` when there is none."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        return path if path.is_dir() else None
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in [start, *start.parents]:
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def shared_dataset_path(folder: str) -> Path | None:
    """``<shared data>/<folder>`` if it exists."""
    root = find_shared_data()
    if root is None:
        return None
    path = root / folder
    return path if path.is_dir() else None

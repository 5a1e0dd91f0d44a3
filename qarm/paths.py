"""Where artifacts go: checks on output folders that every command runs before it writes or deletes."""

from __future__ import annotations

import os
from pathlib import Path

from qarm.errors import ConfigError


def check_output_folder(out: str | Path, inputs: dict[str, str | Path | None], *, flag: str = "--out",
                        allow_inside: bool = False) -> None:
    """Refuse an output folder that overlaps an input: the same folder, a folder that contains an input
    (replacing it would delete the input) or, unless ``allow_inside``, a folder inside an input (its files
    would mix with the input's). Checked before anything is written or deleted.

    ``inputs``: a name for the message (e.g. ``"dataset folder"``) -> the input path (None: not given)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a folder; choose a folder path for {flag}")
    target = Path(out).resolve()
    for name, given in inputs.items():
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents and not allow_inside:
            relation = "lies inside"
        else:
            continue
        raise ConfigError(f"{flag} {out} {relation} the {name} {given}: an output folder must not overlap an input "
                          f"(the input could be replaced or mixed with the output); choose another {flag}")


# -- temporaries: written beside their target, named after the writing process --------------------------

_STALE_AFTER_S = 3600.0  # a temporary without a process id (older qarm) is stale after an hour


def temporary(target: str | Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``target`` to write into and rename: ``.<name>.<kind>-<pid>-<random>``. Stale ones
    (their process is gone) are removed first, so a killed writer's leftovers never survive the next write."""
    import uuid

    target = Path(target)
    remove_stale_temporaries(target)
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the ``.<name>.tmp-*`` / ``.<name>.old-*`` siblings of ``target`` whose writing process is no
    longer running (or, without a process id in the name, older than an hour). Returns what was removed."""
    import shutil
    import time

    target = Path(target)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            suffix = path.name[len(f".{target.name}.{kind}-"):]
            pid_text = suffix.split("-", 1)[0]
            if "-" in suffix and pid_text.isdigit():
                if _alive(int(pid_text)):
                    continue
            else:
                try:
                    if time.time() - path.stat().st_mtime < _STALE_AFTER_S:
                        continue
                except OSError:
                    continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True

"""Codebooks on disk: one safetensors file per codebook (arrays + string metadata, no pickle), atomic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qarm.errors import DataError
from qarm.paths import temporary


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` and ``metadata`` to ``path`` through a temporary sibling renamed into place.

    A killed write leaves the previous file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its arrays."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing file") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_safetensors(path: str | Path, *, expected_format: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All arrays and the metadata of ``path``; its ``format`` metadata must be ``expected_format``."""
    path = Path(path)
    metadata = read_metadata(path)
    if metadata.get("format") != expected_format:
        raise DataError(f"{path}: format {metadata.get('format')!r} is not {expected_format!r}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read its arrays ({exc})") from exc
    return tensors, metadata

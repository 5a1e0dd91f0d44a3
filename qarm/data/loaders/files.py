"""File helpers shared by the loaders: every read failure names the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qarm.errors import DataError


def source_file(folder: Path, name: str) -> Path:
    """``folder/name``, or a DataError that names the missing file (a file ``folder`` is taken as is)."""
    path = folder if folder.is_file() and folder.name == name else folder / name
    if not path.is_file():
        raise DataError(f"{path}: missing file (expected in the source folder {folder})")
    return path


def read_csv(path: Path, *, required: list[str] | None = None, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv`` with clear errors: unreadable / empty file, missing columns."""
    try:
        table = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the file is empty") from exc
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path}: cannot parse the file ({exc})") from exc
    if len(table) == 0:
        raise DataError(f"{path}: the file has no rows")
    for column in required or []:
        if column not in table.columns:
            raise DataError(f"missing column; the file has {list(table.columns)}", file=str(path), column=column)
    return table


def read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array without pickles, as float32."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the .npy array ({exc})") from exc
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2-d array (n_items, dim), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    try:
        text = path.read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: the file is empty")
    return lines

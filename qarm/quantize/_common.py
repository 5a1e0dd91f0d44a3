"""Helpers shared by the quantizers: parameter checks, item ids, content hashes, progress bars."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from qarm.errors import ConfigError, DataError


def bad_param(owner: str, param: str, what: str, value: object) -> ConfigError:
    """The project's error template: "The 'levels' parameter of X must be an int >= 1. Got 0 instead."."""
    return ConfigError(f"The '{param}' parameter of {owner} must be {what}. Got {value!r} instead.")


def is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(owner: str, param: str, value: object, low: int, *, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if not is_int(value) or value < low:  # type: ignore[operator]
        raise bad_param(owner, param, f"an int >= {low}" + (" or None" if none_ok else ""), value)


def check_float(owner: str, param: str, value: object, low: float, high: float | None = None) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and value >= low  # type: ignore[operator]
    if ok and high is not None:
        ok = value <= high  # type: ignore[operator]
    if not ok:
        what = f"a float in [{low}, {high}]" if high is not None else f"a float >= {low}"
        raise bad_param(owner, param, what, value)


def check_bool(owner: str, param: str, value: object) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise bad_param(owner, param, "a bool", value)


def check_option(owner: str, param: str, value: object, options: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in options:
        shown = ", ".join(repr(o) for o in options)
        raise bad_param(owner, param, f"one of {shown}", value)


def as_item_ids(item_ids: Any, n: int, *, name: str = "item_ids", unique: bool = True) -> np.ndarray:
    """``item_ids`` as a 1-D int64 array of length ``n`` (``None``: ``arange(n)``), unique if asked."""
    if item_ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(item_ids)
    if ids.ndim != 1 or len(ids) != n:
        raise DataError(f"{name} must be a 1-D array of length {n}, got shape {ids.shape}")
    if len(ids) and not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{name} must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if unique and len(ids):
        sorted_ids = np.sort(ids)
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if len(dup):
            raise DataError(f"{name} has duplicate ids", ids=np.unique(dup))
    return ids


def content_hash(prefix: str, config: dict[str, Any], arrays: Sequence[np.ndarray]) -> str:
    """``prefix-<16 hex>``: sha256 of the JSON config and the bytes, dtypes and shapes of the arrays."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.data.cast("B"))
    return f"{prefix}-{h.hexdigest()[:16]}"

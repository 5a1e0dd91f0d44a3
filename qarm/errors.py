"""The project's exceptions. Every user-facing check raises one of these, never ``assert``."""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import Any

MAX_IDS_SHOWN = 5


class QarmError(Exception):
    """Base class of every error qarm raises on purpose."""


class ConfigError(QarmError, ValueError):
    """A parameter or a configuration file is invalid."""


class CheckpointMismatch(ConfigError):
    """A checkpoint exists but was written by another run (other settings, model or inputs): resuming it
    would mix two runs. Start over (``resume=False``) or use another folder."""


class DataError(QarmError, ValueError):
    """Input data violates the dataset contract or cannot be read.

    The message names the file, the column and the first few offending ids, so that a user can find
    the bad rows without a debugger::

        items.parquet: column 'item_id': duplicate ids (3 rows), first: [7, 7, 12]
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        ids: Iterable[Any] | None = None,
    ) -> None:
        self.file = file
        self.column = column
        self.ids = None if ids is None else list(_first(ids, MAX_IDS_SHOWN + 1))
        self.n_ids = len(ids) if isinstance(ids, Sized) else None
        super().__init__(self._format(message))
        self.reason = message

    def _format(self, message: str) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.column:
            where.append(f"column '{self.column}'")
        text = (": ".join(where) + ": " if where else "") + message
        if self.ids is not None:
            shown = [_plain(v) for v in self.ids[:MAX_IDS_SHOWN]]
            count = f"{self.n_ids} in all" if self.n_ids is not None else "more"
            more = f" ... ({count})" if len(self.ids) > MAX_IDS_SHOWN else ""
            text += f"; offending: {shown}{more}"
        return text


def _first(values: Iterable[Any], n: int) -> Iterable[Any]:
    for i, v in enumerate(values):
        if i >= n:
            return
        yield v


def _plain(value: Any) -> Any:
    """numpy scalars print as ``np.int64(3)`` in lists; show plain Python values instead."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value

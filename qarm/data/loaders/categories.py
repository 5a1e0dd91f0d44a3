"""One category per item from multi-valued and hierarchical category cells.

The dataset contract holds one ``category`` string per item (models embed it as one categorical field).
A source cell may hold several values (``"Comedy|Drama"``: a ``separator``), a path
(``"Electronics > Audio > Headphones"``: a ``path_separator``), both (``"Books > Fiction|Toys > Games"``), or,
in JSON files, a list of values or a list of paths (``[["Electronics", "Audio"], ["Gifts"]]``). The item's
category is its **first** value, cut to the first ``level`` parts of its path (``None``: the whole path),
the parts joined by ``" <path_separator> "``. Values are trimmed; empty values and parts are skipped; a cell
with no value is ``"unknown"``. Commas are never separators unless named: ``"Books, Music & More"`` is one
name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from qarm.errors import ConfigError, DataError

UNKNOWN_CATEGORY = "unknown"


@dataclass(frozen=True)
class CategoryRule:
    """How a cell becomes one category (see the module docstring)."""

    separator: str | None = None  # between the values of a multi-valued cell, e.g. "|"
    path_separator: str | None = None  # between the levels of a path, e.g. ">"
    level: int | None = None  # keep the first ``level`` levels of the path; None: the full path

    def check(self, where: str) -> None:
        for name, value in (("category_separator", self.separator), ("category_path_separator", self.path_separator)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{where}: {name} must be a non-blank string such as '|' or '>', got {value!r}")
        if self.separator is not None and self.separator == self.path_separator:
            raise ConfigError(f"{where}: category_separator and category_path_separator are both "
                              f"{self.separator!r}; a cell could not be read")
        if self.level is not None and (isinstance(self.level, bool) or not isinstance(self.level, int)
                                       or self.level < 1):
            raise ConfigError(f"{where}: category_level must be an int >= 1 (1: the top level), or absent for the "
                              f"full path; got {self.level!r}")

    def describe(self) -> str | None:
        """A note for ``meta.notes`` (None when cells are taken as they are)."""
        parts = []
        if self.separator is not None:
            parts.append(f"the first of the {self.separator!r}-separated values")
        if self.path_separator is not None or self.level is not None:
            depth = "the full path" if self.level is None else f"the first {self.level} level(s) of the path"
            parts.append(depth + (f" (levels separated by {self.path_separator!r})" if self.path_separator else ""))
        return ("category: " + ", ".join(parts)) if parts else None

    def category(self, cell: Any, where: str) -> str:
        """The category of one cell."""
        if isinstance(cell, dict):
            raise DataError(f"{where}: a category cell is a JSON object ({str(cell)[:60]}); a category must be text, "
                            "a list of values or a list of paths")
        values = self._values(cell)
        if not values:
            return UNKNOWN_CATEGORY
        first = values[0]
        parts = [p.strip() for p in (first if isinstance(first, list) else self._parts(first, where))]
        parts = [p for p in parts if p]
        if not parts:
            return UNKNOWN_CATEGORY
        if self.level is not None:
            parts = parts[: self.level]
        joiner = f" {self.path_separator.strip()} " if self.path_separator else " > "
        return joiner.join(parts)

    def _values(self, cell: Any) -> list[Any]:
        if isinstance(cell, np.ndarray):
            cell = cell.tolist()
        if isinstance(cell, (list, tuple)):
            values: list[Any] = []
            for value in cell:
                if isinstance(value, np.ndarray):
                    value = value.tolist()
                if isinstance(value, (list, tuple)):
                    values.append([str(v) for v in value if v is not None])
                elif value is not None and str(value).strip():  # one level unless a path separator is named
                    split = self._split(str(value))
                    values.extend(split if self.path_separator is not None else [[v] for v in split])
            return values
        if cell is None or (isinstance(cell, float) and np.isnan(cell)) or cell is pd.NA:
            return []
        return self._split(str(cell))

    def _split(self, text: str) -> list[Any]:
        values = text.split(self.separator) if self.separator is not None else [text]
        return [v.strip() for v in values if v.strip()]

    def _parts(self, value: str, where: str) -> list[str]:
        if self.path_separator is not None:
            return value.split(self.path_separator)
        if self.level is not None:
            raise ConfigError(f"{where}: category_level is set but not category_path_separator; name the separator "
                              f"between levels (e.g. category_path_separator: '>') for cells such as {value!r}")
        return [value]


def map_categories(cells: pd.Series, rule: CategoryRule, where: str) -> pd.Series:
    """One category string per cell (see :class:`CategoryRule`). Without a rule, a text cell is kept as it
    is (an empty cell is ``"unknown"``) and a list cell gives its first value."""
    if rule == CategoryRule():
        plain = cells.map(lambda c: not isinstance(c, (list, tuple, np.ndarray, dict)))
        if bool(plain.all()):
            return cells.fillna(UNKNOWN_CATEGORY).astype(str)
    return pd.Series([rule.category(cell, where) for cell in cells], index=cells.index, dtype=object)

"""Assemble a contract :class:`Dataset` from tables keyed by source ids.

Loaders parse their files into plain tables that still carry the source's own ids, then call
:func:`assemble`, which assigns dense ids, maps interactions to them (naming any unknown id), orders
each user's events and numbers them (``seq``). Keeping that work here means every loader, the generic
one included, gets the same ids, order and errors.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qarm.data import schema as S
from qarm.data.schema import Dataset, DatasetMeta
from qarm.data.validate import validate_dataset
from qarm.errors import DataError


def assemble(
    *,
    items: pd.DataFrame,
    interactions: pd.DataFrame,
    meta: DatasetMeta,
    users: pd.DataFrame | None = None,
    item_vectors: dict[str, np.ndarray] | None = None,
    item_key: str = "item",
    user_key: str = "user",
    items_file: str = S.ITEMS_FILE,
    interactions_file: str = S.INTERACTIONS_FILE,
    users_file: str = S.USERS_FILE,
    drop_unknown_items: bool = False,
) -> Dataset:
    """Build a validated dataset.

    Parameters
    ----------
    items : one row per item with a ``source_id`` column (any hashable id) and the item columns.
        Row order is kept: row i becomes ``item_id`` i, and row i of each ``item_vectors`` array
        belongs to it.
    interactions : one row per event with columns ``item_key`` and ``user_key`` holding source ids, a
        ``time`` column (int), and labels / signals / context columns. Rows of one user with equal
        time keep their order here.
    users : optional, one row per user with ``source_id`` and side features. Without it the users are
        the distinct ``user_key`` values in order of first appearance.
    drop_unknown_items : drop events whose item is not in ``items`` (the count goes to ``meta.notes``)
        instead of raising.
    *_file : the source file names used in error messages.
    """
    items = _with_dense_ids(items, S.ITEM_ID, items_file, "item")

    inter = interactions.reset_index(drop=True)
    for column in (item_key, user_key, S.TIME):
        if column not in inter.columns:
            raise DataError(f"missing column; the table has {list(inter.columns)}", file=interactions_file,
                            column=column)
    if len(inter) == 0:
        raise DataError("no interactions", file=interactions_file)
    item_index = pd.Index(items[S.SOURCE_ID])
    item_codes = item_index.get_indexer(inter[item_key].astype(str))
    unknown = item_codes < 0
    if unknown.any():
        if not drop_unknown_items:
            raise DataError(f"item ids not found in {items_file}", file=interactions_file, column=item_key,
                            ids=inter.loc[unknown, item_key].astype(str).unique())
        meta.notes.append(f"dropped {int(unknown.sum())} interactions whose item is not in {items_file}")
        inter = inter.loc[~unknown].reset_index(drop=True)
        item_codes = item_codes[~unknown]

    user_source = inter[user_key].astype(str)
    if users is None:
        users = pd.DataFrame({S.SOURCE_ID: pd.unique(user_source)})
    users = _with_dense_ids(users, S.USER_ID, users_file, "user")
    user_codes = pd.Index(users[S.SOURCE_ID]).get_indexer(user_source)
    if (user_codes < 0).any():
        raise DataError(f"user ids not found in {users_file}", file=interactions_file, column=user_key,
                        ids=user_source[user_codes < 0].unique())

    time = inter[S.TIME]
    if time.isna().any():
        raise DataError("missing time values (rows)", file=interactions_file, column=S.TIME,
                        ids=np.flatnonzero(time.isna().to_numpy()))
    time = time.to_numpy().astype(np.int64)
    rest = inter.drop(columns=[item_key, user_key, S.TIME])
    # Chronological within each user; equal times keep the source order (lexsort is stable).
    order = np.lexsort((np.arange(len(inter)), time, user_codes))
    user_sorted = user_codes[order].astype(np.int64)
    out = pd.DataFrame({
        S.USER_ID: user_sorted,
        S.ITEM_ID: item_codes[order].astype(np.int64),
        S.TIME: time[order],
        S.SEQ: sequence_numbers(user_sorted),
    })
    rest = rest.iloc[order].reset_index(drop=True)
    for column in rest.columns:
        out[column] = rest[column].to_numpy()

    dataset = Dataset(items=items, interactions=out, users=users, meta=meta, item_vectors=dict(item_vectors or {}))
    dataset.meta.counts = dataset.compute_counts()
    return validate_dataset(dataset)


def _with_dense_ids(table: pd.DataFrame, id_column: str, file: str, what: str) -> pd.DataFrame:
    """A copy of ``table`` with string ``source_id`` (unique, or a DataError) and dense ids in front."""
    table = table.reset_index(drop=True).copy()
    if S.SOURCE_ID not in table.columns:
        raise DataError("missing column", file=file, column=S.SOURCE_ID)
    table[S.SOURCE_ID] = table[S.SOURCE_ID].astype(str)
    duplicated = table[S.SOURCE_ID].duplicated(keep=False)
    if duplicated.any():
        raise DataError(f"duplicate {what} ids", file=file, column=S.SOURCE_ID,
                        ids=table.loc[duplicated, S.SOURCE_ID].unique())
    table.insert(0, id_column, np.arange(len(table), dtype=np.int64))
    return table


def sequence_numbers(sorted_user_ids: np.ndarray) -> np.ndarray:
    """0-based position of each row within its run of equal user ids (input sorted by user)."""
    n = len(sorted_user_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_user_ids)) + 1]
    lengths = np.diff(np.r_[starts, n])
    return (np.arange(n) - np.repeat(starts, lengths)).astype(np.int64)

"""Validation of the dataset contract, in one place.

:func:`validate_dataset` is called by every loader (through ``prepare``), by :func:`qarm.data.io.save_dataset`
before anything is written, and by :func:`qarm.data.io.load_dataset` after reading. A violation raises
:class:`qarm.errors.DataError` naming the file, the column and the first offending ids.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qarm.data import schema as S
from qarm.data.schema import Dataset
from qarm.errors import DataError


def validate_dataset(dataset: Dataset) -> Dataset:
    """Check ``dataset`` against the contract; return it unchanged, or raise :class:`DataError`."""
    meta = dataset.meta
    _check_table(dataset.items, S.ITEMS_FILE, S.ITEM_ID)
    _check_table(dataset.users, S.USERS_FILE, S.USER_ID)
    _check_table(dataset.interactions, S.INTERACTIONS_FILE, None)

    inter = dataset.interactions
    f = S.INTERACTIONS_FILE
    for column in (S.USER_ID, S.ITEM_ID, S.TIME, S.SEQ):
        _require_column(inter, f, column)
        _require_int(inter, f, column)
    times = inter[S.TIME].to_numpy()
    out_of_range = np.abs(times.astype(np.float64)) > S.MAX_TIME
    if out_of_range.any():
        raise DataError(f"times out of range (|time| > {S.MAX_TIME}: an overflow or a unit error) for rows",
                        file=f, column=S.TIME, ids=np.flatnonzero(out_of_range))
    _check_foreign_key(inter, f, S.ITEM_ID, len(dataset.items), S.ITEMS_FILE)
    _check_foreign_key(inter, f, S.USER_ID, len(dataset.users), S.USERS_FILE)
    seq = inter[S.SEQ].to_numpy()
    if (seq < 0).any():
        bad = inter.loc[seq < 0, S.USER_ID].unique()
        raise DataError("negative seq values for users", file=f, column=S.SEQ, ids=bad)

    if not meta.label_columns:
        raise DataError("meta.label_columns is empty: a dataset needs at least one label", file=S.META_FILE)
    for column in meta.label_columns:
        _require_column(inter, f, column, role="label")
        _check_binary(inter, f, column)
    for column in meta.signal_columns + meta.context_columns:
        _require_column(inter, f, column, role="signal" if column in meta.signal_columns else "context")
    for column in meta.text_columns:
        _require_column(dataset.items, S.ITEMS_FILE, column, role="text")
        values = dataset.items[column]
        nulls = values.isna().to_numpy()
        if nulls.any():
            raise DataError(
                "missing text (null); use an empty string for items without text",
                file=S.ITEMS_FILE,
                column=column,
                ids=dataset.items.loc[nulls, S.ITEM_ID].to_numpy(),
            )
    for column in meta.item_feature_columns:
        _require_column(dataset.items, S.ITEMS_FILE, column, role="item feature")
    for column in meta.user_feature_columns:
        _require_column(dataset.users, S.USERS_FILE, column, role="user feature")
    if S.CATEGORY in dataset.items.columns and dataset.items[S.CATEGORY].isna().any():
        bad = dataset.items.loc[dataset.items[S.CATEGORY].isna(), S.ITEM_ID].to_numpy()
        raise DataError("missing category; use a category such as 'unknown'", file=S.ITEMS_FILE,
                        column=S.CATEGORY, ids=bad)

    _check_vectors(dataset)
    if S.SPLIT in inter.columns:
        _check_split(inter)
    if meta.time_unit not in ("seconds", "order"):
        raise DataError(f"time_unit must be 'seconds' or 'order', got {meta.time_unit!r}", file=S.META_FILE)
    return dataset


def _check_table(table: pd.DataFrame, file: str, id_column: str | None) -> None:
    if not isinstance(table, pd.DataFrame):
        raise DataError(f"expected a table, got {type(table).__name__}", file=file)
    if len(table) == 0:
        raise DataError("the table is empty", file=file)
    if id_column is None:
        return
    _require_column(table, file, id_column)
    _require_int(table, file, id_column)
    ids = table[id_column].to_numpy()
    duplicated = pd.Series(ids).duplicated(keep=False).to_numpy()
    if duplicated.any():
        raise DataError(
            f"duplicate ids ({int(duplicated.sum())} rows)", file=file, column=id_column, ids=np.unique(ids[duplicated])
        )
    expected = np.arange(len(ids))
    if not np.array_equal(ids, expected):
        wrong = np.flatnonzero(ids != expected)
        raise DataError(
            f"ids must be dense 0..{len(ids) - 1} in row order (loaders remap source ids and keep them in "
            f"'{S.SOURCE_ID}'); rows out of place",
            file=file,
            column=id_column,
            ids=ids[wrong],
        )


def _require_column(table: pd.DataFrame, file: str, column: str, role: str | None = None) -> None:
    if column not in table.columns:
        what = f"{role} column" if role else "column"
        raise DataError(f"missing {what}; the table has {list(table.columns)}", file=file, column=column)


def _require_int(table: pd.DataFrame, file: str, column: str) -> None:
    values = table[column]
    if not pd.api.types.is_integer_dtype(values.dtype):
        if values.isna().any():
            raise DataError("missing values", file=file, column=column, ids=np.flatnonzero(values.isna().to_numpy()))
        raise DataError(f"expected integers, got dtype {values.dtype}", file=file, column=column)


def _check_foreign_key(table: pd.DataFrame, file: str, column: str, n: int, target: str) -> None:
    ids = table[column].to_numpy()
    unknown = (ids < 0) | (ids >= n)
    if unknown.any():
        raise DataError(f"ids not found in {target}", file=file, column=column, ids=np.unique(ids[unknown]))


def _check_binary(table: pd.DataFrame, file: str, column: str) -> None:
    values = table[column]
    if values.isna().any():
        raise DataError("label has missing values (rows)", file=file, column=column,
                        ids=np.flatnonzero(values.isna().to_numpy()))
    if not (pd.api.types.is_integer_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)):
        raise DataError(f"label must be 0/1 integers, got dtype {values.dtype}", file=file, column=column)
    arr = values.to_numpy()
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        raise DataError("label must be 0 or 1; other values", file=file, column=column, ids=np.unique(arr[bad]))


def _check_vectors(dataset: Dataset) -> None:
    n_items = len(dataset.items)
    for name, vectors in dataset.item_vectors.items():
        where = dict(file=S.ITEMS_FILE, column=name)
        if name in dataset.items.columns:
            raise DataError("a modality vector has the name of a scalar column", **where)
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
            shape = getattr(vectors, "shape", None)
            raise DataError(f"modality vectors must be a 2-d array (n_items, dim), got shape {shape}", **where)
        if vectors.shape[0] != n_items:
            raise DataError(f"modality vectors have {vectors.shape[0]} rows for {n_items} items", **where)
        if vectors.shape[1] == 0:
            raise DataError("modality vectors have dimension 0", **where)
        if vectors.dtype != np.float32:
            raise DataError(f"modality vectors must be float32, got {vectors.dtype}", **where)
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            raise DataError("non-finite values (NaN or inf) in items", ids=np.flatnonzero(~finite), **where)


def _check_split(inter: pd.DataFrame) -> None:
    f = S.INTERACTIONS_FILE
    values = inter[S.SPLIT].astype(str).to_numpy()
    bad = ~np.isin(values, S.SPLITS)
    if bad.any():
        raise DataError(f"split must be one of {list(S.SPLITS)}", file=f, column=S.SPLIT, ids=np.unique(values[bad]))
    for column in (S.COLD_ITEM, S.SAMPLED_NEGATIVE):
        if column in inter.columns and not pd.api.types.is_bool_dtype(inter[column].dtype):
            raise DataError(f"expected booleans, got dtype {inter[column].dtype}", file=f, column=column)

"""Ranking examples from a prepared dataset folder: numpy arrays in memory, batches on demand.

:class:`ExampleSource` reads a dataset's Parquet files once, keeps the columns it needs as numpy
arrays (the DataFrames are dropped), builds the :class:`~qarm.features.history.HistoryIndex`, and cuts
:class:`~qarm.features.batch.RankingBatch` es out of any set of rows. Which rows make a split:

* ``"train"``: :meth:`Dataset.training_mask` (train split, without cold-start items' events): the model
  never trains on a cold item as the target;
* ``"valid"`` / ``"test"``: every row of the split, cold items included; the cold rows are the
  cold-start evaluation set.

Batch order is a pure function of ``(seed, epoch)`` so that a trainer can resume in the middle of an
epoch by skipping batches instead of saving a permutation.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qarm.data import schema as S
from qarm.data.io import load_dataset
from qarm.data.schema import Dataset
from qarm.errors import ConfigError, DataError
from qarm.features.batch import RankingBatch, assemble_batch
from qarm.features.history import HistoryIndex
from qarm.provenance import of_dataset

SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class FeatureSpec:
    """The sizes a model needs to build its embeddings; nothing data-sized.

    Attributes
    ----------
    n_users, n_items : int
        Dense id ranges.
    tasks : tuple of str
        Label columns, one logit each, in batch order.
    user_features : tuple of (name, size) pairs
        Categorical user side features; codes lie in ``0..size-1`` (the last code: missing value).
    n_categories : int
        Item category codes lie in ``0..n_categories-1``; 0 when the dataset has no category.
    history_length : int
        ``n``, the history slots per example.
    """

    n_users: int
    n_items: int
    tasks: tuple[str, ...]
    user_features: tuple[tuple[str, int], ...] = ()
    n_categories: int = 0
    history_length: int = 50


class ExampleSource:
    """The examples of one prepared dataset.

    Parameters
    ----------
    dataset : Dataset
        A prepared dataset (with ``split``); see :meth:`from_folder` to read one from disk.
    history_length : int
        ``n``: the latest ``n`` past positives per example (the paper's user-side sequence; 50).

    Attributes
    ----------
    user, item, time, seq : int64 arrays (n_rows,)
    labels : float32 array (n_rows, T)
    split : int8 array (n_rows,): 0 train, 1 valid, 2 test
    cold_item, training : bool arrays (n_rows,)
    item_longtail : int64 array (n_items,): each item's long-tail group (0 when absent)
    item_category : int64 array (n_items,) or None
    user_feature_codes : int64 array (n_users, F) or None
    history : HistoryIndex
    spec : FeatureSpec
    """

    def __init__(self, dataset: Dataset, history_length: int = 50) -> None:
        if isinstance(history_length, bool) or not isinstance(history_length, int) or history_length < 1:
            raise ConfigError(f"The 'history_length' parameter of ExampleSource must be an int >= 1. "
                              f"Got {history_length!r} instead.")
        if not dataset.is_prepared:
            raise DataError("the dataset has no split yet; run qarm data prepare first")
        tasks = tuple(dataset.meta.label_columns)
        if not tasks:
            raise DataError("the dataset has no label column (meta.label_columns is empty)")
        inter = dataset.interactions
        missing = [c for c in (S.USER_ID, S.ITEM_ID, S.TIME, S.SEQ, S.SPLIT, *tasks) if c not in inter.columns]
        if missing:
            raise DataError(f"interactions lack the columns {missing}", file=S.INTERACTIONS_FILE)

        self.meta = dataset.meta
        self._catalogue_digest = dataset.catalogue_digest  # computed only when a folder records a digest
        self.provenance = of_dataset(dataset.meta.provenance)  # checked against what codes / vectors were made from
        self.origin = f"the dataset {dataset.meta.name!r}"  # how messages name it
        self.history_length = history_length
        self.user = inter[S.USER_ID].to_numpy(dtype=np.int64)
        self.item = inter[S.ITEM_ID].to_numpy(dtype=np.int64)
        self.time = inter[S.TIME].to_numpy(dtype=np.int64)
        self.seq = inter[S.SEQ].to_numpy(dtype=np.int64)
        self.labels = np.ascontiguousarray(inter[list(tasks)].to_numpy(dtype=np.float32))
        split = inter[S.SPLIT].astype(str).to_numpy()
        self.split = np.full(len(inter), -1, dtype=np.int8)
        for code, name in enumerate(SPLIT_NAMES):
            self.split[split == name] = code
        self.cold_item = _bool_column(inter, S.COLD_ITEM)
        sampled = _bool_column(inter, S.SAMPLED_NEGATIVE)
        self.sampled_negative = sampled  # a drawn negative, not an event of the log
        self.training = dataset.training_mask()
        # History holds source positives: the primary task's label, never a sampled negative.
        self.history = HistoryIndex(self.user, self.item, self.time, self.seq,
                                    (self.labels[:, 0] == 1) & ~sampled)

        items = dataset.items
        self.item_cold = _bool_column(items, S.COLD_START)
        self.item_longtail = (items[S.LONGTAIL_GROUP].to_numpy(dtype=np.int64) if S.LONGTAIL_GROUP in items.columns
                              else np.zeros(len(items), dtype=np.int64))
        self.item_category, n_categories = None, 0
        if S.CATEGORY in items.columns:
            self.item_category, n_categories = _codes(items[S.CATEGORY])
        columns = [c for c in dataset.meta.user_feature_columns if c in dataset.users.columns]
        user_features: list[tuple[str, int]] = []
        self.user_feature_codes = None
        if columns:
            coded = [_codes(dataset.users[c]) for c in columns]
            self.user_feature_codes = np.stack([c for c, _ in coded], axis=1)
            user_features = [(name, size) for name, (_, size) in zip(columns, coded)]
        self.spec = FeatureSpec(n_users=dataset.n_users, n_items=dataset.n_items, tasks=tasks,
                                user_features=tuple(user_features), n_categories=n_categories,
                                history_length=history_length)
        self.window: dict[str, Any] | None = None

    @classmethod
    def from_folder(cls, path: str | Path, history_length: int = 50, *, validate: bool = True) -> ExampleSource:
        """Read a prepared dataset folder (see :mod:`qarm.data.io`)."""
        source = cls(load_dataset(path, validate=validate), history_length=history_length)
        source.origin = f"the dataset folder {path}"
        return source

    # -- rows ----------------------------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        return len(self.user)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.spec.tasks

    def rows(self, split: str) -> np.ndarray:
        """Row indices of a split, ascending: int64 ``(n,)``. ``"train"`` excludes cold items' rows."""
        if split == "train":
            return np.flatnonzero(self.training)
        if split not in SPLIT_NAMES:
            raise ConfigError(f"unknown split {split!r}; available: {list(SPLIT_NAMES)}")
        return np.flatnonzero(self.split == SPLIT_NAMES.index(split))

    @functools.cached_property
    def catalogue(self) -> str:
        """The dataset's :meth:`~qarm.data.schema.Dataset.catalogue_digest`: codes and vectors made for another
        catalogue are refused (:meth:`qarm.features.ItemTables.build`)."""
        return self._catalogue_digest()

    def view(self, train: np.ndarray, valid: np.ndarray | None = None, *,
             window: dict[str, Any] | None = None) -> ExampleSource:
        """The same examples with other splits: ``train`` rows to train on, ``valid`` rows (or none) to
        validate on, no test rows. Arrays are shared, not copied; histories still see every past positive
        (what a deployed model knows at an example's time). ``window`` describes the choice (it enters
        :meth:`describe`, so a checkpoint of one window is never resumed on another)."""
        out = copy.copy(self)
        out.training = np.zeros(self.n_rows, dtype=bool)
        out.training[np.asarray(train, dtype=np.int64)] = True
        out.split = np.full(self.n_rows, -1, dtype=np.int8)
        out.split[out.training] = 0
        if valid is not None:
            out.split[np.asarray(valid, dtype=np.int64)] = 1
        out.window = dict(window or {}) | {"train_rows": int(out.training.sum()),
                                           "valid_rows": 0 if valid is None else len(valid)}
        return out

    def training_items(self) -> np.ndarray:
        """Items that are the target of at least one training row (the ID vocabulary): int64, sorted."""
        return np.unique(self.item[self.training])

    def order(self, split: str, *, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> np.ndarray:
        """A split's rows in batch order: ascending, or permuted by ``default_rng([seed, epoch])``."""
        rows = self.rows(split)
        if shuffle:
            rows = rows[np.random.default_rng([seed, epoch]).permutation(len(rows))]
        return rows

    def n_batches(self, split: str, batch_size: int) -> int:
        return -(-len(self.rows(split)) // batch_size)

    # -- batches -------------------------------------------------------------------------------------

    def batch(self, rows: np.ndarray) -> RankingBatch:
        """The examples at ``rows`` (int array (B,)) as a :class:`RankingBatch`."""
        rows = np.asarray(rows, dtype=np.int64)
        return assemble_batch(self.user[rows], self.item[rows], self.history.gather(rows, self.history_length),
                              labels=self.labels[rows], user_feature_codes=self.user_feature_codes,
                              item_category=self.item_category, row=rows)

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                start: int = 0) -> Iterator[RankingBatch]:
        """Batches of ``batch_size`` rows (the last one smaller) of a split, from batch ``start`` on."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        rows = self.order(split, shuffle=shuffle, seed=seed, epoch=epoch)
        for begin in range(start * batch_size, len(rows), batch_size):
            yield self.batch(rows[begin:begin + batch_size])

    def frame(self, rows: np.ndarray) -> pd.DataFrame:
        """The evaluation columns of ``rows``: ``user_id, item_id, label_<task>..., cold_item,
        longtail_group`` (the input of :func:`qarm.evaluate.metrics.evaluate_predictions`, less scores)."""
        rows = np.asarray(rows, dtype=np.int64)
        item = self.item[rows]
        data: dict[str, Any] = {S.USER_ID: self.user[rows], S.ITEM_ID: item}
        for j, task in enumerate(self.tasks):
            data[f"label_{task}"] = self.labels[rows, j].astype(np.int8)
        data[S.COLD_ITEM] = self.cold_item[rows]
        data[S.LONGTAIL_GROUP] = self.item_longtail[item]
        return pd.DataFrame(data)

    def describe(self) -> dict[str, Any]:
        """What identifies these examples (for checkpoints: a resumed run must read the same data)."""
        return {"dataset": self.meta.name, "rows": self.n_rows, "train_rows": int(self.training.sum()),
                "positives": self.history.n_positives, "history_length": self.history_length,
                "tasks": list(self.tasks), "n_items": self.spec.n_items, "n_users": self.spec.n_users,
                **({"window": self.window} if self.window is not None else {})}


def _bool_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return frame[name].to_numpy(dtype=bool)


def _codes(column: pd.Series) -> tuple[np.ndarray, int]:
    """Dense codes ``0..k-1`` of a categorical column (sorted values), missing values -> ``k``; and
    the number of codes ``k + 1``."""
    codes, uniques = pd.factorize(column, sort=True)
    codes = codes.astype(np.int64)
    codes[codes < 0] = len(uniques)
    return codes, len(uniques) + 1

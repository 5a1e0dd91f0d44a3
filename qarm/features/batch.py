"""The one batch structure that flows through feature building, training, evaluation and serving.

A :class:`RankingBatch` holds what is specific to each example: who, which item, the user's past
positives, the labels. What is a property of an item (its VQ and RQ codes, its frozen vector, its row in
the ID vocabulary) is *not* in the batch: the model holds those as per-item lookup tables
(:class:`~qarm.features.tables.ItemTables`), so a batch stays a few integers per example and a new
item reaches a served model by adding its codes to the tables, not by changing the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from qarm.errors import DataError


@dataclass
class RankingBatch:
    """B examples: (user, target item, history, labels) and optional side features.

    Attributes
    ----------
    user : int64 tensor (B,)
        Dense user ids.
    item : int64 tensor (B,)
        The target items' dense ids (real ids, not vocabulary indices: cold items included).
    history : int64 tensor (B, n)
        The user's latest ``n`` positive items strictly before the example, most recent first; empty
        slots hold -1, always after the filled ones.
    labels : float32 tensor (B, T) or None
        One 0/1 column per task, in the dataset's ``label_columns`` order; None when serving.
    user_features : int64 tensor (B, F) or None
        Categorical user side features, each column coded ``0..size-1``.
    category : int64 tensor (B,) or None
        The target item's category code.
    row : int64 tensor (B,) or None
        The examples' rows in the interaction table (for joining predictions back); not a feature.
    """

    user: torch.Tensor
    item: torch.Tensor
    history: torch.Tensor
    labels: torch.Tensor | None = None
    user_features: torch.Tensor | None = None
    category: torch.Tensor | None = None
    row: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b = self.item.shape[0] if self.item.dim() == 1 else -1
        if b < 0 or self.user.shape != (b,):
            raise DataError(f"user and item must be 1-D of one length, got {tuple(self.user.shape)} and "
                            f"{tuple(self.item.shape)}")
        if self.history.dim() != 2 or self.history.shape[0] != b:
            raise DataError(f"history must be (B, n) with B = {b}, got {tuple(self.history.shape)}")
        for name, dims in (("labels", 2), ("user_features", 2), ("category", 1), ("row", 1)):
            value = getattr(self, name)
            if value is not None and (value.dim() != dims or value.shape[0] != b):
                raise DataError(f"{name} must have {dims} dim(s) and B = {b} rows, got {tuple(value.shape)}")

    def __len__(self) -> int:
        return int(self.item.shape[0])

    # Derived from the required fields, never stored, so they cannot disagree with them.
    @property
    def history_mask(self) -> torch.Tensor:
        """bool (B, n): True where a history slot holds an item."""
        return self.history >= 0

    @property
    def history_len(self) -> torch.Tensor:
        """int64 (B,): filled history slots per example."""
        return self.history_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> RankingBatch:
        """The same batch with every tensor on ``device``."""
        moved: dict[str, Any] = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                 for f in fields(self)}
        return RankingBatch(**moved)


def assemble_batch(user: np.ndarray, item: np.ndarray, history: np.ndarray, *, labels: np.ndarray | None = None,
                   user_feature_codes: np.ndarray | None = None, item_category: np.ndarray | None = None,
                   row: np.ndarray | None = None) -> RankingBatch:
    """A :class:`RankingBatch` from per-example ids and the per-user / per-item side tables.

    The one place where examples become a batch: training and evaluation (:meth:`ExampleSource.batch`)
    and serving (:class:`qarm.serve.scorer.Scorer`) both call it, so a served request is the same batch as
    the offline example it reproduces.

    Parameters
    ----------
    user, item : int64 arrays (B,)
    history : int64 array (B, n), most recent first, -1 in empty slots
    labels : float32 array (B, T) or None
    user_feature_codes : int64 array (n_users, F) or None, looked up by ``user``
    item_category : int64 array (n_items,) or None, looked up by ``item``
    row : int64 array (B,) or None
    """
    return RankingBatch(
        user=torch.from_numpy(np.ascontiguousarray(user, dtype=np.int64)),
        item=torch.from_numpy(np.ascontiguousarray(item, dtype=np.int64)),
        history=torch.from_numpy(np.ascontiguousarray(history, dtype=np.int64)),
        labels=None if labels is None else torch.from_numpy(labels),
        user_features=None if user_feature_codes is None else torch.from_numpy(user_feature_codes[user]),
        category=None if item_category is None else torch.from_numpy(item_category[item]),
        row=None if row is None else torch.from_numpy(row),
    )

"""The one dataset contract every stage reads and writes.

A dataset folder holds::

    items.parquet         item_id, source_id, text fields, optional category / created_at,
                          and one fixed_size_list<float32> column per modality vector
    interactions.parquet  user_id, item_id, time, seq, label columns (0/1), signal columns, and,
                          once prepared: split, cold_item, sampled_negative
    users.parquet         user_id, source_id, optional side features
    meta.json             schema version, source, loader, config, seed, counts, column roles,
                          split and negative-sampling records
    ground_truth/         only for generated data: the latent truth the generator used

Ids are dense: ``item_id`` is ``0..n_items-1`` in row order, and so is ``user_id``. Loaders remap the
original ids and keep them, as strings, in ``source_id``. Dense ids mean that an item's row, its id,
its embedding index and its row in every vector matrix are one number.

``time`` is an int64: seconds since the epoch when the source has timestamps
(``meta.time_unit == "seconds"``), otherwise the event's position in the user's original order
(``"order"``). ``seq`` is the event's chronological position within its user (0-based, ties broken by
the source order); a sampled negative shares the ``seq`` and ``time`` of the positive it was drawn for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1

ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"
USERS_FILE = "users.parquet"
META_FILE = "meta.json"
GROUND_TRUTH_DIR = "ground_truth"

# Column names fixed by the contract.
ITEM_ID = "item_id"
USER_ID = "user_id"
SOURCE_ID = "source_id"
TIME = "time"
MAX_TIME = 2**53  # |time| bound (seconds or order): ~285 million years, exactly representable as float64
SEQ = "seq"
CATEGORY = "category"
CREATED_AT = "created_at"
# Added by preparation (splits and negative sampling).
SPLIT = "split"
COLD_ITEM = "cold_item"  # on interactions: the event's item is held out as cold-start
COLD_START = "cold_start"  # on items: the item is held out as cold-start
SAMPLED_NEGATIVE = "sampled_negative"
LONGTAIL_GROUP = "longtail_group"

SPLITS = ("train", "valid", "test")
TimeUnit = Literal["seconds", "order"]


@dataclass
class DatasetMeta:
    """What a dataset is and how it was made; written to ``meta.json``.

    Column roles live here, not in naming conventions, so that a user's own columns can be anything.
    """

    name: str
    source: str
    loader: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    schema_version: int = SCHEMA_VERSION
    time_unit: TimeUnit = "order"
    text_columns: list[str] = field(default_factory=list)
    label_columns: list[str] = field(default_factory=list)
    signal_columns: list[str] = field(default_factory=list)
    context_columns: list[str] = field(default_factory=list)  # per-interaction categorical fields
    user_feature_columns: list[str] = field(default_factory=list)
    item_feature_columns: list[str] = field(default_factory=list)  # categorical item side info
    positive_only: bool = False  # every source interaction is a positive (needs sampled negatives)
    counts: dict[str, int] = field(default_factory=dict)
    prepared: dict[str, Any] = field(default_factory=dict)  # split / cold-start / long-tail / negatives
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # run id and digest (qarm.provenance), set on save

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def catalogue_digest(name: str, source_ids: Any, texts: Any = None) -> str:
    """``catalogue-<16 hex>``: SHA-256 of the dataset name and the items' source ids (and texts, one tuple
    of fields per item, when given) in item id order."""
    import hashlib

    h = hashlib.sha256(name.encode("utf-8") + b"\0")
    rows = zip(source_ids, texts) if texts is not None else ((i, ()) for i in source_ids)
    for value, fields in rows:
        h.update(str(value).encode("utf-8") + b"\x1f" + "\x1f".join(fields).encode("utf-8") + b"\0")
    return f"catalogue-{h.hexdigest()[:16]}"


@dataclass
class Dataset:
    """Items, interactions and users in memory, plus the modality vectors of the items.

    Attributes
    ----------
    items : DataFrame, one row per item, ``item_id == arange(n_items)``.
    interactions : DataFrame, one row per event.
    users : DataFrame, one row per user, ``user_id == arange(n_users)``.
    item_vectors : dict name -> float32 array of shape ``(n_items, dim)``, row i belongs to item i.
    meta : DatasetMeta.
    ground_truth : dict name -> DataFrame, only for generated data (``items``, ``users``,
        ``interactions``); never read by models, only by evaluation of the generator itself.
    """

    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame
    meta: DatasetMeta
    item_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    ground_truth: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def catalogue_digest(self) -> str:
        """What identifies the item catalogue: the dataset's name and every item's source id and text, in
        item id order. Codes and vectors made for one catalogue are refused by another with the same item
        count (qarm.features.ItemTables.build)."""
        ids = self.items[SOURCE_ID] if SOURCE_ID in self.items else self.items[ITEM_ID]
        texts = [self.items[c].astype(str).tolist() for c in self.meta.text_columns if c in self.items]
        return catalogue_digest(self.meta.name, ids, list(zip(*texts)) if texts else None)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_interactions(self) -> int:
        return len(self.interactions)

    @property
    def is_prepared(self) -> bool:
        return SPLIT in self.interactions.columns

    def compute_counts(self) -> dict[str, int]:
        counts = {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
        }
        if SAMPLED_NEGATIVE in self.interactions.columns:
            sampled = int(self.interactions[SAMPLED_NEGATIVE].sum())
            counts["sampled_negatives"] = sampled
            counts["source_interactions"] = self.n_interactions - sampled
        return counts

    def training_mask(self) -> np.ndarray:
        """Rows a model may train on: the train split, without the cold-start items' events."""
        if not self.is_prepared:
            raise ValueError("the dataset has no split yet; run qarm data prepare (or split_dataset)")
        mask = self.interactions[SPLIT].to_numpy() == "train"
        if COLD_ITEM in self.interactions.columns:
            mask &= ~self.interactions[COLD_ITEM].to_numpy(dtype=bool)
        return mask

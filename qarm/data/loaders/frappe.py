"""Frappe app-usage CTR data in the libFM format of the NFM release (validation and test parts).

Files: ``frappe.validation.libfm`` and ``frappe.test.libfm``, one event per line::

    label feat:1 feat:1 ... (10 pairs)

``label`` is -1 or 1 and the 10 features are one-hot fields with global feature ids, one per field:
user, item, daytime, weekday, isweekend, homework, cost, weather, country, city. Each field owns a
contiguous id range, so after sorting a line's features by id the k-th feature belongs to the k-th
field; the loader checks that the ranges of the ten positions do not overlap before relying on it.

Mapping: the user field -> ``user``, the item field -> ``item``, ``click = (label == 1)``; the other
eight fields become context columns holding the raw feature ids (an FGCNN / IPNN model embeds them).
The train part of the NFM split is not available, so the recommended protocol (recorded in
``meta.config``) is: train and validate on an 80/20 split of the validation part, test on the test
part, which the ``source_part`` column names. There are no timestamps: ``time`` is the row position,
validation rows first, then test rows, so each file keeps its order and test events come last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qarm.data.build import assemble
from qarm.data.loaders.files import read_csv, source_file
from qarm.data.loaders.registry import register
from qarm.data.schema import Dataset, DatasetMeta
from qarm.errors import DataError

PARTS = {"validation": "frappe.validation.libfm", "test": "frappe.test.libfm"}
FIELDS = ("user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city")
CONTEXT_FIELDS = list(FIELDS[2:])
SOURCE_PART = "source_part"
RECOMMENDED_PROTOCOL = {
    "split": "predefined",
    "column": SOURCE_PART,
    "train_valid": "validation (random 80/20 split into train / valid)",
    "test": "test",
}


@dataclass
class FrappeConfig:
    """Frappe has no options: the files fix the fields and the split."""


@register(
    "frappe",
    config=FrappeConfig,
    shared_folder="frappe_nfm_partial",
    description="Frappe app-usage CTR (libFM, 10 one-hot fields; NFM validation + test parts, 86,582 rows)",
)
def load_frappe(source: Path, config: FrappeConfig) -> Dataset:
    paths = {part: source_file(source, name) for part, name in PARTS.items()}
    parts = [read_libfm(path) for path in paths.values()]
    labels = np.concatenate([label for label, _ in parts])
    features = np.concatenate([feats for _, feats in parts])
    files = " + ".join(str(p) for p in paths.values())
    check_field_ranges(features, file=files)

    part_names = np.repeat(list(paths), [len(label) for label, _ in parts])
    interactions = pd.DataFrame({
        "user": features[:, 0],
        "item": features[:, 1],
        "time": np.arange(len(labels), dtype=np.int64),
        "click": (labels == 1).astype(np.int8),
        **{name: features[:, FIELDS.index(name)] for name in CONTEXT_FIELDS},
        SOURCE_PART: part_names,
    })
    items = pd.DataFrame({"source_id": np.unique(features[:, 1])})
    meta = DatasetMeta(
        name="frappe",
        source=str(source),
        loader="frappe",
        config={"fields": list(FIELDS), "recommended_protocol": RECOMMENDED_PROTOCOL},
        time_unit="order",
        text_columns=[],
        label_columns=["click"],
        context_columns=CONTEXT_FIELDS,
        positive_only=False,
        notes=[
            "context columns hold the raw libFM feature ids; users' and items' feature ids are their source_id",
            f"no train part: train/valid on an 80/20 split of {SOURCE_PART} == 'validation', "
            f"test on {SOURCE_PART} == 'test'",
        ],
    )
    return assemble(items=items, interactions=interactions, meta=meta, items_file=files, interactions_file=files)


def read_libfm(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) and feature ids sorted within each row (n, 10) of a one-hot libFM file."""
    raw = read_csv(path, sep=" ", header=None, dtype=str, keep_default_na=False)
    if raw.shape[1] != len(FIELDS) + 1:
        raise DataError(f"{path}: expected 'label' and {len(FIELDS)} 'feature:1' pairs per line, "
                        f"found lines with {raw.shape[1] - 1} pairs")
    short = (raw == "").any(axis=1).to_numpy()
    if short.any():
        raise DataError(f"{path}: lines with fewer than {len(FIELDS)} 'feature:1' pairs (line numbers)",
                        ids=np.flatnonzero(short) + 1)

    labels = pd.to_numeric(raw[0], errors="coerce").to_numpy()
    bad = ~np.isin(labels, (-1, 1))
    if bad.any():
        raise DataError(f"{path}: labels must be -1 or 1 (line numbers)", ids=np.flatnonzero(bad) + 1)

    pairs = pd.Series(raw.iloc[:, 1:].to_numpy().ravel()).str.partition(":")
    ids = pd.to_numeric(pairs[0], errors="coerce").to_numpy()
    bad = np.isnan(ids) | (pairs[2].to_numpy() != "1")
    if bad.any():
        lines = np.unique(np.flatnonzero(bad) // len(FIELDS)) + 1
        raise DataError(f"{path}: expected one-hot 'feature_id:1' pairs (line numbers)", ids=lines)
    features = np.sort(ids.astype(np.int64).reshape(-1, len(FIELDS)), axis=1)
    return labels.astype(np.int64), features


def check_field_ranges(features: np.ndarray, *, file: str) -> None:
    """Raise unless the id ranges of the sorted feature positions are disjoint (one field each)."""
    low, high = features.min(axis=0), features.max(axis=0)
    overlap = np.flatnonzero(high[:-1] >= low[1:])
    if overlap.size:
        k = int(overlap[0])
        raise DataError(
            f"{file}: feature ids of fields {FIELDS[k]!r} ({low[k]}..{high[k]}) and {FIELDS[k + 1]!r} "
            f"({low[k + 1]}..{high[k + 1]}) overlap, so fields cannot be told apart by position"
        )

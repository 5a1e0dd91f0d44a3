"""Amazon Beauty / Sports_and_Outdoors / Toys_and_Games and Yelp sequences as released with S3-Rec.

Files per subset: ``<subset>.txt`` = ``user item item ...`` (one user per line, items in chronological
order, no timestamps) and ``<subset>_item2attributes.json`` = ``{"item": [attribute ids]}``. Ids are
integers starting at 1.

Every event is a positive (``click = 1``, ``positive_only``); ``time`` is the event's position in the
user's sequence. Items are every id seen in the sequences or the attributes file, sorted by number, with
``attributes`` (the attribute ids joined by spaces, repeats dropped, an item feature column) and
``category`` (the first attribute id, ``"unknown"`` for an item without attributes). There is no text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qarm.data.build import assemble
from qarm.data.loaders.files import read_lines, source_file
from qarm.data.loaders.registry import register
from qarm.data.schema import Dataset, DatasetMeta
from qarm.errors import ConfigError, DataError

# subset (file stem) -> dataset name
SUBSETS = {
    "Beauty": "amazon-beauty",
    "Sports_and_Outdoors": "amazon-sports-and-outdoors",
    "Toys_and_Games": "amazon-toys-and-games",
    "Yelp": "yelp",
}
UNKNOWN_CATEGORY = "unknown"


@dataclass
class AmazonConfig:
    subset: str = "Beauty"  # one of SUBSETS

    def __post_init__(self) -> None:
        if self.subset not in SUBSETS:
            raise ConfigError(f"unknown subset {self.subset!r}; available: {list(SUBSETS)}")


@register(
    "amazon",
    config=AmazonConfig,
    shared_folder="s3rec_amazon_seq",
    description="S3-Rec Amazon (Beauty, Sports_and_Outdoors, Toys_and_Games) and Yelp item sequences "
                "with categorical attributes (positives only)",
)
def load_amazon(source: Path, config: AmazonConfig) -> Dataset:
    sequences_path = source_file(source, f"{config.subset}.txt")
    attributes_path = source_file(source, f"{config.subset}_item2attributes.json")

    interactions = read_sequences(sequences_path)
    attributes = read_attributes(attributes_path)
    item_ids = pd.Index(interactions["item"].unique()).union(attributes.index)
    numeric = pd.to_numeric(pd.Series(item_ids), errors="coerce")
    if numeric.isna().any():
        raise DataError(f"{sequences_path} / {attributes_path}: item ids must be integers",
                        ids=item_ids[numeric.isna().to_numpy()])
    item_ids = item_ids[np.argsort(numeric.to_numpy(), kind="stable")]
    item_attributes = attributes.reindex(item_ids)
    items = pd.DataFrame({
        "source_id": item_ids,
        "attributes": [" ".join(map(str, dict.fromkeys(a))) if isinstance(a, list) else "" for a in item_attributes],
        "category": [str(a[0]) if isinstance(a, list) and a else UNKNOWN_CATEGORY for a in item_attributes],
    })
    meta = DatasetMeta(
        name=SUBSETS[config.subset],
        source=str(source),
        loader="amazon",
        config={"subset": config.subset},
        time_unit="order",
        text_columns=[],
        label_columns=["click"],
        item_feature_columns=["attributes"],
        positive_only=True,
    )
    return assemble(items=items, interactions=interactions, meta=meta, items_file=str(attributes_path),
                    interactions_file=str(sequences_path))


def read_sequences(path: Path) -> pd.DataFrame:
    """One row per event: ``user``, ``item`` (source ids), ``time`` (position), ``click`` (1)."""
    tokens = pd.Series(read_lines(path)).str.split()
    lengths = tokens.str.len().to_numpy() - 1
    if (lengths < 1).any():
        raise DataError(f"{path}: lines without items, expected 'user item item ...' (line numbers)",
                        ids=np.flatnonzero(lengths < 1) + 1)
    items = tokens.str[1:].explode().to_numpy(dtype=str)
    starts = np.cumsum(lengths) - lengths
    return pd.DataFrame({
        "user": np.repeat(tokens.str[0].to_numpy(dtype=str), lengths),
        "item": items,
        "time": np.arange(len(items), dtype=np.int64) - np.repeat(starts, lengths),
        "click": np.ones(len(items), dtype=np.int8),
    })


def read_attributes(path: Path) -> pd.Series:
    """Item id (str) -> list of attribute ids, from the ``item2attributes`` JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object item -> [attribute ids], got {type(data).__name__}")
    bad = [item for item, value in data.items() if not isinstance(value, list)]
    if bad:
        raise DataError(f"{path}: attribute values must be lists of ids (items)", ids=bad)
    return pd.Series(data, dtype=object)

"""MicroLens-50k: short-video titles and chronological user sequences (positives only).

Files (original release): ``MicroLens-50k_pairs.tsv`` = ``user<TAB>item item ...`` in chronological
order, no timestamps; ``MicroLens-50k_titles.csv`` = ``item,title`` (English titles with #hashtags).
Every pair is a positive (``click = 1``); ``time`` is the event's position in the user's sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qarm.data.build import assemble
from qarm.data.loaders.files import read_csv, read_lines, source_file
from qarm.data.loaders.registry import register
from qarm.data.schema import Dataset, DatasetMeta
from qarm.errors import DataError

PAIRS_FILE = "MicroLens-50k_pairs.tsv"
TITLES_FILE = "MicroLens-50k_titles.csv"


@dataclass
class MicroLensConfig:
    drop_items_without_title: bool = False  # every item of the release has a title; keep strict


@register(
    "microlens50k",
    config=MicroLensConfig,
    shared_folder="microlens50k",
    description="MicroLens-50k short-video titles + chronological positives (50k users, 19,220 items)",
)
def load_microlens(source: Path, config: MicroLensConfig) -> Dataset:
    pairs_path = source_file(source, PAIRS_FILE)
    titles_path = source_file(source, TITLES_FILE)

    titles = read_csv(titles_path, required=["item", "title"], dtype={"item": str, "title": str},
                      keep_default_na=False)
    items = pd.DataFrame({"source_id": titles["item"].str.strip(), "title": titles["title"].fillna("")})

    users: list[str] = []
    item_ids: list[str] = []
    order: list[int] = []
    for line_no, line in enumerate(read_lines(pairs_path), start=1):
        head, sep, rest = line.partition("\t")
        if not sep:
            raise DataError(f"{pairs_path}: line {line_no}: expected 'user<TAB>item item ...', got {line[:60]!r}")
        seq = rest.split()
        if not seq:
            raise DataError(f"{pairs_path}: line {line_no}: user {head.strip()!r} has no items")
        users.extend([head.strip()] * len(seq))
        item_ids.extend(seq)
        order.extend(range(len(seq)))
    interactions = pd.DataFrame({
        "user": users,
        "item": item_ids,
        "time": np.asarray(order, dtype=np.int64),
        "click": np.ones(len(users), dtype=np.int8),
    })
    meta = DatasetMeta(
        name="microlens50k",
        source=str(source),
        loader="microlens50k",
        config={"drop_items_without_title": config.drop_items_without_title},
        time_unit="order",
        text_columns=["title"],
        label_columns=["click"],
        positive_only=True,
    )
    return assemble(items=items, interactions=interactions, meta=meta, items_file=str(titles_path),
                    interactions_file=str(pairs_path), drop_unknown_items=config.drop_items_without_title)

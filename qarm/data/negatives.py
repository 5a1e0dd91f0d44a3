"""Negative sampling for positive-only data (MicroLens, MovieLens 'rated', Last.fm, Amazon).

For every source event, ``ratio`` items the user never interacted with (in the whole log) are drawn
and added as rows with every label 0, ``sampled_negative = True``, and the ``time``, ``seq``, ``split``
and context of the positive they were drawn for. So a positive and its negatives form one
"impression", and a negative is never in the past or future of its positive.

Samplers
--------
``uniform``: every item alike. ``popularity``: probability proportional to ``count ** alpha``, where
``count`` is the item's number of source events over the whole log (``+ 1``, so that items with none
can be drawn). Popularity-weighted negatives follow how often items are shown, so that popularity
alone cannot tell positives from negatives; taking the counts from the whole log (not only train)
gives cold-start items their real weight, so the cold-start evaluation set has negatives too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from qarm.data import schema as S
from qarm.data.schema import Dataset
from qarm.errors import ConfigError, DataError

MAX_ROUNDS = 100


@dataclass
class NegativeConfig:
    sampler: Literal["auto", "none", "uniform", "popularity"] = "auto"
    """``auto``: ``popularity`` for positive-only data, ``none`` otherwise."""
    ratio: int = 4  # negatives per positive: a common choice for CTR on implicit data
    popularity_alpha: float = 1.0  # 1.0 = proportional to counts; 0.75 is word2vec's smoothing
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ConfigError(f"The 'ratio' parameter of NegativeConfig must be an int >= 1. Got {self.ratio} instead.")
        if self.popularity_alpha < 0:
            raise ConfigError(
                f"The 'popularity_alpha' parameter of NegativeConfig must be >= 0. Got {self.popularity_alpha} instead."
            )


def resolve_sampler(dataset: Dataset, config: NegativeConfig) -> str:
    if config.sampler != "auto":
        return config.sampler
    return "popularity" if dataset.meta.positive_only else "none"


def add_sampled_negatives(dataset: Dataset, config: NegativeConfig) -> Dataset:
    """Return a dataset whose interactions also hold the sampled negatives (see the module docstring)."""
    sampler = resolve_sampler(dataset, config)
    inter = dataset.interactions
    if sampler == "none":
        inter = inter.copy()
        inter[S.SAMPLED_NEGATIVE] = np.zeros(len(inter), dtype=bool)
        dataset.meta.prepared = {**dataset.meta.prepared, "negatives": {"sampler": "none"}}
        return _with(dataset, inter)
    if S.SAMPLED_NEGATIVE in inter.columns and inter[S.SAMPLED_NEGATIVE].any():
        raise DataError("negatives were already sampled for this dataset", file=S.INTERACTIONS_FILE,
                        column=S.SAMPLED_NEGATIVE)

    n_items = dataset.n_items
    users = inter[S.USER_ID].to_numpy()
    items = inter[S.ITEM_ID].to_numpy()
    counts = np.bincount(items, minlength=n_items).astype(np.float64)
    if sampler == "uniform":
        weights = np.ones(n_items)
    elif sampler == "popularity":
        weights = (counts + 1.0) ** config.popularity_alpha
    else:
        raise ConfigError(f"unknown sampler {sampler!r}; available: auto, none, uniform, popularity")

    _check_users_have_room(users, items, n_items)
    negative_items = sample_excluding(users, items, n_items, weights, config.ratio, config.seed)

    source_rows = np.repeat(np.arange(len(inter)), config.ratio)
    negatives = inter.iloc[source_rows].reset_index(drop=True)
    negatives[S.ITEM_ID] = negative_items
    for column in dataset.meta.label_columns:
        negatives[column] = np.zeros(len(negatives), dtype=inter[column].dtype)
    for column in dataset.meta.signal_columns:
        negatives[column] = np.nan
    if S.COLD_ITEM in negatives.columns:
        cold = dataset.items[S.COLD_START].to_numpy() if S.COLD_START in dataset.items.columns else None
        negatives[S.COLD_ITEM] = cold[negative_items] if cold is not None else False

    positives = inter.copy()
    positives[S.SAMPLED_NEGATIVE] = False
    negatives[S.SAMPLED_NEGATIVE] = True
    combined = pd.concat([positives, negatives], ignore_index=True)
    # Each positive is followed by its negatives: order by user, seq, positive first.
    order = np.lexsort((combined[S.SAMPLED_NEGATIVE].to_numpy(), combined[S.SEQ].to_numpy(),
                        combined[S.USER_ID].to_numpy()))
    combined = combined.iloc[order].reset_index(drop=True)
    for column in dataset.meta.signal_columns:
        if column in combined.columns:
            combined[column] = combined[column].astype(np.float64)

    dataset.meta.prepared = {
        **dataset.meta.prepared,
        "negatives": {
            "sampler": sampler,
            "ratio": config.ratio,
            "popularity_alpha": config.popularity_alpha if sampler == "popularity" else None,
            "popularity_counts": "all source events, + 1" if sampler == "popularity" else None,
            "excludes": "every item the user interacted with in the whole log",
            "seed": config.seed,
            "sampled": int(len(negatives)),
        },
    }
    return _with(dataset, combined)


def sample_excluding(
    users: np.ndarray, positives: np.ndarray, n_items: int, weights: np.ndarray, ratio: int, seed: int
) -> np.ndarray:
    """For each row ``(users[i], positives[i])`` draw ``ratio`` items by ``weights`` that are not among the
    user's items. Returns ``(len(users) * ratio,)`` item ids, row-major (row i's draws are together).

    Rejection sampling, vectorised: draw all, redraw only the rejected ones, until none is left.
    """
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    taken = np.unique(users.astype(np.int64) * n_items + positives)  # sorted keys user*n+item
    want_users = np.repeat(users.astype(np.int64), ratio)
    out = np.searchsorted(cdf, rng.random(len(want_users)), side="right")
    todo = np.arange(len(out))
    for _ in range(MAX_ROUNDS):
        keys = want_users[todo] * n_items + out[todo]
        pos = np.searchsorted(taken, keys)
        hit = (pos < len(taken)) & (taken[np.minimum(pos, len(taken) - 1)] == keys)
        todo = todo[hit]
        if len(todo) == 0:
            return out.astype(np.int64)
        out[todo] = np.searchsorted(cdf, rng.random(len(todo)), side="right")
    raise DataError(
        f"could not draw negatives outside the users' items after {MAX_ROUNDS} rounds; these users have "
        "interacted with almost every item that has sampling weight",
        file=S.INTERACTIONS_FILE, column=S.USER_ID, ids=np.unique(want_users[todo]),
    )


def _check_users_have_room(users: np.ndarray, items: np.ndarray, n_items: int) -> None:
    pairs = np.unique(users.astype(np.int64) * n_items + items)
    distinct_per_user = np.bincount(pairs // n_items)
    full = np.flatnonzero(distinct_per_user >= n_items)
    if len(full):
        raise DataError("users have interacted with every item, so no negative can be sampled for them",
                        file=S.INTERACTIONS_FILE, column=S.USER_ID, ids=full)


def _with(dataset: Dataset, interactions: pd.DataFrame) -> Dataset:
    return Dataset(items=dataset.items, interactions=interactions, users=dataset.users, meta=dataset.meta,
                   item_vectors=dataset.item_vectors, ground_truth=dataset.ground_truth)

"""Negative sampling for positive-only data (MicroLens, MovieLens 'rated', Last.fm, Amazon).

For every source event, ``ratio`` items are drawn and added as rows with every label 0,
``sampled_negative = True``, and the ``time``, ``seq``, ``split`` and context of the positive they were
drawn for. So a positive and its negatives form one "impression", and a negative is never in the past or
future of its positive.

The sampler knows only the past (docs/dataset_contract.md, "Sampled negatives", states it exactly):

* **weights** come from the *training split* alone: ``popularity`` draws item ``i`` with probability
  proportional to ``(train_count_i + smoothing) ** alpha``, where ``train_count_i`` is the number of the
  item's source events in the train split (cold-start items' included: they were shown, the models just
  never train on them); with creation times, counts become rates over the part of the training period
  in which the item existed (``training_rates``), so a draw at any time follows how often the items
  that exist then were shown. Items without training events (first shown after the training period) share the
  Good-Turing estimate of new items' share of the next events (``unseen``). No valid or test event
  changes any weight, for training and evaluation rows alike. ``uniform``: every item alike.
* **exclusions** grow with the splits: a training row's negatives avoid the items the user has in the
  train split, a valid row's those in train + valid, a test row's every item of the user. So training
  rows depend on training events only, and an evaluation row never calls one of the user's own positives
  a negative.
* **existence**: for data with real timestamps (``time_unit == "seconds"``) and an items ``created_at``
  column, an item created after the row's time is never its negative.
* **streams**: each split draws from its own random stream (``seed``, split index), so the training
  negatives do not change when valid or test rows do.
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
    smoothing: float = 0.0
    """Added to every training count. 0: items seen in training at their counts (the maximum-likelihood
    estimate), the unseen ones at their Good-Turing share (``unseen``); needs ``unseen="good_turing"``."""
    unseen: Literal["good_turing", "smoothing"] = "good_turing"
    """Weight of the items without training events (first shown after the training period).
    ``good_turing``: together they get the Good-Turing estimate of the share of new items in the next events,
    ``N1 / N`` (training events whose item was seen exactly once, over all training events), shared
    equally; ``smoothing``: each gets ``smoothing ** alpha``, as if it had been seen zero times."""
    counts: Literal["train", "whole_log"] = "train"
    """``train``: the rule of the module docstring. ``whole_log``: the rule before qarm 0.2 (``count + 1``
    and exclusions over the whole log, valid and test included; ``smoothing`` and ``unseen`` ignored). It
    leaks: an item that later becomes a test
    positive gets extra training negatives. Kept only to reproduce old numbers and to check the leakage
    probe (``qarm.evaluate.leakage``); never use it to train."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ConfigError(f"The 'ratio' parameter of NegativeConfig must be an int >= 1. Got {self.ratio} instead.")
        if self.popularity_alpha < 0:
            raise ConfigError(
                f"The 'popularity_alpha' parameter of NegativeConfig must be >= 0. Got {self.popularity_alpha} instead."
            )
        if self.unseen not in ("good_turing", "smoothing"):
            raise ConfigError(f"The 'unseen' parameter of NegativeConfig must be 'good_turing' or 'smoothing'. "
                              f"Got {self.unseen!r} instead.")
        if self.counts not in ("train", "whole_log"):
            raise ConfigError(f"The 'counts' parameter of NegativeConfig must be 'train' or 'whole_log'. "
                              f"Got {self.counts!r} instead.")
        if self.smoothing == 0 and self.unseen == "smoothing":
            raise ConfigError("NegativeConfig(unseen='smoothing') needs smoothing > 0: items without training "
                              "events would get no weight")
        if not self.smoothing >= 0:
            raise ConfigError(f"The 'smoothing' parameter of NegativeConfig must be >= 0. Got {self.smoothing} instead.")


def resolve_sampler(dataset: Dataset, config: NegativeConfig) -> str:
    if config.sampler != "auto":
        return config.sampler
    return "popularity" if dataset.meta.positive_only else "none"


def training_counts(dataset: Dataset) -> np.ndarray:
    """Source events per item in the train split only (float64, one per item)."""
    inter = dataset.interactions
    rows = inter[S.SPLIT].astype(str).to_numpy() == "train"
    if S.SAMPLED_NEGATIVE in inter.columns:
        rows &= ~inter[S.SAMPLED_NEGATIVE].to_numpy(dtype=bool)
    return np.bincount(inter[S.ITEM_ID].to_numpy()[rows], minlength=dataset.n_items).astype(np.float64)


def sampling_weights(dataset: Dataset, sampler: str, config: NegativeConfig) -> np.ndarray:
    """The weight of each item as a negative: from training-split counts only (module docstring)."""
    if sampler == "uniform":
        return np.ones(dataset.n_items)
    if sampler == "popularity":
        if config.counts == "whole_log":
            counts = np.bincount(dataset.interactions[S.ITEM_ID].to_numpy(), minlength=dataset.n_items)
            return (counts.astype(np.float64) + 1.0) ** config.popularity_alpha  # qarm 0.1's "+ 1"
        counts = training_counts(dataset)
        weights = (training_rates(dataset, counts) + config.smoothing) ** config.popularity_alpha
        unseen = counts == 0
        if config.unseen == "good_turing" and unseen.any() and counts.sum() > 0:
            share = float(np.clip((counts == 1).sum() / counts.sum(), 1e-6, 0.5))
            weights[unseen] = share / (1.0 - share) * weights[~unseen].sum() / unseen.sum()
        return weights
    raise ConfigError(f"unknown sampler {sampler!r}; available: auto, none, uniform, popularity")


MIN_EXPOSURE_SHARE = 0.01  # an item created at the very end of training counts as shown for 1% of it


def training_rates(dataset: Dataset, counts: np.ndarray) -> np.ndarray:
    """Training counts as rates when items are created during the training period: ``c_i * span /
    exposure_i``, where ``span`` is the training period and ``exposure_i`` the part of it in which item
    ``i`` existed (at least ``MIN_EXPOSURE_SHARE`` of it). An item created half-way through with 50 events
    weighs as much as an old item with 100. Without creation times (or timestamps): the counts."""
    created = item_creation_times(dataset)
    if created is None:
        return counts
    inter = dataset.interactions
    train = inter[S.SPLIT].astype(str).to_numpy() == "train"
    if not train.any():
        return counts
    times = inter[S.TIME].to_numpy()[train]
    start, end = int(times.min()), int(times.max())
    span = max(end - start, 1)
    exposure = np.clip(end - np.maximum(created, start), MIN_EXPOSURE_SHARE * span, span).astype(np.float64)
    return counts * (span / exposure)


def item_creation_times(dataset: Dataset) -> np.ndarray | None:
    """``created_at`` per item (int64; missing values as the earliest possible time) when the data has real
    timestamps and the column, else None (every item may be drawn at any time)."""
    if dataset.meta.time_unit != "seconds" or S.CREATED_AT not in dataset.items.columns:
        return None
    created = pd.to_numeric(dataset.items[S.CREATED_AT], errors="coerce").to_numpy(dtype=np.float64)
    created = np.where(np.isfinite(created), created, np.iinfo(np.int64).min)
    return created.astype(np.int64)


def add_sampled_negatives(dataset: Dataset, config: NegativeConfig) -> Dataset:
    """Return a dataset whose interactions also hold the sampled negatives (see the module docstring).
    The dataset must be split already (``split`` column): weights and exclusions depend on it."""
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
    if S.SPLIT not in inter.columns:
        raise DataError("negatives are drawn after the split (their weights use the train split only); "
                        "split the dataset first (qarm data prepare does both)", file=S.INTERACTIONS_FILE,
                        column=S.SPLIT)

    n_items = dataset.n_items
    users = inter[S.USER_ID].to_numpy().astype(np.int64)
    items = inter[S.ITEM_ID].to_numpy().astype(np.int64)
    split = inter[S.SPLIT].astype(str).to_numpy()
    weights = sampling_weights(dataset, sampler, config)
    created = item_creation_times(dataset)
    times = inter[S.TIME].to_numpy().astype(np.int64)

    _check_users_have_room(users, items, n_items)
    negative_items = np.empty((len(inter), config.ratio), dtype=np.int64)
    known = np.zeros(len(inter), dtype=bool)  # events whose items a split's rows may not draw
    if config.counts == "whole_log":
        known[:] = True
    for index, name in enumerate(S.SPLITS):
        rows = split == name
        known |= rows
        if not rows.any():
            continue
        draws = sample_excluding(
            users[rows], items[rows], n_items, weights, config.ratio, seed=(config.seed, index),
            excluded=(users[known], items[known]),
            times=times[rows] if created is not None else None, created_at=created,
        )
        negative_items[rows] = draws.reshape(-1, config.ratio)
    negative_items_flat = negative_items.reshape(-1)

    source_rows = np.repeat(np.arange(len(inter)), config.ratio)
    negatives = inter.iloc[source_rows].reset_index(drop=True)
    negatives[S.ITEM_ID] = negative_items_flat
    for column in dataset.meta.label_columns:
        negatives[column] = np.zeros(len(negatives), dtype=inter[column].dtype)
    for column in dataset.meta.signal_columns:
        negatives[column] = np.nan
    if S.COLD_ITEM in negatives.columns:
        cold = dataset.items[S.COLD_START].to_numpy() if S.COLD_START in dataset.items.columns else None
        negatives[S.COLD_ITEM] = cold[negative_items_flat] if cold is not None else False

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
            "popularity_counts": (None if sampler != "popularity" else
                                  f"train-split source events + {config.smoothing:g}, unseen: {config.unseen}"
                                  if config.counts == "train" else "whole-log source events + 1 (leaky)"),
            "excludes": ("the user's items in the row's split and the splits before it (train < valid < test)"
                         if config.counts == "train" else "every item of the user in the whole log"),
            "created_at": "an item is never drawn before its created_at" if created is not None else None,
            "streams": "one random stream per split: (seed, split index)",
            "seed": config.seed,
            "sampled": int(len(negatives)),
        },
    }
    return _with(dataset, combined)


def sample_excluding(
    users: np.ndarray, positives: np.ndarray, n_items: int, weights: np.ndarray, ratio: int,
    seed: int | tuple[int, ...], *, excluded: tuple[np.ndarray, np.ndarray] | None = None,
    times: np.ndarray | None = None, created_at: np.ndarray | None = None,
) -> np.ndarray:
    """For each row ``(users[i], positives[i])`` draw ``ratio`` items by ``weights`` that are not among the
    user's excluded items. Returns ``(len(users) * ratio,)`` item ids, row-major (row i's draws together).

    ``excluded``: ``(users, items)`` pairs that may not be drawn for that user (default: the rows' own
    pairs). ``times`` with ``created_at``: row i draws only among the items with ``created_at <= times[i]``
    (exactly, by drawing in the items' creation order below the row's prefix, not by rejection).
    Rejection sampling against the exclusions, vectorised: draw all, redraw only the rejected ones.
    """
    rng = np.random.default_rng(seed)
    ex_users, ex_items = excluded if excluded is not None else (users, positives)
    taken = np.unique(ex_users.astype(np.int64) * n_items + ex_items)  # sorted keys user*n+item
    want_users = np.repeat(users.astype(np.int64), ratio)
    if times is not None and created_at is not None:
        order = np.argsort(created_at, kind="stable")
        cum = np.cumsum(weights[order], dtype=np.float64)
        eligible = np.searchsorted(created_at[order], np.repeat(times.astype(np.int64), ratio), side="right")
        if (eligible == 0).any():
            bad = np.unique(want_users[eligible == 0])
            raise DataError("rows earlier than every item's created_at: no item existed to draw as a negative",
                            file=S.INTERACTIONS_FILE, column=S.TIME, ids=bad)
        last = eligible - 1
    else:
        order, cum = np.arange(n_items), np.cumsum(weights, dtype=np.float64)
        last = np.full(len(want_users), n_items - 1)
    total = cum[last]

    def draw(index: np.ndarray) -> np.ndarray:
        picked = np.searchsorted(cum, rng.random(len(index)) * total[index], side="right")
        return order[np.minimum(picked, last[index])]

    out = draw(np.arange(len(want_users)))
    todo = np.arange(len(out))
    for _ in range(MAX_ROUNDS):
        keys = want_users[todo] * n_items + out[todo]
        pos = np.searchsorted(taken, keys)
        hit = (pos < len(taken)) & (taken[np.minimum(pos, len(taken) - 1)] == keys)
        todo = todo[hit]
        if len(todo) == 0:
            return out.astype(np.int64)
        out[todo] = draw(todo)
    raise DataError(
        f"could not draw negatives outside the users' items after {MAX_ROUNDS} rounds; these users have "
        "interacted with almost every item that has sampling weight (and existed at the time)",
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

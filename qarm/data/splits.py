"""Train / valid / test splits, the cold-start item hold-out, and long-tail item groups.

* ``leave_last_out`` (order-only data): per user, the last event is test and the second-to-last valid;
  users with two events give their last to test; users with one event keep it in train.
* ``time`` (real timestamps): one global cut, so that nothing in train happens after anything in test:
  events at or after the ``1 - test_fraction`` time quantile are test, those between the
  ``1 - test_fraction - valid_fraction`` and ``1 - test_fraction`` quantiles are valid.
* ``predefined``: the source says (a column with the parts, e.g. Frappe's validation / test files);
  ``predefined_train_part`` is cut at random into train and valid by ``predefined_valid_fraction``.

The cold-start hold-out picks ``cold_item_fraction`` of the items that have events (seeded). Their events
are flagged ``cold_item`` and are never trained on (:meth:`Dataset.training_mask`); the ones that fall in
valid / test are the cold-start evaluation set. Downstream stages must also treat these items as
out-of-vocabulary in user histories, so that no ID embedding is learnt for them.

Long-tail groups: items with training events are sorted by training frequency and cut into
``n_longtail_groups`` groups that each hold about the same number of training events; group 1 (L1) is the
rarest. Items without training events (cold-start items, items never seen) are group 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from qarm.data import schema as S
from qarm.data.schema import Dataset
from qarm.errors import ConfigError, DataError

SPLIT_DTYPE = pd.CategoricalDtype(list(S.SPLITS))


@dataclass
class SplitConfig:
    strategy: Literal["auto", "leave_last_out", "time", "predefined"] = "auto"
    """``auto``: ``time`` when the data has real timestamps, ``predefined`` when the loader gave parts,
    else ``leave_last_out``."""
    valid_fraction: float = 0.1  # time split: share of events in valid
    test_fraction: float = 0.1  # time split: share of events in test
    predefined_column: str = "source_part"
    predefined_test_part: str = "test"
    predefined_train_part: str = "validation"
    predefined_valid_fraction: float = 0.2  # Frappe protocol: 80/20 of the validation file
    cold_item_fraction: float = 0.1  # the paper's cold-start evaluation needs unseen items
    n_longtail_groups: int = 6  # the paper's Table 5 uses six groups L1..L6
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("valid_fraction", "test_fraction", "predefined_valid_fraction", "cold_item_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"The '{name}' parameter of SplitConfig must be in [0, 1). Got {value} instead.")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"valid_fraction + test_fraction must be < 1, got {self.valid_fraction} + {self.test_fraction}"
            )
        if self.n_longtail_groups < 1:
            raise ConfigError(
                f"The 'n_longtail_groups' parameter of SplitConfig must be an int >= 1. "
                f"Got {self.n_longtail_groups} instead."
            )


def resolve_strategy(dataset: Dataset, config: SplitConfig) -> str:
    if config.strategy != "auto":
        return config.strategy
    if config.predefined_column in dataset.interactions.columns:
        return "predefined"
    return "time" if dataset.meta.time_unit == "seconds" else "leave_last_out"


def split_dataset(dataset: Dataset, config: SplitConfig) -> Dataset:
    """Add ``split`` and ``cold_item`` to the interactions and ``cold_start`` / ``longtail_group`` to the
    items; record what was done in ``meta.prepared``. Returns a new :class:`Dataset`."""
    inter = dataset.interactions.copy()
    strategy = resolve_strategy(dataset, config)
    record: dict[str, Any] = {"strategy": strategy}
    if strategy == "leave_last_out":
        split = leave_last_out(inter[S.USER_ID].to_numpy(), inter[S.SEQ].to_numpy())
    elif strategy == "time":
        split, cuts = time_split(inter[S.TIME].to_numpy(), config.valid_fraction, config.test_fraction)
        record.update(valid_from_time=cuts[0], test_from_time=cuts[1])
    elif strategy == "predefined":
        split = predefined_split(inter, config)
    else:
        raise ConfigError(f"unknown split strategy {strategy!r}; available: auto, leave_last_out, time, predefined")
    inter[S.SPLIT] = pd.Categorical.from_codes(split, dtype=SPLIT_DTYPE)

    items = dataset.items.copy()
    cold = choose_cold_items(inter[S.ITEM_ID].to_numpy(), len(items), config.cold_item_fraction, config.seed)
    items[S.COLD_START] = cold
    inter[S.COLD_ITEM] = cold[inter[S.ITEM_ID].to_numpy()]

    train_rows = (split == 0) & ~inter[S.COLD_ITEM].to_numpy()
    if S.SAMPLED_NEGATIVE in inter.columns:
        train_rows &= ~inter[S.SAMPLED_NEGATIVE].to_numpy(dtype=bool)
    train_counts = np.bincount(inter[S.ITEM_ID].to_numpy()[train_rows], minlength=len(items))
    groups, bounds = longtail_groups(train_counts, config.n_longtail_groups)
    items[S.LONGTAIL_GROUP] = groups

    record.update(
        rows_per_split={name: int((split == i).sum()) for i, name in enumerate(S.SPLITS)},
        cold_item_fraction=config.cold_item_fraction,
        cold_items=int(cold.sum()),
        cold_rows_per_split={name: int(((split == i) & inter[S.COLD_ITEM].to_numpy()).sum())
                             for i, name in enumerate(S.SPLITS)},
        longtail_groups=bounds,
        seed=config.seed,
    )
    meta = dataset.meta
    meta.prepared = {**meta.prepared, "split": record}
    return Dataset(items=items, interactions=inter, users=dataset.users, meta=meta,
                   item_vectors=dataset.item_vectors, ground_truth=dataset.ground_truth)


def leave_last_out(user_ids: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Split codes (0 train, 1 valid, 2 test): per user, last event -> test, second-to-last -> valid.

    Events are ranked by ``seq`` within each user; rows sharing a ``seq`` (a positive and its sampled
    negatives) share the split.
    """
    frame = pd.DataFrame({"u": user_ids, "s": seq})
    distinct = frame.drop_duplicates().copy()
    distinct["rank_from_end"] = distinct.groupby("u")["s"].rank(method="first", ascending=False).astype(np.int64)
    distinct["n"] = distinct.groupby("u")["s"].transform("size")
    code = np.zeros(len(distinct), dtype=np.int8)
    r, n = distinct["rank_from_end"].to_numpy(), distinct["n"].to_numpy()
    code[(r == 1) & (n >= 2)] = 2
    code[(r == 2) & (n >= 3)] = 1
    distinct["code"] = code
    merged = frame.merge(distinct[["u", "s", "code"]], on=["u", "s"], how="left")
    return merged["code"].to_numpy(dtype=np.int8)


def time_split(time: np.ndarray, valid_fraction: float, test_fraction: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Split codes by global time quantiles; returns the codes and the (valid, test) start times."""
    valid_from = int(np.quantile(time, 1.0 - valid_fraction - test_fraction, method="lower"))
    test_from = int(np.quantile(time, 1.0 - test_fraction, method="lower"))
    if test_fraction > 0 and test_from == time.min():
        raise DataError("all events share one timestamp; a time split is impossible (use leave_last_out)",
                        file=S.INTERACTIONS_FILE, column=S.TIME)
    code = np.zeros(len(time), dtype=np.int8)
    if valid_fraction > 0:
        code[time >= valid_from] = 1
    if test_fraction > 0:
        code[time >= test_from] = 2
    return code, (valid_from, test_from)


def predefined_split(inter: pd.DataFrame, config: SplitConfig) -> np.ndarray:
    column = config.predefined_column
    if column not in inter.columns:
        raise DataError(f"the predefined split needs column '{column}'", file=S.INTERACTIONS_FILE, column=column)
    parts = inter[column].astype(str).to_numpy()
    known = {config.predefined_train_part, config.predefined_test_part}
    unknown = ~np.isin(parts, list(known))
    if unknown.any():
        raise DataError(f"unknown parts for a predefined split (expected {sorted(known)})",
                        file=S.INTERACTIONS_FILE, column=column, ids=np.unique(parts[unknown]))
    code = np.where(parts == config.predefined_test_part, 2, 0).astype(np.int8)
    train_rows = np.flatnonzero(code == 0)
    rng = np.random.default_rng(config.seed)
    n_valid = int(round(len(train_rows) * config.predefined_valid_fraction))
    code[rng.choice(train_rows, size=n_valid, replace=False)] = 1
    return code


def choose_cold_items(item_ids: np.ndarray, n_items: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over items: ``fraction`` of the items that have events, drawn with ``seed``."""
    cold = np.zeros(n_items, dtype=bool)
    seen = np.unique(item_ids)
    n_cold = int(round(len(seen) * fraction))
    if n_cold:
        cold[np.random.default_rng(seed).choice(seen, size=n_cold, replace=False)] = True
    return cold


def longtail_groups(train_counts: np.ndarray, n_groups: int) -> tuple[np.ndarray, list[dict[str, int]]]:
    """Group 1..n_groups by training frequency with about equal training events per group (1 = rarest);
    0 for items without training events. Returns the groups and a record of each group's bounds."""
    groups = np.zeros(len(train_counts), dtype=np.int8)
    seen = np.flatnonzero(train_counts > 0)
    bounds: list[dict[str, int]] = []
    if len(seen) == 0:
        return groups, bounds
    # Sort by count, ties by id, so the cut is deterministic; cut the cumulative mass into equal parts.
    order = seen[np.lexsort((seen, train_counts[seen]))]
    mass = np.cumsum(train_counts[order])
    group_of_sorted = np.minimum((mass - 1) * n_groups // mass[-1], n_groups - 1) + 1
    groups[order] = group_of_sorted
    for g in range(1, n_groups + 1):
        members = order[group_of_sorted == g]
        if len(members):
            c = train_counts[members]
            bounds.append({"group": g, "items": int(len(members)), "events": int(c.sum()),
                           "min_count": int(c.min()), "max_count": int(c.max())})
    return groups, bounds

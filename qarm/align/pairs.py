"""Item2item pair mining for item alignment (QARM Sec. 3.2): two sources, one deduplicated union.

Source 1, ``user2item`` (:func:`mine_user2item_pairs`)
    For every training positive ``(user, target)``, the candidates are the user's latest ``history_len``
    training positives with a strictly smaller ``seq`` (``seq`` is the event's chronological position within
    the user, so a candidate is never at or after the target's time), other than the target item itself.
    The trigger is the candidate most similar to the target by cosine in the User2Item model's item
    embedding space; the pair is kept when that similarity is ``>= min_similarity``.
Source 2, ``swing`` (:func:`fit_swing`, :func:`swing_pairs`)
    Each item's top-N Swing neighbours, computed on the training positives.
Union (:func:`union_pairs`)
    ``(a, b)`` and ``(b, a)`` are one pair (contrastive alignment is symmetric), stored with
    ``trigger < target``; self-pairs are dropped; ``sources`` lists every source that produced the pair.

Leakage: both sources read only :func:`qarm.align.user2item.positive_events` of the ``train`` split, i.e.
the rows of :meth:`Dataset.training_mask` (no valid / test rows, no cold-start items) that are positives;
:func:`mine_pairs` also drops any pair touching a cold-start item (counted; 0 when the inputs are right).
:func:`split_pairs` holds out a seeded fraction of the pairs for early stopping / evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import pandas as pd

from qarm.align.swing import Swing
from qarm.align.user2item import cold_item_mask, gather_histories, history_windows, positive_events
from qarm.data import schema as S
from qarm.data.schema import Dataset
from qarm.errors import ConfigError, DataError

PAIR_COLUMNS = ["trigger", "target", "score", "source"]


@dataclass
class PairMiningConfig:
    """Parameters of :func:`mine_pairs`."""

    history_len: int = 50  # the paper's window: the trigger is among the latest 50 positives
    min_similarity: float = 0.5  # cosine in the User2Item item space; keeps about the closer half on MicroLens
    swing_alpha: float = 1.0  # Swing smoothing 1 / (alpha + overlap), the usual value
    swing_top_n: int = 50  # Swing neighbours per item
    swing_min_score: float = 0.0  # keep every Swing neighbour with a positive score
    swing_max_users_per_item: int | None = 500  # bounds the quadratic cost of very popular items
    holdout_fraction: float = 0.05  # pairs held out for early stopping / evaluation of the alignment
    label: str | None = None  # positive label column; None: the dataset's first label column
    seed: int = 0  # the hold-out draw (and the Swing cap when the data has no global clock)

    def __post_init__(self) -> None:
        name = type(self).__name__
        for param in ("history_len", "swing_top_n"):
            value = getattr(self, param)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"The '{param}' parameter of {name} must be an int >= 1. Got {value!r} instead.")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(
                f"The 'holdout_fraction' parameter of {name} must be in [0, 1). Got {self.holdout_fraction!r} instead."
            )
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(
                f"The 'min_similarity' parameter of {name} must be in [-1, 1]. Got {self.min_similarity!r} instead."
            )


def mine_user2item_pairs(
    dataset: Dataset,
    item_embeddings: np.ndarray,
    *,
    history_len: int = 50,
    min_similarity: float | None = 0.5,
    label: str | None = None,
    chunk_size: int = 4096,
) -> pd.DataFrame:
    """Source 1: the trigger of each training positive, by cosine similarity (see the module docstring).

    Parameters
    ----------
    dataset : Dataset
        A prepared dataset.
    item_embeddings : ndarray of shape (n_items, dim)
        Row ``i`` is item ``i`` (e.g. :func:`qarm.align.user2item.item_embeddings`); rows are normalised
        here, zero rows stay zero (similarity 0).
    history_len : int
        Candidates per target: the latest ``history_len`` earlier training positives.
    min_similarity : float or None
        Keep a pair when its cosine is ``>= min_similarity``; None keeps every target's best trigger.
    label : str, optional
        Positive label column (default: the dataset's first).
    chunk_size : int
        Targets scored at a time (memory ``chunk_size * history_len * dim`` float32).

    Returns
    -------
    DataFrame, one row per mined (user, target) event, in user then seq order
        ``trigger``, ``target`` (item ids), ``score`` (cosine, float32), ``source`` (``"user2item"``),
        ``user_id``, ``trigger_seq``, ``target_seq`` (``trigger_seq < target_seq`` always).
        Targets without an earlier candidate, or below the threshold, give no row.
    """
    if isinstance(history_len, bool) or not isinstance(history_len, Integral) or history_len < 1:
        raise ConfigError(f"The 'history_len' parameter of mine_user2item_pairs must be an int >= 1. "
                          f"Got {history_len!r} instead.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral) or chunk_size < 1:
        raise ConfigError(f"The 'chunk_size' parameter of mine_user2item_pairs must be an int >= 1. "
                          f"Got {chunk_size!r} instead.")
    if min_similarity is not None and (not isinstance(min_similarity, Real) or not -1.0 <= min_similarity <= 1.0):
        raise ConfigError(f"The 'min_similarity' parameter of mine_user2item_pairs must be in [-1, 1] or None. "
                          f"Got {min_similarity!r} instead.")
    vectors = _unit_rows(item_embeddings, dataset.n_items)
    events = positive_events(dataset, "train", label)
    start, end = history_windows(events, events.user_ids, events.seq, history_len)
    pad = dataset.n_items
    padded = np.vstack([vectors, np.zeros((1, vectors.shape[1]), dtype=np.float32)])  # row n_items = padding

    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (target position, trigger position, score)
    for lo in range(0, len(events), chunk_size):
        hi = min(lo + chunk_size, len(events))
        positions = end[lo:hi, None] - history_len + np.arange(history_len)  # (chunk, L) indices into events
        candidates = gather_histories(events.item_ids, start[lo:hi], end[lo:hi], history_len, pad)
        targets = events.item_ids[lo:hi]
        sims = np.einsum("cld,cd->cl", padded[candidates], vectors[targets])
        usable = (candidates != pad) & (candidates != targets[:, None])
        sims = np.where(usable, sims, -np.inf)
        best = sims.argmax(axis=1)
        score = sims[np.arange(hi - lo), best]
        keep = np.isfinite(score)
        if min_similarity is not None:
            keep &= score >= min_similarity
        rows = np.flatnonzero(keep)
        kept.append((lo + rows, positions[rows, best[rows]], score[rows]))

    target_pos = np.concatenate([k[0] for k in kept]) if kept else np.zeros(0, dtype=np.int64)
    trigger_pos = np.concatenate([k[1] for k in kept]) if kept else np.zeros(0, dtype=np.int64)
    scores = np.concatenate([k[2] for k in kept]).astype(np.float32) if kept else np.zeros(0, dtype=np.float32)
    return pd.DataFrame({
        "trigger": events.item_ids[trigger_pos],
        "target": events.item_ids[target_pos],
        "score": scores,
        "source": "user2item",
        "user_id": events.user_ids[target_pos],
        "trigger_seq": events.seq[trigger_pos],
        "target_seq": events.seq[target_pos],
    })


def fit_swing(
    dataset: Dataset,
    *,
    alpha: float = 1.0,
    top_n: int = 50,
    max_users_per_item: int | None = 500,
    label: str | None = None,
    random_state: int = 0,
) -> Swing:
    """Fit :class:`Swing` on the training positives (no valid / test rows, no cold-start items).

    The per-item cap keeps the most recent users when ``time`` is a global clock
    (``meta.time_unit == "seconds"``), otherwise a seeded random subset (``"order"`` time is per user).
    """
    events = positive_events(dataset, "train", label)
    time = None
    if dataset.meta.time_unit == "seconds":
        time = dataset.interactions[S.TIME].to_numpy()[events.rows]
    swing = Swing(alpha=alpha, top_n=top_n, max_users_per_item=max_users_per_item, random_state=random_state)
    return swing.fit(events.user_ids, events.item_ids, dataset.n_items, time=time)


def swing_pairs(swing: Swing, top_n: int | None = None, min_score: float = 0.0) -> pd.DataFrame:
    """Source 2: Swing neighbours as pairs.

    Parameters
    ----------
    swing : Swing
        Fitted (on training interactions only, e.g. by :func:`fit_swing`).
    top_n : int, optional
        Neighbours per item (default: all the fit kept).
    min_score : float
        Keep neighbours with ``score >= min_score``.

    Returns
    -------
    DataFrame ``trigger`` (item), ``target`` (neighbour), ``score`` (Swing, float32), ``source`` (``"swing"``).
        Both directions of a pair appear when each is in the other's top-N; :func:`union_pairs` merges them.
    """
    frame = swing.to_frame(min_score=min_score, top_n=top_n)
    return pd.DataFrame({
        "trigger": frame["item"].to_numpy(),
        "target": frame["neighbor"].to_numpy(),
        "score": frame["score"].to_numpy(dtype=np.float32),
        "source": "swing",
    })


def union_pairs(*frames: pd.DataFrame, sources: Sequence[str] = ()) -> pd.DataFrame:
    """Deduplicated, unordered union of pair frames.

    Parameters
    ----------
    *frames : DataFrame
        Each with ``trigger``, ``target``, ``score``, ``source`` (extra columns are ignored).
    sources : sequence of str
        Source names whose ``score_*`` / ``support_*`` columns must exist even when they produced no pair
        (names found in the frames are always included).

    Returns
    -------
    DataFrame, one row per unordered pair ``{a, b}``, ``a != b``, sorted by ``(trigger, target)``
        ``trigger`` = min(a, b), ``target`` = max(a, b); ``sources``: the sources that produced it, sorted and
        comma-joined (e.g. ``"swing,user2item"``); per source ``s``: ``score_s`` (the best score of ``s`` for the
        pair, NaN if ``s`` did not produce it) and ``support_s`` (rows of ``s`` merged into it: mined events
        for ``user2item``, directions for ``swing``).
    """
    parts = []
    for index, frame in enumerate(frames):
        missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(f"pair frame {index} lacks column(s) {missing}; expected {PAIR_COLUMNS}")
        parts.append(frame[PAIR_COLUMNS])
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PAIR_COLUMNS)
    trigger, target = rows["trigger"].to_numpy(np.int64), rows["target"].to_numpy(np.int64)
    keep = trigger != target
    rows = pd.DataFrame({
        "trigger": np.minimum(trigger, target)[keep],
        "target": np.maximum(trigger, target)[keep],
        "source": rows["source"].to_numpy()[keep],
        "score": rows["score"].to_numpy(np.float64)[keep],
    })
    names = sorted(set(rows["source"].astype(str)) | set(sources))
    per_source = rows.groupby(["trigger", "target", "source"], sort=True).agg(
        score=("score", "max"), support=("score", "size")
    )
    pair_index = per_source.index.droplevel("source").unique()
    scores = per_source["score"].unstack("source").reindex(index=pair_index, columns=names)
    support = per_source["support"].unstack("source").reindex(index=pair_index, columns=names)
    out = pd.DataFrame({
        "trigger": pair_index.get_level_values(0).to_numpy(np.int64),
        "target": pair_index.get_level_values(1).to_numpy(np.int64),
    })
    joined = np.full(len(out), "", dtype=object)
    for name in names:
        present = scores[name].notna().to_numpy()
        joined = np.where(present, np.where(joined == "", name, joined + "," + name), joined)
    out["sources"] = joined
    for name in names:
        out[f"score_{name}"] = scores[name].to_numpy(np.float32)
        out[f"support_{name}"] = support[name].fillna(0).to_numpy(np.int64)
    return out


def split_pairs(
    pairs: pd.DataFrame, holdout_fraction: float = 0.05, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``round(holdout_fraction * len(pairs))`` pairs drawn at random (seeded), by pair.

    Returns
    -------
    train, holdout : DataFrame
        Disjoint, in the input's row order, indexes reset.
    """
    if not (isinstance(holdout_fraction, Real) and 0.0 <= holdout_fraction < 1.0):
        raise ConfigError(f"The 'holdout_fraction' parameter of split_pairs must be in [0, 1). "
                          f"Got {holdout_fraction!r} instead.")
    n_holdout = int(round(holdout_fraction * len(pairs)))
    held = np.zeros(len(pairs), dtype=bool)
    held[np.random.default_rng(seed).permutation(len(pairs))[:n_holdout]] = True
    return pairs[~held].reset_index(drop=True), pairs[held].reset_index(drop=True)


@dataclass
class MinedPairs:
    """What :func:`mine_pairs` returns.

    Attributes
    ----------
    pairs : DataFrame
        The deduplicated union (columns of :func:`union_pairs`), cold-start items removed.
    train, holdout : DataFrame
        :func:`split_pairs` of ``pairs``: the hold-out is for early stopping / evaluating the alignment.
    user2item_events : DataFrame
        The raw rows of :func:`mine_user2item_pairs` (one per mined training event), for inspection.
    counts : dict
        ``user2item_events`` (mined rows), ``user2item_pairs`` / ``swing_pairs`` (distinct unordered pairs
        per source), ``both``, ``union``, ``cold_pairs_dropped``, ``train``, ``holdout``.
    seconds : dict
        Wall time of ``user2item``, ``swing`` and ``union``.
    """

    pairs: pd.DataFrame
    train: pd.DataFrame
    holdout: pd.DataFrame
    user2item_events: pd.DataFrame
    counts: dict[str, int]
    seconds: dict[str, float]


def mine_pairs(
    dataset: Dataset, item_embeddings: np.ndarray, config: PairMiningConfig | None = None
) -> MinedPairs:
    """Both sources, their union, and the hold-out split.

    Parameters
    ----------
    dataset : Dataset
        A prepared dataset.
    item_embeddings : ndarray of shape (n_items, dim)
        The User2Item model's item embeddings (:func:`qarm.align.user2item.item_embeddings`).
    config : PairMiningConfig, optional

    Returns
    -------
    MinedPairs
    """
    config = config or PairMiningConfig()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    mined = mine_user2item_pairs(dataset, item_embeddings, history_len=config.history_len,
                                 min_similarity=config.min_similarity, label=config.label)
    seconds["user2item"] = time.perf_counter() - start
    start = time.perf_counter()
    swing = fit_swing(dataset, alpha=config.swing_alpha, top_n=config.swing_top_n,
                      max_users_per_item=config.swing_max_users_per_item, label=config.label,
                      random_state=config.seed)
    swing_frame = swing_pairs(swing, min_score=config.swing_min_score)
    seconds["swing"] = time.perf_counter() - start
    start = time.perf_counter()
    union = union_pairs(mined, swing_frame, sources=("swing", "user2item"))
    cold = cold_item_mask(dataset)
    touches_cold = cold[union["trigger"].to_numpy()] | cold[union["target"].to_numpy()]
    union = union[~touches_cold].reset_index(drop=True)
    train, holdout = split_pairs(union, config.holdout_fraction, config.seed)
    seconds["union"] = time.perf_counter() - start
    sources = union["sources"].to_numpy(dtype=str) if len(union) else np.zeros(0, dtype=str)
    from_u2i = np.char.find(sources, "user2item") >= 0
    from_swing = np.char.find(sources, "swing") >= 0
    counts = {
        "user2item_events": int(len(mined)),
        "user2item_pairs": int(from_u2i.sum()),
        "swing_pairs": int(from_swing.sum()),
        "both": int((from_u2i & from_swing).sum()),
        "union": int(len(union)),
        "cold_pairs_dropped": int(touches_cold.sum()),
        "train": int(len(train)),
        "holdout": int(len(holdout)),
    }
    return MinedPairs(pairs=union, train=train, holdout=holdout, user2item_events=mined, counts=counts,
                      seconds=seconds)


def _unit_rows(item_embeddings: np.ndarray, n_items: int) -> np.ndarray:
    vectors = np.asarray(item_embeddings, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != n_items:
        raise DataError(f"item_embeddings must be (n_items, dim) = ({n_items}, dim), got {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise DataError("item_embeddings hold NaN or infinite values",
                        ids=np.flatnonzero(~np.isfinite(vectors).all(axis=1)))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)

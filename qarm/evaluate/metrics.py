"""Ranking metrics for click-through style tasks: AUC, UAUC, GAUC and log loss, overall and by segment.

All AUCs are computed from ranks, without a Python loop over users: within a group, with average ranks
for tied scores,

    AUC = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)

which is the Mann-Whitney U statistic divided by the number of (positive, negative) pairs: the share of
pairs the model orders correctly, a tied pair counting one half. That is exactly what
``sklearn.metrics.roc_auc_score`` returns (its trapezoidal ROC area gives tied pairs one half too).
Per-group AUCs come from one ``np.lexsort`` by (group, score) for all groups at once.

* :func:`auc`: one AUC over all rows.
* :func:`grouped_auc`: one AUC per group (per user), for the groups that hold both classes.
* :func:`uauc`: the unweighted mean of the per-user AUCs.
* :func:`gauc`: the per-user AUCs weighted by each user's number of examples.
* :func:`logloss`: binary cross-entropy of probabilities, clipped to ``[eps, 1 - eps]``.
* :func:`evaluate_predictions`: all of the above per task, overall, on cold-start items and per long-tail
  group ``L1 .. Ln``, as a JSON-ready dict (a *report*).
* :func:`compare`: the difference of two reports in points (x100), for ablation tables.

An AUC is undefined when its rows hold only one class. The functions then return NaN rather than raise,
so that one empty segment (no cold-start positives in a small test split, say) does not stop a whole
report; the report's counts (``n_pos``, ``users_with_both_classes``) show why a value is missing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from qarm.data import schema as S
from qarm.errors import ConfigError, DataError

# The metrics of a report segment that are scores (compared and tabulated), and the counts beside them.
SCORE_METRICS = ("auc", "uauc", "gauc", "logloss")
COUNT_FIELDS = ("n", "n_pos", "n_users", "users_with_both_classes")
# Beside each segment's log loss: the log loss of always predicting the segment's own positive rate.
CONSTANT_LOGLOSS = "constant_logloss"
OVERALL = "overall"
WARM = "warm"
COLD_START = "cold_start"
LABEL_PREFIX = "label_"
SCORE_PREFIX = "score_"


class GroupedAUC(NamedTuple):
    """Per-group AUCs, for the groups whose rows hold both classes (the others have no AUC).

    Attributes
    ----------
    groups : (n_used,) array of the group keys (user ids), ascending.
    auc : (n_used,) float64 array, the AUC of each group, in [0, 1].
    counts : (n_used,) int64 array, each group's number of rows (examples).
    n_positive : (n_used,) int64 array, each group's number of positive rows.
    n_groups : int, the number of distinct groups in the input, including those left out.
    """

    groups: np.ndarray
    auc: np.ndarray
    counts: np.ndarray
    n_positive: np.ndarray
    n_groups: int

    @property
    def n_used(self) -> int:
        """The number of groups that hold both classes (and so have an AUC)."""
        return len(self.auc)

    @property
    def gauc(self) -> float:
        """The per-group AUCs averaged with each group's row count as the weight (:func:`gauc`); NaN when
        no group holds both classes."""
        return float(np.average(self.auc, weights=self.counts)) if self.n_used else float("nan")


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """``labels`` as a 1-D float64 array of 0.0 / 1.0; anything else is a DataError naming the values."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise DataError(f"{name} must be a 1-D array, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.float64)
    if not (np.issubdtype(array.dtype, np.number)):
        raise DataError(f"{name} must be numeric 0/1 (or bool), got dtype {array.dtype}")
    values = array.astype(np.float64)
    bad = ~((values == 0.0) | (values == 1.0))  # NaN fails both comparisons
    if bad.any():
        raise DataError(f"{name} must hold only 0 and 1 ({int(bad.sum())} rows do not)",
                        ids=pd.unique(values[bad]))
    return values


def _check_scores(scores: Any, n: int, name: str = "scores", labels_name: str = "labels") -> np.ndarray:
    """``scores`` as a 1-D finite float64 array of length ``n``."""
    array = np.asarray(scores)
    if array.ndim != 1:
        raise DataError(f"{name} must be a 1-D array, got shape {array.shape}")
    if len(array) != n:
        raise DataError(f"{labels_name} and {name} must have the same length, got {n} and {len(array)}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(f"{name} must be numeric, got dtype {array.dtype}")
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        raise DataError(f"{name} holds NaN or infinite values ({int((~finite).sum())} rows)",
                        ids=np.flatnonzero(~finite))
    return values


def _group_codes(groups: Any, n: int, name: str = "groups", labels_name: str = "labels"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes ``0..k-1`` for the group keys (ascending keys), and the keys."""
    array = np.asarray(groups)
    if array.ndim != 1:
        raise DataError(f"{name} must be a 1-D array, got shape {array.shape}")
    if len(array) != n:
        raise DataError(f"{labels_name} and {name} must have the same length, got {n} and {len(array)}")
    codes, keys = pd.factorize(array, sort=True)
    if (codes < 0).any():
        raise DataError(f"{name} holds missing values ({int((codes < 0).sum())} rows)",
                        ids=np.flatnonzero(codes < 0))
    return codes.astype(np.int64, copy=False), np.asarray(keys)


# --------------------------------------------------------------------------------------------------
# The rank-based core


def _rank_auc(labels: np.ndarray, scores: np.ndarray, codes: np.ndarray, n_groups: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC of every group at once, from average ranks within each group.

    Parameters
    ----------
    labels : (n,) float64 array of 0/1.
    scores : (n,) finite float64 array.
    codes : (n,) int64 array of group codes in ``[0, n_groups)``.
    n_groups : the number of groups.

    Returns
    -------
    auc : (n_groups,) float64, NaN where a group lacks positives or negatives (or rows).
    counts : (n_groups,) int64, rows per group.
    n_pos : (n_groups,) int64, positive rows per group.
    """
    counts = np.bincount(codes, minlength=n_groups).astype(np.int64)
    n_pos_f = np.bincount(codes, weights=labels, minlength=n_groups)
    auc = np.full(n_groups, np.nan)
    if len(labels) == 0:
        return auc, counts, n_pos_f.astype(np.int64)

    # Sort by group, then score: each group is one contiguous block, ascending in score.
    order = np.lexsort((scores, codes))
    c, s, y = codes[order], scores[order], labels[order]
    # A tie run is a maximal stretch of equal scores inside one group; its rows share the mean position.
    new_run = np.ones(len(s), dtype=bool)
    new_run[1:] = (c[1:] != c[:-1]) | (s[1:] != s[:-1])
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], len(s)) - 1
    mean_position = (run_start + run_end) / 2.0  # 0-based positions in the sorted array
    group_start = np.cumsum(counts) - counts
    rank = mean_position[np.cumsum(new_run) - 1] - group_start[c] + 1.0  # 1-based within the group

    positive_rank_sum = np.bincount(c, weights=rank * y, minlength=n_groups)
    n_neg_f = counts - n_pos_f
    both = (n_pos_f > 0) & (n_neg_f > 0)
    auc[both] = (positive_rank_sum[both] - n_pos_f[both] * (n_pos_f[both] + 1.0) / 2.0) / (
        n_pos_f[both] * n_neg_f[both])
    return auc, counts, np.rint(n_pos_f).astype(np.int64)


def _grouped_from_codes(labels: np.ndarray, scores: np.ndarray, codes: np.ndarray, keys: np.ndarray
                        ) -> GroupedAUC:
    """:class:`GroupedAUC` from checked arrays; groups without rows in ``codes`` count as absent."""
    values, counts, n_pos = _rank_auc(labels, scores, codes, len(keys))
    used = ~np.isnan(values)
    return GroupedAUC(groups=keys[used], auc=values[used], counts=counts[used], n_positive=n_pos[used],
                      n_groups=int((counts > 0).sum()))


def _uauc_of(grouped: GroupedAUC) -> float:
    return float(grouped.auc.mean()) if grouped.n_used else float("nan")


# --------------------------------------------------------------------------------------------------
# Public metrics


def auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of ``scores`` against binary ``labels``.

    Parameters
    ----------
    labels : (n,) array of 0/1 (int, float or bool).
    scores : (n,) finite float array; any monotone scale (probabilities, logits) gives the same AUC.

    Returns
    -------
    float in [0, 1]: the share of (positive, negative) pairs in which the positive scores higher, tied
    pairs counting one half (equal to ``sklearn.metrics.roc_auc_score``). NaN when the rows hold no
    positive or no negative (the AUC is then undefined).

    Raises
    ------
    DataError
        If the arrays are not 1-D, their lengths differ, a label is not 0/1, or a score is NaN or infinite.
    """
    y = _check_labels(labels)
    s = _check_scores(scores, len(y))
    values, _, _ = _rank_auc(y, s, np.zeros(len(y), dtype=np.int64), 1)
    return float(values[0])


def grouped_auc(labels: Any, scores: Any, groups: Any) -> GroupedAUC:
    """The AUC within each group (typically each user), for every group that holds both classes.

    Parameters
    ----------
    labels : (n,) array of 0/1.
    scores : (n,) finite float array.
    groups : (n,) array of group keys (user ids; any sortable values, no missing ones).

    Returns
    -------
    :class:`GroupedAUC`: the keys, AUCs, row counts and positive counts of the groups with both classes,
    in ascending key order, and ``n_groups``, the number of distinct groups including those left out
    (a group with only positives or only negatives has no AUC).
    """
    y = _check_labels(labels)
    s = _check_scores(scores, len(y))
    codes, keys = _group_codes(groups, len(y))
    return _grouped_from_codes(y, s, codes, keys)


def uauc(labels: Any, scores: Any, users: Any) -> float:
    """User AUC: the unweighted mean of the per-user AUCs over the users that hold both classes.

    Every such user counts the same, however many examples they have. Users with only positives or only
    negatives are left out (their AUC is undefined); NaN when no user has both classes. Use
    :func:`grouped_auc` to see how many users were used.

    Parameters
    ----------
    labels : (n,) array of 0/1.
    scores : (n,) finite float array.
    users : (n,) array of user ids.
    """
    return _uauc_of(grouped_auc(labels, scores, users))


def gauc(labels: Any, scores: Any, users: Any) -> float:
    """Group AUC: the per-user AUCs averaged with each user's number of examples as the weight.

    ``GAUC = sum_u n_u AUC_u / sum_u n_u`` over the users that hold both classes, where ``n_u`` is the
    number of rows (examples, positives and negatives together) of user ``u``; users with one class only
    are left out of both sums. NaN when no user has both classes.

    Weighting by examples follows the ranking literature that evaluates on logged impressions, where a
    user's rows *are* their impressions. A common alternative (Zhou et al., DIN, KDD 2018) weights by
    each user's impressions or clicks (``n_pos`` per user, when the negatives are sampled rather than
    logged, so that the number of negatives is an arbitrary choice); compute it from
    :func:`grouped_auc` as ``np.average(g.auc, weights=g.n_positive)``.

    Parameters
    ----------
    labels : (n,) array of 0/1.
    scores : (n,) finite float array.
    users : (n,) array of user ids.
    """
    return grouped_auc(labels, scores, users).gauc


def logloss(labels: Any, probs: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy ``-mean(y log p + (1 - y) log(1 - p))``, in nats.

    Parameters
    ----------
    labels : (n,) array of 0/1.
    probs : (n,) array of predicted probabilities of the positive class, in [0, 1] (not logits).
    eps : probabilities are clipped to ``[eps, 1 - eps]`` so that a confident miss costs ``-log(eps)``
        (16.1 nats for 1e-7) instead of infinity.

    Returns
    -------
    float; NaN for empty input. Equal to ``sklearn.metrics.log_loss`` when no probability is clipped.
    """
    if not (isinstance(eps, (float, int)) and not isinstance(eps, bool) and 0.0 < eps < 0.5):
        raise ConfigError(f"The 'eps' parameter of logloss must be a float in (0, 0.5). Got {eps!r} instead.")
    y = _check_labels(labels)
    p = _check_probs(_check_scores(probs, len(y), name="probs"), name="probs")
    return _logloss(y, p, eps)


def _check_probs(p: np.ndarray, name: str) -> np.ndarray:
    outside = (p < 0.0) | (p > 1.0)
    if outside.any():
        raise DataError(f"{name} must be probabilities in [0, 1], not logits ({int(outside.sum())} rows "
                        "outside)", ids=p[outside])
    return p


def _logloss(y: np.ndarray, p: np.ndarray, eps: float) -> float:
    """Log loss of checked arrays (labels 0/1, probabilities in [0, 1])."""
    if len(y) == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


# --------------------------------------------------------------------------------------------------
# Reports


def evaluate_predictions(frame: pd.DataFrame, tasks: Sequence[str], *, n_longtail_groups: int = 6,
                         eps: float = 1e-7) -> dict[str, dict[str, dict[str, Any]]]:
    """Every metric of every task, overall, on cold-start items and per long-tail group.

    Parameters
    ----------
    frame : DataFrame, one row per (user, item) example, with columns ``user_id``,
        ``cold_item`` (bool: the item is held out as cold-start), ``longtail_group`` (int: 0 for items
        without training events, 1..n_longtail_groups from the rarest to the most frequent items), and
        per task ``label_<task>`` (0/1) and ``score_<task>`` (predicted probability in [0, 1]). Other
        columns (``item_id``, ``split`` ...) are ignored; select the split to evaluate beforehand.
    tasks : task names, e.g. ``["click", "like"]``.
    n_longtail_groups : the number of long-tail groups (the split's ``n_longtail_groups``; the paper's
        Table 5 uses six). Every group gets a segment, empty ones with NaN metrics and zero counts.
    eps : clipping of the probabilities in :func:`logloss`.

    Returns
    -------
    A report: ``{task: {segment: metrics}}`` with segments ``"overall"``, ``"warm"`` (rows whose item is
    not cold-start), ``"cold_start"`` (rows whose item is cold) and ``"L1" .. "Ln"`` (rows whose item's
    ``longtail_group`` is 1..n; group 0 holds the items without training events, which the cold-start
    segment covers). ``metrics`` is::

        {"auc", "uauc", "gauc", "logloss": float (NaN where undefined),
         "constant_logloss": the log loss of always predicting the segment's positive rate (the best
             constant in hindsight; a model above it is worse than no model),
         "n": rows, "n_pos": positive rows, "n_users": users with rows in the segment,
         "users_with_both_classes": users that enter UAUC and GAUC}

    Plain Python floats and ints only (no numpy types), ready for ``json.dumps``.
    """
    if isinstance(n_longtail_groups, bool) or not isinstance(n_longtail_groups, (int, np.integer)) \
            or n_longtail_groups < 0:
        raise ConfigError("The 'n_longtail_groups' parameter of evaluate_predictions must be an int >= 0. "
                          f"Got {n_longtail_groups!r} instead.")
    tasks = _check_tasks(tasks)
    required = [S.USER_ID, S.COLD_ITEM, S.LONGTAIL_GROUP]
    required += [f"{prefix}{t}" for t in tasks for prefix in (LABEL_PREFIX, SCORE_PREFIX)]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"predictions lack the columns {missing}; they have {list(frame.columns)}")

    n = len(frame)
    codes, keys = _group_codes(frame[S.USER_ID].to_numpy(), n, name=S.USER_ID, labels_name="rows")
    cold = _check_cold(frame[S.COLD_ITEM])
    segments = {OVERALL: np.ones(n, dtype=bool), WARM: ~cold, COLD_START: cold}
    groups = _check_longtail(frame[S.LONGTAIL_GROUP], n_longtail_groups)
    for g in range(1, n_longtail_groups + 1):
        segments[f"L{g}"] = groups == g

    report: dict[str, dict[str, dict[str, Any]]] = {}
    for task in tasks:
        label_name, score_name = f"{LABEL_PREFIX}{task}", f"{SCORE_PREFIX}{task}"
        y = _check_labels(frame[label_name].to_numpy(), name=label_name)
        p = _check_probs(_check_scores(frame[score_name].to_numpy(), n, name=score_name,
                                       labels_name=label_name), name=score_name)
        report[task] = {name: _segment_metrics(y[mask], p[mask], codes[mask], keys, eps)
                        for name, mask in segments.items()}
    return report


def _segment_metrics(y: np.ndarray, p: np.ndarray, codes: np.ndarray, keys: np.ndarray, eps: float
                     ) -> dict[str, Any]:
    overall, _, _ = _rank_auc(y, p, np.zeros(len(y), dtype=np.int64), 1)
    grouped = _grouped_from_codes(y, p, codes, keys)
    return {
        "auc": float(overall[0]),
        "uauc": _uauc_of(grouped),
        "gauc": grouped.gauc,
        "logloss": _logloss(y, p, eps),
        CONSTANT_LOGLOSS: _logloss(y, np.full(len(y), y.mean()), eps) if len(y) else float("nan"),
        "n": int(len(y)),
        "n_pos": int(y.sum()),
        "n_users": grouped.n_groups,
        "users_with_both_classes": grouped.n_used,
    }


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks) or not len(tasks):
        raise ConfigError("The 'tasks' parameter of evaluate_predictions must be a non-empty list of task "
                          f"names. Got {tasks!r} instead.")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"The 'tasks' parameter of evaluate_predictions holds duplicates. Got {tasks!r}.")
    return list(tasks)


def _check_cold(column: pd.Series) -> np.ndarray:
    values = column.to_numpy()
    if values.dtype == bool:
        return values
    if column.isna().any() or not column.isin([0, 1]).all():
        raise DataError("must be bool (or 0/1) without missing values", column=S.COLD_ITEM,
                        ids=pd.unique(values[~column.isin([0, 1]).to_numpy()]))
    return values.astype(bool)


def _check_longtail(column: pd.Series, n_groups: int) -> np.ndarray:
    if column.isna().any() or not pd.api.types.is_integer_dtype(column.dtype):
        raise DataError(f"must be integers 0..{n_groups} without missing values, got dtype {column.dtype}",
                        column=S.LONGTAIL_GROUP)
    values = column.to_numpy()
    bad = (values < 0) | (values > n_groups)
    if bad.any():
        raise DataError(f"must lie in 0..{n_groups} (n_longtail_groups={n_groups})",
                        column=S.LONGTAIL_GROUP, ids=pd.unique(values[bad]))
    return values


def compare(report_a: Mapping[str, Any], report_b: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The change from ``report_a`` to ``report_b``, in points: ``100 * (b - a)`` per metric and segment.

    Parameters
    ----------
    report_a, report_b : outputs of :func:`evaluate_predictions` (or of
        :func:`qarm.evaluate.report.aggregate_seeds`, whose means are compared) over the same tasks and
        segments; ``a`` is the baseline.

    Returns
    -------
    ``{task: {segment: {"auc": ..., "uauc": ..., "gauc": ..., "logloss": ...}}}``. For the AUCs a positive
    value is a gain (+0.35 = 0.35 percentage points); for ``logloss`` lower is better, so a negative
    value is the gain. NaN where either side is NaN.
    """
    if set(report_a) != set(report_b):
        raise DataError(f"the reports cover different tasks: {sorted(report_a)} vs {sorted(report_b)}")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task, segments_a in report_a.items():
        segments_b = report_b[task]
        if set(segments_a) != set(segments_b):
            raise DataError(f"task '{task}': the reports cover different segments: {list(segments_a)} vs "
                            f"{list(segments_b)}")
        out[task] = {
            segment: {m: 100.0 * (as_float(segments_b[segment].get(m)) - as_float(metrics.get(m)))
                      for m in SCORE_METRICS}
            for segment, metrics in segments_a.items()
        }
    return out


def as_float(value: Any) -> float:
    """A report value as a float: ``None`` (JSON ``null``, an undefined metric read back) becomes NaN."""
    return float("nan") if value is None else float(value)

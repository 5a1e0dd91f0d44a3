"""A model-free leakage probe for a prepared dataset: can a per-item score learnt from training rows alone
rank the evaluation rows?

With sampled negatives, an item's labels in the evaluation rows should not be predictable from how the
sampler treated it in the training rows. Two scores, learnt from the rows a model trains on
(:meth:`Dataset.training_mask`) and nothing else, are ranked against the valid and test rows by GAUC
(per-user AUC weighted by the user's rows, :func:`qarm.evaluate.metrics.gauc`):

* ``item_ratio``: ``log((positives + 1) / (negatives + 1))`` of the item in the training rows, the score
  that caught negatives drawn with whole-log counts (an item that later becomes a test positive got extra
  *training* negatives, so the score ranked the test rows at GAUC 28.6 on MicroLens-50k);
* ``popularity``: the item's number of training positives.

For sampled negatives both should sit near 50; the probe warns when one leaves ``BAND`` (45..55).
Popularity may also leave it for a real reason (what is popular drifts between the training period and
the test period): the probe says what it sees, the reader judges. With real negatives (exposures that
were not clicked) an item's training click rate is a legitimate signal, so the band does not apply and
no warning is given.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qarm.data import schema as S
from qarm.data.describe import describe_dataset
from qarm.data.schema import Dataset
from qarm.evaluate.metrics import grouped_auc

BAND = (45.0, 55.0)  # GAUC in percent: outside it the sampler (or the split) tells labels apart
SCORES = ("item_ratio", "popularity")
EVAL_SPLITS = ("valid", "test")


def item_scores(dataset: Dataset, label: str) -> dict[str, np.ndarray]:
    """The probe's per-item scores, learnt from the training rows only."""
    inter = dataset.interactions
    train = dataset.training_mask()
    items = inter[S.ITEM_ID].to_numpy()[train]
    y = inter[label].to_numpy()[train].astype(np.float64) > 0
    positives = np.bincount(items[y], minlength=dataset.n_items).astype(np.float64)
    negatives = np.bincount(items[~y], minlength=dataset.n_items).astype(np.float64)
    return {"item_ratio": np.log((positives + 1.0) / (negatives + 1.0)), "popularity": positives}


def leakage_probe(dataset: Dataset, label: str | None = None) -> dict[str, Any]:
    """GAUC (percent) of each probe score on the valid and test rows, and the warnings.

    Returns ``{"label", "sampled_negatives": bool, "band": [45, 55], "gauc": {score: {split: value}},
    "users": {split: users with both classes}, "warnings": [str, ...]}``. A split without rows (or
    without users holding both classes) gets ``None``.
    """
    if not dataset.is_prepared:
        raise ValueError("the leakage probe needs a prepared dataset (split and negatives); run qarm data prepare")
    label = label or dataset.meta.label_columns[0]
    inter = dataset.interactions
    sampled = bool(S.SAMPLED_NEGATIVE in inter.columns and inter[S.SAMPLED_NEGATIVE].any())
    scores = item_scores(dataset, label)
    split = inter[S.SPLIT].astype(str).to_numpy()
    items, users = inter[S.ITEM_ID].to_numpy(), inter[S.USER_ID].to_numpy()
    labels = (inter[label].to_numpy() > 0).astype(np.int8)
    out: dict[str, Any] = {"label": label, "sampled_negatives": sampled, "band": list(BAND),
                           "gauc": {name: {} for name in SCORES}, "users": {}, "warnings": []}
    for part in EVAL_SPLITS:
        rows = split == part
        for name in SCORES:
            value = None
            if rows.any():
                probe = scores[name][items[rows]]
                grouped = grouped_auc(labels[rows], probe, users[rows])
                used = grouped.n_used
                if used:
                    value = 100.0 * grouped.gauc
                out["users"][part] = used
            out["gauc"][name][part] = value
            if sampled and value is not None and not BAND[0] <= value <= BAND[1]:
                out["warnings"].append(
                    f"leakage probe: the per-item '{name}' score learnt from training rows ranks the {part} rows at "
                    f"GAUC {value:.1f} (chance 50, band {BAND[0]:g}..{BAND[1]:g}): the sampled negatives (or the "
                    "split) let an item's identity alone tell labels apart" +
                    ("; popularity may also drift between training and evaluation periods"
                     if name == "popularity" else ""))
    return out


def describe_with_probe(dataset: Dataset) -> dict[str, Any]:
    """:func:`qarm.data.describe.describe_dataset`, plus ``leakage_probe`` for a prepared dataset
    (what ``qarm data describe`` and ``qarm run`` report)."""
    stats = describe_dataset(dataset)
    if dataset.is_prepared and dataset.meta.label_columns:
        stats["leakage_probe"] = leakage_probe(dataset)
    return stats

"""How good are item vectors at what alignment is for?

* :func:`pair_recall`: for each held-out (trigger, target) pair, the rank of the target among *all*
  items by cosine to the trigger; Recall@K = share of pairs with rank < K (the paper's item2item view).
* :func:`business_rank_correlation`: on synthetic data, Spearman's rho between vector cosine and the
  generator's ground-truth business similarity over random item pairs (alignment must raise it).
* :func:`plot_tsne`: t-SNE maps of two vector sets of the same items side by side (pre-trained vs
  aligned), coloured by a label (category, business group), written as a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qarm.align.contrastive import check_pairs, target_ranks
from qarm.data.io import atomic_write_bytes
from qarm.errors import ConfigError, DataError


def _unit(vectors: np.ndarray, name: str = "vectors") -> torch.Tensor:
    array = np.asarray(vectors)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{name} must be a float (n_items, dim) array, got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), dim=1)


def pair_recall(
    vectors: np.ndarray,
    pairs: pd.DataFrame,
    ks: Sequence[int] = (10, 50),
    *,
    exclude_self: bool = True,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K of held-out pairs, ranking the target among all items by cosine to the trigger.

    Parameters
    ----------
    vectors : (n_items, dim) float array, row = item id (normalised here; any scale is fine).
    pairs : DataFrame with int columns ``trigger`` and ``target`` (self-pairs dropped).
    ks : cut-offs K.
    exclude_self : leave the trigger out of its own ranking (it would always be first).
    chunk_size : triggers scored at a time (memory: chunk_size x n_items floats, at most 256 MiB).

    Returns
    -------
    ``{"recall@10": ..., "recall@50": ..., "mrr": ..., "n_pairs": ...}``. Rank is the number of other
    items scoring at least as high as the target (ties count against it), so Recall@K is the share of
    pairs with rank < K; ``mrr`` is the mean of ``1 / (rank + 1)``.
    """
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ConfigError(f"The 'ks' parameter of pair_recall must be ints >= 1. Got {ks!r} instead.")
    unit = _unit(vectors)
    trigger, target = check_pairs(pairs, unit.shape[0], name="pairs")
    n = len(trigger)
    if n == 0:
        return {f"recall@{k}": float("nan") for k in ks} | {"mrr": float("nan"), "n_pairs": 0}
    ranks = target_ranks(unit, torch.from_numpy(trigger), torch.from_numpy(target), exclude_self=exclude_self,
                         block=chunk_size).numpy()
    out = {f"recall@{k}": float((ranks < k).mean()) for k in ks}
    return out | {"mrr": float((1.0 / (ranks + 1)).mean()), "n_pairs": int(n)}


def business_rank_correlation(
    vectors: np.ndarray,
    gt_items: pd.DataFrame,
    n_pairs: int = 20_000,
    seed: int = 0,
) -> float:
    """Spearman's rho between cosine(vectors) and ground-truth business similarity on random pairs.

    Parameters
    ----------
    vectors : (n_items, dim) float array, row = item id.
    gt_items : ``dataset.ground_truth["items"]`` of a synthetic dataset (``load_dataset(...,
        ground_truth=True)``), with business vector columns ``b0..b{d-1}`` and row = item id.
    n_pairs : random pairs of distinct items, drawn uniformly with ``seed``.
    """
    from scipy.stats import spearmanr

    from qarm.data.synthetic import business_similarity, business_vectors

    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 2:
        raise ConfigError(f"The 'n_pairs' parameter of business_rank_correlation must be an int >= 2. "
                          f"Got {n_pairs!r} instead.")
    unit = _unit(vectors).numpy()
    n_items = unit.shape[0]
    truth_shape = business_vectors(gt_items).shape
    if truth_shape[0] != n_items or truth_shape[1] == 0:
        raise DataError(f"gt_items must have one row per item ({n_items}) and columns b0..b{{d-1}}; got "
                        f"{len(gt_items)} rows and columns {list(gt_items.columns)[:10]}")
    if n_items < 2:
        raise DataError("business_rank_correlation needs at least 2 items")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n_items, n_pairs)
    b = (a + rng.integers(1, n_items, n_pairs)) % n_items  # uniform over the other items
    cosine = np.einsum("nd,nd->n", unit[a], unit[b])
    truth = business_similarity(gt_items, a, b)
    return float(spearmanr(cosine, truth).statistic)


def plot_tsne(
    vectors_before: np.ndarray,
    vectors_after: np.ndarray,
    labels: Sequence[object] | np.ndarray,
    path: str | Path,
    *,
    sample: int = 2000,
    seed: int = 0,
    titles: tuple[str, str] = ("pre-trained", "aligned"),
    label_name: str = "label",
    threads: int | None = 1,
) -> Path:
    """Two t-SNE panels (the same ``sample`` items, cosine metric) coloured by ``labels``; PNG at ``path``.

    ``labels`` has one entry per item (category, business group). At most 20 distinct labels get their
    own colour (the most frequent); the rest are drawn grey as "other". Written atomically.
    ``threads`` caps the OpenMP / BLAS threads of the t-SNE (``None``: no cap). One by default: on a
    busy 2-core machine, spinning OpenMP threads made a 45-point t-SNE take 30 s instead of 0.2 s;
    2,000 points take ~14 s on one thread.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas by default
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    before, after = np.asarray(vectors_before, np.float32), np.asarray(vectors_after, np.float32)
    labels = np.asarray(labels)
    if before.ndim != 2 or after.ndim != 2 or len(before) != len(after) or len(labels) != len(before):
        raise DataError(f"vectors_before {before.shape}, vectors_after {after.shape} and labels "
                        f"{labels.shape} must describe the same items")
    if len(before) < 5:
        raise DataError(f"plot_tsne needs at least 5 items, got {len(before)}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(before))[: min(sample, len(before))])
    perplexity = float(min(30.0, (len(rows) - 1) / 3))
    values, counts = np.unique(labels[rows].astype(str), return_counts=True)
    shown = list(values[np.argsort(-counts, kind="stable")][:20])
    fig = Figure(figsize=(13, 6), dpi=110)
    axes = fig.subplots(1, 2)
    for ax, vectors, title in zip(axes, (before, after), titles):
        with threadpool_limits(threads):
            xy = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed
                      ).fit_transform(vectors[rows])
        point_labels = labels[rows].astype(str)
        other = ~np.isin(point_labels, shown)
        ax.scatter(xy[other, 0], xy[other, 1], s=4, c="lightgrey", label="other" if other.any() else None)
        cmap = colormaps["tab20"]
        for i, value in enumerate(shown):
            mask = point_labels == value
            ax.scatter(xy[mask, 0], xy[mask, 1], s=4, color=cmap(i % 20), label=value)
        ax.set_title(f"{title} ({len(rows)} items)")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", title=label_name, fontsize=7, markerscale=3)
    fig.subplots_adjust(left=0.02, right=0.84, wspace=0.05)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path

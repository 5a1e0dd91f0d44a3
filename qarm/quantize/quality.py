"""Code quality: how well RQ and VQ codes use their codebooks and keep items apart.

Every function returns a JSON-ready dict; :func:`render_markdown` turns a report into tables.

RQ, per level ``l`` (1-based):

* ``utilisation`` = distinct codes used / codebook size;
* ``entropy_bits`` = ``-sum_j p_j log2 p_j`` of the level's code distribution, at most
  ``log2(codebook_size)``; ``perplexity`` = ``2 ** entropy_bits`` (the number of equally used codes
  that would give the same entropy);
* ``mse`` = mean over items and dimensions of ``(x - x_hat_l)^2``, where ``x_hat_l`` sums the chosen
  centroids of levels ``1..l``; ``relative_error`` = ``sum ||x - x_hat_l||^2 / sum ||x||^2`` (the
  share of the vectors' energy not yet explained; 0.5 means half is left); ``unexplained_variance`` =
  ``sum ||x - x_hat_l||^2 / sum ||x - mean(x)||^2``, the same error against the spread around the mean:
  comparable between vector spaces of different anisotropy (where all vectors share a large common
  component, ``relative_error`` is small however badly the codes separate the items);
* prefix collisions: for the code prefix of length ``l``, ``collision_rate`` = the fraction of items
  whose prefix is shared with at least one other item. The full code's collision rate is the last one:
  items that the code cannot tell apart;
* ``category_purity`` of level-1 codes: ``sum over codes of (items of the code's majority category)``
  / items, with its ``baseline`` (the share of the most common category: the purity of one big code).

VQ: ``coverage`` (the share of catalogue items that appear in some code), the in-degree distribution
(hubs: ``max_in_degree``, ``top_1pct_share`` of all code slots), ``entropy_bits`` of code-id usage,
``category_agreement`` (mean share of an item's neighbours in its own category, with the chance
baseline ``sum_c p_c^2``) and, when the index is approximate, ``recall`` against exact search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from qarm.errors import DataError

_CHUNK = 262_144


def entropy_bits(labels: np.ndarray, size: int | None = None) -> float:
    """Shannon entropy, in bits, of the empirical distribution of non-negative int ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=size or 0)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def collision_rate(codes: np.ndarray) -> dict[str, Any]:
    """How many rows of ``codes`` (n, width) share their whole row with another row.

    Returns ``distinct`` (distinct rows), ``collision_rate`` (fraction of rows whose row occurs more
    than once) and ``max_bucket`` (items behind the most shared row).
    """
    codes = np.asarray(codes)
    if codes.ndim == 1:
        codes = codes[:, None]
    keys = _row_keys(codes)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True, axis=0 if keys.ndim == 2 else None)
    shared = counts[inverse.reshape(-1)] > 1
    return {
        "distinct": int(len(counts)),
        "collision_rate": float(shared.mean()) if len(shared) else 0.0,
        "max_bucket": int(counts.max()) if len(counts) else 0,
    }


def category_purity(labels: np.ndarray, categories: Any) -> dict[str, Any]:
    """Weighted majority share of ``categories`` within each label, and its one-label baseline.

    Items whose category is missing (None / NaN) are left out.
    """
    cats = pd.Series(np.asarray(categories, dtype=object))
    known = cats.notna().to_numpy()
    if not known.any():
        return {"purity": None, "baseline": None, "n_items": 0, "n_categories": 0}
    frame = pd.DataFrame({"label": np.asarray(labels)[known], "cat": cats[known].to_numpy()})
    majority = frame.groupby(["label", "cat"]).size().groupby(level=0).max().sum()
    n = len(frame)
    return {
        "purity": float(majority / n),
        "baseline": float(frame["cat"].value_counts().iloc[0] / n),
        "n_items": int(n),
        "n_categories": int(frame["cat"].nunique()),
    }


def rq_quality(
    codes: np.ndarray,
    codebooks: Sequence[np.ndarray],
    vectors: np.ndarray | None = None,
    categories: Any = None,
) -> dict[str, Any]:
    """Quality of RQ codes.

    Parameters
    ----------
    codes : int array of shape (n, L)
    codebooks : L float arrays, ``codebooks[l]`` of shape (K_l, dim)
    vectors : float array of shape (n, dim) or None
        The vectors as the quantizer saw them (``ResidualKMeans.preprocess``); enables the
        reconstruction errors.
    categories : array-like of shape (n,) or None
        Item categories; enables the level-1 purity.

    Returns
    -------
    dict with ``n_items``, ``levels`` (one dict per level), ``prefixes`` (one per prefix length),
    ``full_code`` and, when categories are given, ``category_purity``.
    """
    codes = np.asarray(codes)
    n_levels = len(codebooks)
    if codes.ndim != 2 or codes.shape[1] != n_levels:
        raise DataError(f"codes must be (n, {n_levels}), got {codes.shape}")
    n = len(codes)
    levels: list[dict[str, Any]] = []
    for level, book in enumerate(codebooks):
        size = len(book)
        col = codes[:, level]
        if n and (col.min() < 0 or col.max() >= size):
            raise DataError(f"level {level + 1} codes must lie in [0, {size})")
        h = entropy_bits(col, size)
        used = int(np.count_nonzero(np.bincount(col, minlength=size)))
        levels.append({
            "level": level + 1,
            "codebook_size": int(size),
            "used": used,
            "utilisation": used / size,
            "entropy_bits": h,
            "max_entropy_bits": math.log2(size),
            "perplexity": 2.0**h,
        })
    if vectors is not None:
        for entry, (mse, rel, unexplained) in zip(levels, _reconstruction_errors(codes, codebooks, vectors)):
            entry["mse"] = mse
            entry["relative_error"] = rel
            entry["unexplained_variance"] = unexplained
    prefixes = [{"length": length, **collision_rate(codes[:, :length])} for length in range(1, n_levels + 1)]
    report: dict[str, Any] = {
        "kind": "rq",
        "n_items": int(n),
        "levels": levels,
        "prefixes": prefixes,
        "full_code": prefixes[-1] if prefixes else {},
    }
    if categories is not None:
        report["category_purity"] = {"level": 1, **category_purity(codes[:, 0], _aligned(categories, n))}
    return report


def vq_quality(
    codes: np.ndarray,
    catalogue_ids: np.ndarray,
    *,
    item_ids: np.ndarray | None = None,
    categories: Any = None,
    catalogue_categories: Any = None,
    recall: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quality of VQ (top-K neighbour) codes.

    Parameters
    ----------
    codes : int array of shape (n, K)
        Catalogue ids, as returned by :meth:`TopKCodes.transform`.
    catalogue_ids : int array of shape (n_catalogue,)
    item_ids : int array of shape (n,) or None
        Unused except for checks; the rows' own ids.
    categories : array-like of shape (n,) or None
        The coded items' categories.
    catalogue_categories : array-like of shape (n_catalogue,) or None
        The catalogue items' categories (default: ``categories`` when codes are the catalogue's own).
    recall : dict or None
        :meth:`TopKCodes.recall_against_exact`'s result, copied into the report.
    """
    codes = np.asarray(codes)
    catalogue_ids = np.asarray(catalogue_ids, dtype=np.int64)
    if codes.ndim != 2:
        raise DataError(f"VQ codes must be (n, K), got {codes.shape}")
    n, k = codes.shape
    order = np.argsort(catalogue_ids)
    pos = np.searchsorted(catalogue_ids, codes, sorter=order)
    pos = np.minimum(pos, len(catalogue_ids) - 1)
    rows = order[pos]
    if not (catalogue_ids[rows] == codes).all():
        raise DataError("VQ codes hold ids that are not catalogue ids")
    n_cat = len(catalogue_ids)
    in_degree = np.bincount(rows.reshape(-1), minlength=n_cat)
    top = max(1, int(math.ceil(0.01 * n_cat)))
    h = entropy_bits(rows.reshape(-1), n_cat)
    report: dict[str, Any] = {
        "kind": "vq",
        "n_items": int(n),
        "k": int(k),
        "n_catalogue": int(n_cat),
        "coverage": float(np.count_nonzero(in_degree) / n_cat),
        "mean_in_degree": float(in_degree.mean()),
        "max_in_degree": int(in_degree.max()) if n_cat else 0,
        "top_1pct_share": float(np.sort(in_degree)[-top:].sum() / max(1, in_degree.sum())),
        "entropy_bits": h,
        "max_entropy_bits": math.log2(n_cat) if n_cat else 0.0,
        "perplexity": 2.0**h,
    }
    if item_ids is not None and len(item_ids) != n:
        raise DataError(f"item_ids must have {n} entries, got {len(item_ids)}")
    if categories is not None:
        item_cats = _aligned(categories, n)
        cat_cats = _aligned(catalogue_categories, n_cat) if catalogue_categories is not None else item_cats
        if catalogue_categories is None and n != n_cat:
            raise DataError("catalogue_categories is needed when the coded items are not the catalogue")
        report["category_agreement"] = _category_agreement(rows, item_cats, cat_cats)
    if recall is not None:
        report["recall"] = dict(recall)
    return report


def render_markdown(report: dict[str, Any]) -> str:
    """Markdown tables of a report made of ``rq`` / ``vq`` sections (or of one section)."""
    if report.get("kind") in ("rq", "vq"):
        report = {report["kind"]: report}
    out: list[str] = []
    rq = report.get("rq")
    if rq:
        out += ["## RQ codes", "", f"{rq['n_items']:,} items, {len(rq['levels'])} levels", ""]
        has_err = "mse" in rq["levels"][0] if rq["levels"] else False
        head = ("| level | size | used | utilisation | entropy (bits) | perplexity | prefix distinct "
                "| prefix collision |")
        sep = "|---:|---:|---:|---:|---:|---:|---:|---:|"
        if has_err:
            head += " MSE | relative error | unexplained variance |"
            sep += "---:|---:|---:|"
        out += [head, sep]
        for lv, px in zip(rq["levels"], rq["prefixes"]):
            row = (f"| {lv['level']} | {lv['codebook_size']} | {lv['used']} | {lv['utilisation']:.3f} | "
                   f"{lv['entropy_bits']:.2f} / {lv['max_entropy_bits']:.2f} | {lv['perplexity']:.1f} | "
                   f"{px['distinct']:,} | {px['collision_rate']:.4f} |")
            if has_err:
                row += f" {lv['mse']:.3g} | {lv['relative_error']:.4f} | {lv['unexplained_variance']:.4f} |"
            out.append(row)
        full = rq["full_code"]
        out += ["", f"Full code: {full['distinct']:,} distinct codes, collision rate {full['collision_rate']:.4f}, "
                    f"largest bucket {full['max_bucket']} items."]
        pur = rq.get("category_purity")
        if pur and pur.get("purity") is not None:
            out.append(f"Level-1 category purity {pur['purity']:.3f} (one-code baseline {pur['baseline']:.3f}, "
                       f"{pur['n_categories']} categories).")
        out.append("")
    vq = report.get("vq")
    if vq:
        out += ["## VQ codes", "",
                f"{vq['n_items']:,} items, top-{vq['k']} of {vq['n_catalogue']:,} catalogue items", "",
                "| metric | value |", "|---|---:|",
                f"| coverage | {vq['coverage']:.4f} |",
                f"| mean / max in-degree | {vq['mean_in_degree']:.1f} / {vq['max_in_degree']} |",
                f"| top 1% items' share of slots | {vq['top_1pct_share']:.4f} |",
                f"| entropy (bits) | {vq['entropy_bits']:.2f} / {vq['max_entropy_bits']:.2f} |"]
        agree = vq.get("category_agreement")
        if agree and agree.get("agreement") is not None:
            out.append(f"| neighbours in own category | {agree['agreement']:.3f} (chance {agree['baseline']:.3f}) |")
        rec = vq.get("recall")
        if rec:
            if rec.get("exact"):
                out.append("| recall@k vs exact | 1 (exact search) |")
            else:
                out.append(f"| recall@{rec['k']} vs exact ({rec['index']}, {rec['sample_size']:,} items) | "
                           f"{rec['recall_at_k']:.4f} |")
        out.append("")
    return "\n".join(out)


def _reconstruction_errors(
    codes: np.ndarray, codebooks: Sequence[np.ndarray], vectors: np.ndarray
) -> list[tuple[float, float, float]]:
    """(mse, relative_error, unexplained_variance) after each level, accumulated in row chunks."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) != len(codes):
        raise DataError(f"vectors must be ({len(codes)}, dim), got {vectors.shape}")
    dim = vectors.shape[1]
    sq_err = np.zeros(len(codebooks))
    energy = 0.0
    total = np.zeros(dim, dtype=np.float64)
    for start in range(0, len(codes), _CHUNK):
        x = vectors[start:start + _CHUNK].astype(np.float32)
        energy += float(np.einsum("ij,ij->", x, x, dtype=np.float64))
        total += x.sum(axis=0, dtype=np.float64)
        residual = x.copy()
        for level, book in enumerate(codebooks):
            residual -= book[codes[start:start + _CHUNK, level]]
            sq_err[level] += float(np.einsum("ij,ij->", residual, residual, dtype=np.float64))
    n = max(1, len(codes))
    spread = energy - float(total @ total) / n  # sum ||x - mean||^2
    return [(float(e / (n * dim)), float(e / energy) if energy > 0 else 0.0,
             float(e / spread) if spread > 0 else 0.0) for e in sq_err]


def _category_agreement(rows: np.ndarray, item_cats: np.ndarray, catalogue_cats: np.ndarray) -> dict[str, Any]:
    item = pd.Series(item_cats)
    cat_codes, uniques = pd.factorize(pd.Series(np.concatenate([np.asarray(item_cats, dtype=object),
                                                                np.asarray(catalogue_cats, dtype=object)])))
    own = cat_codes[: len(item_cats)]
    neigh = cat_codes[len(item_cats):][rows]
    valid = (own >= 0)[:, None] & (neigh >= 0)
    if not valid.any():
        return {"agreement": None, "baseline": None}
    same = (neigh == own[:, None]) & valid
    p = item[item.notna()].value_counts(normalize=True).to_numpy()
    return {"agreement": float(same.sum() / valid.sum()), "baseline": float((p**2).sum())}


def _aligned(values: Any, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"categories must have one entry per item ({n}), got shape {arr.shape}")
    return arr


def _row_keys(codes: np.ndarray) -> np.ndarray:
    """One int64 per row when the code space fits (mixed radix), else the rows themselves."""
    codes = codes.astype(np.int64, copy=False)
    if codes.size == 0:
        return np.zeros(len(codes), dtype=np.int64)
    low = codes.min(axis=0)
    span = codes.max(axis=0) - low + 1
    if float(np.prod(span.astype(np.float64))) < 2.0**62:
        key = np.zeros(len(codes), dtype=np.int64)
        for col in range(codes.shape[1]):
            key = key * span[col] + (codes[:, col] - low[col])
        return key
    return codes

"""``qarm data describe``: the numbers a recommender engineer looks at first."""

from __future__ import annotations

from typing import Any

import numpy as np

from qarm.data import schema as S
from qarm.data.schema import Dataset

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def describe_dataset(dataset: Dataset) -> dict[str, Any]:
    """Counts, density, label rates, sequence-length quantiles, modality dims, splits (JSON-ready)."""
    inter = dataset.interactions
    meta = dataset.meta
    source_rows = ~inter[S.SAMPLED_NEGATIVE].to_numpy(dtype=bool) if S.SAMPLED_NEGATIVE in inter.columns \
        else np.ones(len(inter), dtype=bool)
    source = inter.loc[source_rows]
    n_pairs = len(np.unique(source[S.USER_ID].to_numpy() * dataset.n_items + source[S.ITEM_ID].to_numpy()))
    per_user = np.bincount(source[S.USER_ID].to_numpy(), minlength=dataset.n_users)
    per_item = np.bincount(source[S.ITEM_ID].to_numpy(), minlength=dataset.n_items)
    out: dict[str, Any] = {
        "name": meta.name,
        "loader": meta.loader,
        "source": meta.source,
        "seed": meta.seed,
        "users": dataset.n_users,
        "items": dataset.n_items,
        "interactions": dataset.n_interactions,
        "source_interactions": int(source_rows.sum()),
        "sampled_negatives": int((~source_rows).sum()),
        "distinct_user_item_pairs": n_pairs,
        "density": n_pairs / (dataset.n_users * dataset.n_items),
        "time_unit": meta.time_unit,
        "time_range": [int(inter[S.TIME].min()), int(inter[S.TIME].max())],
        "label_rates": {c: float(inter[c].mean()) for c in meta.label_columns},
        "label_rates_source_events": {c: float(source[c].mean()) for c in meta.label_columns},
        "events_per_user": _quantiles(per_user),
        "events_per_item": _quantiles(per_item),
        "items_without_events": int((per_item == 0).sum()),
        "text_columns": {c: _text_stats(dataset, c) for c in meta.text_columns},
        "modality_vectors": {name: int(v.shape[1]) for name, v in dataset.item_vectors.items()},
        "label_columns": list(meta.label_columns),
        "signal_columns": list(meta.signal_columns),
        "context_columns": list(meta.context_columns),
        "user_feature_columns": list(meta.user_feature_columns),
        "item_feature_columns": list(meta.item_feature_columns),
        "positive_only": meta.positive_only,
    }
    if S.CATEGORY in dataset.items.columns:
        out["categories"] = int(dataset.items[S.CATEGORY].nunique())
    if dataset.is_prepared:
        out["splits"] = _split_stats(dataset)
    if meta.notes:
        out["notes"] = list(meta.notes)
    return out


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    q = np.quantile(values, QUANTILES)
    stats = {f"p{int(p * 100)}": float(v) for p, v in zip(QUANTILES, q)}
    stats.update(min=float(values.min()), mean=float(values.mean()), max=float(values.max()))
    return stats


def _text_stats(dataset: Dataset, column: str) -> dict[str, float]:
    text = dataset.items[column].astype(str)
    words = text.str.split().str.len()
    return {"empty": int((text.str.len() == 0).sum()), "mean_words": float(words.mean()),
            "max_words": int(words.max())}


def _split_stats(dataset: Dataset) -> dict[str, Any]:
    inter = dataset.interactions
    split = inter[S.SPLIT].astype(str).to_numpy()
    cold = inter[S.COLD_ITEM].to_numpy(dtype=bool)
    stats: dict[str, Any] = {}
    for name in S.SPLITS:
        rows = split == name
        stats[name] = {
            "rows": int(rows.sum()),
            "users": int(len(np.unique(inter[S.USER_ID].to_numpy()[rows]))),
            "cold_item_rows": int((rows & cold).sum()),
            "label_rates": {c: float(inter[c].to_numpy()[rows].mean()) if rows.any() else None
                            for c in dataset.meta.label_columns},
        }
    stats["trainable_rows"] = int(dataset.training_mask().sum())
    stats["cold_start_items"] = int(dataset.items[S.COLD_START].sum())
    groups = dataset.items[S.LONGTAIL_GROUP].to_numpy()
    stats["longtail_items"] = {f"L{g}" if g else "none": int((groups == g).sum()) for g in np.unique(groups)}
    stats["prepared"] = dataset.meta.prepared
    return stats


def render_markdown(stats: dict[str, Any]) -> str:
    """A compact Markdown summary of :func:`describe_dataset`'s output."""
    lines = [f"## {stats['name']} ({stats['loader']})", ""]
    lines += ["| what | value |", "|---|---|"]
    rows = [
        ("users", f"{stats['users']:,}"),
        ("items", f"{stats['items']:,}"),
        ("interactions", f"{stats['interactions']:,} ({stats['source_interactions']:,} source, "
                         f"{stats['sampled_negatives']:,} sampled negatives)"),
        ("density", f"{stats['density']:.5f}"),
        ("time", f"{stats['time_unit']}, {stats['time_range'][0]} .. {stats['time_range'][1]}"),
        ("label rates", ", ".join(f"{k} {v:.3f}" for k, v in stats["label_rates"].items())),
        ("events per user p10/p50/p90/max", _q(stats["events_per_user"])),
        ("events per item p10/p50/p90/max", _q(stats["events_per_item"])),
        ("text", ", ".join(f"{k} ({v['mean_words']:.1f} words)" for k, v in stats["text_columns"].items()) or "-"),
        ("modality vectors", ", ".join(f"{k} {v}-d" for k, v in stats["modality_vectors"].items()) or "-"),
    ]
    if "splits" in stats:
        sp = stats["splits"]
        rows.append(("split", sp["prepared"].get("split", {}).get("strategy", "?") + ": " + ", ".join(
            f"{n} {sp[n]['rows']:,}" for n in S.SPLITS)))
        cold_rows = ", ".join(f"{n} {sp[n]['cold_item_rows']:,}" for n in S.SPLITS)
        rows.append(("cold-start items", f"{sp['cold_start_items']:,} (rows: {cold_rows})"))
        rows.append(("long-tail items", ", ".join(f"{k} {v:,}" for k, v in sp["longtail_items"].items())))
    lines += [f"| {k} | {v} |" for k, v in rows]
    if "leakage_probe" in stats:
        lines += ["", *render_probe(stats["leakage_probe"])]
    return "\n".join(lines) + "\n"


def render_probe(probe: dict[str, Any]) -> list[str]:
    """Markdown lines for ``qarm.evaluate.leakage.leakage_probe``'s output (kept here, beside the rest of
    the summary, so that the data package renders without importing the evaluation package)."""
    low, high = probe["band"]
    kind = ("sampled negatives: both should lie in the band" if probe["sampled_negatives"]
            else "real negatives: an item's training click rate is a real signal, the band does not apply")
    lines = [f"Leakage probe ({probe['label']}; GAUC of a per-item score learnt from training rows only; "
             f"chance 50, band {low:g}..{high:g}; {kind}):", "",
             "| score | valid GAUC | test GAUC |", "|---|---:|---:|"]
    for name, values in probe["gauc"].items():
        cells = [("-" if values.get(part) is None else f"{values[part]:.2f}") for part in ("valid", "test")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"**WARNING** {w}" for w in probe["warnings"]]
    return lines


def _q(q: dict[str, float]) -> str:
    return f"{q['p10']:g} / {q['p50']:g} / {q['p90']:g} / {q['max']:g}" if q else "-"

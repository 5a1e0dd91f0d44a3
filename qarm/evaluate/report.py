"""Reports for people: Markdown tables across models, mean ± std over seeds, JSON + Markdown files.

A *report* is the output of :func:`qarm.evaluate.metrics.evaluate_predictions`,
``{task: {segment: {"auc", "uauc", "gauc", "logloss", "n", "n_pos", "n_users",
"users_with_both_classes"}}}``. :func:`aggregate_seeds` returns the same shape with the seeds' means in
place of the values and, beside each score, ``"<metric>_std"`` and ``"n_seeds"``; every function here
takes either kind.

* :func:`render_markdown`: one table for one task and one metric, a row per model or variant, columns
  overall / cold-start / L1 .. Ln, in percent with two decimals (``mean ± std`` for aggregated reports).
* :func:`aggregate_seeds`: mean and standard deviation over the runs of one variant with different seeds.
* :func:`write_report`: ``<stem>.json`` and ``<stem>.md``, each written atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qarm.data.io import atomic_write_bytes
from qarm.errors import ConfigError, DataError
from qarm.evaluate.metrics import (
    COLD_START,
    CONSTANT_LOGLOSS,
    COUNT_FIELDS,
    OVERALL,
    SCORE_METRICS,
    WARM,
    as_float,
)

STD_SUFFIX = "_std"
N_SEEDS = "n_seeds"
SEGMENT_TITLES = {OVERALL: "overall", WARM: "warm", COLD_START: "cold-start"}
WORSE_MARK = " (!)"  # a log loss worse than the constant base rate's
MISSING = "-"


def aggregate_seeds(reports: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean and standard deviation, over seeds, of every score of every task and segment.

    Parameters
    ----------
    reports : the reports of one model or variant trained (or sampled) with different seeds, over the
        same tasks and segments.

    Returns
    -------
    A report of the same shape whose scores are the means over the seeds, with
    ``"<metric>_std"`` beside each: the sample standard deviation (``ddof=1``, the usual ``± std`` of
    papers; NaN for a single seed, shown as the mean alone) and ``"n_seeds"``. A seed with a NaN score
    makes that mean NaN (a segment undefined in one run is not silently averaged over the others).
    Counts (``n``, ``n_pos`` ...) stay ints when all seeds agree, as they do on one test split, and are
    averaged otherwise.
    """
    reports = list(reports)
    if not reports:
        raise ConfigError("The 'reports' parameter of aggregate_seeds must be a non-empty list of reports. "
                          "Got [] instead.")
    first = reports[0]
    for i, other in enumerate(reports[1:], start=1):
        _check_same_shape(first, other, f"reports[0] and reports[{i}]")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, segments in first.items():
        out[task] = {}
        for segment, metrics in segments.items():
            runs = [r[task][segment] for r in reports]
            merged: dict[str, Any] = {}
            for name in metrics:
                if name.endswith(STD_SUFFIX) or name == N_SEEDS:
                    continue  # aggregating aggregates: keep only the means
                values = np.array([as_float(run[name]) for run in runs])
                if name in SCORE_METRICS:
                    merged[name] = float(values.mean())
                    merged[name + STD_SUFFIX] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
                elif name in COUNT_FIELDS and (values == values[0]).all():
                    merged[name] = int(runs[0][name])
                else:
                    merged[name] = float(values.mean())
            merged[N_SEEDS] = len(reports)
            out[task][segment] = merged
    return out


def render_markdown(reports: Mapping[str, Mapping[str, Any]], task: str, metric: str = "gauc", *,
                    title: str | None = None) -> str:
    """A Markdown table of one metric of one task: a row per model, a column per segment.

    Parameters
    ----------
    reports : ``{model or variant name: report}``, single-run or aggregated (:func:`aggregate_seeds`).
    task : the task to show; every report must have it.
    metric : ``"auc"``, ``"uauc"``, ``"gauc"`` or ``"logloss"``. AUCs are shown in percent with two
        decimals (``76.41``); log loss, not a share, as is with four (``0.4412``).
    title : a heading line above the table; default ``"<task>: <METRIC>"``.

    Returns
    -------
    The Markdown text: the heading, the table (``mean ± std`` where the report holds a standard
    deviation, ``-`` where a value is undefined), and a line with the segments' sizes, read from the
    first report, that says why a cell may be empty.
    """
    if metric not in SCORE_METRICS:
        raise ConfigError(f"The 'metric' parameter of render_markdown must be one of {list(SCORE_METRICS)}. "
                          f"Got {metric!r} instead.")
    if not reports:
        raise ConfigError("The 'reports' parameter of render_markdown must map at least one model name to "
                          "a report. Got {} instead.")
    for name, report in reports.items():
        if task not in report:
            raise ConfigError(f"unknown task {task!r} in report {name!r}; available: {list(report)}")
    segments: list[str] = []
    for report in reports.values():
        segments += [s for s in report[task] if s not in segments]

    header = ["model"] + [SEGMENT_TITLES.get(s, s) for s in segments]
    lines = [f"### {title if title is not None else f'{task}: {metric.upper()}'}", "",
             "| " + " | ".join(header) + " |", "|---" + "|---:" * len(segments) + "|"]
    for name, report in reports.items():
        cells = [_cell(report[task].get(s), metric) for s in segments]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first_name, first = next(iter(reports.items()))
    if metric == "logloss":
        constant = [_constant_cell(first[task].get(s)) for s in segments]
        lines.append("| constant (the segment's base rate) | " + " | ".join(constant) + " |")
    sizes = ", ".join(
        f"{SEGMENT_TITLES.get(s, s)} {_count(first[task][s], 'n')} ({_count(first[task][s], 'n_pos')} pos, "
        f"{_count(first[task][s], 'users_with_both_classes')} users with both classes)"
        for s in segments if s in first[task]
    )
    unit = "log loss in nats" if metric == "logloss" else "percent"
    lines += ["", f"Values in {unit}. Rows per segment in '{first_name}': {sizes}."]
    if metric == "logloss":
        lines += ["", f"`{WORSE_MARK.strip()}`: worse than always predicting the segment's base rate (the last row)."]
    return "\n".join(lines) + "\n"


def write_report(path_stem: str | Path, data: Mapping[str, Mapping[str, Any]], *,
                 metrics: Sequence[str] = SCORE_METRICS, title: str | None = None) -> tuple[Path, Path]:
    """Write ``<path_stem>.json`` (the reports) and ``<path_stem>.md`` (their tables), each atomically.

    Parameters
    ----------
    path_stem : path without extension, e.g. ``runs/rank/results``; ``.json`` and ``.md`` are appended
        (a dot inside the stem, as in ``results.v2``, is kept).
    data : ``{model or variant name: report}``; wrap a single report as ``{"name": report}``.
    metrics : the metrics tabulated in the Markdown file, one table per task and metric.
    title : a top-level heading of the Markdown file.

    Returns
    -------
    The paths of the JSON and the Markdown file. NaN (an undefined metric) is written as JSON ``null``,
    so that strict parsers (``jq``, JavaScript) read the file.
    """
    if _is_report(data):
        raise DataError("write_report needs {name: report}, got a single report; wrap it, e.g. "
                        "write_report(path, {'model': report})")
    bad = [name for name, report in data.items() if not _is_report(report)]
    if bad or not data:
        raise DataError(f"write_report needs {{name: report}} with at least one report; not reports: {bad}")
    stem = Path(path_stem)
    json_path, md_path = stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"

    parts = [f"# {title}", ""] if title else []
    tasks = list(dict.fromkeys(task for report in data.values() for task in report))
    for task in tasks:
        having = {name: report for name, report in data.items() if task in report}
        for metric in metrics:
            parts.append(render_markdown(having, task, metric))
    text = json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(json_path, text.encode("utf-8"))
    atomic_write_bytes(md_path, "\n".join(parts).encode("utf-8"))
    return json_path, md_path


def _cell(metrics: Mapping[str, Any] | None, metric: str) -> str:
    if metrics is None:
        return MISSING
    mean = as_float(metrics.get(metric))
    std = as_float(metrics.get(metric + STD_SUFFIX))
    if math.isnan(mean):
        return MISSING
    scale, digits = (1.0, 4) if metric == "logloss" else (100.0, 2)
    text = f"{scale * mean:.{digits}f}"
    if not math.isnan(std):
        text += f" ± {scale * std:.{digits}f}"
    if metric == "logloss" and worse_than_constant(metrics):
        text += WORSE_MARK
    return text


def worse_than_constant(metrics: Mapping[str, Any] | None) -> bool:
    """Whether a segment's (mean) log loss is above the constant base rate's."""
    if metrics is None:
        return False
    mine, constant = as_float(metrics.get("logloss")), as_float(metrics.get(CONSTANT_LOGLOSS))
    return not (math.isnan(mine) or math.isnan(constant)) and mine > constant


def _constant_cell(metrics: Mapping[str, Any] | None) -> str:
    value = as_float(None if metrics is None else metrics.get(CONSTANT_LOGLOSS))
    return MISSING if math.isnan(value) else f"{value:.4f}"


def _count(metrics: Mapping[str, Any], name: str) -> str:
    value = metrics.get(name)
    if value is None:
        return "?"
    return f"{value:,}" if isinstance(value, int) else f"{float(value):,.1f}"


def _is_report(obj: Any) -> bool:
    """``{task: {segment: {"auc": ...}}}``, checked on the first task and segment."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    segments = next(iter(obj.values()))
    if not isinstance(segments, Mapping) or not segments:
        return False
    metrics = next(iter(segments.values()))
    return isinstance(metrics, Mapping) and "auc" in metrics


def _check_same_shape(a: Mapping[str, Any], b: Mapping[str, Any], what: str) -> None:
    if set(a) != set(b):
        raise DataError(f"{what} cover different tasks: {sorted(a)} vs {sorted(b)}")
    for task in a:
        if set(a[task]) != set(b[task]):
            raise DataError(f"{what}: task '{task}' has different segments: {list(a[task])} vs {list(b[task])}")


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN and infinities to None, numpy scalars and arrays to Python ones."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

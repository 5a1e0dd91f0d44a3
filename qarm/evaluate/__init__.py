"""Evaluation of ranking models (QARM issue: ranking): AUC, UAUC, GAUC and log loss per task, overall, on
cold-start items and per long-tail group L1..L6, written as JSON and Markdown.

Modules
-------
``metrics``  rank-based AUC / per-user AUC, UAUC, GAUC, log loss; ``evaluate_predictions`` and ``compare``
``report``   Markdown tables across models, mean ± std over seeds, JSON + Markdown files
"""

from qarm.evaluate.metrics import (
    GroupedAUC,
    auc,
    compare,
    evaluate_predictions,
    gauc,
    grouped_auc,
    logloss,
    uauc,
)
from qarm.evaluate.report import aggregate_seeds, render_markdown, write_report

__all__ = [
    "GroupedAUC",
    "aggregate_seeds",
    "auc",
    "compare",
    "evaluate_predictions",
    "gauc",
    "grouped_auc",
    "logloss",
    "render_markdown",
    "uauc",
    "write_report",
]

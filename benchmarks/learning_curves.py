"""Validation curves of the leaderboard's rows against training time, read from finished runs.

    python benchmarks/learning_curves.py runs/ml50k/rank                       # after `qarm leaderboard`
    python benchmarks/learning_curves.py runs/mls/rank --rows "EM3,QARM VQ & RQ" --out docs/img/curves_mls.png

Reads ``leaderboard.json`` (or ``ablation.json``) in the folder and every run's ``report.json`` (its
validation history, the one the tables' training seconds come from), trains nothing. A validation's training time is
approximated as
``step x (the run's training seconds / its steps)``: the trainer records the step of each validation and
the run's total optimiser time, not the clock at each validation, and a run's step time is steady. Writes a
PNG (validation metric against training seconds, log scale, one line a seed) and prints a Markdown table:
per row and seed, the validation metric at its first validation, at 1/10 of the longest run's time, and at
its end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from qarm.train.ablation import run_dir
from qarm.train.stage import REPORT_FILE

DEFAULT_ROWS = ("EM3", "QARM VQ & RQ", "Baseline", "DIN (ID-only)")


def curves(folder: Path, rows: list[str]) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """``{row: {seed: [(training seconds, validation metric), ...]}}`` for the named rows."""
    report_path = next((folder / name for name in ("leaderboard.json", "ablation.json")
                        if (folder / name).exists()), None)
    if report_path is None:
        raise SystemExit(f"{folder}: no leaderboard.json or ablation.json; run `qarm leaderboard` first")
    variants = json.loads(report_path.read_text(encoding="utf-8"))["variants"]
    unknown = [r for r in rows if r not in variants]
    if unknown:
        raise SystemExit(f"{report_path}: no rows {unknown}; it has {list(variants)}")
    out: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for row in rows:
        variant = variants[row]
        for seed in variant["seeds"]:
            report = run_dir(folder, variant["run_key"], seed) / REPORT_FILE
            if not report.exists():
                raise SystemExit(f"{report}: missing (the run's report)")
            history = json.loads(report.read_text(encoding="utf-8"))["history"]
            per_step = history["train_seconds"] / max(history["steps"], 1)
            out.setdefault(row, {})[seed] = [(e["step"] * per_step, e["metric"]) for e in history["evals"]]
    return out


def value_at(curve: list[tuple[float, float]], seconds: float) -> float | None:
    """The metric of the last validation at or before ``seconds`` (None when none is)."""
    before = [m for s, m in curve if s <= seconds]
    return before[-1] if before else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a leaderboard / ablation --out folder")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated row names")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: FOLDER/learning_curves.png)")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    data = curves(args.folder, rows)
    longest = max(c[-1][0] for per_seed in data.values() for c in per_seed.values() if c)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (row, per_seed) in enumerate(data.items()):
        for j, (_seed, curve) in enumerate(sorted(per_seed.items())):
            xs, ys = zip(*curve) if curve else ((), ())
            ax.plot(xs, [100 * y for y in ys], color=f"C{i}", alpha=0.85, marker=".", markersize=3,
                    label=row if j == 0 else None)
    ax.axvline(longest / 10, color="grey", linestyle=":", linewidth=1)
    ax.text(longest / 10, ax.get_ylim()[0], " 1/10 of the longest run", color="grey", fontsize=8, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("training seconds (optimiser steps, one thread)")
    ax.set_ylabel("validation GAUC, % (first task)")
    ax.set_title(f"{args.folder}: validation against training time, one line a seed")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = args.out or args.folder / "learning_curves.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(png)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    print(f"{args.folder}: validation metric (%) of each run; longest run {longest:,.0f} training s\n")
    print(f"| row | seed | first validation (s) | at {longest / 10:,.0f} s | end (s) |")
    print("|---|---:|---:|---:|---:|")
    for row, per_seed in data.items():
        for seed, curve in sorted(per_seed.items()):
            if not curve:
                continue
            print(f"| {row} | {seed} | {fmt(curve[0][1])} ({curve[0][0]:,.0f}) | {fmt(value_at(curve, longest / 10))} "
                  f"| {fmt(curve[-1][1])} ({curve[-1][0]:,.0f}) |")
    print(f"\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

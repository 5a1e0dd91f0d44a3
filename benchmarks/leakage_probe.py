"""The leakage probe before and after the past-only sampler, on the real datasets and the generator.

    python benchmarks/leakage_probe.py            # writes benchmarks/results/leakage_probe.md / .json

For each dataset, the loader's data is prepared twice with the same split and seed: once with the
whole-log sampler of qarm 0.1 (``negatives.counts=whole_log``: ``count + 1`` over train + valid + test,
exclusions over the whole log) and once with the default past-only sampler, and
:func:`qarm.evaluate.leakage.leakage_probe` scores both (GAUC in percent of a per-item score learnt from
training rows; chance 50, band 45..55). Datasets: MicroLens-50k and ml-latest-small (leave-last-out, as
their benchmark configs) from ``../shared/data`` (skipped with a message when absent), and the embedded
synthetic default (real exposures: no sampling, the probe is informational) with its clicks as a
positive-only log (items created during the window, its own time split; and the same log in click
order with leave-last-out).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from qarm.data import schema as S
from qarm.data.build import sequence_numbers
from qarm.data.loaders import load
from qarm.data.negatives import NegativeConfig
from qarm.data.prepare import PrepareConfig, prepare_dataset
from qarm.data.schema import Dataset
from qarm.data.shared import find_shared_data
from qarm.data.splits import SplitConfig
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.evaluate.leakage import leakage_probe

RESULTS = Path(__file__).resolve().parent / "results"
BEFORE = NegativeConfig(counts="whole_log")
AFTER = NegativeConfig()


def clicks_only(ds: Dataset, time_unit: str | None = None) -> Dataset:
    inter = ds.interactions
    inter = inter[inter["click"] == 1].drop(columns=["convert"]).reset_index(drop=True)
    inter[S.SEQ] = sequence_numbers(inter[S.USER_ID].to_numpy())
    ds.meta.positive_only, ds.meta.label_columns = True, ["click"]
    if time_unit:
        ds.meta.time_unit = time_unit
    return Dataset(items=ds.items, interactions=inter, users=ds.users, meta=ds.meta)


def cases() -> dict[str, tuple[Any, SplitConfig]]:
    out: dict[str, tuple[Any, SplitConfig]] = {}
    shared = find_shared_data()
    lolo = SplitConfig(strategy="leave_last_out")
    if shared is None:
        print("../shared/data is absent: MicroLens-50k and ml-latest-small are skipped", file=sys.stderr)
    else:
        out["microlens50k"] = (lambda: load("microlens50k", shared / "microlens50k"), SplitConfig())
        out["ml-latest-small"] = (lambda: load("ml-latest-small", shared / "ml-latest-small"), lolo)
    out["synthetic (real exposures)"] = (lambda: generate(SyntheticConfig()), SplitConfig())
    out["synthetic clicks, time split"] = (lambda: clicks_only(generate(SyntheticConfig())), SplitConfig())
    out["synthetic clicks, no births, time split"] = (
        lambda: clicks_only(generate(SyntheticConfig(initial_item_fraction=1.0))), SplitConfig())
    out["synthetic clicks, leave-last-out"] = (lambda: clicks_only(generate(SyntheticConfig()), "order"), lolo)
    return out


def main() -> int:
    rows: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for name, (make, split) in cases().items():
        rows[name] = {}
        for label, negatives in (("before", BEFORE), ("after", AFTER)):
            ds = prepare_dataset(make(), PrepareConfig(split=split, negatives=negatives))
            rows[name][label] = leakage_probe(ds)
            g = rows[name][label]["gauc"]
            print(f"{name:42s} {label:6s} item_ratio valid {g['item_ratio']['valid']:.2f} test "
                  f"{g['item_ratio']['test']:.2f}  popularity valid {g['popularity']['valid']:.2f} test "
                  f"{g['popularity']['test']:.2f}", flush=True)
    lines = ["# Leakage probe: whole-log negatives (before) vs past-only negatives (after)", "",
             f"Machine {platform.platform()}, {os.cpu_count()} CPUs; `python benchmarks/leakage_probe.py`; "
             f"{time.perf_counter() - start:.0f} s. GAUC (%) on the valid / test rows of a per-item score learnt "
             "from the training rows only (chance 50, band 45..55; `(!)` outside it; the band applies to sampled "
             "negatives only). Split seed 0, negative seed 0, 4 negatives per positive.", "",
             "| data | sampler | item_ratio valid | item_ratio test | popularity valid | popularity test |",
             "|---|---|---:|---:|---:|---:|"]
    for name, both in rows.items():
        for label, probe in both.items():
            if label == "before" and not probe["sampled_negatives"]:
                continue  # real negatives: the sampler plays no part, one row says it
            cells = []
            for score in ("item_ratio", "popularity"):
                for part in ("valid", "test"):
                    v = probe["gauc"][score][part]
                    out = probe["sampled_negatives"] and not 45 <= v <= 55
                    cells.append(f"{v:.2f}" + (" (!)" if out else ""))
            sampler = ("none (real negatives)" if not probe["sampled_negatives"] else
                       "whole log (qarm 0.1)" if label == "before" else "past only")
            lines.append(f"| {name} | {sampler} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "leakage_probe.md").write_text(text, encoding="utf-8")
    (RESULTS / "leakage_probe.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

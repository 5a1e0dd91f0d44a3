"""Test GAUC of QARM with the paper's layout against 32-d sequences (and target) on the default synthetic run, 3 seeds.

    python benchmarks/sequence_dim_probe.py      # needs runs/synthetic (qarm run); writes runs/seq32_probe/

Each run: early stopping on validation GAUC, up to 8 epochs, patience 2 (qarm's trainer). Prints the
machine, each seed and the mean +- sample std of the test GAUC (click). Finished runs are read back.
"""

from __future__ import annotations

import platform
import statistics

from qarm.train.stage import RankingConfig, train_ranking
from qarm.train.trainer import TrainConfig

PAPER = {"sequence_dim": None, "target_dim": None}  # QARM's default before qarm 0.2.0
VARIANTS = {"QARM, paper layout": ("full", PAPER),
            "QARM sequence_dim=32": ("seq32", {"sequence_dim": 32, "target_dim": None}),
            "QARM default (sequence_dim=32, target_dim=32)": ("default", {})}
SEEDS = (0, 1, 2)


def main() -> int:
    print(f"machine {platform.platform()}; data runs/synthetic; seeds {list(SEEDS)}; epochs <= 8, patience 2")
    gaucs: dict[str, list[float]] = {}
    for name, (tag, model_config) in VARIANTS.items():
        for seed in SEEDS:
            report = train_ranking("runs/synthetic/data", f"runs/seq32_probe/{tag}-{seed}",
                                   RankingConfig(model="qarm", model_config=model_config,
                                                 train=TrainConfig(epochs=8, patience=2, seed=seed)),
                                   quantize_dir="runs/synthetic/quantize", align_dir="runs/synthetic/align")
            gauc = 100 * report["metrics"]["click"]["overall"]["gauc"]
            gaucs.setdefault(name, []).append(gauc)
            print(f"{name} seed {seed}: test GAUC {gauc:.2f}", flush=True)
    for name, values in gaucs.items():
        print(f"{name}: {statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

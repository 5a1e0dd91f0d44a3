"""How long the synthetic generator takes, and how much memory it needs, at scale.

    python benchmarks/synthetic_scale.py                       # 1M items, 10M exposures, 1M users
    python benchmarks/synthetic_scale.py --items 100000 --interactions 1000000 --users 100000
    python benchmarks/synthetic_scale.py --save                # also time save_dataset to a temp folder

Prints the machine, the config, the wall time of each phase and in total, the realised label rates
and the peak resident memory of the process (``ru_maxrss``). The goal: 1M items / 10M exposures in at
most 2 minutes and 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil

from qarm.config import to_dict
from qarm.data.io import save_dataset
from qarm.data.synthetic import SyntheticConfig, generate

GIB = 1024**3


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="also write the dataset with save_dataset")
    args = parser.parse_args()

    config = SyntheticConfig(seed=args.seed, n_items=args.items, n_users=args.users,
                             n_interactions=args.interactions)
    memory = psutil.virtual_memory().total
    print(f"machine: {platform.platform()}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {memory / GIB:.1f} GiB RAM")
    print(f"config: {json.dumps(to_dict(config))}")
    print(f"seed: {config.seed}")

    timings: dict[str, float] = {}
    start = time.perf_counter()
    dataset = generate(config, timings=timings)
    total = time.perf_counter() - start
    for phase, seconds in timings.items():
        print(f"  {phase:<16} {seconds:8.2f} s")
    print(f"generate total     {total:8.2f} s")
    inter = dataset.interactions
    print(f"rows: {dataset.n_items} items, {dataset.n_users} users, {dataset.n_interactions} interactions; "
          f"click rate {inter['click'].mean():.4f}, convert rate {inter['convert'].mean():.4f}")
    print(f"peak RSS after generate: {peak_rss_bytes() / GIB:.2f} GiB")

    if args.save:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            folder = save_dataset(dataset, Path(tmp) / "synthetic")
            seconds = time.perf_counter() - start
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            print(f"save_dataset       {seconds:8.2f} s ({size / 2**20:.0f} MiB on disk)")
        print(f"peak RSS after save: {peak_rss_bytes() / GIB:.2f} GiB")


if __name__ == "__main__":
    main()

"""Prepare + describe every dataset in ../shared/data and compare the counts with the data cards.

    python benchmarks/prepare_all.py [--out /tmp/qarm-prepared] [--markdown results.md]

Prints the machine, each dataset's counts (users, items, source interactions) next to the data
card's, the time of each step, and the describe summary. Exits non-zero if a count does not match.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil

from qarm.data.describe import describe_dataset
from qarm.data.loaders import get_loader
from qarm.data.prepare import prepare
from qarm.data.shared import find_shared_data

# (dataset, loader options, expected users, items, source interactions) from the data cards
# (../shared/data/README.md and the sources' own READMEs / papers).
DATASETS = [
    ("microlens50k", {}, 50_000, 19_220, 359_708),
    ("ml-latest-small", {}, 610, 9_742, 100_836),
    ("ml100k", {}, 943, 1_682, 100_000),
    # The card's 1,892 users are HetRec's; 34 of them have no pair among the 1,425 artists of this subset.
    ("lastfm2k", {}, 1_892 - 34, 1_425, 56_345),
    # Frappe's README counts 957 users over the full data; these two parts hold 913 of them.
    ("frappe", {}, None, 4_082, 57_722 + 28_860),
    ("amazon", {"subset": "Beauty"}, 22_363, 12_101, 198_502),
    ("amazon", {"subset": "Sports_and_Outdoors"}, 35_598, 18_357, 296_337),
    ("amazon", {"subset": "Toys_and_Games"}, 19_412, 11_924, 167_597),
    ("amazon", {"subset": "Yelp"}, 30_431, 20_033, 316_354),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where to write the prepared folders (default: a temp dir)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    root = find_shared_data()
    if root is None:
        print("SKIP: ../shared/data is absent (set QARM_SHARED_DATA); nothing to prepare")
        return 0
    out_root = args.out or Path(tempfile.mkdtemp(prefix="qarm-prepared-"))
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, python {platform.python_version()}")
    print(f"data: {root}; output: {out_root}; prepare config: defaults (seed 0)\n")

    header = ("| dataset | users | items | source interactions | data card (users / items / interactions) | match "
              "| rows after negatives | label rates | split | load s | prepare s | save s |")
    lines = [header, "|" + "---|" * 12]
    all_match = True
    for name, options, e_users, e_items, e_inter in DATASETS:
        spec = get_loader(name)
        if spec.shared_folder and not (root / spec.shared_folder).is_dir():
            print(f"SKIP {name}: {root / spec.shared_folder} is absent")
            continue
        label = name + ("-" + options["subset"] if "subset" in options else "")
        start = time.perf_counter()
        _, ds, timings = prepare(name, out_root / label, loader_options=options, overwrite=True)
        stats = describe_dataset(ds)
        got = (stats["users"], stats["items"], stats["source_interactions"])
        expected = (e_users, e_items, e_inter)
        match = all(e is None or g == e for g, e in zip(got, expected))
        all_match &= match
        card = " / ".join("-" if e is None else f"{e:,}" for e in expected)
        rates = ", ".join(f"{k} {v:.3f}" for k, v in stats["label_rates"].items())
        split = stats["splits"]
        split_text = f"{split['prepared']['split']['strategy']}: " + "/".join(f"{split[s]['rows']:,}" for s in
                                                                          ("train", "valid", "test"))
        lines.append(f"| {label} | {got[0]:,} | {got[1]:,} | {got[2]:,} | {card} | {'yes' if match else 'NO'} "
                     f"| {stats['interactions']:,} | {rates} | {split_text} | {timings['load']:.1f} "
                     f"| {timings['split_and_negatives']:.1f} | {timings['save']:.1f} |")
        print(f"{label}: {time.perf_counter() - start:.1f} s, counts {got}, data card {expected}, "
              f"match={match}, vectors {stats['modality_vectors']}, text {list(stats['text_columns'])}")
        for note in stats.get("notes", []):
            print(f"  note: {note}")
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0 if all_match else 1


if __name__ == "__main__":
    sys.exit(main())

"""User2Item training and item2item pair mining on MicroLens-50k (QARM issue 3, item alignment).

    python benchmarks/align_pairs_microlens.py                  # prepares MicroLens-50k into a temp folder
    python benchmarks/align_pairs_microlens.py /tmp/ml50k       # a folder from `qarm data prepare`
    python benchmarks/align_pairs_microlens.py /tmp/ml50k --epochs 4 --pooling attention --save /tmp/u2i
    python benchmarks/align_pairs_microlens.py /tmp/ml50k --threads 0   # torch's default thread count

Prints the machine, the data, the configs and the seed; the training time (per step and in all);
Recall@50 / NDCG@50 on the validation split for the two-tower model and for the popularity baseline
(protocol: the docstring of ``qarm.align.user2item``); the similarity distribution of the mined triggers;
the number of pairs per source, and the time of each mining step. The goal: training in at most
3 minutes and Swing well under 2 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from qarm.align.pairs import PairMiningConfig, mine_pairs, mine_user2item_pairs
from qarm.align.user2item import (
    User2ItemConfig,
    evaluate_popularity,
    item_embeddings,
    positive_events,
    save_user2item,
    train_user2item,
)
from qarm.config import to_dict
from qarm.data.io import load_dataset
from qarm.data.prepare import prepare

GIB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", type=Path, help="prepared MicroLens-50k folder (default: prepare one)")
    parser.add_argument("--epochs", type=int, default=User2ItemConfig.epochs)
    parser.add_argument("--pooling", choices=["mean", "attention"], default=User2ItemConfig.pooling)
    parser.add_argument("--min-similarity", type=float, default=PairMiningConfig.min_similarity)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="also save the model to this folder")
    # One thread by default: the ops are small, so a second thread gains ~10% on an idle machine, while on a
    # busy one two OpenMP threads fighting for a core made each step 20x slower (690 vs 30 ms measured).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(f"machine: {platform.platform()}, python {platform.python_version()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / GIB:.1f} GiB RAM; load average {os.getloadavg()[0]:.1f} "
          f"(the machine may be shared: times are indicative)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data
        if folder is None:
            start = time.perf_counter()
            folder, _, _ = prepare("microlens50k", Path(tmp) / "microlens50k")
            print(f"prepared MicroLens-50k into {folder} in {time.perf_counter() - start:.1f} s")
        run(load_dataset(folder), folder, args)


def run(dataset, folder: Path, args: argparse.Namespace) -> None:
    train = positive_events(dataset, "train")
    valid = positive_events(dataset, "valid")
    split = dataset.meta.prepared.get("split", {})
    print(f"data: {folder} ({dataset.meta.name}): {dataset.n_users:,} users, {dataset.n_items:,} items, "
          f"{dataset.n_interactions:,} rows; split {split.get('strategy')}, "
          f"{int(dataset.items['cold_start'].sum()):,} cold-start items; "
          f"{len(train):,} training positives, {len(valid):,} valid positives on non-cold items")

    config = User2ItemConfig(epochs=args.epochs, pooling=args.pooling, seed=args.seed)
    mining = PairMiningConfig(min_similarity=args.min_similarity, seed=args.seed)
    print(f"user2item config: {json.dumps(to_dict(config))}")
    print(f"pair mining config: {json.dumps(to_dict(mining))}")
    print(f"seed: {args.seed}")

    model, metrics = train_user2item(dataset, config, progress=not args.no_progress)
    k = config.eval_k
    print(f"train: {metrics['steps']} steps of {config.batch_size} in {metrics['seconds_train']:.1f} s "
          f"({1000 * metrics['seconds_per_step']:.1f} ms/step); loss per epoch "
          f"{[round(v, 3) for v in metrics['epoch_loss']]}")
    popularity = evaluate_popularity(dataset, k=k)
    print(f"valid ({metrics['n_valid_events']:,} events, all non-cold items, own training positives excluded):")
    print(f"  two-tower   recall@{k} {metrics[f'recall@{k}']:.4f}  ndcg@{k} {metrics[f'ndcg@{k}']:.4f}  "
          f"(eval {metrics['seconds_eval']:.1f} s)")
    print(f"  popularity  recall@{k} {popularity[f'recall@{k}']:.4f}  ndcg@{k} {popularity[f'ndcg@{k}']:.4f}")
    if args.save:
        save_user2item(model, args.save, metrics)
        print(f"saved the model to {args.save}")

    vectors = item_embeddings(model)
    mined_all = mine_user2item_pairs(dataset, vectors, history_len=mining.history_len,
                                     min_similarity=None)["score"].to_numpy()
    quantiles = np.quantile(mined_all, [0.1, 0.25, 0.5, 0.75, 0.9]) if len(mined_all) else []
    print(f"trigger similarity (all {len(mined_all):,} targets with an earlier positive): quantiles "
          f"10/25/50/75/90% = {np.round(quantiles, 3).tolist()}")

    start = time.perf_counter()
    mined = mine_pairs(dataset, vectors, mining)
    total = time.perf_counter() - start
    print(f"pairs (min_similarity {mining.min_similarity}): " + ", ".join(f"{n} {v:,}" for n, v in mined.counts.items()))
    print("time: " + ", ".join(f"{n} {v:.1f} s" for n, v in mined.seconds.items()) + f", mine_pairs total {total:.1f} s")


if __name__ == "__main__":
    main()

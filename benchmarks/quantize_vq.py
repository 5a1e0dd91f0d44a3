"""VQ codes at scale: top-25 neighbours of every item of a 1M-item catalogue with HNSW (or IVF).

    python benchmarks/quantize_vq.py                                   # 1M x 64-d, IVF (the default above 50k), k=25
    python benchmarks/quantize_vq.py --items 50000 --recall-sample 2000
    python benchmarks/quantize_vq.py --index ivf --ivf-nprobe 32
    python benchmarks/quantize_vq.py --sweep ''                       # skip the efSearch sweep

Times the index build and the search of every catalogue item (self excluded: ``TopKCodes.fit_transform``),
then measures recall@k of those codes against exact search (faiss ``IndexFlatIP``) on a random sample
of catalogue items. ``--sweep`` repeats the sample measurement for other efSearch (or nprobe) values and
extrapolates the full search time from the sample's, to show where the recall / time trade-off sits.

Goals for 1M items: codes in <= 5 min (build + search) and recall@25 >= 0.95 on a 10k sample.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from quantize_common import Timer, gaussian_mixture, machine_line

from qarm.quantize import TopKCodes, faiss_ops

GOAL_SECONDS = 300.0
GOAL_RECALL = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--items-per-component", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--index", choices=["hnsw", "ivf", "exact"], default="ivf")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-ef-construction", type=int, default=80)
    parser.add_argument("--hnsw-ef-search", type=int, default=64)
    parser.add_argument("--ivf-nlist", type=int, default=None)
    parser.add_argument("--ivf-nprobe", type=int, default=32)
    parser.add_argument("--recall-sample", type=int, default=10_000)
    parser.add_argument("--sweep", default="32,64,128,256",
                        help="comma list of efSearch (hnsw) or nprobe (ivf) values to measure on the sample; "
                             "'' to skip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    faiss_ops.set_num_threads(args.threads)
    print(machine_line())
    params = {"k": args.k, "index": args.index, "hnsw_m": args.hnsw_m,
              "hnsw_ef_construction": args.hnsw_ef_construction, "hnsw_ef_search": args.hnsw_ef_search,
              "ivf_nlist": args.ivf_nlist, "ivf_nprobe": args.ivf_nprobe, "normalize": True, "exclude_self": True}
    print(f"data: {args.items:,} x {args.dim} Gaussian mixture, {max(1, args.items // args.items_per_component):,} "
          f"components, noise {args.noise}, seed {args.seed}")
    print(f"config: {json.dumps(params)}")

    with Timer() as t:
        x, _ = gaussian_mixture(args.items, args.dim, args.items_per_component, args.noise, args.seed)
    print(f"generate: {t.seconds:.1f} s")

    vq = TopKCodes(**params, random_state=args.seed, verbose=False)
    with Timer() as build:
        vq.fit(x)
    print(f"build ({vq.index_kind_}): {build.seconds:8.2f} s", flush=True)
    with Timer() as search:
        codes = vq.transform(vq.vectors_, vq.item_ids_)
    print(f"search all {len(x):,} items (top-{args.k}, self excluded): {search.seconds:8.2f} s", flush=True)
    if (codes == vq.item_ids_[:, None]).any():
        raise SystemExit("self-exclusion failed")
    total = build.seconds + search.seconds

    recall = vq.recall_against_exact(args.recall_sample, random_state=args.seed)
    print(f"recall@{args.k} vs exact on {recall['sample_size']:,} items: {recall['recall_at_k']:.4f} "
          f"(worst item {recall.get('min_item_recall', 1.0):.2f}, items below 0.5: "
          f"{recall.get('share_below_half', 0.0):.4f}, redone exactly: {recall.get('share_researched', 0.0):.4f}; "
          f"exact search of the sample "
          f"{recall.get('seconds_exact', 0.0):.1f} s)", flush=True)

    sweep_rows = []
    if args.sweep and vq.index_kind_ != "exact":
        # The same sample as recall_against_exact; its exact codes are computed once for every value.
        rng = np.random.default_rng(args.seed)
        rows = np.sort(rng.choice(len(x), size=min(args.recall_sample, len(x)), replace=False))
        queries, ids = vq.vectors_[rows], vq.item_ids_[rows]
        exact = TopKCodes(k=args.k, index="exact").fit(vq.vectors_, vq.item_ids_).transform(queries, ids)
        knob = "hnsw_ef_search" if vq.index_kind_ == "hnsw" else "ivf_nprobe"
        print(f"\n| {knob} | recall@{args.k} | worst item | items < 0.5 | redone exactly | sample search (s) | "
              f"extrapolated full search (s) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for value in [int(v) for v in args.sweep.split(",") if v.strip()]:
            setattr(vq, knob, value)
            with Timer() as t:
                approx, _, n_researched = vq._search(queries, ids)
            per_item = np.array([len(set(a) & set(b)) for a, b in zip(approx, exact)]) / args.k
            full = t.seconds * len(x) / len(rows)
            sweep_rows.append({knob: value, "recall_at_k": float(per_item.mean()),
                               "min_item_recall": float(per_item.min()),
                               "share_below_half": float((per_item < 0.5).mean()),
                               "share_researched": n_researched / len(rows), "extrapolated_search_s": full})
            print(f"| {value} | {per_item.mean():.4f} | {per_item.min():.2f} | {(per_item < 0.5).mean():.4f} | "
                  f"{n_researched / len(rows):.4f} | {t.seconds:.2f} | {full:.1f} |", flush=True)

    time_ok = "meets" if total <= GOAL_SECONDS else "misses"
    recall_ok = "meets" if recall["recall_at_k"] >= GOAL_RECALL else "misses"
    scale = "" if args.items == 1_000_000 else " (goals are set for 1M items)"
    print(f"\nVQ top-{args.k} codes: build + search {total:.1f} s ({time_ok} the {GOAL_SECONDS:.0f} s goal), "
          f"recall@{args.k} {recall['recall_at_k']:.4f} ({recall_ok} the {GOAL_RECALL} goal){scale}")
    print(json.dumps({"machine": machine_line(), "config": params, "items": args.items, "dim": args.dim,
                      "seed": args.seed, "build_s": build.seconds, "search_s": search.seconds,
                      "recall": recall, "sweep": sweep_rows, "codes_dtype": str(np.asarray(codes).dtype)}))


if __name__ == "__main__":
    main()

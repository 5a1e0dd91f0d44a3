"""RQ codes at scale: faiss residual k-means against scikit-learn k-means per level, side by side.

    python benchmarks/quantize_rq.py                                  # 1M x 64-d, 6 levels x 256
    python benchmarks/quantize_rq.py --items 50000 --reference minibatch
    python benchmarks/quantize_rq.py --threads 2 --reference minibatch,kmeans

Both runs use the same vectors, the same per-level training samples and the same residual chain: the
reference is a subclass of :class:`qarm.quantize.ResidualKMeans` whose two seams (one level's k-means,
the nearest-centroid assignment) call scikit-learn (``MiniBatchKMeans`` or ``KMeans``, ``n_init=1``,
``fit`` then ``predict``) instead of faiss. "train + assign" is ``fit_transform`` on every vector: each
level's k-means plus the assignment of all items, i.e. the codes of the whole catalogue. "assign only"
is ``transform`` with the frozen codebooks (the cost of coding new items).

Prints the machine, data, config and seed, the wall times, their ratio, and the quality of each
result (reconstruction error, level-1 utilisation and entropy, full-code collision rate) so that a
speed-up is not bought with worse codes. Goal: faiss train + assign <= 60 s on 2 cores for 1M x 64-d.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from quantize_common import Timer, gaussian_mixture, machine_line
from threadpoolctl import threadpool_limits

from qarm.quantize import ResidualKMeans, faiss_ops, rq_quality

GOAL_SECONDS = 60.0


class SklearnResidualKMeans(ResidualKMeans):
    """The same residual chain, with scikit-learn doing each level's k-means and assignment."""

    def __init__(self, *args: Any, algorithm: str = "minibatch", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.algorithm = algorithm

    def _train_level(self, points: np.ndarray, k: int, seed: int) -> np.ndarray:
        from sklearn.cluster import KMeans, MiniBatchKMeans

        if self.algorithm == "minibatch":
            est = MiniBatchKMeans(n_clusters=k, n_init=1, random_state=seed % (2**31))
        else:
            est = KMeans(n_clusters=k, n_init=1, max_iter=int(self.niter), random_state=seed % (2**31))
        self._estimator = est.fit(points)
        return np.ascontiguousarray(est.cluster_centers_, dtype=np.float32)

    def _assign(self, residual: np.ndarray, centroids: np.ndarray, advance: Any = None) -> np.ndarray:
        est = getattr(self, "_estimator", None)
        if est is not None and np.array_equal(est.cluster_centers_, centroids):
            return est.predict(residual).astype(np.int64)
        from sklearn.metrics import pairwise_distances_argmin

        return pairwise_distances_argmin(residual, centroids).astype(np.int64)


def summarise(name: str, rq: ResidualKMeans, codes: np.ndarray, x: np.ndarray, fit_s: float,
              assign_s: float | None) -> dict[str, Any]:
    q = rq_quality(codes, rq.codebooks_, rq.preprocess(x))
    last, first = q["levels"][-1], q["levels"][0]
    return {
        "name": name,
        "train_assign_s": fit_s,
        "assign_only_s": assign_s,
        "relative_error": last["relative_error"],
        "level1_utilisation": first["utilisation"],
        "level1_entropy_bits": first["entropy_bits"],
        "min_level_utilisation": min(lv["utilisation"] for lv in q["levels"]),
        "full_code_collision_rate": q["full_code"]["collision_rate"],
        "distinct_codes": q["full_code"]["distinct"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--items-per-component", type=int, default=1000,
                        help="mixture components = items / this (cluster sizes do not change with --items)")
    parser.add_argument("--noise", type=float, default=0.5, help="within-component std (centres ~ N(0, I))")
    parser.add_argument("--levels", type=int, default=6)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--max-points-per-centroid", type=int, default=256,
                        help="per-level k-means sample = this x codebook size; 0 = every residual")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="faiss and scikit-learn threads (default: all)")
    parser.add_argument("--reference", default="minibatch",
                        help="comma list of minibatch, kmeans; or none (faiss only)")
    parser.add_argument("--skip-assign-timing", action="store_true", help="do not time transform() separately")
    args = parser.parse_args()

    references = [] if args.reference == "none" else [r.strip() for r in args.reference.split(",")]
    unknown = sorted(set(references) - {"minibatch", "kmeans"})
    if unknown:
        parser.error(f"unknown --reference {unknown}; choose from minibatch, kmeans, none")
    faiss_ops.set_num_threads(args.threads)
    print(machine_line())
    config = {"levels": args.levels, "codebook_size": args.codebook_size, "niter": args.niter,
              "max_points_per_centroid": args.max_points_per_centroid or None, "normalize": True}
    print(f"data: {args.items:,} x {args.dim} Gaussian mixture, {max(1, args.items // args.items_per_component):,} "
          f"components, noise {args.noise}, seed {args.seed}")
    print(f"config: {json.dumps(config)}")

    with Timer() as t:
        x, _ = gaussian_mixture(args.items, args.dim, args.items_per_component, args.noise, args.seed)
    print(f"generate: {t.seconds:.1f} s")

    rows = []
    runs: list[tuple[str, ResidualKMeans]] = [("faiss", ResidualKMeans(**config, random_state=args.seed))]
    runs += [(f"sklearn-{r}", SklearnResidualKMeans(**config, random_state=args.seed, algorithm=r)) for r in references]
    with threadpool_limits(limits=args.threads):
        for name, rq in runs:
            with Timer() as fit:
                codes = rq.fit_transform(x)
            assign_s = None
            if not args.skip_assign_timing:
                with Timer() as assign:
                    again = rq.transform(x)
                assign_s = assign.seconds
                if not np.array_equal(again, codes):
                    raise SystemExit(f"{name}: transform() disagrees with fit_transform()")
            rows.append(summarise(name, rq, codes, x, fit.seconds, assign_s))
            print(f"  {name:<18} train + assign {fit.seconds:8.2f} s" +
                  (f"   assign only {assign_s:7.2f} s" if assign_s is not None else ""), flush=True)

    base = rows[0]["train_assign_s"]
    print()
    print("| run | train + assign (s) | assign only (s) | time / faiss | relative error | level-1 util. | "
          "level-1 entropy (bits) | worst level util. | full-code collision | distinct codes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        assign = f"{r['assign_only_s']:.2f}" if r["assign_only_s"] is not None else "-"
        print(f"| {r['name']} | {r['train_assign_s']:.2f} | {assign} | {r['train_assign_s'] / base:.2f}x | "
              f"{r['relative_error']:.4f} | {r['level1_utilisation']:.3f} | {r['level1_entropy_bits']:.2f} | "
              f"{r['min_level_utilisation']:.3f} | {r['full_code_collision_rate']:.4f} | {r['distinct_codes']:,} |")
    verdict = "meets" if base <= GOAL_SECONDS else "misses"
    print(f"\nfaiss train + assign: {base:.1f} s ({verdict} the {GOAL_SECONDS:.0f} s goal"
          f"{'' if args.items == 1_000_000 else ', which is set for 1M items'})")
    print(json.dumps({"machine": machine_line(), "config": config, "items": args.items, "dim": args.dim,
                      "seed": args.seed, "results": rows}))


if __name__ == "__main__":
    main()

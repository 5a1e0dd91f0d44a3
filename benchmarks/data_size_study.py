"""The data-size study: do the codes overtake the frozen aligned vector when exposures are plentiful?

    python benchmarks/data_size_study.py                                  # 0.2M, 2M and 10M exposures, seeds 0 1
    python benchmarks/data_size_study.py --exposures 200000 2000000 --seeds 0 1 --out runs/datasize

The paper's premise is that QARM's trainable codes win when the data is plentiful. Here the synthetic
generator's catalogue and its ground truth stay fixed (``--items``, 5,000 by default: the embedded default's)
and only the log grows: for each exposure count N the generator draws N real exposures (clicked or not: no
sampled negatives) from N / 100 users (the default's exposures per user), and ``qarm run`` takes them through
prepare, align, quantize and the three ranking rows ID-only, ``+ aligned vector`` (the frozen aligned vector,
no codes) and ``+ VQ & RQ`` (QARM), each with ``--seeds``, on the run's own defaults (alignment budget, 64
centroids per RQ level) so that nothing but N changes. The codes' gain is ``+ VQ & RQ`` minus ``+ aligned
vector`` in test GAUC, overall, on warm targets and on cold-start targets.

Every size is a ``qarm run`` folder under ``--out`` (``n<N>``): an interrupted study resumes from the stage
cache and the finished ranking runs. ``--merge A.json B.json`` trains nothing: it joins the sizes of earlier
results (a later file's size replaces an earlier one's) into one table and plot. Writes
``data_size_study.json`` / ``.md`` and a PNG of the gain against N to ``benchmarks/results/`` (``--name``),
with the machine, the configs and the seeds.

The ranking rows train QARM's default layout of the code that runs them: the results in RESULTS.md (issue 15)
were made before qarm 0.2.0, with the paper's layout (``sequence_dim`` and ``target_dim`` None).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _machine import load_average

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("ID-only", "+ aligned vector", "+ VQ & RQ")
SEGMENTS = ("overall", "warm", "cold_start")
EXPOSURES_PER_USER = 100  # the embedded default: 200,000 exposures of 2,000 users


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """``qarm run`` on the synthetic data with ``n`` exposures; the report's ranking part."""
    from qarm.pipeline import run_config_from_dict, run_pipeline

    config = run_config_from_dict({
        "dataset": "synthetic",
        "loader_options": {"n_items": args.items, "n_users": max(1, n // EXPOSURES_PER_USER),
                           "n_interactions": n, "seed": args.data_seed},
        "rank": {"studies": ["table1"], "rows": list(ROWS), "seeds": list(args.seeds),
                 "train": {"epochs": args.epochs}, "workers": args.workers},
    })
    start = time.perf_counter()
    report = run_pipeline(config, args.out / f"n{n}", log=lambda line: print(f"[n={n:,}] {line}", flush=True))
    return {"report": report, "wall_seconds": time.perf_counter() - start}


def summarise(n: int, report: dict[str, Any]) -> dict[str, Any]:
    """Test GAUC (percent) per row and segment, mean and std over the seeds, and the stage seconds."""
    ranking = report["ranking"]
    task = ranking["tasks"][0]
    rows: dict[str, Any] = {}
    for name in ROWS:
        metrics = ranking["variants"][name]["metrics"][task]
        rows[name] = {segment: {"gauc": 100 * metrics[segment]["gauc"],
                                "std": 100 * metrics[segment]["gauc_std"] if metrics[segment]["n_seeds"] > 1 else None,
                                "n": metrics[segment]["n"]}
                      for segment in SEGMENTS if segment in metrics}
    gain = {segment: rows["+ VQ & RQ"][segment]["gauc"] - rows["+ aligned vector"][segment]["gauc"]
            for segment in SEGMENTS if segment in rows["+ VQ & RQ"]}
    data = report["data"]
    return {"exposures": n, "interactions": data.get("interactions"), "users": data.get("users"),
            "items": data.get("items"), "task": task, "rows": rows, "codes_gain_over_vector": gain,
            "stage_seconds": report["seconds"], "training_seconds": ranking.get("seconds")}


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Data-size study: {result['name']}", "",
             f"Machine {result['machine']['platform']}, {result['machine']['cpus']} CPUs, python "
             f"{result['machine']['python']}; seeds {result['seeds']} (data seed {result['data_seed']}); "
             f"{result['items']:,} items; {result['epochs']} epochs per ranking run; "
             f"command `python benchmarks/data_size_study.py {' '.join(result['argv'])}`.", "",
             f"Load average at the end: {result['load_average']}. {result['beside']}", "",
             "Test GAUC (percent, mean ± std over the seeds) of the task "
             f"`{result['sizes'][0]['task'] if result['sizes'] else '?'}`:", "",
             "| exposures | users | row | overall | warm | cold-start |", "|---:|---:|---|---:|---:|---:|"]

    def cell(v: dict[str, Any] | None) -> str:
        if v is None:
            return "-"
        return f"{v['gauc']:.2f}" + (f" ± {v['std']:.2f}" if v.get("std") is not None else "")

    for size in result["sizes"]:
        for name in ROWS:
            r = size["rows"][name]
            lines.append(f"| {size['exposures']:,} | {size['users']:,} | {name} | {cell(r.get('overall'))} | "
                         f"{cell(r.get('warm'))} | {cell(r.get('cold_start'))} |")
        g = size["codes_gain_over_vector"]
        lines.append(f"| {size['exposures']:,} | | **codes - vector** | {g.get('overall', float('nan')):+.2f} | "
                     f"{g.get('warm', float('nan')):+.2f} | {g.get('cold_start', float('nan')):+.2f} |")
    lines += ["", "Stage seconds (wall, shared machine):", "", "| exposures | " + " | ".join(
        ("prepare", "align", "quantize", "rank")) + " |", "|---:|---:|---:|---:|---:|"]
    for size in result["sizes"]:
        s = size["stage_seconds"]
        lines.append(f"| {size['exposures']:,} | " + " | ".join(
            f"{s[k]:.0f}" if k in s else "cached" for k in ("prepare", "align", "quantize", "rank")) + " |")
    lines += ["", f"Codes overtake the frozen aligned vector (overall): {result['overtake']}", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [s["exposures"] for s in result["sizes"]]
    for segment in SEGMENTS:
        ys = [s["codes_gain_over_vector"].get(segment, float("nan")) for s in result["sizes"]]
        ax.plot(xs, ys, marker="o", label=segment.replace("_", "-"))
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("exposures in the log")
    ax.set_ylabel("test GAUC, VQ & RQ minus vector (points)")
    ax.set_title(f"Codes vs frozen vector, synthetic ({result['items']:,} items)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exposures", type=int, nargs="+", default=[200_000, 2_000_000, 10_000_000])
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2, help="ranking epochs of every run (same at every size)")
    parser.add_argument("--workers", type=int, default=1, help="ranking runs trained at once (one thread each)")
    parser.add_argument("--out", type=Path, default=Path("runs/datasize"))
    parser.add_argument("--name", default="data_size_study")
    parser.add_argument("--beside", default="", help="what else ran on the machine meanwhile (for the record)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="earlier result JSONs to join into one table and plot (nothing is trained)")
    args = parser.parse_args(argv)

    sizes = []
    if args.merge:
        by_size: dict[int, dict[str, Any]] = {}
        for path in args.merge:
            earlier = json.loads(path.read_text(encoding="utf-8"))
            for size in earlier["sizes"]:
                by_size[int(size["exposures"])] = size | {"from": path.name, "seeds": earlier["seeds"]}
        sizes = [by_size[n] for n in sorted(by_size)]
        args.seeds = sorted({seed for size in sizes for seed in size["seeds"]})
    for n in ([] if args.merge else sorted(args.exposures)):
        done = run_size(n, args)
        sizes.append(summarise(n, done["report"]) | {"wall_seconds": done["wall_seconds"]})
    overtake = [s["exposures"] for s in sizes if s["codes_gain_over_vector"].get("overall", 0.0) > 0]
    result = {"name": args.name, "argv": sys.argv[1:] if argv is None else argv,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "seeds": args.seeds, "data_seed": args.data_seed, "items": args.items, "epochs": args.epochs,
              "exposures_per_user": EXPOSURES_PER_USER, "rows": list(ROWS), "sizes": sizes,
              "load_average": load_average(), "beside": args.beside,
              "overtake": (f"yes, at {', '.join(f'{n:,}' for n in overtake)} exposures" if overtake
                           else "no, at none of the sizes measured")}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (args.results / f"{args.name}.md").write_text(to_markdown(result), encoding="utf-8")
    plot(result, args.results / f"{args.name}.png")
    print(to_markdown(result))
    if len(sizes) > 1:
        gains = [s["codes_gain_over_vector"].get("overall", float("nan")) for s in sizes]
        print(f"median gain over the sizes: {statistics.median(gains):+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

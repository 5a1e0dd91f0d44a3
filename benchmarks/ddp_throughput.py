"""1 process against N data-parallel processes on the same cores: training examples/s and test GAUC.

    python benchmarks/ddp_throughput.py runs/synthetic/data --codes runs/synthetic/quantize \\
        --vectors runs/synthetic/align --name synthetic --seeds 0 1 2

Each seed trains the QARM row (``+ VQ & RQ``: aligned vector, VQ and RQ codes, code matching) twice with
the same recipe (``--epochs``, batch 1,024, early stopping on validation GAUC) and the same global batch:

* ``1x{cores}``: one process with ``--cores`` torch threads (``qarm train``);
* ``{N}x{cores/N}``: ``--nproc N`` gloo processes of ``cores / N`` threads each (``qarm train --nproc N``).

N ranks take the steps of one rank (each rank's loss is weighted by its share of the global batch), so the
two runs differ only by float summation order and speed. examples/s is the trainer's own figure: training
examples (all ranks) per second of training time, validation and checkpoints excluded. Runs of one seed
are interleaved, so a change in the machine's load hits both alike; the machine, its load average before
and after, the data, the config and the seeds are printed and written to
``benchmarks/results/ddp_throughput_<name>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _machine import load_average

from qarm.distributed import spawn
from qarm.train.ablation import TABLE1
from qarm.train.stage import RankingConfig, train_ranking
from qarm.train.trainer import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
ROW = "+ VQ & RQ"


def ranking_config(seed: int, epochs: int, threads: int) -> RankingConfig:
    model, switches = TABLE1[ROW]
    return RankingConfig(model=model, model_config=dict(switches),
                         train=TrainConfig(epochs=epochs, seed=seed, threads=threads))


def run_one(data: Path, codes: Path, vectors: Path, out: Path, config: RankingConfig, nproc: int) -> dict[str, Any]:
    arguments: dict[str, Any] = {"quantize_dir": codes, "align_dir": vectors, "resume": False}
    if nproc == 1:
        report = train_ranking(data, out, config, **arguments)
    else:
        spawn(nproc, train_ranking, data, out, config, threads=config.train.threads, **arguments)
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    history = report["history"]
    return {"examples_per_second": round(report["examples_per_second"], 1),
            "test_gauc": {t: round(100 * m["overall"]["gauc"], 3) for t, m in report["metrics"].items()},
            "steps": history["steps"], "examples": history["examples"], "stopped": history["stopped"],
            "train_seconds": round(history["train_seconds"], 2), "world_size": report["world_size"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--codes", type=Path, required=True)
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--name", required=True, help="the data's name in the results file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=3, help="upper bound (early stopping may end sooner)")
    parser.add_argument("--cores", type=int, default=2, help="threads of the 1-process run, shared by the ranks")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    layouts = {f"1x{args.cores}": (1, args.cores), f"{args.nproc}x{args.cores // args.nproc}":
               (args.nproc, max(1, args.cores // args.nproc))}
    header = {"command": shlex.join([sys.executable, *sys.argv]),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cpu_count": os.cpu_count(),
                          "load_average_before": load_average(),
                          "note": "a machine shared with other work: figures move with its load"},
              "data": {"name": args.name, "data": str(args.data), "codes": str(args.codes),
                       "vectors": str(args.vectors)},
              "config": {"row": ROW, **json.loads(json.dumps(
                  ranking_config(args.seeds[0], args.epochs, 1), default=lambda o: o.__dict__))},
              "layouts": {k: {"processes": n, "threads_each": t} for k, (n, t) in layouts.items()},
              "seeds": args.seeds}
    print(json.dumps(header, indent=1), flush=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qarm-ddp-") as tmp:
        for seed in args.seeds:
            for layout, (nproc, threads) in layouts.items():
                start = time.perf_counter()
                result = run_one(args.data, args.codes, args.vectors, Path(tmp) / f"{layout}-{seed}",
                                 ranking_config(seed, args.epochs, threads), nproc)
                result |= {"layout": layout, "seed": seed, "wall_seconds": round(time.perf_counter() - start, 1)}
                runs.append(result)
                print(json.dumps(result), flush=True)
    summary = {}
    for layout in layouts:
        mine = [r for r in runs if r["layout"] == layout]
        summary[layout] = {"examples_per_second_median": statistics.median(r["examples_per_second"] for r in mine),
                           "test_gauc_mean": {t: round(statistics.mean(r["test_gauc"][t] for r in mine), 3)
                                              for t in mine[0]["test_gauc"]}}
    header["machine"]["load_average_after"] = load_average()
    report = {**header, "runs": runs, "summary": summary}
    print(json.dumps(summary, indent=1))
    out = args.out or RESULTS / f"ddp_throughput_{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

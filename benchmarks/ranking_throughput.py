"""Training and prediction speed of the Table 1 rows, measured side by side, and a torch.profiler view.

    python benchmarks/ranking_throughput.py runs/ml50k/data --codes runs/ml50k/quantize \\
        --vectors runs/ml50k/align --name microlens50k            # writes benchmarks/results/
    python benchmarks/ranking_throughput.py runs/synthetic/data --codes runs/synthetic/quantize \\
        --vectors runs/synthetic/align --name synthetic --profile "+ VQ & RQ"

Every row (ID-only, Baseline, + VQ, + RQ, + VQ & RQ) is built with the seed and trained from the same
initial weights; the rows are **interleaved**: each of ``--repeats`` rounds times every row once, so a
change in the machine's load hits every row alike, and a row's figure is the median over the rounds.

* training: ``--steps`` optimiser steps (forward, BCE, backward, Adam) on the trainer's own shuffled
  batches (``batch_size`` of the training recipe, 1,024), after ``--warmup`` untimed steps;
* prediction: :func:`qarm.train.trainer.predict`'s forward on ``--predict-rows`` validation rows in
  batches of 8,192 (what evaluation and serving call).

Run once per thread count (``--threads 1 2``: torch intra-op threads). ``--profile ROW`` also prints the
top operators of one row's training steps (torch.profiler, self CPU time) and writes them beside the
table. Batches are built outside the timed region for training (the trainer builds them the same way,
and the cost is the same for every row); prediction times include building its batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _machine import load_average

from qarm.features.examples import ExampleSource
from qarm.models import build_model
from qarm.optim import make_adam
from qarm.precision import PRECISIONS, autocast
from qarm.train.ablation import TABLE1
from qarm.train.stage import build_tables
from qarm.train.trainer import TrainConfig, loss_fn, predict

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("ID-only", "Baseline", "+ VQ", "+ RQ", "+ VQ & RQ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--codes", type=Path, required=True)
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--name", default=None, help="name of the results files (default: the data folder's)")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(TABLE1))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=MODEL:JSON",
                        help='an extra row, e.g. "QARM d32=qarm:{\\"sequence_dim\\": 32}"')
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--predict-rows", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", nargs="*", default=[], help="rows whose training steps are profiled")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(PRECISIONS),
                        help="each row in each precision (qarm.precision; 'bf16': bfloat16 autocast)")
    parser.add_argument("--tag", default="", help="suffix of the results files (e.g. before / after)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    variants = {name: TABLE1[name] for name in args.rows}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        model_name, _, config = rest.partition(":")
        variants[name] = (model_name, json.loads(config or "{}"))
    base_rows = list(variants)
    precision_of: dict[str, str] = {}
    for precision in args.precisions:
        for name in base_rows:
            key = name if precision == args.precisions[0] else f"{name} [{precision}]"
            precision_of[key] = precision
            variants[key] = variants[name]
    args.rows = list(precision_of)
    source = ExampleSource.from_folder(args.data)
    tables = build_tables(source, args.data, "qarm", quantize_dir=args.codes, align_dir=args.vectors)
    train_rows = source.order("train", shuffle=True, seed=args.seed)
    n_batches = args.warmup + args.steps
    batches = [source.batch(train_rows[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(n_batches)]
    valid = source.rows("valid")[: args.predict_rows]
    print(f"machine {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}; data {args.data} ({len(source.rows('train')):,} training rows); seed "
          f"{args.seed}; batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, "
          f"{len(valid):,} prediction rows; {args.repeats} interleaved rounds; load average {load_average()}",
          flush=True)

    results: dict[str, dict[str, dict[str, float]]] = {}
    profiles: dict[str, list[dict[str, float | str]]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        models, optimizers = {}, {}
        for name in args.rows:
            model_name, switches = variants[name]
            models[name] = build_model(model_name, source.spec, tables, switches, seed=args.seed)
            optimizers[name] = make_adam(models[name], 1e-3, fused=True)  # as the trainer (sparse tables: SparseAdam)
        train_s: dict[str, list[float]] = {n: [] for n in args.rows}
        predict_s: dict[str, list[float]] = {n: [] for n in args.rows}
        for round_ in range(args.repeats):
            for name in args.rows:
                model, optimizer = models[name], optimizers[name]
                model.train()
                for i, batch in enumerate(batches):
                    if i == args.warmup:
                        start = time.perf_counter()
                    with autocast(precision_of[name]):
                        logits = model(batch)
                    loss = loss_fn(logits, batch.labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                train_s[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                with torch.no_grad():
                    predict(model, source, "valid", rows=valid, precision=precision_of[name])
                predict_s[name].append(time.perf_counter() - start)
            print(f"  threads {threads} round {round_ + 1}/{args.repeats} done (load {load_average()})", flush=True)
        timed = args.steps * args.batch_size
        results[str(threads)] = {
            name: {"train_examples_per_second": timed / statistics.median(train_s[name]),
                   "predict_examples_per_second": len(valid) / statistics.median(predict_s[name]),
                   "train_seconds_rounds": train_s[name], "predict_seconds_rounds": predict_s[name]}
            for name in args.rows}
        if threads == args.threads[0]:
            for name in args.profile:
                profiles[name] = _profile(models[name], optimizers[name], batches[: args.warmup + 20],
                                          precision_of[name])

    reference = args.rows[0]  # ID-only, or the first row; each precision against its own reference
    lines = [f"# Ranking throughput: {args.name or args.data.name}{' ' + args.tag if args.tag else ''}", "",
             f"Machine {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}; data `{args.data}` "
             f"({len(source.rows('train')):,} training rows); seed {args.seed}; batch {args.batch_size}; "
             f"{args.steps} timed training steps after {args.warmup} warm-up steps; prediction on {len(valid):,} "
             f"validation rows; medians of {args.repeats} interleaved rounds; load average at the end "
             f"{load_average()}. Command: `python benchmarks/ranking_throughput.py {shlex.join(sys.argv[1:])}`.", "",
             "| row | threads | training examples/s | vs " + reference + " | prediction examples/s | vs "
             + reference + " |", "|---|---:|---:|---:|---:|---:|"]
    for threads, rows in results.items():
        for name, r in rows.items():
            ref = rows[reference if precision_of[name] == args.precisions[0]
                       else f"{reference} [{precision_of[name]}]"]
            lines.append(f"| {name} | {threads} | {r['train_examples_per_second']:,.0f} | "
                         f"{r['train_examples_per_second'] / ref['train_examples_per_second']:.0%} | "
                         f"{r['predict_examples_per_second']:,.0f} | "
                         f"{r['predict_examples_per_second'] / ref['predict_examples_per_second']:.0%} |")
    for name, profile_rows in profiles.items():
        lines += ["", f"Profile of `{name}`, {args.warmup + 20} training steps (torch.profiler, {args.threads[0]} "
                  "thread(s), top operators by self CPU time):", "", "| operator | self CPU ms | share | calls |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{p['name']}` | {p['self_ms']:.1f} | {p['share']:.1%} | {p['calls']:.0f} |" for p in profile_rows]
    text = "\n".join(lines) + "\n"
    print(text)
    stem = f"throughput_{args.name or args.data.name}" + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    payload = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "argv": sys.argv[1:], "seed": args.seed, "variants": {n: list(v) for n, v in variants.items()},
               "precisions": precision_of,
               "results": results, "profiles": profiles}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


def _profile(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list, precision: str = "fp32",
             top: int = 15) -> list[dict[str, float | str]]:
    from torch.profiler import ProfilerActivity, profile

    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            with autocast(precision):
                logits = model(batch)
            loss = loss_fn(logits, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"name": e.key, "self_ms": e.self_cpu_time_total / 1000.0, "share": e.self_cpu_time_total / total,
             "calls": float(e.count)} for e in events[:top]]


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    sys.exit(main())

"""The synthetic generator at 1M items / 10M exposures, end to end: time and peak memory of every stage.

    python benchmarks/scale_run.py                                   # 1M items, 100k users, 10M exposures
    python benchmarks/scale_run.py --items 20000 --users 2000 --exposures 200000 --out runs/scale_small

Each stage is the CLI command a user would type, run as its own process so that its peak resident memory
(``ru_maxrss`` of the finished child, from ``os.wait4``) is its own:

1. ``qarm data prepare --dataset synthetic`` (generation, split, validation, Parquet);
2. ``qarm align`` (User2Item, Swing and pair mining, MiniLM encoding of every title, head training, evaluation);
3. ``qarm quantize`` (VQ top-25 neighbours and RQ residual k-means of every item);
4. ``qarm train --model qarm --set train.epochs=1`` (one epoch of QARM VQ & RQ, then validation and test);
5. ``qarm codes publish`` into a SQLite code store, then (in this process) lookups of random item batches.

A finished stage leaves ``<out>/<stage>.done.json`` (its seconds, peak memory and command) and is not run
again: an interrupted run resumes with the next stage (and the stages resume from their own checkpoints).
Writes ``benchmarks/results/<name>.json`` / ``.md`` with the machine, the config, the seed and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import load_average

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_stage(name: str, command: list[str], out: Path, product: Path) -> dict[str, Any]:
    """Run ``command`` as a child process (its output streamed through); its seconds and peak RSS."""
    marker = out / f"{name}.done.json"
    if marker.exists():
        done: dict[str, Any] = json.loads(marker.read_text())
        print(f"[{name}] done before: {done['seconds']:.0f} s, peak {done['peak_rss_gib']:.2f} GiB", flush=True)
        return done
    print(f"[{name}] $ {shlex.join(command)}", flush=True)
    load_before = load_average()
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"[{name}] failed with exit code {code}: {shlex.join(command)}")
    result = {"stage": name, "command": shlex.join(command), "seconds": seconds,
              "peak_rss_gib": usage.ru_maxrss * 1024 / GIB, "cpu_seconds": usage.ru_utime + usage.ru_stime,
              "output_bytes": folder_bytes(product), "load_before": load_before, "load_after": load_average()}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(marker)
    print(f"[{name}] {seconds:.0f} s, peak {result['peak_rss_gib']:.2f} GiB", flush=True)
    return result


def store_lookups(store_path: Path, quantize_dir: Path, n_items: int, *, batches: int, batch_size: int,
                  seed: int) -> dict[str, Any]:
    """Latency of ``CodeStore.get`` for random batches of stored items (bounded: ``batches`` calls)."""
    from qarm.quantize.store import open_store

    store = open_store(store_path)
    names = sorted(store.schema())
    rng = np.random.default_rng(seed)
    ids = np.asarray(_stored_ids(quantize_dir))
    seconds = {name: [] for name in names}
    for _ in range(batches):
        batch = rng.choice(ids, size=batch_size, replace=False)
        for name in names:
            start = time.perf_counter()
            codes = store.get(batch, name)
            seconds[name].append(time.perf_counter() - start)
            if len(codes) != batch_size:
                raise SystemExit(f"store returned {len(codes)} rows for {batch_size} ids")
    return {"items": len(store), "names": names, "batch_size": batch_size, "batches": batches,
            "p50_ms": {n: 1000 * float(np.median(s)) for n, s in seconds.items()},
            "p99_ms": {n: 1000 * float(np.quantile(s, 0.99)) for n, s in seconds.items()},
            "store_bytes": store_path.stat().st_size, "catalogue_items": n_items}


def _stored_ids(quantize_dir: Path) -> list[int]:
    import pyarrow.parquet as pq

    for path in sorted(quantize_dir.glob("*.parquet")):
        table = pq.read_table(path)
        if "item_id" in table.column_names:
            return [int(v) for v in table.column("item_id").to_numpy()]
    raise SystemExit(f"{quantize_dir}: no Parquet file with an item_id column")


def to_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"# End to end at {cfg['items']:,} items / {cfg['exposures']:,} exposures", "",
             f"Machine {result['machine']['platform']}, {result['machine']['cpus']} CPUs, "
             f"{result['machine']['memory_gib']:.1f} GiB, python {result['machine']['python']}; "
             f"{cfg['users']:,} users; seed {cfg['seed']}; command `python benchmarks/scale_run.py "
             f"{' '.join(result['argv'])}`.", "",
             "| stage | wall seconds | CPU seconds | peak RSS (GiB) | output (MiB) | load before / after |",
             "|---|---:|---:|---:|---:|---|"]
    for stage in result["stages"]:
        lines.append(f"| {stage['stage']} | {stage['seconds']:,.0f} | {stage['cpu_seconds']:,.0f} | "
                     f"{stage['peak_rss_gib']:.2f} | {stage['output_bytes'] / 2**20:,.0f} | "
                     f"{stage['load_before']} / {stage['load_after']} |")
    total = sum(s["seconds"] for s in result["stages"])
    lines += ["", f"Total wall time {total:,.0f} s ({total / 60:.1f} min)."]
    lookups = result.get("store_lookups")
    if lookups:
        lines += ["", f"Code store (SQLite, {lookups['items']:,} items, {lookups['store_bytes'] / 2**20:,.0f} MiB): "
                  f"`get` of {lookups['batch_size']} random items, {lookups['batches']} calls per code name: "
                  + ", ".join(f"{n} p50 {lookups['p50_ms'][n]:.2f} ms / p99 {lookups['p99_ms'][n]:.2f} ms"
                              for n in lookups["names"]) + "."]
    for key, text in result.get("reports", {}).items():
        lines += ["", f"{key}: {text}"]
    return "\n".join(lines) + "\n"


def summarise_reports(out: Path) -> dict[str, str]:
    """A line each from the stage reports: what the stages produced, for the results page."""
    lines: dict[str, str] = {}
    align = out / "align" / "align_report.json"
    if align.exists():
        report = json.loads(align.read_text())
        recall = report["evaluation"]["pair_recall"]
        lines["align"] = (f"pairs {report['pairs']['counts']}; held-out pair recall@10 "
                          f"{recall['pretrained']['recall@10']:.4f} pre-trained -> "
                          f"{recall['aligned']['recall@10']:.4f} aligned; seconds {report['seconds']}")
    train = out / "train" / "report.json"
    if train.exists():
        report = json.loads(train.read_text())
        lines["train"] = json.dumps({k: report[k] for k in ("examples_per_second", "seconds") if k in report})
        lines["train test GAUC (%)"] = "; ".join(
            f"{task}: " + ", ".join(f"{segment} {100 * metrics[segment]['gauc']:.2f}"
                                    for segment in ("overall", "warm", "cold_start") if segment in metrics)
            for task, metrics in report["metrics"].items())
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000, help="100 exposures a user, as the embedded default")
    parser.add_argument("--exposures", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/scale_1m"))
    parser.add_argument("--name", default="scale_run_1m")
    parser.add_argument("--lookup-batches", type=int, default=200)
    parser.add_argument("--train-max-steps", type=int, default=None,
                        help="stop the QARM epoch after this many steps (the table says so); default: the whole epoch")
    args = parser.parse_args(argv)

    import psutil

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    qarm = [sys.executable, "-m", "qarm"]
    data, align, quantize, train, store = (out / "data", out / "align", out / "quantize", out / "train",
                                           out / "codes.sqlite")
    train_stage = f"train (QARM, first {args.train_max_steps} steps)" if args.train_max_steps else "train (QARM, 1 epoch)"
    stages = [
        ("prepare", [*qarm, "data", "prepare", "--dataset", "synthetic", "--out", str(data), "--overwrite",
                     "--set", f"n_items={args.items}", "--set", f"n_users={args.users}",
                     "--set", f"n_interactions={args.exposures}", "--set", f"seed={args.seed}"], data),
        ("align", [*qarm, "align", str(data), "--out", str(align)], align),
        ("quantize", [*qarm, "quantize", str(align), "--out", str(quantize), "--overwrite"], quantize),
        (train_stage, [*qarm, "train", str(data), "--out", str(train), "--model", "qarm",
                                   "--codes", str(quantize), "--vectors", str(align), "--set", "train.epochs=1",
                                   "--set", f"train.seed={args.seed}",
                                   *(["--set", f"train.max_steps={args.train_max_steps}"] if args.train_max_steps else [])],
         train),
        ("codes publish (SQLite)", [*qarm, "codes", "publish", str(quantize), "--to", str(store), "--replace"],
         store),
    ]
    result: dict[str, Any] = {
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "memory_gib": psutil.virtual_memory().total / GIB},
        "config": {"items": args.items, "users": args.users, "exposures": args.exposures, "seed": args.seed},
        "stages": [run_stage(name, command, out, product) for name, command, product in stages],
    }
    result["store_lookups"] = store_lookups(store, quantize, args.items, batches=args.lookup_batches,
                                            batch_size=100, seed=args.seed)
    result["reports"] = summarise_reports(out)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

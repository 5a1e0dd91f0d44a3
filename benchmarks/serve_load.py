"""`qarm serve` measured on 127.0.0.1 with bounded loops: load, new uploads, hot reload under load.

    python benchmarks/serve_load.py load runs/synthetic/models --name synthetic     # 50 & 100 req/s x 60 s
    python benchmarks/serve_load.py uploads runs/synthetic/models --name synthetic  # /v1/items + ground truth
    python benchmarks/serve_load.py reload runs/synthetic --name synthetic          # 10 swaps at 100 req/s

Every part starts the real service (``qarm serve`` as a subprocess: uvicorn, the CLI's own defaults) on a
free loopback port, waits for ``/readyz``, warms it with untimed requests, then runs an **open-loop**
load: request ``i`` is due at ``t0 + i / rate`` whatever the earlier ones did (no coordinated
omission), its latency is measured from when it was due (``open``) and from when it was sent
(``sent``). Each run has a fixed request count (``rate x duration``) and a hard deadline
(``duration + 30 s``); requests still open at the deadline count as errors. The client (httpx, asyncio)
runs in this process on the same 2 cores as the server, so its CPU is reported beside the server's
(``/proc`` CPU time of the server's process tree over the run's wall time, in cores).

* ``load``: ``--candidates`` (200) random catalogue items a request for known users; each
  ``--configs`` entry ``STORE:WORKERS[:THREADS]`` (torch threads, default cores / workers; ``sqlite:1``,
  ``redis:1``, ``redis:2``; Redis is a real ``redis-server`` started on a free port) at each ``--rates``;
  plus an in-process breakdown of one
  request (history, batch assembly, model forward, JSON) to say where the time goes.
* ``uploads`` (synthetic bundles only: it needs the generator's ground truth): ``/v1/items`` latency
  for single items, items/s in batches, and the ground-truth check: new items drawn from the same
  generator (items ``n_items..``, never seen in training) are uploaded and ranked at once for users whose
  top interest is the item's business group, against a random catalogue item; the rate at which the
  new item scores higher, beside the same items uploaded with an empty text (the same model knowing
  nothing of the item: out-of-vocabulary id, the codes of no content).
* ``consistency``: from a ``qarm run`` folder whose ``models/`` serves its QARM run: ``--rows`` (1,000) test
  rows of the run's offline ``predictions.parquet``, each one ``/v1/rank`` request for the row's user and
  item as of the row's time, over HTTP to the real service; the largest difference of any task's score.
* ``reload``: from a ``qarm run`` folder, exports ``--swaps`` + 1 bundle versions and one corrupt copy
  into a temporary models folder, serves it at ``--rate`` and moves the current pointer every
  ``duration / (swaps + 2)`` seconds (the corrupt one among them); checks every response.

Writes ``benchmarks/results/serve_<part>_<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from _machine import load_average

RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------- machinery

def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "httpx": httpx.__version__, "load_average_at_start": load_average()}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu_seconds(root: int) -> float:
    """user + system CPU seconds of ``root`` and its live descendants (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(child for child, parent in parents.items() if parent == pid)
    return total


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    import redis

    with tempfile.TemporaryDirectory(prefix="qarm-bench-redis-") as workdir:
        port = free_port()
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def service(models_dir: Path, store: str, workers: int = 1, reload_interval: float = 1.0,
            log_file: Path | None = None, threads: int | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``qarm serve`` on 127.0.0.1:<free port>; yields (base URL, process) once /readyz answers 200."""
    qarm = shutil.which("qarm") or str(Path(sys.executable).with_name("qarm"))
    port = free_port()
    command = [qarm, "serve", str(models_dir), "--store", store, "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers), "--reload-interval", str(reload_interval)]
    if threads is not None:
        command += ["--threads", str(threads)]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"qarm serve exited with {proc.returncode}: {' '.join(command)}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"qarm serve not ready after 120 s: {' '.join(command)}")
            time.sleep(0.2)
        yield url, proc
    finally:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
        if log_file:
            out.close()  # type: ignore[union-attr]


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values) * 1000.0
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "mean_ms": float(a.mean())}


async def open_loop(url: str, path: str, bodies: Sequence[bytes], rate: float, duration: float,
                    parse: bool = False, start_at: float | None = None) -> list[dict[str, Any]]:
    """POST ``bodies`` (cycled) at ``rate`` per second for ``duration`` s: ``rate * duration`` requests."""
    n = int(round(rate * duration))
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    records: list[dict[str, Any]] = [{"i": i, "status": "not sent"} for i in range(n)]
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        t0 = loop.time() + 0.2 if start_at is None else start_at

        async def one(i: int) -> None:
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            rec = records[i]
            rec["due"] = due - t0
            rec["sent"] = loop.time() - t0
            try:
                response = await client.post(path, content=bodies[i % len(bodies)], headers=headers)
                rec["status"] = response.status_code
                if parse and response.status_code == 200:
                    rec["version"] = response.json().get("model_version")
            except httpx.HTTPError as exc:
                rec["status"] = type(exc).__name__
            rec["done"] = loop.time() - t0

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=duration + 30.0)
        for task in pending:
            task.cancel()
    return records


def summarise(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    done = [r for r in records if "done" in r]
    ok = [r for r in done if r["status"] == 200]
    return {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
            "statuses": dict(Counter(str(r["status"]) for r in records)),
            "achieved_rps": len(done) / wall if wall else 0.0,
            "latency_open": percentiles([r["done"] - r["due"] for r in ok]),
            "latency_sent": percentiles([r["done"] - r["sent"] for r in ok]),
            "client_lateness_max_ms": 1000 * max((r["sent"] - r["due"] for r in done), default=0.0)}


def run_load(url: str, proc: subprocess.Popen[bytes], path: str, bodies: Sequence[bytes], rate: float,
             duration: float, parse: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    server0, client0, wall0 = tree_cpu_seconds(proc.pid), self_cpu_seconds(), time.monotonic()
    records = asyncio.run(open_loop(url, path, bodies, rate, duration, parse))
    wall = time.monotonic() - wall0
    out = summarise(records, wall)
    out.update(rate=rate, duration_s=duration, wall_s=wall,
               server_cpu_cores=(tree_cpu_seconds(proc.pid) - server0) / wall,
               client_cpu_cores=(self_cpu_seconds() - client0) / wall)
    return out, records


def read_ids(models_dir: Path) -> tuple[list[str], list[str]]:
    from qarm.serve.bundle import current_version

    version = current_version(models_dir)
    if version is None:
        raise SystemExit(f"{models_dir} has no current version (run `qarm export` or `qarm run`)")
    ids = pd.read_parquet(models_dir / "versions" / version / "ids.parquet")
    users = ids.loc[ids["kind"] == "user", "source_id"].astype(str).tolist()
    items = ids.loc[ids["kind"] == "item", "source_id"].astype(str).tolist()
    return users, items


def rank_bodies(users: list[str], items: list[str], candidates: int, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [json.dumps({"user_id": rng.choice(users), "candidates": rng.sample(items, candidates)}).encode()
            for _ in range(n)]


def write(part: str, name: str, result: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"serve_{part}_{name}"
    for path, text in ((stem.with_suffix(".json"), json.dumps(result, indent=2, default=str)),
                       (stem.with_suffix(".md"), markdown)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {stem}.json / .md")


def header(args: argparse.Namespace, result: dict[str, Any]) -> str:
    m = result["machine"]
    return (f"Machine: {m['platform']}, {m['cpu_count']} CPUs, Python {m['python']}, torch {m['torch']}, load "
            f"average at start {m['load_average_at_start']}. Command: `{result['command']}`. Seed {args.seed}. "
            "Server and load generator share the machine's cores (client CPU shown).\n\n")


# ---------------------------------------------------------------------------------------------- load

def in_process_breakdown(models_dir: Path, bodies: Sequence[bytes], threads: int, repeats: int = 200) -> dict[str, Any]:
    """Where one /v1/rank request's time goes inside the service (same Scorer, no HTTP)."""
    import torch

    from qarm.features.batch import assemble_batch
    from qarm.serve.bundle import load_current
    from qarm.serve.scorer import Scorer

    torch.set_num_threads(threads)
    scorer = Scorer(load_current(models_dir))
    parts: dict[str, list[float]] = {"parse": [], "history": [], "assemble_batch": [], "forward": [], "json": []}
    for k in range(repeats):
        t = time.perf_counter()
        request = json.loads(bodies[k % len(bodies)])
        user_id, candidates = request["user_id"], request["candidates"]
        t1 = time.perf_counter()
        items = scorer.dense_items(candidates)
        user = scorer.user_index.get(user_id, scorer.unknown_user)
        history = scorer.history(user_id)
        t2 = time.perf_counter()
        c = len(items)
        batch = assemble_batch(np.full(c, user, dtype=np.int64), items, np.repeat(history[None, :], c, axis=0),
                               user_feature_codes=scorer.user_feature_codes, item_category=scorer.item_category)
        t3 = time.perf_counter()
        with torch.no_grad():
            probs = torch.sigmoid(scorer.model(batch)).double().numpy()
        t4 = time.perf_counter()
        json.dumps({"scores": [{"item_id": i, **dict(zip(scorer.tasks, row))} for i, row in
                               zip(candidates, probs.tolist())]})
        t5 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[key].append(dt)
    out = {key: 1000 * statistics.median(v[repeats // 5:]) for key, v in parts.items()}
    out["total"] = sum(out.values())
    out["threads"] = threads
    return {"median_ms": out}


def part_load(args: argparse.Namespace) -> None:
    models_dir = args.target
    users, items = read_ids(models_dir)
    bodies = rank_bodies(users, items, args.candidates, 500, args.seed)
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv), "models_dir": str(models_dir),
                              "users": len(users), "items": len(items), "candidates": args.candidates,
                              "seed": args.seed, "runs": []}
    with tempfile.TemporaryDirectory(prefix="qarm-bench-load-") as tmp:
        for config in args.configs:
            store_kind, workers_text, threads_text = (config.split(":") + ["", ""])[:3]
            workers = int(workers_text or 1)
            threads = int(threads_text) if threads_text else max(1, (os.cpu_count() or 1) // workers)
            with _store(store_kind, Path(tmp) / f"live-{config.replace(':', '-')}.sqlite") as store, \
                    service(models_dir, store, workers, log_file=Path(tmp) / "serve.log", threads=threads) as (url, proc):
                warm = [httpx.post(url + "/v1/rank", content=b, headers={"content-type": "application/json"},
                                   timeout=30).status_code for b in bodies[:60]]
                if set(warm) != {200}:
                    raise SystemExit(f"warm-up answered {Counter(warm)}")
                for rate in args.rates:
                    summary, _ = run_load(url, proc, "/v1/rank", bodies, rate, args.duration)
                    summary.update(store=store_kind, workers=workers, threads=threads)
                    result["runs"].append(summary)
                    lo, ls = summary["latency_open"], summary["latency_sent"]
                    print(f"{config} {rate:>5.0f}/s: ok {summary['ok']}/{summary['requests']}, p50 "
                          f"{lo.get('p50_ms', float('nan')):.1f} p99 {lo.get('p99_ms', float('nan')):.1f} max "
                          f"{lo.get('max_ms', float('nan')):.1f} ms (sent: p99 {ls.get('p99_ms', float('nan')):.1f}),"
                          f" server {summary['server_cpu_cores']:.2f} cores, client "
                          f"{summary['client_cpu_cores']:.2f}", flush=True)
    result["breakdown"] = {str(t): in_process_breakdown(models_dir, bodies, t) for t in (1, 2)}
    lines = [f"# `qarm serve` load: {args.name}\n\n", header(args, result),
             f"Bundle `{models_dir}` ({result['items']:,} items, {result['users']:,} users), {args.candidates} "
             f"random catalogue candidates a request for known users, open loop, {args.duration:.0f} s a run. "
             "Latency from when each request was due (open) and from when it was sent.\n\n",
             "| store | workers | torch threads | rate | requests | errors | p50 ms | p99 ms | max ms | p99 sent ms |"
             " server cores | client cores |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"]
    for r in result["runs"]:
        lo, ls = r["latency_open"], r["latency_sent"]
        lines.append(f"| {r['store']} | {r['workers']} | {r.get('threads', '-')} | {r['rate']:.0f}/s | {r['requests']} | "
                     f"{r['errors']} | "
                     f"{lo.get('p50_ms', float('nan')):.1f} | {lo.get('p99_ms', float('nan')):.1f} | "
                     f"{lo.get('max_ms', float('nan')):.1f} | {ls.get('p99_ms', float('nan')):.1f} | "
                     f"{r['server_cpu_cores']:.2f} | {r['client_cpu_cores']:.2f} |\n")
    lines.append("\nIn-process cost of one request (median ms, same Scorer, no HTTP):\n\n| threads | parse | history |"
                 " assemble_batch | forward | json | total |\n|---|---|---|---|---|---|---|\n")
    for t, b in result["breakdown"].items():
        m = b["median_ms"]
        lines.append(f"| {t} | {m['parse']:.2f} | {m['history']:.2f} | {m['assemble_batch']:.2f} | {m['forward']:.2f}"
                     f" | {m['json']:.2f} | {m['total']:.2f} |\n")
    write("load", args.name, result, "".join(lines))


@contextmanager
def _store(kind: str, sqlite_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield str(sqlite_path)
    elif kind == "redis":
        with redis_server() as url:
            yield url
    else:
        raise SystemExit(f"unknown store {kind!r} (sqlite or redis)")


# ------------------------------------------------------------------------------------------- uploads

def part_uploads(args: argparse.Namespace) -> None:
    from qarm.data.synthetic import SyntheticConfig, generate
    models_dir = args.target
    meta_path = args.data / "meta.json" if args.data else models_dir.parent / "data" / "meta.json"
    meta = json.loads(meta_path.read_text())
    if meta.get("loader") != "synthetic":
        raise SystemExit(f"{meta_path}: the uploads part needs a synthetic dataset (its generator's ground truth)")
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    config = SyntheticConfig(**{k: v for k, v in meta["config"].items() if k in fields})
    users, catalogue = read_ids(models_dir)
    n_new = args.new_items
    grown = generate(dataclasses.replace(config, n_items=config.n_items + n_new))
    if grown.ground_truth is None:
        raise SystemExit("the synthetic generator returned no ground truth")
    truth_items = grown.ground_truth["items"].iloc[config.n_items:]
    new_items = grown.items.iloc[config.n_items:]
    truth_users = grown.ground_truth["users"]
    known_users = set(users)
    by_group: dict[int, list[str]] = {}
    for uid, group in zip(grown.users["source_id"].astype(str), truth_users["top1_group"]):
        if uid in known_users:
            by_group.setdefault(int(group), []).append(uid)
    uploads = [{"item_id": f"new-{sid}", "text": str(title), "category": str(cat)}
               for sid, title, cat in zip(new_items["source_id"], new_items["title"], new_items["category"])]
    blanks = [{"item_id": f"blank-{sid}", "text": ""} for sid in new_items["source_id"]]
    groups = truth_items["business_group"].astype(int).tolist()
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv), "models_dir": str(models_dir),
                              "seed": args.seed, "new_items": n_new, "generator": dataclasses.asdict(config)}
    rng = random.Random(args.seed)
    headers = {"content-type": "application/json"}
    n_single = min(args.single, n_new)
    with tempfile.TemporaryDirectory(prefix="qarm-bench-uploads-") as tmp, \
            service(models_dir, str(Path(tmp) / "live.sqlite"), log_file=Path(tmp) / "serve.log") as (url, proc):
        client = httpx.Client(base_url=url, timeout=60, headers=headers)
        first = client.post("/v1/items", content=json.dumps(blanks[0]).encode())  # loads the encoder (untimed)
        if first.status_code != 200:
            raise SystemExit(f"/v1/items answered {first.status_code}: {first.text[:300]}")
        single: list[float] = []
        statuses: Counter[int] = Counter()
        for item in uploads[:n_single]:
            t = time.perf_counter()
            r = client.post("/v1/items", content=json.dumps(item).encode())
            single.append(time.perf_counter() - t)
            statuses[r.status_code] += 1
        batch_times: list[tuple[int, float]] = []
        rest = uploads[n_single:]
        for lo in range(0, len(rest), args.batch):
            chunk = rest[lo:lo + args.batch]
            t = time.perf_counter()
            r = client.post("/v1/items", content=json.dumps({"items": chunk}).encode())
            batch_times.append((len(chunk), time.perf_counter() - t))
            statuses[r.status_code] += 1
        for lo in range(0, len(blanks) - 1, args.batch):
            r = client.post("/v1/items", content=json.dumps({"items": blanks[1 + lo:1 + lo + args.batch]}).encode())
            statuses[r.status_code] += 1
        result["upload_statuses"] = dict(statuses)
        result["single"] = percentiles(single)
        n_batched = sum(n for n, _ in batch_times)
        result["batch"] = {"batches": len(batch_times), "items": n_batched, "size": args.batch,
                           "items_per_s": n_batched / sum(t for _, t in batch_times) if batch_times else None,
                           "per_batch": percentiles([t for _, t in batch_times])}
        # Ground truth: the new item against a random catalogue item, for users of the item's group.
        wins_new, wins_blank, wins_others, rank_statuses = [], [], [], Counter()
        all_known = sorted(known_users)
        group_of = dict(zip(grown.users["source_id"].astype(str), truth_users["top1_group"].astype(int)))
        rank_times: list[float] = []
        task = None
        for item, blank, group in zip(uploads, blanks, groups):
            members = by_group.get(group, [])
            for user in rng.sample(members, min(args.users_per_item, len(members))):
                other = rng.choice(catalogue)
                t = time.perf_counter()
                r = client.post("/v1/rank", content=json.dumps(
                    {"user_id": user, "candidates": [item["item_id"], blank["item_id"], other]}).encode())
                rank_times.append(time.perf_counter() - t)
                rank_statuses[r.status_code] += 1
                if r.status_code != 200:
                    continue
                scores = r.json()["scores"]
                task = task or next(k for k in scores[0] if k != "item_id")
                s_new, s_blank, s_other = (s[task] for s in scores)
                wins_new.append(1.0 if s_new > s_other else 0.5 if s_new == s_other else 0.0)
                wins_blank.append(1.0 if s_blank > s_other else 0.5 if s_blank == s_other else 0.0)
            # The same item for users of other groups: is what it learnt specific to its group?
            outsiders = [u for u in rng.sample(all_known, 4 * args.users_per_item) if group_of[u] != group]
            for user in outsiders[:args.users_per_item]:
                other = rng.choice(catalogue)
                r = client.post("/v1/rank", content=json.dumps(
                    {"user_id": user, "candidates": [item["item_id"], other]}).encode())
                rank_statuses[r.status_code] += 1
                if r.status_code == 200 and task is not None:
                    s_new, s_other = (s[task] for s in r.json()["scores"])
                    wins_others.append(1.0 if s_new > s_other else 0.5 if s_new == s_other else 0.0)
        client.close()
    n = len(wins_new)
    result["ground_truth"] = {
        "task": task, "comparisons": n, "items": n_new, "users_per_item": args.users_per_item,
        "rank_statuses": dict(rank_statuses), "rank_latency": percentiles(rank_times),
        "rate_uploaded": float(np.mean(wins_new)) if n else None,
        "rate_empty_text": float(np.mean(wins_blank)) if n else None,
        "rate_uploaded_other_groups": float(np.mean(wins_others)) if wins_others else None,
        "comparisons_other_groups": len(wins_others),
        "binomial_std": float(np.sqrt(0.25 / n)) if n else None}
    g, s, b = result["ground_truth"], result["single"], result["batch"]
    markdown = (f"# `qarm serve` new uploads: {args.name}\n\n" + header(args, result)
                + f"Bundle `{models_dir}`; {n_new} new items from the same generator (ids `new-*`, never in "
                  f"training), SQLite store, one worker.\n\n"
                  f"| /v1/items | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n"
                  f"| one item a request | {s['n']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.1f} |\n"
                  f"| {b['size']} items a request | {b['batches']} | {b['per_batch'].get('p50_ms', float('nan')):.1f}"
                  f" | {b['per_batch'].get('p99_ms', float('nan')):.1f} | "
                  f"{b['per_batch'].get('max_ms', float('nan')):.1f} |\n\n"
                  f"Batch form: **{b['items_per_s'] or float('nan'):.0f} items/s**. Upload statuses "
                  f"{result['upload_statuses']}.\n\n"
                  f"Ranked at once ({g['comparisons']} comparisons, {g['users_per_item']} users of the item's "
                  f"business group per item, task `{g['task']}`): the uploaded item scores above a random catalogue"
                  f" item at rate **{g['rate_uploaded']:.3f}**; the same items uploaded with an empty text "
                  f"{g['rate_empty_text']:.3f} (chance 0.5, binomial std {g['binomial_std']:.3f}); the uploaded "
                  f"item for users of other groups {g['rate_uploaded_other_groups']:.3f} "
                  f"({g['comparisons_other_groups']} comparisons). Rank statuses "
                  f"{g['rank_statuses']}.\n")
    write("uploads", args.name, result, markdown)


# -------------------------------------------------------------------------------------------- reload

def part_reload(args: argparse.Namespace) -> None:
    from qarm.serve.bundle import export_bundle, set_current

    run_dir = args.target
    with tempfile.TemporaryDirectory(prefix="qarm-bench-reload-") as tmp:
        models_dir = Path(tmp) / "models"
        t = time.perf_counter()
        versions = [str(export_bundle(run_dir, models_dir, keep=1000, version=f"v{k:02d}", make_current=(k == 0))
                        ["version"]) for k in range(args.swaps + 1)]
        export_seconds = (time.perf_counter() - t) / len(versions)
        corrupt = "v99-corrupt"
        shutil.copytree(models_dir / "versions" / versions[-1], models_dir / "versions" / corrupt)
        weights = models_dir / "versions" / corrupt / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        for k in range(len(data) // 2, len(data) // 2 + 64):
            data[k] ^= 0xFF
        weights.write_bytes(bytes(data))
        schedule = versions[1:len(versions) // 2 + 1] + [corrupt] + versions[len(versions) // 2 + 1:]
        users, items = read_ids(models_dir)
        bodies = rank_bodies(users, items, args.candidates, 500, args.seed)
        timeline: list[tuple[float, str]] = []
        with service(models_dir, str(Path(tmp) / "live.sqlite"), reload_interval=args.reload_interval,
                     threads=args.threads,
                     log_file=Path(tmp) / "serve.log") as (url, proc):
            for b in bodies[:60]:
                httpx.post(url + "/v1/rank", content=b, headers={"content-type": "application/json"}, timeout=30)
            period = args.duration / (len(schedule) + 1)

            async def swapper(t0: float) -> None:
                loop = asyncio.get_running_loop()
                for k, version in enumerate(schedule):
                    await asyncio.sleep(max(0.0, t0 + (k + 1) * period - loop.time()))
                    await asyncio.to_thread(set_current, models_dir, version)
                    timeline.append((loop.time() - t0, version))

            clock: dict[str, float] = {}

            async def both() -> list[dict[str, Any]]:
                loop = asyncio.get_running_loop()
                t0 = loop.time() + 0.5
                clock["wall_t0"] = time.time() + (t0 - loop.time())  # t0 on the wall clock
                swap = asyncio.ensure_future(swapper(t0))
                records = await open_loop(url, "/v1/rank", bodies, args.rate, args.duration, parse=True, start_at=t0)
                await swap
                return records

            cpu0, wall0 = tree_cpu_seconds(proc.pid), time.monotonic()
            records = asyncio.run(both())
            wall = time.monotonic() - wall0
            server_cores = (tree_cpu_seconds(proc.pid) - cpu0) / wall
            metrics = httpx.get(url + "/metrics", timeout=10).text
            final = httpx.get(url + "/readyz", timeout=10).json()
            log_text = (Path(tmp) / "serve.log").read_text(errors="replace")
    summary = summarise(records, wall)
    summary["server_cpu_cores"] = server_cores
    # The service's own swap times (its log: "reload: OLD -> NEW in X s", wall clock, ms resolution), put on
    # the client's clock. A response is consistent when the version it names was the service's version at
    # some instant of its request: a swap is atomic and a request is scored by one bundle only.
    swaps: list[tuple[float, str]] = []
    for line in log_text.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) qarm\.serve INFO reload: (\S+) -> (\S+) in", line)
        if m:
            wall_at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))  # logging's asctime is local
            swaps.append((wall_at + int(m.group(2)) / 1000 - clock["wall_t0"], m.group(4)))
    intervals: list[tuple[float, float, str]] = []
    points = [(-1e9, versions[0])] + swaps
    for k, (start, version) in enumerate(points):
        end = points[k + 1][0] if k + 1 < len(points) else 1e9
        intervals.append((start, end, version))
    served = [r for r in records if r.get("version")]
    slack = 0.002  # the log's millisecond resolution
    consistent = sum(any(v == r["version"] and s - slack <= r["done"] and e + slack >= r["sent"]
                         for s, e, v in intervals) for r in served)
    # Pointer move -> the service's swap: the poll interval plus loading and checking the bundle.
    good_moves = [(t, v) for t, v in timeline if v != corrupt]
    swap_at = {v: t for t, v in swaps}
    lags = {v: swap_at[v] - t for t, v in good_moves if v in swap_at}
    max_lag = max(lags.values(), default=float("nan"))
    strict, within_lag = consistent, len(lags)
    result = {"machine": machine(), "command": " ".join(sys.argv), "run_dir": str(run_dir), "seed": args.seed,
              "rate": args.rate, "duration_s": args.duration, "reload_interval_s": args.reload_interval,
              "export_seconds_per_version": export_seconds, "schedule": schedule, "timeline": timeline,
              "summary": summary, "versions_served": dict(Counter(r["version"] for r in served)),
              "corrupt_served": sum(r["version"] == corrupt for r in served),
              "responses_with_version": len(served), "consistent_with_service_swaps": consistent,
              "service_swaps": swaps, "swaps_seen_in_log": within_lag, "pointer_to_swap_s": lags,
              "max_pointer_to_swap_s": max_lag,
              "final_version": final.get("model_version"), "expected_final": schedule[-1],
              "refusal_logged": corrupt in log_text,
              "reload_metrics": [line for line in metrics.splitlines() if line.startswith("qarm_reloads")]}
    lo = summary["latency_open"]
    markdown = (f"# `qarm serve` hot reload under load: {args.name}\n\n" + header(args, result)
                + f"{len(schedule)} pointer moves ({args.swaps} good versions and one with 64 flipped bytes in its "
                  f"weights) during {summary['requests']} requests at {args.rate:.0f}/s ({args.candidates} "
                  f"candidates), SQLite store, one worker with {args.threads} torch thread(s), reload poll every "
                  f"{args.reload_interval} s.\n\n"
                  f"- requests: {summary['requests']}, failed: **{summary['errors']}** ({summary['statuses']})\n"
                  f"- latency (open loop): p50 {lo.get('p50_ms', float('nan')):.1f} ms, p99 "
                  f"{lo.get('p99_ms', float('nan')):.1f} ms, max {lo.get('max_ms', float('nan')):.1f} ms\n"
                  f"- versions served: {result['versions_served']}; the corrupt one: {result['corrupt_served']} "
                  f"responses; refusal in the service log: {result['refusal_logged']}; final version "
                  f"{result['final_version']} (expected {schedule[-1]})\n"
                  f"- responses naming the version the service held at some instant of the request (its logged "
                  f"swap times): **{strict} of {len(served)}**\n"
                  f"- swaps in the service log: {len(swaps)} (good pointer moves: {len(good_moves)}); pointer move to "
                  f"swap: max {max_lag:.2f} s (poll every {args.reload_interval} s plus load and hash check)\n"
                  f"- reload metrics: {'; '.join(result['reload_metrics'])}\n")
    write("reload", args.name, result, markdown)


def part_consistency(args: argparse.Namespace) -> None:
    import pandas as pd

    from qarm.data.io import load_dataset
    from qarm.serve.bundle import find_run

    run_dir = args.target
    run = find_run(run_dir)
    offline = pd.read_parquet(run.run_dir / "predictions.parquet")
    dataset = load_dataset(run.dataset_dir)
    rows = offline.sample(n=min(args.rows, len(offline)), random_state=args.seed)
    times = dataset.interactions["time"].to_numpy()
    users = dataset.users.set_index("user_id")["source_id"].astype(str)
    items = dataset.items.set_index("item_id")["source_id"].astype(str)
    tasks = [c.removeprefix("score_") for c in offline.columns if c.startswith("score_")]
    worst, per_task = 0.0, {t: 0.0 for t in tasks}
    with tempfile.TemporaryDirectory(prefix="qarm-bench-consistency-") as tmp, \
            service(run_dir / "models", str(Path(tmp) / "live.sqlite"), threads=args.threads) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as client:
            for r in rows.itertuples():
                body = {"user_id": users[r.user_id], "candidates": [items[r.item_id]],
                        "context": {"time": int(times[int(r.row)])}}
                response = client.post("/v1/rank", json=body)
                response.raise_for_status()
                got = response.json()["scores"][0]
                for t in tasks:
                    diff = abs(got[t] - getattr(r, f"score_{t}"))
                    per_task[t] = max(per_task[t], diff)
                    worst = max(worst, diff)
    result = {"machine": machine(), "command": " ".join(sys.argv), "run_dir": str(run.run_dir), "rows": len(rows),
              "seed": args.seed, "max_abs_difference": worst, "per_task": per_task}
    markdown = (f"# `qarm serve` against offline predict: {args.name}\n\n{header(args, result)}\n\n"
                f"{len(rows):,} test rows of `{run.run_dir}` (sampled with seed {args.seed}), each one `/v1/rank` "
                f"request over HTTP as of the row's time, against the run's `predictions.parquet`.\n\n"
                f"- largest |served - offline| over every task: **{worst:.2e}** (goal <= 1e-5: "
                f"{'met' if worst <= 1e-5 else 'NOT met'}); per task "
                + ", ".join(f"{t} {v:.2e}" for t, v in per_task.items()) + "\n")
    write("consistency", args.name, result, markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("load", "uploads", "reload", "consistency"))
    parser.add_argument("target", type=Path, help="models folder (load, uploads) or a `qarm run` folder "
                        "(reload, consistency)")
    parser.add_argument("--name", required=True, help="results file name suffix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--rates", type=float, nargs="+", default=[50.0, 100.0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--configs", nargs="+", default=["sqlite:1", "redis:1", "redis:2"])
    parser.add_argument("--data", type=Path, default=None,
                        help="uploads: the prepared synthetic dataset (default: MODELS/../data)")
    parser.add_argument("--new-items", type=int, default=500)
    parser.add_argument("--single", type=int, default=200, help="uploads timed one item a request")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--users-per-item", type=int, default=10)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--reload-interval", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1,
                        help="reload, consistency: torch threads of the server (the load part's best on 2 cores: 1)")
    parser.add_argument("--rows", type=int, default=1000, help="consistency: test rows scored")
    args = parser.parse_args(argv)
    {"load": part_load, "uploads": part_uploads, "reload": part_reload,
     "consistency": part_consistency}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

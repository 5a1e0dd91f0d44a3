"""The live loop measured end to end: `qarm serve` + `qarm learn` beside it, fed the synthetic log in time order.

    python benchmarks/live_loop.py /work/main/runs/synthetic --days 6 --day-wall-seconds 20

From a ``qarm run`` folder (its ``models/`` current bundle and its prepared ``data/``):

1. copies the current bundle into a temporary models folder and starts ``qarm serve`` on it (127.0.0.1, a
   free port, an SQLite live store, hot reload every 0.25 s) and ``qarm learn`` beside it (same store,
   ``--every-events K``);
2. streams the exposures after the time split's cut (the prepared ``valid`` + ``test`` rows: no sampled
   negatives in the synthetic log), ``--days`` of them in time order, one simulated hour per round, paced at
   ``--day-wall-seconds`` wall seconds per simulated day. Each round first asks ``/v1/rank`` for the round's
   exposures (one request per user, ``context.time`` = the round's start: the history the service knows
   before the round), then posts them to ``/v1/events``;
3. scores the same requests with the frozen bundle in this process (the un-updated model, the same
   histories: the same live store's positives as of the same time);
4. records when each learned version starts serving (a watcher polls ``/readyz`` every 0.1 s) and which log
   position it learned up to (its manifest).

Reports: events/s ingested (events over the time spent in ``/v1/events`` calls, and the stream's achieved
rate), seconds from an event's ingestion to the first serving version that learned from it (p50 / p90 /
max), and the served next-day GAUC of the live loop against the frozen model on the same events (overall,
per simulated day, and on the rows scored after the first update). Bounded: a fixed number of events, a
hard wall-clock limit (``--max-wall``), every process stopped at the end.

Writes ``benchmarks/results/live_loop.json`` (``updates.update_seconds``: each update's preparation and
training, from its manifest; the commit of the version comes after the manifest is written, so the whole
update's wall time is in the learner's log lines, ``learn_log_tail``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from serve_load import RESULTS, machine, service, tree_cpu_seconds

from qarm.data import schema as S
from qarm.data.io import load_dataset
from qarm.evaluate.metrics import gauc
from qarm.serve.bundle import current_version, load_bundle, set_current
from qarm.serve.scorer import Scorer
from qarm.serve.store import SQLiteLiveStore


def later_exposures(run: Path, days: int) -> tuple[pd.DataFrame, list[str], int]:
    """The first ``days`` days of exposures after the cut, in time order, with source ids; the tasks; the cut."""
    data = load_dataset(run / "data")
    inter = data.interactions
    held = inter[inter[S.SPLIT].astype(str) != "train"]
    if S.SAMPLED_NEGATIVE in held.columns:
        held = held[~held[S.SAMPLED_NEGATIVE].to_numpy(dtype=bool)]
    cut = int(held[S.TIME].min())
    rows = held[held[S.TIME] < cut + days * 86_400].sort_values([S.TIME, S.SEQ]).reset_index(drop=True)
    tasks = list(data.meta.label_columns)
    out = pd.DataFrame({"user": data.users[S.SOURCE_ID].astype(str).to_numpy()[rows[S.USER_ID].to_numpy()],
                        "item": data.items[S.SOURCE_ID].astype(str).to_numpy()[rows[S.ITEM_ID].to_numpy()],
                        "time": rows[S.TIME].to_numpy(), **{t: rows[t].to_numpy(dtype=int) for t in tasks}})
    return out, tasks, cut


class VersionWatcher(threading.Thread):
    """Polls /readyz; records (wall time, version) at each change. Bounded by ``stop``."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, stop
        self.changes: list[tuple[float, str]] = []

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            last = None
            while not self.stop.wait(0.1):
                try:
                    version = client.get(self.url + "/readyz").json()["model_version"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                if version != last:
                    self.changes.append((time.time(), version))
                    last = version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `qarm run` folder (models/ and data/)")
    parser.add_argument("--days", type=int, default=6, help="simulated days streamed after the cut")
    parser.add_argument("--day-wall-seconds", type=float, default=20.0, help="wall seconds per simulated day")
    parser.add_argument("--round-seconds", type=int, default=3600, help="simulated seconds per round")
    parser.add_argument("--every-events", type=int, default=1000, help="qarm learn --every-events")
    parser.add_argument("--batch-size", type=int, default=1024, help="qarm learn train.batch_size (TrainConfig's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and the learner")
    parser.add_argument("--drain-seconds", type=float, default=60.0, help="wait this long after the stream for the "
                        "learner to publish what it has")
    parser.add_argument("--max-wall", type=float, default=480.0, help="hard limit on the streaming phase (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS / "live_loop.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    exposures, tasks, cut = later_exposures(args.run, args.days)
    primary = tasks[0]
    frozen_folder = args.run / "models" / "versions" / str(current_version(args.run / "models"))
    result: dict[str, Any] = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                              "run": str(args.run), "frozen_version": frozen_folder.name, "cut": cut,
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "events": len(exposures)}
    print(f"live loop: {len(exposures):,} exposures over {args.days} days after {cut}, "
          f"{args.day_wall_seconds:g} s per day, learner every {args.every_events} events", flush=True)
    with tempfile.TemporaryDirectory(prefix="qarm-live-loop-") as tmp:
        models = Path(tmp) / "models"
        shutil.copytree(frozen_folder, models / "versions" / frozen_folder.name)
        set_current(models, frozen_folder.name)
        store_path = models / "live.sqlite"
        frozen = Scorer(load_bundle(frozen_folder))
        with service(models, str(store_path), reload_interval=0.25, threads=args.threads,
                     log_file=Path(tmp) / "serve.log") as (url, server):
            learner_log = open(Path(tmp) / "learn.log", "wb")  # noqa: SIM115
            qarm = shutil.which("qarm") or str(Path(sys.executable).with_name("qarm"))
            learner = subprocess.Popen(
                [qarm, "learn", str(models), "--store", str(store_path), "--every-events", str(args.every_events),
                 "--threads", str(args.threads), "--keep", "1000", "--max-seconds",
                 str(args.max_wall + args.drain_seconds + 60), "--set", "poll_seconds=0.1",
                 "--set", f"train.batch_size={args.batch_size}"],
                stdout=learner_log, stderr=subprocess.STDOUT, start_new_session=True)
            store = SQLiteLiveStore(store_path)
            stop = threading.Event()
            watcher = VersionWatcher(url, stop)
            watcher.start()
            try:
                stream = stream_exposures(url, exposures, tasks, frozen, store, cut, args)
                deadline = time.monotonic() + args.drain_seconds
                learnable = (len(exposures) // args.every_events) * args.every_events
                while time.monotonic() < deadline and learner.poll() is None:
                    served = [load_position(models, v) for _, v in watcher.changes]
                    if max(served, default=0) >= learnable:
                        break
                    time.sleep(0.5)
                time.sleep(0.3)
                learner_cpu = tree_cpu_seconds(learner.pid)
                server_cpu = tree_cpu_seconds(server.pid)
            finally:
                stop.set()
                watcher.join(5)
                if learner.poll() is None:
                    os.killpg(learner.pid, signal.SIGTERM)
                    try:
                        learner.wait(20)
                    except subprocess.TimeoutExpired:  # a learner that ignores SIGTERM is killed
                        os.killpg(learner.pid, signal.SIGKILL)
                        learner.wait(5)
                learner_log.close()
                store.close()
            versions = [{"seen_at": t, "version": v, "position": load_position(models, v),
                         **{k: (load_manifest(models, v).get("live") or {}).get(k) for k in
                            ("events", "new_users", "new_id_rows", "seconds", "train_loss")}}
                        for t, v in watcher.changes]
            result["learn_log_tail"] = (Path(tmp) / "learn.log").read_text(errors="replace")[-3000:]
        result["learned_rows_max_abs_score_difference"] = recheck_learned(models, store_path, stream, exposures, frozen)
        result.update(summarise(stream, versions, exposures, tasks, primary, args))
        result["cpu_seconds"] = {"learner": learner_cpu, "server": server_cpu}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2, default=float))
    tmp_out.replace(args.out)
    print(json.dumps({k: result[k] for k in ("ingest", "event_to_serving_seconds", "frozen_rows_max_abs_score_difference",
                                             "learned_rows_max_abs_score_difference", "served_gauc", "updates")},
                     indent=2, default=float))
    print(f"wrote {args.out}")
    return 0


def load_manifest(models: Path, version: str) -> dict[str, Any]:
    return dict(json.loads((models / "versions" / version / "bundle.json").read_text(encoding="utf-8")))


def load_position(models: Path, version: str) -> int:
    return int((load_manifest(models, version).get("live") or {}).get("position", 0))


def stream_exposures(url: str, exposures: pd.DataFrame, tasks: list[str], frozen: Scorer, store: SQLiteLiveStore,
                     cut: int, args: argparse.Namespace) -> dict[str, Any]:
    """Rank then log each simulated round's exposures, paced; scores of the live loop and of the frozen model."""
    n = len(exposures)
    live_scores = np.full((n, len(tasks)), np.nan)
    frozen_scores = np.full((n, len(tasks)), np.nan)
    served_version = np.empty(n, dtype=object)
    served_as_of = np.zeros(n, dtype=np.int64)
    ingested_at = np.full(n, np.nan)  # wall time each event's /v1/events call returned
    post_seconds, rank_seconds, behind = 0.0, 0.0, 0.0
    round_of = (exposures["time"].to_numpy() - cut) // args.round_seconds
    bounds = np.flatnonzero(np.diff(round_of)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [n]])
    t0 = time.monotonic()
    hard_stop = t0 + args.max_wall
    done = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for lo, hi in zip(starts.tolist(), ends.tolist()):
            due = t0 + round_of[lo] * args.round_seconds / 86_400 * args.day_wall_seconds
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            else:
                behind = max(behind, now - due)
            if time.monotonic() > hard_stop:
                print(f"live loop: --max-wall {args.max_wall:g} s reached after {done:,} events", flush=True)
                break
            chunk = exposures.iloc[lo:hi]
            as_of = int(cut + round_of[lo] * args.round_seconds)
            for user, group in chunk.groupby("user", sort=False):
                candidates = list(dict.fromkeys(group["item"].tolist()))
                t = time.perf_counter()
                response = client.post("/v1/rank", json={"user_id": user, "candidates": candidates,
                                                         "context": {"time": as_of}})
                rank_seconds += time.perf_counter() - t
                response.raise_for_status()
                body = response.json()
                by_item = {s["item_id"]: [s[task] for task in tasks] for s in body["scores"]}
                live_history = store.user_positives(str(user), frozen.history_length)
                frozen_probs = frozen.score(str(user), candidates, live=live_history, as_of=as_of)
                frozen_by_item = dict(zip(candidates, frozen_probs.tolist()))
                for row, item in zip(group.index.tolist(), group["item"].tolist()):
                    live_scores[row] = by_item[item]
                    frozen_scores[row] = frozen_by_item[item]
                    served_version[row] = body["model_version"]
                    served_as_of[row] = as_of
            events = [{"user_id": r.user, "item_id": r.item, "time": int(r.time),
                       "labels": {task: int(getattr(r, task)) for task in tasks}} for r in chunk.itertuples()]
            t = time.perf_counter()
            response = client.post("/v1/events", json={"events": events})
            post_seconds += time.perf_counter() - t
            response.raise_for_status()
            ingested_at[lo:hi] = time.time()
            done = hi
            if hi // 2000 != lo // 2000:
                print(f"live loop: {hi:,}/{n:,} events, {time.monotonic() - t0:.0f} s", flush=True)
    return {"done": done, "live": live_scores, "frozen": frozen_scores, "version": served_version, "as_of": served_as_of,
            "ingested_at": ingested_at, "post_seconds": post_seconds, "rank_seconds": rank_seconds,
            "wall_seconds": time.monotonic() - t0, "rounds": len(starts), "max_behind_seconds": behind}


def recheck_learned(models: Path, store_path: Path, stream: dict[str, Any], exposures: pd.DataFrame,
                    frozen: Scorer, sample: int = 300) -> float | None:
    """Check of the served scores: up to ``sample`` rows served by learned versions, rescored here by a
    Scorer of the version that served them (the store's positives as of the same time): the largest
    difference of any task's score."""
    from qarm.serve.store import USER_POSITIVES_KEPT

    versions = stream["version"][:stream["done"]]
    rows = np.flatnonzero(np.asarray([v not in (None, frozen.version) for v in versions]))
    if not len(rows):
        return None
    rows = np.random.default_rng(0).choice(rows, size=min(sample, len(rows)), replace=False)
    store = SQLiteLiveStore(store_path)
    scorers: dict[str, Scorer] = {}
    worst = 0.0
    for row in rows.tolist():
        version = str(versions[row])
        if version not in scorers:
            scorers[version] = Scorer(load_bundle(models / "versions" / version), store.items_since(0))
        user, item = str(exposures.at[row, "user"]), str(exposures.at[row, "item"])
        probs = scorers[version].score(user, [item], live=store.user_positives(user, USER_POSITIVES_KEPT),
                                       as_of=int(stream["as_of"][row]))[0]
        worst = max(worst, float(np.abs(probs - stream["live"][row]).max()))
    store.close()
    return worst


def summarise(stream: dict[str, Any], versions: list[dict[str, Any]], exposures: pd.DataFrame, tasks: list[str],
              primary: str, args: argparse.Namespace) -> dict[str, Any]:
    done = stream["done"]
    ingested = stream["ingested_at"][:done]
    # latency: each event -> the first serving version whose manifest position is past it
    latency = np.full(done, np.nan)
    for v in versions:
        waiting = np.isnan(latency) & (np.arange(done) < v["position"])
        latency[waiting] = v["seen_at"] - ingested[waiting]
    learned = ~np.isnan(latency)
    frame = exposures.iloc[:done]
    day = (frame["time"].to_numpy() - frame["time"].min()) // 86_400
    users = frame["user"].to_numpy()
    first_version = versions[0]["version"] if versions else None
    updated = np.asarray([v is not None and v != first_version for v in stream["version"][:done]])

    # GAUC groups: by user (what each user was served, across the versions that served them), and by
    # (user, serving version), where every group's scores come from one model, the frozen one's from the
    # same groups: a user's AUC across two versions compares scores of two models on different scales.
    served_by = np.asarray([f"{u}\t{v}" for u, v in zip(users, stream["version"][:done])], dtype=object)

    def gaucs(mask: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": int(mask.sum())}
        for j, task in enumerate(tasks):
            y = frame[task].to_numpy()[mask]
            if len(np.unique(y)) < 2:
                continue
            live, fixed = stream["live"][:done, j][mask], stream["frozen"][:done, j][mask]
            out[task] = {"by_user": {"live_loop": gauc(y, live, users[mask]), "frozen": gauc(y, fixed, users[mask])},
                         "by_user_and_version": {"live_loop": gauc(y, live, served_by[mask]),
                                                 "frozen": gauc(y, fixed, served_by[mask])}}
        return out

    every = np.ones(done, dtype=bool)
    # check of the comparison: rows the service served with the frozen version score as the frozen scorer here
    same = ~updated
    consistency = float(np.abs(stream["live"][:done][same] - stream["frozen"][:done][same]).max()) if same.any() else None
    per_day = [{"day": int(d) + 1, **gaucs(day == d)} for d in np.unique(day)]
    return {
        "ingest": {"events": int(done), "post_seconds": stream["post_seconds"],
                   "events_per_second_in_posts": done / stream["post_seconds"] if stream["post_seconds"] else None,
                   "stream_wall_seconds": stream["wall_seconds"],
                   "stream_events_per_second": done / stream["wall_seconds"], "rounds": stream["rounds"],
                   "events_per_post": done / max(1, stream["rounds"]), "rank_requests_seconds": stream["rank_seconds"],
                   "max_behind_schedule_seconds": stream["max_behind_seconds"]},
        "event_to_serving_seconds": {
            "events_learned": int(learned.sum()), "events_not_yet_learned": int((~learned).sum()),
            **({"p50": float(np.percentile(latency[learned], 50)), "p90": float(np.percentile(latency[learned], 90)),
                "max": float(latency[learned].max()), "min": float(latency[learned].min())} if learned.any() else {})},
        "frozen_rows_max_abs_score_difference": consistency,
        "served_gauc": {"all": gaucs(every), "after_first_update": gaucs(updated), "per_day": per_day,
                        "primary": primary},
        "updates": {"versions_served": len(versions) - 1,
                    "update_seconds": [sum((v["seconds"] or {}).values()) for v in versions[1:] if v["seconds"]]},
        "versions": versions,
    }


if __name__ == "__main__":
    sys.exit(main())

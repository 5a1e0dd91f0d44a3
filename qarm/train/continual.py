"""Continuous training: warm starts on time windows, ID tables that grow, and the day-by-day replay.

A deployed model never stops learning: each day the new user-item pairs update the last model's
parameters, new items get ID rows, and the result replaces the serving version. This module holds the
pieces (they work on any model of :mod:`qarm.models` on a prepared, timestamped dataset):

* :func:`window_rows`: the rows of a time window ``[start, end)`` (every split: in continuous training
  the prepared split is only where the first model stops);
* :func:`grow_id_index`: the ID vocabulary extended *append-only* by the items first trained on in a
  window (old items keep their rows, new ones get the next rows, in the order of their first event);
* :func:`grow_state` / :func:`grow_optimizer_state`: the last model's weights and Adam moments copied
  into a model built on the grown tables; old rows are copied bit for bit, new rows keep the fresh
  initialisation the model gives any row (and zero moments). Code tables keep their rows: the codebooks
  are frozen, so a code means the same thing before and after the update;
* :func:`warm_start`: a grown model plus its carried optimiser state, ready for
  :func:`qarm.train.trainer.train` on a window (optionally with a replay fraction of older rows);
* :func:`replay`: the time-ordered simulation behind ``qarm replay``: train on everything before the
  replay's first day; then each following day ``d`` is scored by each strategy's model of day ``d-1``
  (the test of a deployed model) and the strategy updates: ``frozen`` never, ``incremental`` warm-starts
  on day ``d``, ``retrain`` trains from scratch on every row before the end of day ``d``. Items whose first
  event falls on day ``d`` are that day's cold-start segment.

The replay starts at the prepared dataset's first validation event (the time split's cut), so the
alignment, the codes and the negative sampler, which saw only training rows, know nothing of any
replayed day.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qarm import __version__, provenance
from qarm.config import from_dict, to_dict
from qarm.data.io import atomic_write_bytes, write_json
from qarm.errors import ConfigError, DataError
from qarm.features.examples import ExampleSource
from qarm.features.tables import OOV, ItemTables
from qarm.models import build_model, model_config, recorded_ranking_config
from qarm.quantize._common import check_float, check_int
from qarm.train.trainer import TrainConfig, predict, train, validation_metrics

STRATEGIES = ("frozen", "incremental", "retrain")
VOCABULARY_FILE = "vocabulary.safetensors"  # in a warm-started run's train/: its grown ID vocabulary
REPLAY_JSON = "replay.json"
REPLAY_MD = "replay.md"
REPLAY_PNG = "replay.png"

Log = Callable[[str], None]


# -- windows and growth ----------------------------------------------------------------------------

def window_rows(source: ExampleSource, start: int | None, end: int | None) -> np.ndarray:
    """Rows with ``start <= time < end`` (None: unbounded), ascending."""
    keep = np.ones(source.n_rows, dtype=bool)
    if start is not None:
        keep &= source.time >= start
    if end is not None:
        keep &= source.time < end
    return np.flatnonzero(keep)


def with_older_rows(source: ExampleSource, rows: np.ndarray, start: int | None, fraction: float,
                    rng: np.random.Generator) -> np.ndarray:
    """``rows`` plus ``fraction`` x as many rows from before ``start`` (drawn without replacement by ``rng``),
    ascending: the replay that keeps an update from forgetting what its window does not show."""
    if fraction <= 0:
        return rows
    older = window_rows(source, None, start) if start is not None else np.zeros(0, dtype=np.int64)
    k = min(len(older), int(round(fraction * len(rows))))
    return np.sort(np.concatenate([rows, rng.choice(older, size=k, replace=False)]))


def parse_window(text: str) -> tuple[int | None, int | None]:
    """``"START:END"`` in the log's time unit (integers; either side may be empty) -> ``(start, end)``."""
    if not isinstance(text, str) or text.count(":") != 1:
        raise ConfigError(f"--window must be START:END in the log's time unit (e.g. 1704067200:1704153600), "
                          f"got {text!r}")
    parts: list[int | None] = []
    for side in text.split(":"):
        side = side.strip()
        try:
            parts.append(int(side) if side else None)
        except ValueError as exc:
            raise ConfigError(f"--window {text!r}: {side!r} is not an integer time") from exc
    start, end = parts
    if start is not None and end is not None and end <= start:
        raise ConfigError(f"--window {text!r}: END must be after START")
    return start, end


def grow_id_index(old: np.ndarray | None, n_items: int, items: np.ndarray) -> np.ndarray:
    """The ID vocabulary of ``old`` (or an empty one) extended by ``items`` (in the order given, first
    occurrence): items already in it keep their rows; new ones get rows ``n_vocab + 1, ...``."""
    index = np.full(n_items, OOV, dtype=np.int64) if old is None else np.asarray(old, dtype=np.int64).copy()
    if len(index) != n_items:
        raise DataError(f"the vocabulary covers {len(index)} items, the dataset has {n_items}")
    items = np.asarray(items, dtype=np.int64)
    _, first = np.unique(items, return_index=True)
    ordered = items[np.sort(first)]
    new = ordered[index[ordered] == OOV]
    start = int(index.max(initial=0)) + 1
    index[new] = np.arange(start, start + len(new))
    return index


def _items_by_first_event(source: ExampleSource, rows: np.ndarray) -> np.ndarray:
    """The target items of ``rows`` in the order of their first event (time, then seq)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = rows[np.lexsort((source.seq[rows], source.time[rows]))]
    return source.item[order]


def grow_state(old: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state with ``old``'s values: equal shapes are copied, a tensor that grew along its
    first dimension (an embedding table with new rows) gets the old rows copied and keeps the model's
    own initial values for the new ones. Anything else is an error naming the tensor."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    missing = sorted(set(state) - set(old))
    extra = sorted(set(old) - set(state))
    if missing or extra:
        raise ConfigError(f"the warm-start weights do not fit this model: missing {missing[:10]}, "
                          f"unexpected {extra[:10]} (another model or model config)")
    for name, new in state.items():
        value = old[name]
        if value.shape == new.shape:
            state[name] = value.detach().clone()
        elif value.dim() == new.dim() and value.shape[1:] == new.shape[1:] and value.shape[0] <= new.shape[0]:
            new[: value.shape[0]] = value
        else:
            raise ConfigError(f"the warm-start weights do not fit this model: {name} is {tuple(value.shape)}, "
                              f"the model has {tuple(new.shape)}")
    return state


def grow_optimizer_state(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Adam's ``state_dict()`` of the old model, its per-parameter moments padded with zero rows where the
    parameter grew (``model.parameters()`` in the same order: the same architecture)."""
    params = list(model.parameters())
    out: dict[str, Any] = {"param_groups": [dict(g) for g in state["param_groups"]], "state": {}}
    for pid, entries in state["state"].items():
        pid = int(pid)
        if pid >= len(params):
            raise ConfigError(f"the optimiser state has parameter {pid}; the model has {len(params)}")
        target = params[pid].shape
        grown = {}
        for key, value in entries.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != target:
                pad = torch.zeros((target[0] - value.shape[0], *value.shape[1:]), dtype=value.dtype)
                value = torch.cat([value, pad])
            grown[key] = value.clone() if torch.is_tensor(value) else value
        out["state"][pid] = grown
    return out


@dataclass
class WarmStart:
    """A model grown from the last one, ready to train on a window."""

    model: nn.Module
    tables: ItemTables
    optimizer_state: dict[str, Any] | None
    new_items: int


def warm_start(name: str, config: Any, source: ExampleSource, tables: ItemTables, old_state: dict[str, torch.Tensor],
               old_index: np.ndarray, window: np.ndarray, *, optimizer_state: dict[str, Any] | None = None,
               seed: int = 0) -> WarmStart:
    """The last model (``old_state`` on vocabulary ``old_index``) grown by the items first trained on in
    ``window`` (rows), on ``tables``' codes and vectors (which must be the ones it was trained on)."""
    index = grow_id_index(old_index, source.spec.n_items, _items_by_first_event(source, window))
    grown = _with_index(tables, index)
    model = build_model(name, source.spec, grown, config, seed=seed)
    model.load_state_dict(grow_state(old_state, model))
    carried = None if optimizer_state is None else grow_optimizer_state(optimizer_state, model)
    return WarmStart(model, grown, carried, int(index.max(initial=0)) - int(np.max(old_index, initial=0)))


def _with_index(tables: ItemTables, index: np.ndarray) -> ItemTables:
    from dataclasses import replace

    return replace(tables, id_index=index)


def check_codes_version(bundle_version: str | None, codes_version: str | None, where: str) -> None:
    """Re-quantising is a separate, versioned event: a model trained on other codebooks is refused."""
    if bundle_version and codes_version and bundle_version != codes_version:
        raise ConfigError(f"{where} was trained on codes {bundle_version}, the codes given are {codes_version}: "
                          "a warm start keeps the codebooks frozen; retrain from scratch on the new codes "
                          "(qarm train without --warm-start) or pass the codes it was trained on (--codes)")


# -- qarm train --warm-start -----------------------------------------------------------------------

@dataclass
class LastModel:
    """What a warm start starts from: a ranking run folder or a serving bundle."""

    where: Path
    ranking: dict[str, Any]  # the RankingConfig (as a dict) it was trained with
    state: dict[str, torch.Tensor]
    id_index: np.ndarray | None  # its ID vocabulary (None: the dataset's prepared training vocabulary)
    tables_digest: str | None  # the item tables it was trained on (a ranking run)
    codes_version: str | None
    optimizer_state: dict[str, Any] | None  # Adam's moments at its last step (a run's checkpoint)


def read_last_model(path: str | Path) -> LastModel:
    """A ranking run (``report.json`` + ``train/``; a ``qarm run`` folder's QARM row), a bundle version
    folder, or a bundles' folder (its current version)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file as load_numpy_file
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "CURRENT").exists() or (path / "bundle.json").exists():
        from qarm.serve.bundle import current_version, load_bundle

        folder = path if (path / "bundle.json").exists() else path / "versions" / str(current_version(path))
        bundle = load_bundle(folder)
        return LastModel(folder, bundle.manifest["ranking_config"], dict(bundle.weights),
                         np.asarray(bundle.arrays["id_index"]), None, bundle.codes_version, None)
    if not ((path / "report.json").exists() and (path / "train").is_dir()):  # a `qarm run` folder: its QARM row
        from qarm.serve.bundle import find_run

        path = find_run(path).run_dir
    report = json.loads((path / "report.json").read_text(encoding="utf-8"))
    best = path / "train" / "best.safetensors"
    if not best.exists():
        raise DataError(f"{path}: no train/best.safetensors (the run did not finish)")
    state = load_file(str(best))
    vocabulary = path / "train" / VOCABULARY_FILE
    id_index = load_numpy_file(str(vocabulary))["id_index"] if vocabulary.exists() else None
    optimizer_state = None
    checkpoint = path / "train" / "checkpoint.safetensors"
    if checkpoint.exists():
        with safe_open(str(checkpoint), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
            moments: dict[int, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                if key.startswith("optim/"):
                    _, pid, name = key.split("/", 2)
                    moments.setdefault(int(pid), {})[name] = f.get_tensor(key)
        optimizer_state = {"state": moments, "param_groups": meta["param_groups"]}
    tables = report.get("tables") or {}
    ranking = recorded_ranking_config(report["config"], report.get("qarm_version"))  # complete for this qarm
    return LastModel(path, ranking, state, id_index, tables.get("digest"), tables.get("codes_version"),
                     optimizer_state)


def _last_model_provenance(where: Path) -> provenance.Provenance | None:
    """The record of a last model: a bundle's ``bundle.json`` or a ranking run's ``report.json``."""
    bundle = where / "bundle.json"
    return provenance.read(bundle if bundle.exists() else where / "report.json")


def train_warm_start(dataset_dir: str | Path, out_dir: str | Path, last: str | Path, window: tuple[int | None, int | None],
                     *, quantize_dir: str | Path | None = None, align_dir: str | Path | None = None,
                     train_config: TrainConfig | None = None, replay_fraction: float = 0.0, resume: bool = True,
                     progress: bool = False, log: Log | None = None,
                     on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """``qarm train --warm-start LAST --window START:END``: the last model grown by the window's new items
    and trained on the window's events (plus ``replay_fraction`` x as many older ones, drawn with the
    seed), its optimiser state carried over. Writes a ranking run folder (``train/`` with checkpoints, the
    grown vocabulary, ``report.json`` naming its inputs) that ``qarm export`` turns into a bundle; an
    interrupted update resumes from its checkpoint and never touches a bundle."""
    from qarm.train.stage import REPORT_FILE, TRAIN_DIR, RankingConfig, build_tables, run_provenance

    say = log or (lambda line: None)
    out_dir = Path(out_dir)
    previous = read_last_model(last)
    ranking = RankingConfig.from_dict(previous.ranking)
    config = train_config or TrainConfig(epochs=1, seed=ranking.train.seed)
    check_float("train_warm_start", "replay_fraction", replay_fraction, 0.0)
    source = ExampleSource.from_folder(dataset_dir, history_length=ranking.history_length)
    tables = build_tables(source, dataset_dir, ranking.model, quantize_dir=quantize_dir, align_dir=align_dir)
    check_codes_version(previous.codes_version, tables.codes_version, str(previous.where))
    old_index = tables.id_index if previous.id_index is None else previous.id_index
    if previous.tables_digest is not None and _with_index(tables, old_index).digest() != previous.tables_digest:
        raise DataError(f"{previous.where} was trained on other item tables (digest {previous.tables_digest}) than "
                        f"--codes / --vectors make ({_with_index(tables, old_index).digest()}); pass the codes and "
                        "vectors it was trained on")
    start, end = window
    rows = window_rows(source, start, end)
    if not len(rows):
        raise DataError(f"--window {start}:{end} holds no events (the log spans {int(source.time.min())}.."
                        f"{int(source.time.max())})")
    train_rows = with_older_rows(source, rows, start, replay_fraction, np.random.default_rng([config.seed, 7]))
    grown = warm_start(ranking.model, ranking.model_config, source, tables, previous.state, old_index, rows,
                       optimizer_state=previous.optimizer_state, seed=config.seed)
    say(f"warm start: {ranking.model} from {previous.where}, {grown.new_items:,} new ID rows, "
        f"{len(rows):,} window rows + {len(train_rows) - len(rows):,} replayed")
    view = source.view(train_rows, None, window={"start": start, "end": end, "replay_fraction": replay_fraction,
                                                 "from": str(previous.where)})
    train_dir = out_dir / TRAIN_DIR
    train_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save as save_numpy

    atomic_write_bytes(train_dir / VOCABULARY_FILE, save_numpy({"id_index": np.ascontiguousarray(grown.tables.id_index)}))
    t = time.perf_counter()
    result = train(grown.model, view, config, train_dir, resume=resume, progress=progress, log=log,
                   on_step=on_step, optimizer_state=grown.optimizer_state)
    seconds = time.perf_counter() - t
    ranking_out = to_dict(ranking) | {"train": to_dict(config)}
    report = {
        "qarm_version": __version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": ranking_out, "seed": config.seed,
        "warm_start": {"from": str(previous.where), "window": [start, end], "window_rows": len(rows),
                       "replayed_rows": len(train_rows) - len(rows), "new_id_rows": grown.new_items,
                       "optimizer_state": "carried" if grown.optimizer_state is not None else "fresh (a bundle has none)"},
        "inputs": {"dataset_dir": str(Path(dataset_dir).resolve()),
                   "quantize_dir": None if quantize_dir is None else str(Path(quantize_dir).resolve()),
                   "align_dir": None if align_dir is None else str(Path(align_dir).resolve())},
        "data": view.describe(), "tables": grown.tables.describe(), "metrics": {},
        "history": result.history.to_dict(), "examples_per_second": result.examples_per_second,
        "seconds": {"train": seconds},
        provenance.BLOCK: run_provenance(provenance.new_run_id(), out_dir, source, quantize_dir, align_dir,
                                         model=_last_model_provenance(previous.where)).to_json(),
    }
    write_json(out_dir / REPORT_FILE, report)
    say(f"warm start: trained {result.history.steps:,} steps in {seconds:.1f} s -> {out_dir} "
        "(qarm export it to serve it)")
    return report


# -- the replay --------------------------------------------------------------------------------------

@dataclass
class ReplayConfig:
    """``qarm replay``: which model, how many days, how each strategy trains. Defaults replay 14 days of
    the embedded synthetic data with QARM in a few minutes on 2 cores."""

    model: str = "qarm"
    model_config: dict[str, Any] = field(default_factory=dict)
    history_length: int = 50
    days: int = 14  # replayed days after the cut (fewer when the log ends before)
    day_seconds: int = 86_400  # one "day" in the log's time unit (ml-latest-small: use weeks or months)
    strategies: tuple[str, ...] = STRATEGIES
    initial_epochs: int = 2  # the first model, on everything before the first replayed day
    incremental_epochs: int = 1  # a warm start's passes over the day's rows
    retrain_epochs: int = 2  # a from-scratch model's passes over all rows before the day's end
    replay_fraction: float = 0.0  # older rows mixed into an incremental update, as a share of the day's rows
    batch_size: int = 1024
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0,)
    threads: int | None = None

    def __post_init__(self) -> None:
        name = "ReplayConfig"
        model_config(self.model, self.model_config)
        for param in ("days", "day_seconds", "initial_epochs", "incremental_epochs", "retrain_epochs",
                      "batch_size", "history_length"):
            check_int(name, param, getattr(self, param), 1)
        check_int(name, "threads", self.threads, 1, none_ok=True)
        check_float(name, "lr", self.lr, 0.0)
        check_float(name, "replay_fraction", self.replay_fraction, 0.0)
        self.strategies = tuple(self.strategies)
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ConfigError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ConfigError("ReplayConfig.seeds is empty")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ReplayConfig:
        return from_dict(cls, data, where="replay")


def replay_days(source: ExampleSource, config: ReplayConfig) -> tuple[int, list[tuple[int, int]]]:
    """The cut (first validation or test event of the prepared time split) and the replayed days."""
    held = source.split > 0
    if not held.any():
        raise DataError("the dataset has no valid / test rows: the replay starts at the time split's cut")
    strategy = (source.meta.prepared.get("split") or {}).get("strategy")
    if strategy not in (None, "time"):
        raise DataError(f"the replay needs a time split (the dataset was split by {strategy!r}): prepare it with "
                        "--set split.strategy=time")
    cut = int(source.time[held].min())
    end = int(source.time.max()) + 1
    days = []
    for d in range(config.days):
        lo = cut + d * config.day_seconds
        if lo >= end:
            break
        days.append((lo, min(end, lo + config.day_seconds)))
    return cut, days


def _train_config(config: ReplayConfig, epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=config.batch_size, lr=config.lr, seed=seed,
                       threads=config.threads, checkpoint_every=10**9)


def _fit(config: ReplayConfig, source: ExampleSource, tables: ItemTables, rows: np.ndarray, epochs: int, seed: int,
         start: WarmStart | None = None, window: dict[str, Any] | None = None) -> tuple[nn.Module, ItemTables,
                                                                                     dict[str, Any] | None]:
    view = source.view(rows, None, window=window)
    if start is None:
        index = grow_id_index(None, source.spec.n_items, _items_by_first_event(source, rows))
        tables = _with_index(tables, index)
        model = build_model(config.model, source.spec, tables, config.model_config, seed=seed)
        optimizer_state = None
    else:
        model, tables, optimizer_state = start.model, start.tables, start.optimizer_state
    result = train(model, view, _train_config(config, epochs, seed), None, progress=False,
                   optimizer_state=optimizer_state)
    return result.model, tables, result.optimizer_state


def _day_metrics(model: nn.Module, source: ExampleSource, rows: np.ndarray, born: np.ndarray,
                 batch_size: int) -> dict[str, Any]:
    frame = predict(model, source, "test", rows=rows, batch_size=batch_size)
    overall = validation_metrics(frame, source.tasks)
    cold_rows = born[frame["item_id"].to_numpy()]
    cold = validation_metrics(frame[cold_rows], source.tasks) if cold_rows.any() else {}
    return {"rows": len(rows), "cold_rows": int(cold_rows.sum()),
            "gauc": {t: overall[t]["gauc"] for t in source.tasks},
            "auc": {t: overall[t]["auc"] for t in source.tasks},
            "logloss": {t: overall[t]["logloss"] for t in source.tasks},
            "cold_gauc": {t: (cold[t]["gauc"] if cold else float("nan")) for t in source.tasks}}


def replay_seed(source: ExampleSource, tables: ItemTables, config: ReplayConfig, seed: int, *,
                log: Log | None = None) -> dict[str, Any]:
    """One seed of the replay: ``{"initial_seconds", "days": [{"day", "start", "end", "rows", "new_items"}],
    "strategies": {name: [{"day", "gauc", "auc", "logloss", "cold_gauc", "seconds"}, ...]}}``."""
    say = log or (lambda line: None)
    cut, days = replay_days(source, config)
    # An item's birth is its first logged event; a sampled negative is no event (negatives are drawn from
    # items that may appear in the log only later).
    logged = ~source.sampled_negative
    first_time = np.full(source.spec.n_items, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_time, source.item[logged], source.time[logged])
    t = time.perf_counter()
    before = window_rows(source, None, cut)
    model, grown, opt = _fit(config, source, tables, before, config.initial_epochs, seed,
                             window={"end": cut, "strategy": "initial"})
    initial_seconds = time.perf_counter() - t
    say(f"replay seed {seed}: initial model on {len(before):,} rows before {cut} in {initial_seconds:.1f} s")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    current = {s: (model if s == "frozen" else None, grown, state, opt) for s in config.strategies}
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in config.strategies}
    day_info = []
    rng = np.random.default_rng([seed, 7])
    for d, (lo, hi) in enumerate(days, start=1):
        rows = window_rows(source, lo, hi)
        born = (first_time >= lo) & (first_time < hi)
        day_info.append({"day": d, "start": lo, "end": hi, "rows": len(rows), "new_items": int(born.sum())})
        if not len(rows):
            continue
        for s in config.strategies:
            m, g, st, o = current[s]
            if m is None:
                m = build_model(config.model, source.spec, g, config.model_config, seed=seed)
                m.load_state_dict(st)
            record = {"day": d, **_day_metrics(m, source, rows, born, batch_size=8192)}
            t = time.perf_counter()
            if s == "incremental":
                train_rows = with_older_rows(source, rows, lo, config.replay_fraction, rng)
                ws = warm_start(config.model, config.model_config, source, g, st, g.id_index, rows,
                                optimizer_state=o, seed=seed + d)
                m, g, o = _fit(config, source, g, train_rows, config.incremental_epochs, seed + d, start=ws,
                               window={"start": lo, "end": hi, "strategy": s})
                st = {k: v.detach().clone() for k, v in m.state_dict().items()}
            elif s == "retrain":
                m, g, o = _fit(config, source, tables, window_rows(source, None, hi), config.retrain_epochs, seed,
                               window={"end": hi, "strategy": s})
                st = {k: v.detach().clone() for k, v in m.state_dict().items()}
            record["seconds"] = time.perf_counter() - t
            current[s] = (m, g, st, o)
            results[s].append(record)
        primary = source.tasks[0]
        say(f"replay seed {seed} day {d}/{len(days)} ({len(rows):,} rows, {int(born.sum())} new items): "
            + ", ".join(f"{s} {100 * results[s][-1]['gauc'][primary]:.2f}" for s in config.strategies))
    return {"seed": seed, "cut": cut, "initial_rows": len(before), "initial_seconds": initial_seconds,
            "days": day_info, "strategies": results}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]
    return float(np.mean(finite)) if finite else float("nan")


def summarise_replay(runs: list[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per strategy: per-day metrics averaged over seeds (and each seed's), the mean next-day GAUC per
    seed and its mean and std over seeds, and the seconds spent updating."""
    out: dict[str, Any] = {}
    names = list(runs[0]["strategies"])
    for s in names:
        per_seed = [r["strategies"][s] for r in runs]
        n_days = min(len(p) for p in per_seed)
        days = []
        for k in range(n_days):
            entries = [p[k] for p in per_seed]
            day: dict[str, Any] = {"day": entries[0]["day"], "rows": entries[0]["rows"],
                                   "cold_rows": entries[0]["cold_rows"],
                                   "seconds": float(np.mean([e["seconds"] for e in entries]))}
            for key in ("gauc", "auc", "logloss", "cold_gauc"):
                day[key] = {t: _nanmean([e[key][t] for e in entries]) for t in tasks}
            day["per_seed_gauc"] = [e["gauc"] for e in entries]
            days.append(day)
        mean_gauc = {t: [_nanmean([e["gauc"][t] for e in p[:n_days]]) for p in per_seed] for t in tasks}
        mean_cold = {t: [_nanmean([e["cold_gauc"][t] for e in p[:n_days]]) for p in per_seed] for t in tasks}
        seconds = [float(sum(e["seconds"] for e in p[:n_days])) for p in per_seed]
        out[s] = {"days": days,
                  "mean_gauc": {t: float(np.mean(v)) for t, v in mean_gauc.items()},
                  "mean_gauc_std": {t: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
                                    for t, v in mean_gauc.items()},
                  "mean_gauc_per_seed": mean_gauc,
                  "mean_cold_gauc": {t: _nanmean(v) for t, v in mean_cold.items()},
                  "update_seconds": float(np.mean(seconds)), "update_seconds_per_seed": seconds}
    return out


def replay(dataset_dir: str | Path, out_dir: str | Path, config: ReplayConfig | None = None, *,
           quantize_dir: str | Path | None = None, align_dir: str | Path | None = None,
           log: Log | None = None) -> dict[str, Any]:
    """Run the replay for every seed (a finished seed's ``seed-<n>.json`` is read back, so an interrupted
    replay resumes at the seed it was in) and write ``replay.json``, ``replay.md`` and ``replay.png``."""
    from qarm.train.stage import build_tables, run_provenance

    config = config or ReplayConfig()
    say = log or (lambda line: None)
    out_dir = Path(out_dir)
    source = ExampleSource.from_folder(dataset_dir, history_length=config.history_length)
    tables = build_tables(source, dataset_dir, config.model, quantize_dir=quantize_dir, align_dir=align_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs passed their checks
    settings = {k: v for k, v in to_dict(config).items() if k not in ("seeds", "threads")}
    identity = {"config": settings, "dataset": source.describe(), "tables": tables.digest()}
    runs = []
    for seed in config.seeds:
        path = out_dir / f"seed-{seed}.json"
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("identity") == json.loads(json.dumps(identity)):
                say(f"replay seed {seed}: read back from {path}")
                runs.append(saved["run"])
                continue
        run = replay_seed(source, tables, config, seed, log=say)
        write_json(path, {"identity": identity, "run": run})
        runs.append(run)
    summary = summarise_replay(runs, source.tasks)
    result = {"qarm_version": __version__,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "threads": torch.get_num_threads()},
              "config": to_dict(config), "dataset": source.describe(), "tables": tables.describe(),
              "cut": runs[0]["cut"], "days": runs[0]["days"], "initial_rows": runs[0]["initial_rows"],
              "initial_seconds": [r["initial_seconds"] for r in runs], "tasks": list(source.tasks),
              "strategies": summary,
              provenance.BLOCK: run_provenance(provenance.new_run_id(), out_dir, source, quantize_dir,
                                               align_dir).to_json()}
    write_json(out_dir / REPLAY_JSON, result)
    atomic_write_bytes(out_dir / REPLAY_MD, replay_markdown(result).encode())
    plot_replay(result, out_dir / REPLAY_PNG)
    return result


def replay_markdown(result: dict[str, Any]) -> str:
    tasks, strategies = result["tasks"], result["strategies"]
    primary = tasks[0]
    cfg = result["config"]
    lines = [f"# Replay: {result['dataset']['dataset']}, {cfg['model']}", "",
             f"Seeds {cfg['seeds']}; {len(result['days'])} days of {cfg['day_seconds']} time units after the cut "
             f"{result['cut']}; initial model on {result['initial_rows']:,} rows ({cfg['initial_epochs']} epochs); "
             f"incremental: {cfg['incremental_epochs']} epoch(s) on the day (replay fraction "
             f"{cfg['replay_fraction']}); retrain: {cfg['retrain_epochs']} epochs on everything before the day's "
             f"end. Machine: {result['machine']['platform']}, {result['machine']['threads']} torch threads.", "",
             f"## Mean next-day GAUC ({primary}) over the days", "",
             "| strategy | mean GAUC | std over seeds | per seed | new items' GAUC | update seconds |",
             "|---|---|---|---|---|---|"]
    for s, r in strategies.items():
        per_seed = ", ".join(f"{100 * v:.2f}" for v in r["mean_gauc_per_seed"][primary])
        lines.append(f"| {s} | {100 * r['mean_gauc'][primary]:.2f} | {100 * r['mean_gauc_std'][primary]:.2f} | "
                     f"{per_seed} | {100 * r['mean_cold_gauc'][primary]:.2f} | {r['update_seconds']:.1f} |")
    lines += ["", f"## Per day ({primary}: next-day GAUC, new items' GAUC in brackets)", "",
              "| day | rows | new items | " + " | ".join(strategies) + " |",
              "|---|---|---|" + "---|" * len(strategies)]
    for k, day in enumerate(result["days"]):
        cells = []
        for s in strategies:
            days = strategies[s]["days"]
            if k < len(days):
                e = days[k]
                cold = e["cold_gauc"][primary]
                cells.append(f"{100 * e['gauc'][primary]:.2f} ({'-' if math.isnan(cold) else f'{100 * cold:.1f}'})")
            else:
                cells.append("-")
        lines.append(f"| {day['day']} | {day['rows']:,} | {day['new_items']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_replay(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    primary = result["tasks"][0]
    figure = Figure(figsize=(7, 4))
    ax = figure.add_subplot()
    for s, r in result["strategies"].items():
        days = [e["day"] for e in r["days"]]
        ax.plot(days, [100 * e["gauc"][primary] for e in r["days"]], marker="o", label=s)
    ax.set_xlabel("day")
    ax.set_ylabel(f"next-day GAUC ({primary})")
    ax.set_title(f"Replay: {result['dataset']['dataset']}, {result['config']['model']}, seeds {result['config']['seeds']}")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)


__all__ = ["STRATEGIES", "VOCABULARY_FILE", "LastModel", "ReplayConfig", "WarmStart", "check_codes_version",
           "grow_id_index", "grow_optimizer_state", "grow_state", "parse_window", "read_last_model", "replay",
           "replay_days", "replay_seed", "summarise_replay", "train_warm_start", "warm_start", "window_rows"]

"""The live loop behind ``qarm learn``: a trainer that follows the service's event log and publishes versions.

``qarm serve`` appends every ``POST /v1/events`` to its live store's log (positions 0, 1, ...). This
module turns what was appended after the serving bundle into one incremental update and a new bundle
version that the running service hot-reloads:

1. read the current bundle and the log position it has consumed (``manifest["live"]["position"]``; 0
   for an exported run);
2. read the events after it (at most ``max_events``) and, with ``replay_fraction``, draw older events
   from the ``replay_pool`` events before it (:func:`qarm.train.continual.with_older_rows`);
3. turn them into examples the serving way: ids through the bundle's :class:`~qarm.serve.scorer.Scorer`
   (catalogue items, the store's uploaded items with the codes the store holds, users), labels as logged
   (a task an event does not name is 0), histories as ``/v1/rank`` builds them as of the event's time
   (:meth:`Scorer.history`: the bundle's log, then the store's live positives);
4. grow the tables and warm-start (:func:`qarm.train.continual.warm_start`): items first trained on
   get ID rows, users first seen get user rows, code tables stay (the codebooks are frozen);
5. train (:func:`qarm.train.trainer.train`, no validation: the budget, then the last weights);
6. commit a new version (:func:`qarm.serve.bundle.commit_version`: a temporary folder renamed whole, then
   ``CURRENT`` swapped) whose manifest records the new position.

Exactly once: the consumed position lives in the bundle's manifest, written in the same rename as the
weights that learned from those events. A restarted trainer resumes from the current bundle's position;
an update killed before the rename leaves the serving version (and so the position) as it was, and the
next start redoes it from the same position. One trainer per models folder (a lock file says so).

Negatives: events are logged *exposures* with their labels, the data path's rule for exposure logs
(``negatives.sampler=auto`` draws none when the log has its own zero labels).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import save as save_numpy
from safetensors.torch import load as load_torch_bytes
from safetensors.torch import save as save_torch
from torch import nn

from qarm import __version__, provenance
from qarm.config import from_dict, to_dict
from qarm.data import schema as S
from qarm.errors import ConfigError, DataError
from qarm.features.batch import RankingBatch, assemble_batch
from qarm.features.examples import ExampleSource, FeatureSpec
from qarm.features.tables import ItemTables
from qarm.quantize._common import check_float, check_int
from qarm.serve.bundle import (
    ADDED_KIND,
    CURRENT_FILE,
    ENCODER_DIR,
    IDS_FILE,
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    RQ_FILE,
    TABLES_FILE,
    VERSIONS_DIR,
    VQ_FILE,
    WEIGHTS_FILE,
    Bundle,
    commit_version,
    current_version,
    load_bundle,
    load_current,
    set_current,
    version_name,
)
from qarm.serve.scorer import Scorer
from qarm.serve.store import USER_POSITIVES_KEPT, Event, LiveStore
from qarm.train.continual import warm_start, window_rows, with_older_rows
from qarm.train.trainer import TrainConfig, train

LOCK_FILE = ".learn.lock"

Log = Callable[[str], None]


@dataclass
class LearnConfig:
    """``qarm learn``: when to update, how much each update reads, how it trains."""

    every_events: int | None = None  # update once this many events wait (default 1000 when every_seconds is unset)
    every_seconds: float | None = None  # or: update every T seconds when any event waits
    max_updates: int | None = None  # stop after this many updates (None: run until stopped)
    max_seconds: float | None = None  # stop after this long (None: run until stopped)
    once: bool = False  # one update of whatever waits (or none), then stop: the scheduler's form
    max_events: int = 100_000  # events one update reads at most (more wait for the next update)
    replay_fraction: float = 0.0  # older events mixed into an update, as a share of its new events
    replay_pool: int = 50_000  # the older events drawn from: the latest ones before the update's position
    poll_seconds: float = 1.0  # between checks of the log's length
    keep: int = 3  # bundle versions kept (the current one never removed)
    threads: int | None = None  # torch threads (None: leave torch's setting)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, checkpoint_every=10**9))

    def __post_init__(self) -> None:
        name = "LearnConfig"
        if self.every_events is not None and self.every_seconds is not None:
            raise ConfigError("--every-events and --every-seconds exclude each other: update on a count or on a clock")
        if self.every_events is None and self.every_seconds is None:
            self.every_events = 1000
        check_int(name, "every_events", self.every_events, 1, none_ok=True)
        for param in ("max_updates", "threads"):
            check_int(name, param, getattr(self, param), 1, none_ok=True)
        for param in ("max_events", "replay_pool", "keep"):
            check_int(name, param, getattr(self, param), 1)
        check_float(name, "replay_fraction", self.replay_fraction, 0.0)
        check_float(name, "poll_seconds", self.poll_seconds, 0.0)
        for param in ("every_seconds", "max_seconds"):
            value = getattr(self, param)
            if value is not None:
                check_float(name, param, value, 0.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LearnConfig:
        return from_dict(cls, data, where="learn")


# -- the log's examples ------------------------------------------------------------------------------

class LogExamples(ExampleSource):
    """Examples of log events in the interface :func:`~qarm.train.trainer.train` reads (``rows``,
    ``order``, ``batch``, ``view``, ``describe``). Row ``r`` is one event; ``time`` and ``seq`` hold its
    *log position* (what windows and :func:`~qarm.train.continual.with_older_rows` cut on: arrival order);
    the event's own time only chose its history, resolved when the rows were made."""

    def __init__(self, spec: FeatureSpec, user: np.ndarray, item: np.ndarray, position: np.ndarray,
                 labels: np.ndarray, histories: np.ndarray, user_feature_codes: np.ndarray | None,
                 item_category: np.ndarray | None, name: str) -> None:
        # Not ExampleSource.__init__: that one reads a prepared dataset; these arrays are the whole state.
        self.spec, self.history_length, self.name = spec, spec.history_length, name
        self.user, self.item = user, item
        self.time = self.seq = position
        self.labels = labels
        self.histories = histories
        self.user_feature_codes, self.item_category = user_feature_codes, item_category
        self.split = np.zeros(len(user), dtype=np.int8)
        self.training = np.ones(len(user), dtype=bool)
        self.cold_item = self.sampled_negative = np.zeros(len(user), dtype=bool)
        self.window = None

    def batch(self, rows: np.ndarray) -> RankingBatch:
        rows = np.asarray(rows, dtype=np.int64)
        return assemble_batch(self.user[rows], self.item[rows], self.histories[rows], labels=self.labels[rows],
                              user_feature_codes=self.user_feature_codes, item_category=self.item_category, row=rows)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "rows": self.n_rows, "train_rows": int(self.training.sum()),
                "history_length": self.history_length, "tasks": list(self.tasks), "n_items": self.spec.n_items,
                "n_users": self.spec.n_users, **({"window": self.window} if self.window is not None else {})}


def log_examples(scorer: Scorer, events: Sequence[Event], first_position: int,
                 live_positives: Callable[[str], list[tuple[str, int]]]) -> tuple[LogExamples, list[str]]:
    """The examples of ``events`` (log positions ``first_position, ...``) for ``scorer``'s bundle, and the
    users first seen in them (in order; their dense ids follow the bundle's users)."""
    items = scorer.dense_items([e.item_id for e in events])  # UnknownItems: the log names items of no store
    new_users: dict[str, int] = {}
    users = np.empty(len(events), dtype=np.int64)
    n_users = scorer.spec.n_users
    for r, e in enumerate(events):
        known = scorer.user_index.get(e.user_id)
        users[r] = known if known is not None else new_users.setdefault(e.user_id, n_users + len(new_users))
    labels = np.asarray([[e.labels.get(t, 0) for t in scorer.tasks] for e in events], dtype=np.float32)
    live: dict[str, list[tuple[str, int]]] = {}  # each user's store positives, read once

    def positives(user: str) -> list[tuple[str, int]]:
        if user not in live:
            live[user] = live_positives(user)
        return live[user]

    histories = np.zeros((len(events), scorer.history_length), dtype=np.int64)
    for r, e in enumerate(events):
        histories[r] = scorer.history(e.user_id, positives(e.user_id), as_of=e.time)
    codes = scorer.user_feature_codes  # the bundle's users, then the unknown user's missing codes
    if codes is not None:
        codes = np.vstack([codes[:-1], np.repeat(codes[-1:], len(new_users), axis=0)])
    spec = replace(scorer.spec, n_users=n_users + len(new_users), n_items=scorer.tables.n_items)
    positions = np.arange(first_position, first_position + len(events), dtype=np.int64)
    examples = LogExamples(spec, users, items, positions, labels, histories, codes, scorer.item_category,
                           name=f"live log of {scorer.version}")
    return examples, list(new_users)


# -- one update --------------------------------------------------------------------------------------

def consumed_position(bundle: Bundle) -> int:
    """The log position a bundle has learned up to (0: none of the live log)."""
    return int((bundle.manifest.get("live") or {}).get("position", 0))


def current_position(models_dir: str | Path) -> int:
    """The current version's consumed position, from its manifest alone (the cheap check of the loop;
    an update reads the bundle with every hash checked)."""
    version = current_version(models_dir)
    if version is None:
        raise DataError(f"{models_dir}: no current bundle ({CURRENT_FILE} missing); run `qarm export RUN_DIR "
                        f"--to {models_dir}` first")
    path = Path(models_dir) / VERSIONS_DIR / version / MANIFEST_FILE
    try:
        return int((json.loads(path.read_text(encoding="utf-8")).get("live") or {}).get("position", 0))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the consumed log position ({exc})") from exc


def learn_once(models_dir: str | Path, store: LiveStore, config: LearnConfig | None = None, *,
               log: Log | None = None) -> dict[str, Any] | None:
    """One update: the events after the current bundle's position -> a new current version. Returns its
    ``manifest["live"]`` record, or None when no event waits."""
    config = config or LearnConfig()
    say = log or (lambda line: None)
    bundle = load_current(models_dir)
    position = consumed_position(bundle)
    if bundle.codes_version is not None:
        store.bind(bundle.codes_version)  # CodeVersionError: the store's uploads were coded by other codebooks
    length = store.n_events()
    if length < position:
        raise DataError(f"bundle {bundle.version} learned the log up to position {position}, the store "
                        f"({store.describe()}) holds {length} events: it is not the store this bundle learned from")
    events = store.events_since(position, config.max_events)
    if not events:
        say(f"learn: no new events after position {position:,} (version {bundle.version})")
        return None
    start = time.perf_counter()
    older: list[Event] = []
    if config.replay_fraction > 0 and position > 0:
        first = max(0, position - config.replay_pool)
        older = store.events_since(first, position - first)
    end = position + len(events)
    scorer = Scorer(bundle, store.items_since(0))
    examples, new_users = log_examples(scorer, older + events, position - len(older),
                                       lambda user: store.user_positives(user, USER_POSITIVES_KEPT))
    new_rows = window_rows(examples, position, None)
    train_rows = with_older_rows(examples, new_rows, position, config.replay_fraction,
                                 np.random.default_rng([config.train.seed, position]))
    name, model_config = str(bundle.manifest["model"]), bundle.manifest["model_config"]
    grown = warm_start(name, model_config, examples, scorer.tables, dict(bundle.weights), scorer.tables.id_index,
                       new_rows, optimizer_state=read_optimizer_state(bundle), seed=config.train.seed)
    view = examples.view(train_rows, None, window={"log_start": position, "log_end": end, "from": bundle.version,
                                                   "replay_fraction": config.replay_fraction})
    prepared = time.perf_counter() - start
    losses: list[float] = []
    result = train(grown.model, view, config.train, None, progress=False, optimizer_state=grown.optimizer_state,
                   on_step=lambda step, loss: losses.append(loss))
    record = {"position": end, "previous_position": position, "events": len(events),
              "replayed_events": len(train_rows) - len(new_rows), "learned_from": bundle.version,
              "store": store.describe(), "new_users": len(new_users), "new_id_rows": grown.new_items,
              "added_items": scorer.n_added, "optimizer_state": "carried" if grown.optimizer_state else "fresh",
              "train_loss": float(np.mean(losses)) if losses else None,  # mean over the update's steps
              "steps": result.history.steps, "seconds": {"prepare": prepared,
                                                         "train": time.perf_counter() - start - prepared}}
    manifest = commit_learned_version(models_dir, bundle, result.model, grown.tables, new_users, scorer, record,
                                      optimizer_state=result.optimizer_state, keep=config.keep)
    say(f"learn: log {position:,}..{end:,} ({len(events):,} events + {record['replayed_events']:,} replayed, "
        f"{len(new_users)} new users, {grown.new_items} new ID rows, {result.history.steps} steps, mean loss "
        f"{np.mean(losses) if losses else float('nan'):.4f}) -> {manifest['version']} in "
        f"{time.perf_counter() - start:.1f} s")
    return dict(manifest["live"]) | {"version": manifest["version"]}


def commit_learned_version(models_dir: str | Path, bundle: Bundle, model: nn.Module, tables: ItemTables,
                           new_users: Sequence[str], scorer: Scorer, record: dict[str, Any], *,
                           optimizer_state: dict[str, Any] | None = None, keep: int = 3) -> dict[str, Any]:
    """Write the updated model as a new current version: ``bundle`` with the new weights, the grown ID
    vocabulary (catalogue items in ``id_index``, the store's added items in ``added_id_index``), the new
    users (rows after the bundle's; missing side features, no bundle history: their positives are the
    store's), Adam's moments (``optimizer.safetensors``, for the next update) and ``record`` as
    ``manifest["live"]``. The codebooks, encoder and the bundle's log are the bundle's own."""
    n_catalogue = scorer.n_catalogue
    arrays = dict(bundle.arrays)
    arrays["id_index"] = tables.id_index[:n_catalogue]
    arrays["added_id_index"] = tables.id_index[n_catalogue:]
    codes = arrays.get("user_feature_codes")
    if codes is not None and scorer.user_feature_codes is not None:
        arrays["user_feature_codes"] = np.vstack([codes, np.repeat(scorer.user_feature_codes[-1:], len(new_users), 0)])
    offsets = arrays["history_offsets"]
    arrays["history_offsets"] = np.concatenate([offsets, np.full(len(new_users), offsets[-1], dtype=offsets.dtype)])
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights_bytes = save_torch(weights)
    tables_bytes = save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    n_users = len(bundle.user_source_ids)
    ids = pd.concat([
        pd.DataFrame({"kind": "item", "id": np.arange(n_catalogue), S.SOURCE_ID: bundle.item_source_ids}),
        pd.DataFrame({"kind": "user", "id": np.arange(n_users + len(new_users)),
                      S.SOURCE_ID: np.concatenate([bundle.user_source_ids, np.asarray(new_users, dtype=object)])}),
        pd.DataFrame({"kind": ADDED_KIND, "id": np.arange(scorer.n_added),
                      S.SOURCE_ID: [it.source_id for it in scorer.added]}),
    ], ignore_index=True)
    ids[S.SOURCE_ID] = ids[S.SOURCE_ID].astype(str)

    manifest = json.loads(json.dumps(bundle.manifest))
    manifest.update(version=version_name(weights_bytes + tables_bytes + str(record["position"]).encode()),
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), qarm_version=__version__,
                    machine={"platform": platform.platform(), "python": platform.python_version()}, live=record)
    manifest["spec"]["n_users"] = n_users + len(new_users)
    manifest["source"] = dict(manifest.get("source") or {}) | {"tables_digest": tables.digest(),
                                                               "learned_from": bundle.version}
    parent = provenance.Provenance.from_json(bundle.manifest.get(provenance.BLOCK))
    content = hashlib.sha256(weights_bytes + tables_bytes).hexdigest()[:12]
    manifest[provenance.BLOCK] = provenance.Provenance(provenance.new_run_id(), f"bundle-{content}",
                                                       provenance.made_from(bundle=parent)).to_json()
    folder = bundle.path

    def write_files(tmp: Path) -> None:
        (tmp / WEIGHTS_FILE).write_bytes(weights_bytes)
        (tmp / TABLES_FILE).write_bytes(tables_bytes)
        ids.to_parquet(tmp / IDS_FILE, index=False, write_page_checksum=True)
        if optimizer_state is not None:
            (tmp / OPTIMIZER_FILE).write_bytes(encode_optimizer_state(optimizer_state))
        for name in (RQ_FILE, VQ_FILE):
            shutil.copyfile(folder / name, tmp / name)
        shutil.copytree(folder / ENCODER_DIR, tmp / ENCODER_DIR)

    existing = Path(models_dir) / VERSIONS_DIR / manifest["version"]
    if existing.exists():  # this very update was committed by a run killed before CURRENT moved
        if consumed_position(load_bundle(existing)) != record["position"]:
            raise DataError(f"{existing} exists and learned another part of the log; remove it")
        set_current(models_dir, manifest["version"])
        return json.loads((existing / MANIFEST_FILE).read_text(encoding="utf-8"))
    commit_version(models_dir, manifest, write_files, keep=keep, make_current=True)
    return manifest


def encode_optimizer_state(state: dict[str, Any]) -> bytes:
    """Adam's ``state_dict()`` as safetensors: ``optim/<param>/<name>`` tensors (the trainer checkpoint's
    layout) and the param groups as JSON metadata."""
    tensors = {f"optim/{pid}/{key}": (value if torch.is_tensor(value) else torch.tensor(value)).contiguous()
               for pid, entries in state["state"].items() for key, value in entries.items()}
    return save_torch(tensors, {"param_groups": json.dumps(state["param_groups"])})


def read_optimizer_state(bundle: Bundle) -> dict[str, Any] | None:
    """The moments a ``qarm learn`` version carries (None: an exported run's bundle has none: fresh Adam)."""
    if bundle.optimizer_bytes is None:
        return None
    data = bundle.optimizer_bytes
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # safetensors: u64 size, JSON header
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_torch_bytes(data).items():
        _, pid, name = key.split("/", 2)
        moments.setdefault(int(pid), {})[name] = value
    return {"state": moments, "param_groups": json.loads(header["__metadata__"]["param_groups"])}


# -- the loop ----------------------------------------------------------------------------------------

@contextmanager
def trainer_lock(models_dir: str | Path) -> Iterator[None]:
    """One ``qarm learn`` per models folder: two would both learn from one position and race on CURRENT."""
    path = Path(models_dir) / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(f"another qarm learn is running on {models_dir} (it holds {path}); one trainer per "
                              "models folder") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def learn(models_dir: str | Path, store: LiveStore, config: LearnConfig | None = None, *,
          log: Log | None = None, should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Follow the log: an update (:func:`learn_once`) whenever ``every_events`` events wait (or every
    ``every_seconds`` when any waits), until ``max_updates`` updates, ``max_seconds`` or ``should_stop()``;
    with ``once``, one update of whatever waits. Returns the updates' records."""
    config = config or LearnConfig()
    say = log or (lambda line: None)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    updates: list[dict[str, Any]] = []
    began = last = time.monotonic()
    current_position(models_dir)  # a folder without a current bundle is refused before anything is written
    with trainer_lock(models_dir):
        say(f"learn: following {store.describe()} from position {current_position(models_dir):,} "
            f"({to_dict(config) | {'train': None}})")
        while True:
            waiting = store.n_events() - current_position(models_dir)
            if config.once:
                due = waiting > 0
            elif config.every_seconds is not None:
                due = waiting > 0 and time.monotonic() - last >= config.every_seconds
            else:
                due = waiting >= (config.every_events or 1)
            if due:
                record = learn_once(models_dir, store, config, log=say)
                last = time.monotonic()
                if record is not None:
                    updates.append(record)
            if config.once or (config.max_updates is not None and len(updates) >= config.max_updates):
                break
            if config.max_seconds is not None and time.monotonic() - began >= config.max_seconds:
                say(f"learn: --max-seconds {config.max_seconds:g} reached after {len(updates)} update(s)")
                break
            if should_stop is not None and should_stop():
                break
            if not due:
                time.sleep(config.poll_seconds)
    return updates


__all__ = ["LOCK_FILE", "LearnConfig", "LogExamples", "commit_learned_version", "consumed_position",
           "current_position", "learn", "learn_once", "log_examples", "trainer_lock"]

"""Live state of a service, shared by its processes: the items added after the bundle, and the event log.

One interface, :class:`LiveStore`, two backends that pass the same tests:

* :class:`SQLiteLiveStore` (the embedded default, one process): one SQLite file in WAL mode; every
  write is one transaction; a connection per thread.
* :class:`RedisLiveStore` (several worker processes): redis-py; adding items is one Lua script (atomic:
  the version check, the ordinal and the write cannot interleave with another worker's), appending
  events one MULTI/EXEC transaction.

What it holds:

* ``codes_version``: the codebook version of every code in the store. The first bundle bound to an empty
  store sets it; a bundle of another version is refused (:class:`~qarm.quantize.store.CodeVersionError`,
  naming both), since added items' codes would mean something else to it.
* **added items** in the order they were added: ``ordinal`` 0, 1, ... (the same in every process), the
  source id, the aligned vector and the VQ / RQ codes, the category. Adding an id that is already there
  returns the stored item unchanged (an upload retried is not a second item).
* the **event log**, append-only and ordered (``position`` 0, 1, ...): user, item, time, labels. It is
  the input of continuous training; each user's positives (the primary task's label 1) are also kept
  per user, for histories.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qarm.errors import ConfigError, DataError
from qarm.quantize.store import REDIS_TIMEOUT_S, CodeVersionError
from qarm.serve.scorer import NewItem

STORE_FORMAT = "qarm.live/1"
USER_POSITIVES_KEPT = 1000  # per user in Redis: histories read the latest 50; the full log keeps everything


@dataclass(frozen=True)
class Event:
    """One logged event: ``labels`` task -> 0/1; ``positive``: the primary task's label is 1."""

    user_id: str
    item_id: str
    time: int
    labels: dict[str, int]
    positive: bool

    def to_json(self) -> str:
        return json.dumps({"user_id": self.user_id, "item_id": self.item_id, "time": self.time,
                           "labels": self.labels, "positive": self.positive}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        d = json.loads(text)
        return cls(str(d["user_id"]), str(d["item_id"]), int(d["time"]), {k: int(v) for k, v in d["labels"].items()},
                   bool(d["positive"]))


@dataclass(frozen=True)
class ItemUpload:
    """An item to add: what :class:`NewItem` holds, less the ordinal the store gives it."""

    source_id: str
    vector: np.ndarray
    vq: np.ndarray
    rq: np.ndarray
    category: str | None = None


def _pack_item(item: ItemUpload | NewItem) -> bytes:
    vector = np.ascontiguousarray(item.vector, dtype="<f4")
    vq, rq = np.ascontiguousarray(item.vq, dtype="<i8"), np.ascontiguousarray(item.rq, dtype="<i8")
    header = json.dumps({"source_id": item.source_id, "category": item.category, "d": len(vector), "k": len(vq),
                         "l": len(rq)}, separators=(",", ":")).encode()
    return len(header).to_bytes(4, "little") + header + vector.tobytes() + vq.tobytes() + rq.tobytes()


def _unpack_item(ordinal: int, blob: bytes) -> NewItem:
    size = int.from_bytes(blob[:4], "little")
    h = json.loads(blob[4:4 + size])
    at = 4 + size
    vector = np.frombuffer(blob, dtype="<f4", count=h["d"], offset=at).astype(np.float32)
    at += 4 * h["d"]
    vq = np.frombuffer(blob, dtype="<i8", count=h["k"], offset=at).astype(np.int64)
    at += 8 * h["k"]
    rq = np.frombuffer(blob, dtype="<i8", count=h["l"], offset=at).astype(np.int64)
    return NewItem(ordinal, str(h["source_id"]), vector, vq, rq, h["category"])


def _version_error(stored: str, bundle: str) -> CodeVersionError:
    return CodeVersionError(f"the live store holds codes of codebook version {stored}, the bundle's codes are "
                            f"{bundle}; a bundle cannot serve items coded by other codebooks (use a fresh store, "
                            "or a bundle of the same quantize run)")


class LiveStore(ABC):
    """Added items and the event log; see the module docstring."""

    backend = "abstract"

    @abstractmethod
    def codes_version(self) -> str | None:
        """The codebook version the store's codes belong to (None: empty store, not bound yet)."""

    @abstractmethod
    def bind(self, codes_version: str) -> None:
        """Record ``codes_version`` in an empty store, or check it equals the recorded one."""

    @abstractmethod
    def add_items(self, codes_version: str, items: Sequence[ItemUpload]) -> list[NewItem]:
        """Add items (atomically, in order); an id already added returns its stored item. Returns one
        NewItem per input, in input order."""

    @abstractmethod
    def items_since(self, ordinal: int) -> list[NewItem]:
        """Added items with ``ordinal >= ordinal``, in order."""

    @abstractmethod
    def n_items(self) -> int: ...

    @abstractmethod
    def append_events(self, events: Sequence[Event]) -> int:
        """Append to the log, in order, atomically; return the log's length after."""

    @abstractmethod
    def user_positives(self, user_id: str, limit: int) -> list[tuple[str, int]]:
        """The user's latest ``limit`` logged positives as ``(item_id, time)``, oldest first."""

    @abstractmethod
    def events_since(self, position: int, limit: int = 10_000) -> list[Event]:
        """Up to ``limit`` events from log position ``position`` on, in order."""

    @abstractmethod
    def n_events(self) -> int: ...

    @abstractmethod
    def ping(self) -> bool:
        """True when the store answers."""

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release connections."""

    def describe(self) -> str:
        return self.backend


class SQLiteLiveStore(LiveStore):
    """The embedded live store: one SQLite file (WAL), a connection per thread."""

    backend = "sqlite"

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._local = threading.local()
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS items (ordinal INTEGER PRIMARY KEY, source_id TEXT NOT NULL "
                         "UNIQUE, record BLOB NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS events (position INTEGER PRIMARY KEY, user_id TEXT NOT NULL, "
                         "item_id TEXT NOT NULL, time INTEGER NOT NULL, record TEXT NOT NULL, positive INTEGER NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS events_user ON events (user_id, positive, position)")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (STORE_FORMAT,))
            conn.execute("COMMIT")
            row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{self.path}: not a usable SQLite live store ({exc})") from exc
        if row is None or row[0] != STORE_FORMAT:
            raise DataError(f"{self.path}: store format {row[0] if row else None!r} is not {STORE_FORMAT!r}")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def codes_version(self) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'codes_version'").fetchone()
        return None if row is None else str(row[0])

    def _bind(self, conn: sqlite3.Connection, codes_version: str) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'codes_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('codes_version', ?)", (codes_version,))
        elif row[0] != codes_version:
            raise _version_error(row[0], codes_version)

    def bind(self, codes_version: str) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._bind(conn, codes_version)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def add_items(self, codes_version: str, items: Sequence[ItemUpload]) -> list[NewItem]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._bind(conn, codes_version)
            out = []
            next_ordinal = int(conn.execute("SELECT COALESCE(MAX(ordinal) + 1, 0) FROM items").fetchone()[0])
            for item in items:
                row = conn.execute("SELECT ordinal, record FROM items WHERE source_id = ?", (item.source_id,)).fetchone()
                if row is not None:
                    out.append(_unpack_item(int(row[0]), row[1]))
                    continue
                conn.execute("INSERT INTO items VALUES (?, ?, ?)", (next_ordinal, item.source_id, _pack_item(item)))
                out.append(NewItem(next_ordinal, item.source_id, item.vector, item.vq, item.rq, item.category))
                next_ordinal += 1
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return out

    def items_since(self, ordinal: int) -> list[NewItem]:
        rows = self._conn().execute("SELECT ordinal, record FROM items WHERE ordinal >= ? ORDER BY ordinal",
                                    (int(ordinal),)).fetchall()
        return [_unpack_item(int(o), r) for o, r in rows]

    def n_items(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def append_events(self, events: Sequence[Event]) -> int:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            start = int(conn.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM events").fetchone()[0])
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                             [(start + i, e.user_id, e.item_id, e.time, e.to_json(), int(e.positive))
                              for i, e in enumerate(events)])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return start + len(events)

    def user_positives(self, user_id: str, limit: int) -> list[tuple[str, int]]:
        rows = self._conn().execute(
            "SELECT item_id, time FROM events WHERE user_id = ? AND positive = 1 ORDER BY position DESC LIMIT ?",
            (user_id, int(limit))).fetchall()
        return [(str(i), int(t)) for i, t in reversed(rows)]

    def events_since(self, position: int, limit: int = 10_000) -> list[Event]:
        rows = self._conn().execute("SELECT record FROM events WHERE position >= ? ORDER BY position LIMIT ?",
                                    (int(position), int(limit))).fetchall()
        return [Event.from_json(r[0]) for r in rows]

    def n_events(self) -> int:
        return int(self._conn().execute("SELECT COALESCE(MAX(position) + 1, 0) FROM events").fetchone()[0])

    def ping(self) -> bool:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True


# Atomic add: KEYS = meta, ids (hash source_id -> ordinal), items (list); ARGV = version, then
# (source_id, record) pairs. Returns {"version mismatch", stored} or one ordinal per item (existing or new).
_ADD_ITEMS_LUA = """
local stored = redis.call('HGET', KEYS[1], 'codes_version')
if stored and stored ~= ARGV[1] then return {'mismatch', stored} end
if not stored then redis.call('HSET', KEYS[1], 'codes_version', ARGV[1]) end
local out = {'ok'}
for i = 2, #ARGV, 2 do
  local existing = redis.call('HGET', KEYS[2], ARGV[i])
  if existing then
    table.insert(out, existing)
  else
    local ordinal = redis.call('RPUSH', KEYS[3], ARGV[i + 1]) - 1
    redis.call('HSET', KEYS[2], ARGV[i], ordinal)
    table.insert(out, tostring(ordinal))
  end
end
return out
"""


class RedisLiveStore(LiveStore):
    """The live store in Redis, shared by several server processes.

    Keys under ``prefix``: ``meta`` (hash: format, codes_version), ``item_ids`` (hash: source id ->
    ordinal), ``items`` (list: packed items by ordinal), ``log`` (list: events as JSON, by position),
    ``user:<user id>`` (list: the user's latest positives, ``item\\ttime``). For durability run Redis with
    ``appendonly yes``: the log is the input of continuous training.
    """

    backend = "redis"

    def __init__(self, client: Any, *, prefix: str = "qarm:live") -> None:
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigError("RedisLiveStore needs a client with decode_responses=False")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ConfigError(f"The 'prefix' parameter of RedisLiveStore must be a non-empty string without spaces. "
                              f"Got {prefix!r} instead.")
        self.client, self.prefix = client, prefix
        self._meta, self._ids, self._items, self._log = (f"{prefix}:meta", f"{prefix}:item_ids", f"{prefix}:items",
                                                         f"{prefix}:log")
        self._add = client.register_script(_ADD_ITEMS_LUA)
        stored = client.hget(self._meta, "format")
        if stored is None:
            client.hsetnx(self._meta, "format", STORE_FORMAT)
        elif stored.decode() != STORE_FORMAT:
            raise DataError(f"redis prefix {prefix!r}: store format {stored.decode()!r} is not {STORE_FORMAT!r}")

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "qarm:live", **kwargs: Any) -> RedisLiveStore:
        import redis

        # A server that accepts the connection and never answers must fail, not hang the caller forever.
        kwargs.setdefault("socket_connect_timeout", REDIS_TIMEOUT_S)
        kwargs.setdefault("socket_timeout", REDIS_TIMEOUT_S)
        return cls(redis.Redis.from_url(url, **kwargs), prefix=prefix)

    def describe(self) -> str:
        kw = self.client.connection_pool.connection_kwargs
        return f"redis {kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)} prefix {self.prefix!r}"

    def close(self) -> None:
        self.client.close()

    def _user_key(self, user_id: str) -> bytes:
        return f"{self.prefix}:user:".encode() + user_id.encode("utf-8")

    def codes_version(self) -> str | None:
        value = self.client.hget(self._meta, "codes_version")
        return None if value is None else value.decode()

    def bind(self, codes_version: str) -> None:
        result = self._add(keys=[self._meta, self._ids, self._items], args=[codes_version])
        if result[0] == b"mismatch":
            raise _version_error(result[1].decode(), codes_version)

    def add_items(self, codes_version: str, items: Sequence[ItemUpload]) -> list[NewItem]:
        args: list[Any] = [codes_version]
        for item in items:
            args += [item.source_id.encode("utf-8"), _pack_item(item)]
        result = self._add(keys=[self._meta, self._ids, self._items], args=args)
        if result[0] == b"mismatch":
            raise _version_error(result[1].decode(), codes_version)
        out = []
        for item, raw in zip(items, result[1:]):
            ordinal = int(raw)
            stored = self.client.lindex(self._items, ordinal)
            out.append(_unpack_item(ordinal, stored) if stored is not None else
                       NewItem(ordinal, item.source_id, item.vector, item.vq, item.rq, item.category))
        return out

    def items_since(self, ordinal: int) -> list[NewItem]:
        blobs = self.client.lrange(self._items, int(ordinal), -1)
        return [_unpack_item(int(ordinal) + i, b) for i, b in enumerate(blobs)]

    def n_items(self) -> int:
        return int(self.client.llen(self._items))

    def append_events(self, events: Sequence[Event]) -> int:
        pipe = self.client.pipeline(transaction=True)
        for e in events:
            pipe.rpush(self._log, e.to_json())
        users = {e.user_id for e in events if e.positive}
        for e in events:
            if e.positive:
                pipe.rpush(self._user_key(e.user_id), f"{e.item_id}\t{e.time}".encode())
        for user in users:
            pipe.ltrim(self._user_key(user), -USER_POSITIVES_KEPT, -1)
        pipe.llen(self._log)
        return int(pipe.execute()[-1])

    def user_positives(self, user_id: str, limit: int) -> list[tuple[str, int]]:
        out = []
        for raw in self.client.lrange(self._user_key(user_id), -int(limit), -1):
            item, _, time = raw.decode("utf-8").rpartition("\t")
            out.append((item, int(time)))
        return out

    def events_since(self, position: int, limit: int = 10_000) -> list[Event]:
        return [Event.from_json(r) for r in self.client.lrange(self._log, int(position), int(position) + limit - 1)]

    def n_events(self) -> int:
        return int(self.client.llen(self._log))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:  # any connection failure means "not reachable"
            return False


def open_live_store(target: str | Path, *, prefix: str | None = None) -> LiveStore:
    """A live store from a URL or path: ``redis://host:port/db`` (Redis) or a SQLite file path
    (``sqlite:///path`` works too)."""
    text = str(target)
    if text.startswith(("redis://", "rediss://", "unix://")):
        return RedisLiveStore.from_url(text, **({"prefix": prefix} if prefix else {}))
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]
    blocker = next((p for p in Path(text).parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"--store {text}: {blocker} is a file, so no SQLite store can be made under it; give a path "
                          "in a folder, or redis://host:port/db")
    return SQLiteLiveStore(text)

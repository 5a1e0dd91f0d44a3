"""The code store: item id -> codes, versioned by the codebooks that made them.

One interface, :class:`CodeStore`, two backends:

* :class:`SQLiteCodeStore` (the embedded default): one SQLite file. Every ``put`` is one transaction,
  so a write killed midway leaves the previous codes; WAL mode lets other processes read while one
  writes; new items are added without rewriting the file. See ``docs/quantize.md`` for why SQLite.
* :class:`RedisCodeStore`: redis-py. A new version is written under a fresh key namespace and made
  visible by swapping one pointer in a MULTI/EXEC transaction; an upsert into the current version is
  one MULTI/EXEC transaction.

Rules, the same for both:

* a store holds codes of exactly one ``version`` (the codebook version, e.g. ``ResidualKMeans.version_``);
  every item has every code name (``"rq"``, ``"vq"``, ...) with a fixed width;
* ``put`` with the stored version adds or overwrites items; ``put`` with another version raises
  :class:`CodeVersionError` (mixing versions is an error) unless ``replace=True``, which swaps *all*
  codes to the new version in one atomic step;
* ``get`` of an id that is not stored raises :class:`~qarm.errors.DataError` naming the ids; ``get(...,
  version=v)`` also checks the stored version is ``v``.

Codes are stored per item and name as little-endian packed integers (int32 when every value fits at the
version's first write, else int64); ``get`` returns int64.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from qarm.errors import ConfigError, DataError, QarmError

STORE_FORMAT = "qarm.codes/1"
ORPHAN_GENERATION_AFTER_S = 3600.0  # an unreferenced Redis generation this old is a killed write's leftover
REDIS_TIMEOUT_S = 10.0  # connect and per-command socket timeout of the Redis stores
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
INT32 = np.iinfo(np.int32)


class CodeVersionError(QarmError):
    """Codes of one codebook version were about to be mixed with (or read as) another version."""


@dataclass(frozen=True)
class CodeSpec:
    """Layout of one code name: ``width`` integers per item, stored as ``dtype`` (``<i4`` or ``<i8``)."""

    width: int
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CodeSpec:
        return cls(int(data["width"]), str(data["dtype"]))


Schema = dict[str, CodeSpec]


@dataclass(frozen=True)
class Head:
    """What a store holds now: its version (``None`` when empty) and the layout of its codes."""

    version: str | None
    schema: Schema


class CodeStore(ABC):
    """item id -> codes, one codebook version at a time. Backends implement the ``_`` methods."""

    # Rows per write chunk (one executemany / one pipeline batch).
    chunk_size: int = 20_000

    # ------------------------------------------------------------------ public interface
    def version(self) -> str | None:
        """The version of the stored codes, ``None`` when the store is empty."""
        return self._head().version

    def schema(self) -> dict[str, CodeSpec]:
        """Code name -> layout."""
        return dict(self._head().schema)

    def __len__(self) -> int:
        """Number of items."""
        return self._count()

    def put(
        self,
        version: str,
        item_ids: Any,
        codes: Mapping[str, np.ndarray],
        *,
        replace: bool = False,
    ) -> None:
        """Store ``codes`` of ``item_ids`` made by codebook ``version``, atomically.

        Parameters
        ----------
        version : str
            The codebook version (letters, digits, ``._:+-``; at most 128 characters).
        item_ids : int array of shape (n,), unique
        codes : mapping name -> int array of shape (n, width)
            Every stored name, each with its stored width, when adding to an existing version.
        replace : bool
            Swap the whole store to ``version``: the old codes are gone once the new ones are in.

        Raises
        ------
        CodeVersionError
            The store holds another version and ``replace`` is False.
        DataError
            Malformed ids or codes, or names / widths that differ from the stored ones.
        """
        version = check_version(version)
        ids, arrays = _check_put_args(item_ids, codes)
        self._put(version, ids, arrays, bool(replace))

    def get(self, item_ids: Any, name: str, *, version: str | None = None) -> np.ndarray:
        """Codes ``name`` of ``item_ids``: int64 array of shape (n, width), in the order asked.

        Raises
        ------
        DataError
            The store is empty, ``name`` is unknown, or some ids are not stored (named in the error).
        CodeVersionError
            ``version`` is given and is not the stored version.
        """
        ids = np.asarray(item_ids)
        if ids.ndim != 1 or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
            raise DataError(f"item_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        uniq, inverse = np.unique(ids.astype(np.int64), return_inverse=True)
        head, found, blobs = self._fetch(uniq, name)
        spec = self._check_read(head, name, version)
        if len(found) != len(uniq):
            missing = np.setdiff1d(uniq, found)
            raise DataError(f"unknown item ids ({len(missing)} of {len(uniq)} asked) in the code store "
                            f"{self.describe()}", ids=missing)
        values = _unpack(blobs, spec)
        order = np.argsort(found, kind="stable")
        return values[order][inverse.reshape(-1)]

    def get_all(self, name: str, *, version: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every stored item: ``(item_ids, codes)``, ids ascending, codes int64 (n, width)."""
        head, found, blobs = self._fetch(None, name)
        spec = self._check_read(head, name, version)
        values = _unpack(blobs, spec)
        order = np.argsort(found, kind="stable")
        return found[order], values[order]

    def contains(self, item_ids: Any) -> np.ndarray:
        """Boolean array: which of ``item_ids`` are stored."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        head = self._head()
        if head.version is None:
            return np.zeros(len(ids), dtype=bool)
        name = sorted(head.schema)[0]
        uniq, inverse = np.unique(ids, return_inverse=True)
        _, found, _ = self._fetch(uniq, name)
        return np.isin(uniq, found)[inverse.reshape(-1)]

    def info(self) -> dict[str, Any]:
        """JSON-ready summary: backend, location, version, items, code layout."""
        head = self._head()
        return {"backend": self.backend, "location": self.describe(), "version": head.version,
                "items": self._count(), "codes": {k: v.to_json() for k, v in sorted(head.schema.items())}}

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release connections."""

    def __enter__(self) -> CodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ backend hooks
    backend: str = "abstract"

    @abstractmethod
    def describe(self) -> str:
        """Where the store lives (a path, a URL and key prefix)."""

    @abstractmethod
    def _head(self) -> Head: ...

    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _put(self, version: str, ids: np.ndarray, arrays: dict[str, np.ndarray], replace: bool) -> None:
        """Write atomically; must check the version with :func:`resolve_put` inside the transaction."""

    @abstractmethod
    def _fetch(self, ids: np.ndarray | None, name: str) -> tuple[Head, np.ndarray, list[bytes]]:
        """From one consistent snapshot: the head, the found ids (int64) and their packed codes ``name``.

        ``ids=None`` reads every item.
        """

    # ------------------------------------------------------------------ shared logic
    def _check_read(self, head: Head, name: str, version: str | None) -> CodeSpec:
        if head.version is None:
            raise DataError(f"the code store {self.describe()} is empty")
        if version is not None and version != head.version:
            raise CodeVersionError(f"the code store {self.describe()} holds codes of version {head.version}, "
                                   f"not {version}; re-run quantize or pass the matching codebook")
        if name not in head.schema:
            raise DataError(f"unknown code name {name!r}; the store has {sorted(head.schema)}")
        return head.schema[name]


def check_version(version: Any) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ConfigError(f"a code version must be 1-128 characters of letters, digits and '._:+-' "
                          f"(starting with a letter or digit). Got {version!r} instead.")
    return version


def resolve_put(head: Head, version: str, arrays: dict[str, np.ndarray], replace: bool,
                where: str) -> tuple[Schema, str]:
    """Decide how a put goes: returns ``(schema, mode)``, mode ``"create"`` (a new version replaces
    whatever was there) or ``"upsert"`` (add to the stored version). Raises on mixing versions."""
    if head.version is not None and head.version == version and not replace:
        names, stored = sorted(arrays), sorted(head.schema)
        if names != stored:
            raise DataError(f"{where} holds codes {stored} for version {version}; a put must give exactly "
                            f"those names, got {names}")
        for name, arr in arrays.items():
            spec = head.schema[name]
            if arr.shape[1] != spec.width:
                raise DataError(f"{where}: codes {name!r} of version {version} are {spec.width} wide; "
                                f"got width {arr.shape[1]}")
            if spec.dtype == "<i4" and not _fits_int32(arr):
                raise DataError(f"{where}: codes {name!r} of version {version} are stored as int32; "
                                f"got values outside that range")
        return dict(head.schema), "upsert"
    if head.version is not None and head.version != version and not replace:
        raise CodeVersionError(
            f"{where} holds codes of version {head.version}; refusing to add codes of version {version} "
            f"(mixing codebook versions is an error). Pass replace=True to swap every code to {version}."
        )
    schema = {name: CodeSpec(int(arr.shape[1]), "<i4" if _fits_int32(arr) else "<i8")
              for name, arr in arrays.items()}
    return schema, "create"


# ====================================================================== SQLite
class SQLiteCodeStore(CodeStore):
    """The embedded code store: one SQLite file (stdlib ``sqlite3``), WAL journal.

    Parameters
    ----------
    path : str or Path
        The database file; created (with its folder) if absent.
    timeout : float, default 30.0
        Seconds to wait for another process's write lock.
    """

    backend = "sqlite"
    _LARGE_FETCH = 20_000  # above this many ids, scan the name's rows instead of IN (...) look-ups
    _IN_CHUNK = 500

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: atomic, durable at checkpoints
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"meta", "codes"} <= tables:  # a new store: create it (the write lock only then)
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS codes (name TEXT NOT NULL, item_id INTEGER NOT NULL, "
                    "code BLOB NOT NULL, PRIMARY KEY (name, item_id)) WITHOUT ROWID")
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (STORE_FORMAT,))
                self._conn.execute("COMMIT")
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise DataError(f"{self.path}: not a usable SQLite code store ({exc})") from exc
        if row is None or row[0] != STORE_FORMAT:
            self.close()
            raise DataError(f"{self.path}: store format {row[0] if row else None!r} is not {STORE_FORMAT!r}")

    def describe(self) -> str:
        return str(self.path)

    def close(self) -> None:
        if getattr(self, "_conn", None) is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]

    def _read_head(self, cur: sqlite3.Cursor) -> Head:
        meta = dict(cur.execute("SELECT key, value FROM meta WHERE key IN ('version', 'schema')").fetchall())
        if "version" not in meta:
            return Head(None, {})
        schema = {k: CodeSpec.from_json(v) for k, v in json.loads(meta["schema"]).items()}
        return Head(meta["version"], schema)

    def _head(self) -> Head:
        return self._read_head(self._conn.cursor())

    def _count(self) -> int:
        cur = self._conn.cursor()
        cur.execute("BEGIN")
        try:
            head = self._read_head(cur)
            if head.version is None:
                return 0
            name = sorted(head.schema)[0]
            return int(cur.execute("SELECT COUNT(*) FROM codes WHERE name = ?", (name,)).fetchone()[0])
        finally:
            cur.execute("COMMIT")

    def _put(self, version: str, ids: np.ndarray, arrays: dict[str, np.ndarray], replace: bool) -> None:
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")  # take the write lock now: the version check and the write are one step
        try:
            schema, mode = resolve_put(self._read_head(cur), version, arrays, replace, str(self.path))
            if mode == "create":
                cur.execute("DELETE FROM codes")
                cur.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (version,))
                cur.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)",
                            (json.dumps({k: v.to_json() for k, v in schema.items()}),))
            id_list = ids.tolist()
            for name in sorted(arrays):
                blobs = _pack(arrays[name], schema[name])
                for start in range(0, len(id_list), self.chunk_size):
                    stop = start + self.chunk_size
                    self._write_chunk(cur, name, id_list[start:stop], blobs[start:stop])
            cur.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                cur.execute("ROLLBACK")
            raise

    def _write_chunk(self, cur: sqlite3.Cursor, name: str, ids: list[int], blobs: list[bytes]) -> None:
        cur.executemany("INSERT OR REPLACE INTO codes (name, item_id, code) VALUES (?, ?, ?)",
                        zip([name] * len(ids), ids, blobs))

    def _fetch(self, ids: np.ndarray | None, name: str) -> tuple[Head, np.ndarray, list[bytes]]:
        cur = self._conn.cursor()
        cur.execute("BEGIN")  # one read snapshot (WAL): a concurrent replace is seen entirely or not at all
        try:
            head = self._read_head(cur)
            rows: list[tuple[int, bytes]] = []
            if ids is None or len(ids) > self._LARGE_FETCH:
                rows = cur.execute("SELECT item_id, code FROM codes WHERE name = ?", (name,)).fetchall()
                if ids is not None:
                    found = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                    keep = np.flatnonzero(np.isin(found, ids))
                    rows = [rows[i] for i in keep]
            else:
                id_list = ids.tolist()
                for start in range(0, len(id_list), self._IN_CHUNK):
                    part = id_list[start:start + self._IN_CHUNK]
                    marks = ",".join("?" * len(part))
                    rows += cur.execute(f"SELECT item_id, code FROM codes WHERE name = ? AND item_id IN ({marks})",
                                        (name, *part)).fetchall()
        finally:
            cur.execute("COMMIT")
        found = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return head, found, [r[1] for r in rows]


# ====================================================================== Redis
class RedisCodeStore(CodeStore):
    """Codes in Redis (redis-py), under a key prefix.

    Keys: ``<prefix>:head`` (hash: ``version``, ``gen``, ``schema``) points at the live generation;
    ``<prefix>:gen:<gen>:<name>`` (hash: item id -> packed codes) holds its codes. A new version is
    written to a fresh generation nobody reads, then the head is swapped in one MULTI/EXEC (with WATCH,
    so a concurrent writer cannot be overwritten unseen) and the old generation deleted. A killed write
    leaves an unreferenced generation, removed by the next successful new-version write.

    Parameters
    ----------
    client : redis.Redis
        Must not decode responses (codes are bytes).
    prefix : str, default "qarm:codes"
    """

    backend = "redis"
    _FETCH_CHUNK = 10_000
    _RETRIES = 10

    def __init__(self, client: Any, *, prefix: str = "qarm:codes") -> None:
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigError("RedisCodeStore needs a client with decode_responses=False (codes are bytes)")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ConfigError(f"The 'prefix' parameter of RedisCodeStore must be a non-empty string without "
                              f"spaces. Got {prefix!r} instead.")
        self.client = client
        self.prefix = prefix
        self._head_key = f"{prefix}:head"

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "qarm:codes", **kwargs: Any) -> RedisCodeStore:
        """Connect with ``redis.Redis.from_url(url)`` (e.g. ``redis://127.0.0.1:6379/0``)."""
        import redis

        # A server that accepts the connection and never answers must fail, not hang the caller forever.
        kwargs.setdefault("socket_connect_timeout", REDIS_TIMEOUT_S)
        kwargs.setdefault("socket_timeout", REDIS_TIMEOUT_S)
        return cls(redis.Redis.from_url(url, **kwargs), prefix=prefix)

    def describe(self) -> str:
        kw = self.client.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
        return f"redis {where} prefix {self.prefix!r}"

    def close(self) -> None:
        self.client.close()

    def _key(self, gen: str, name: str) -> str:
        return f"{self.prefix}:gen:{gen}:{name}"

    @staticmethod
    def _decode_head(raw: dict[bytes, bytes]) -> tuple[Head, str | None]:
        if not raw:
            return Head(None, {}), None
        schema = {k: CodeSpec.from_json(v) for k, v in json.loads(raw[b"schema"]).items()}
        return Head(raw[b"version"].decode(), schema), raw[b"gen"].decode()

    def _head(self) -> Head:
        return self._decode_head(self.client.hgetall(self._head_key))[0]

    def _count(self) -> int:
        head, gen = self._decode_head(self.client.hgetall(self._head_key))
        if head.version is None:
            return 0
        return int(self.client.hlen(self._key(gen, sorted(head.schema)[0])))  # type: ignore[arg-type]

    def _put(self, version: str, ids: np.ndarray, arrays: dict[str, np.ndarray], replace: bool) -> None:
        import redis

        fields = [str(i).encode() for i in ids.tolist()]
        with self.client.pipeline(transaction=True) as pipe:
            pipe.watch(self._head_key)
            head, gen = self._decode_head(pipe.hgetall(self._head_key))
            schema, mode = resolve_put(head, version, arrays, replace, self.describe())
            if mode == "upsert":
                # One MULTI/EXEC: redis-py buffers the commands and sends them with EXEC, so a client
                # killed before EXEC changes nothing; WATCH aborts it if the head moved meanwhile.
                pipe.multi()
                for name in sorted(arrays):
                    self._write_name(pipe, self._key(gen, name), fields,  # type: ignore[arg-type]
                                     _pack(arrays[name], schema[name]), send_each_chunk=False)
                try:
                    pipe.execute()
                except redis.WatchError as exc:
                    raise QarmError(f"{self.describe()}: another writer changed the store during this put; "
                                    "retry it") from exc
                self._delete_other_generations(str(gen), older_than=ORPHAN_GENERATION_AFTER_S)
                return
            pipe.unwatch()
        # A new version: fill a fresh generation (invisible to readers), then swap the head.
        new_gen = f"{int(time.time())}-{uuid.uuid4().hex}"  # its birth time: orphans can be aged
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for name in sorted(arrays):
                    self._write_name(pipe, self._key(new_gen, name), fields, _pack(arrays[name], schema[name]),
                                     send_each_chunk=True)
            with self.client.pipeline(transaction=True) as pipe:
                pipe.watch(self._head_key)
                _, current_gen = self._decode_head(pipe.hgetall(self._head_key))
                if current_gen != gen:
                    raise QarmError(f"{self.describe()}: another writer replaced the store during this put; "
                                    "retry it")
                pipe.multi()
                pipe.delete(self._head_key)
                pipe.hset(self._head_key, mapping={
                    "version": version, "gen": new_gen,
                    "schema": json.dumps({k: v.to_json() for k, v in schema.items()})})
                pipe.execute()
        except BaseException:
            self._delete_generation(new_gen)
            raise
        self._delete_other_generations(new_gen)

    def _write_name(self, pipe: Any, key: str, fields: list[bytes], blobs: list[bytes], *,
                    send_each_chunk: bool) -> None:
        """Queue HSETs chunk by chunk; staging writes (``send_each_chunk``) go out as they are queued."""
        for start in range(0, len(fields), self.chunk_size):
            stop = start + self.chunk_size
            self._write_chunk(pipe, key, fields[start:stop], blobs[start:stop])
            if send_each_chunk:
                pipe.execute()

    def _write_chunk(self, pipe: Any, key: str, fields: list[bytes], blobs: list[bytes]) -> None:
        pipe.hset(key, mapping=dict(zip(fields, blobs)))

    def _delete_generation(self, gen: str) -> None:
        keys = list(self.client.scan_iter(match=f"{self.prefix}:gen:{gen}:*", count=1000))
        if keys:
            self.client.unlink(*keys)

    def _delete_other_generations(self, keep: str, older_than: float | None = None) -> None:
        """Delete every generation but ``keep``; with ``older_than`` only those born that many seconds ago
        or more (a generation without a birth time counts as old), so that a concurrent writer's generation
        being filled is never deleted by an upsert."""
        now = time.time()

        def stale_gen(gen: str) -> bool:
            if gen == keep:
                return False
            if older_than is None:
                return True
            born = gen.split("-", 1)[0]
            return not born.isdigit() or now - int(born) >= older_than

        stale = [k for k in self.client.scan_iter(match=f"{self.prefix}:gen:*", count=1000)
                 if stale_gen(k.decode().split(":gen:", 1)[1].split(":", 1)[0])]
        for start in range(0, len(stale), 1000):
            self.client.unlink(*stale[start:start + 1000])

    def _fetch(self, ids: np.ndarray | None, name: str) -> tuple[Head, np.ndarray, list[bytes]]:
        import redis

        with self.client.pipeline(transaction=True) as pipe:
            for _ in range(self._RETRIES):
                try:
                    pipe.watch(self._head_key)
                    head, gen = self._decode_head(pipe.hgetall(self._head_key))
                    if head.version is None or name not in head.schema:
                        pipe.unwatch()
                        return head, np.zeros(0, dtype=np.int64), []
                    key = self._key(gen, name)  # type: ignore[arg-type]
                    pipe.multi()
                    if ids is None:
                        pipe.hgetall(key)
                        (mapping,) = pipe.execute()
                        found = np.fromiter((int(k) for k in mapping), dtype=np.int64, count=len(mapping))
                        return head, found, list(mapping.values())
                    id_list = ids.tolist()
                    for start in range(0, len(id_list), self._FETCH_CHUNK):
                        pipe.hmget(key, [str(i) for i in id_list[start:start + self._FETCH_CHUNK]])
                    values = [v for part in pipe.execute() for v in part]
                    hit = [i for i, v in enumerate(values) if v is not None]
                    return head, ids[hit].astype(np.int64), [values[i] for i in hit]
                except redis.WatchError:
                    continue  # the head moved between reading it and reading the codes: read again
        raise QarmError(f"{self.describe()}: the store kept changing while reading; retry")


# ====================================================================== helpers
def open_store(target: str | Path | CodeStore, **kwargs: Any) -> CodeStore:
    """A code store from a location: ``redis://`` / ``rediss://`` / ``unix://`` URLs open a
    :class:`RedisCodeStore`, anything else is the path of a :class:`SQLiteCodeStore`."""
    if isinstance(target, CodeStore):
        return target
    text = str(target)
    if text.startswith(("redis://", "rediss://", "unix://")):
        return RedisCodeStore.from_url(text, **kwargs)
    return SQLiteCodeStore(target, **kwargs)


def _check_put_args(item_ids: Any, codes: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ids = np.asarray(item_ids)
    if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"item_ids must be a non-empty 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    sorted_ids = np.sort(ids)
    dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(dup):
        raise DataError("item_ids has duplicate ids", ids=np.unique(dup))
    if not isinstance(codes, Mapping) or not codes:
        raise DataError("codes must be a non-empty mapping name -> (n, width) int array")
    arrays: dict[str, np.ndarray] = {}
    for name, arr in codes.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise DataError(f"code names must be identifiers (letters, digits, '_'), got {name!r}")
        arr = np.asarray(arr)
        if arr.ndim != 2 or len(arr) != len(ids) or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"codes {name!r} must be an integer array of shape ({len(ids)}, width >= 1), "
                            f"got shape {arr.shape} dtype {arr.dtype}")
        arrays[name] = arr.astype(np.int64, copy=False)
    return ids, arrays


def _fits_int32(arr: np.ndarray) -> bool:
    return bool(arr.size == 0 or (arr.min() >= INT32.min and arr.max() <= INT32.max))


def _pack(arr: np.ndarray, spec: CodeSpec) -> list[bytes]:
    """One ``bytes`` per row: the row's integers, little-endian ``spec.dtype``."""
    packed = np.ascontiguousarray(arr, dtype=np.dtype(spec.dtype))
    row = np.dtype((np.void, packed.dtype.itemsize * spec.width))
    return cast(list[bytes], packed.view(row).reshape(-1).tolist())


def _unpack(blobs: list[bytes], spec: CodeSpec) -> np.ndarray:
    if not blobs:
        return np.zeros((0, spec.width), dtype=np.int64)
    flat = np.frombuffer(b"".join(blobs), dtype=np.dtype(spec.dtype))
    if flat.size != len(blobs) * spec.width:
        raise DataError(f"stored codes are not {spec.width} x {spec.dtype} wide; the store is corrupt")
    return flat.reshape(len(blobs), spec.width).astype(np.int64)

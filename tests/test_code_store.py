"""The code store, both backends: round trip, versions, replace, unknown ids, atomic writes.

The Redis backend runs against a real ``redis-server`` started here on a free loopback port (no
persistence, in a temporary folder) and stopped afterwards; its tests skip, saying why, only where
no server can be started (CI installs Debian's ``redis-server``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qarm.errors import ConfigError, DataError
from qarm.quantize.store import CodeStore, CodeVersionError, RedisCodeStore, SQLiteCodeStore, open_store

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- both backends
@pytest.fixture(params=["sqlite", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh, empty store lives: a SQLite path, or a Redis URL (a fresh key prefix per test)."""
    if request.param == "sqlite":
        return str(tmp_path / "codes.sqlite")
    url = request.getfixturevalue("redis_url")
    return url + "#" + request.node.name  # the prefix rides along; see open_target


def open_target(target: str) -> CodeStore:
    if target.startswith("redis://"):
        url, prefix = target.split("#", 1)
        return RedisCodeStore.from_url(url, prefix=f"test:{prefix}")
    return SQLiteCodeStore(target)


@pytest.fixture
def store(target: str) -> Iterator[CodeStore]:
    s = open_target(target)
    yield s
    s.close()


def example(n: int = 6, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) + 1
    return ids, {"rq": rng.integers(0, 256, (n, 3)), "vq": rng.integers(0, 10**6, (n, 4))}


def test_round_trip(store: CodeStore):
    assert store.version() is None and len(store) == 0
    ids, codes = example()
    store.put("rq-v1", ids, codes)
    assert store.version() == "rq-v1" and len(store) == 6
    ask = ids[[3, 0, 3, 5]]  # any order, repeats allowed
    np.testing.assert_array_equal(store.get(ask, "rq"), codes["rq"][[3, 0, 3, 5]])
    np.testing.assert_array_equal(store.get(ask, "vq", version="rq-v1"), codes["vq"][[3, 0, 3, 5]])
    assert store.get(ask, "rq").dtype == np.int64
    all_ids, all_codes = store.get_all("vq")
    order = np.argsort(ids)
    np.testing.assert_array_equal(all_ids, ids[order])
    np.testing.assert_array_equal(all_codes, codes["vq"][order])
    assert store.contains([ids[0], 10**9]).tolist() == [True, False]
    info = store.info()
    assert info["items"] == 6
    assert info["codes"] == {"rq": {"width": 3, "dtype": "<i4"}, "vq": {"width": 4, "dtype": "<i4"}}


def test_round_trip_is_seen_by_a_second_connection(target: str, store: CodeStore):
    ids, codes = example()
    store.put("v1", ids, codes)
    with open_target(target) as other:
        np.testing.assert_array_equal(other.get(ids, "rq"), codes["rq"])


def test_int64_codes_round_trip(store: CodeStore):
    ids = np.array([1, 2], dtype=np.int64)
    big = np.array([[2**40, -3], [5, 2**62]], dtype=np.int64)
    store.put("v1", ids, {"vq": big})
    assert store.schema()["vq"].dtype == "<i8"
    np.testing.assert_array_equal(store.get(ids, "vq"), big)


def test_upsert_same_version_adds_and_overwrites(store: CodeStore):
    ids, codes = example()
    store.put("v1", ids, codes)
    new_ids = np.array([ids[0], 10**6], dtype=np.int64)  # one overwrite, one new item
    new = {"rq": np.array([[1, 2, 3], [4, 5, 6]]), "vq": np.array([[7, 7, 7, 7], [8, 8, 8, 8]])}
    store.put("v1", new_ids, new)
    assert len(store) == 7
    np.testing.assert_array_equal(store.get(new_ids, "rq"), new["rq"])
    np.testing.assert_array_equal(store.get(ids[1:], "rq"), codes["rq"][1:])


def test_version_mismatch_is_an_error_and_changes_nothing(store: CodeStore):
    ids, codes = example()
    store.put("rq-aaaa", ids, codes)
    with pytest.raises(CodeVersionError, match=r"holds codes of version rq-aaaa; refusing to add codes of version "
                                               r"rq-bbbb \(mixing codebook versions is an error\)\. Pass replace=True"):
        store.put("rq-bbbb", np.array([10**6]), {"rq": [[1, 2, 3]], "vq": [[1, 2, 3, 4]]})
    assert store.version() == "rq-aaaa" and len(store) == 6
    with pytest.raises(CodeVersionError, match="holds codes of version rq-aaaa, not rq-bbbb"):
        store.get(ids, "rq", version="rq-bbbb")


def test_replace_swaps_every_code_to_the_new_version(store: CodeStore):
    ids, codes = example()
    store.put("v1", ids, codes)
    new_ids, new_codes = example(4, seed=1)
    new_ids += 1000
    store.put("v2", new_ids, {"rq": new_codes["rq"][:, :2]}, replace=True)  # another layout is fine
    assert store.version() == "v2" and len(store) == 4 and set(store.schema()) == {"rq"}
    np.testing.assert_array_equal(store.get(new_ids, "rq"), new_codes["rq"][:, :2])
    with pytest.raises(DataError, match="unknown item ids"):
        store.get(ids[:1], "rq")


def test_unknown_ids_names_and_empty_store(store: CodeStore):
    with pytest.raises(DataError, match="is empty"):
        store.get([1], "rq")
    ids, codes = example()
    store.put("v1", ids, codes)
    with pytest.raises(DataError, match=r"unknown item ids \(2 of 3 asked\).*offending: \[123456, 999999\]"):
        store.get([ids[0], 999_999, 123_456], "rq")
    with pytest.raises(DataError, match=r"unknown code name 'sid'; the store has \['rq', 'vq'\]"):
        store.get(ids, "sid")


def test_put_checks_its_arguments(store: CodeStore):
    ids, codes = example()
    with pytest.raises(ConfigError, match="a code version must be"):
        store.put("bad version", ids, codes)
    with pytest.raises(DataError, match="duplicate ids"):
        store.put("v1", np.array([1, 1, 2, 3, 4, 5]), codes)
    with pytest.raises(DataError, match=r"codes 'rq' must be an integer array of shape \(6, width >= 1\)"):
        store.put("v1", ids, {"rq": np.zeros((5, 3), dtype=int)})
    store.put("v1", ids, codes)
    with pytest.raises(DataError, match=r"a put must give exactly those names, got \['rq'\]"):
        store.put("v1", ids, {"rq": codes["rq"]})
    with pytest.raises(DataError, match="are 3 wide; got width 2"):
        store.put("v1", ids, {"rq": codes["rq"][:, :2], "vq": codes["vq"]})
    with pytest.raises(DataError, match="stored as int32"):
        store.put("v1", ids, {"rq": codes["rq"] + 2**40, "vq": codes["vq"]})


def test_open_store_picks_the_backend(tmp_path: Path):
    with open_store(tmp_path / "c.sqlite") as s:
        assert isinstance(s, SQLiteCodeStore)
    not_sqlite = tmp_path / "x.sqlite"
    not_sqlite.write_text("hello, not a database " * 100)
    with pytest.raises(DataError, match="not a usable SQLite code store"):
        SQLiteCodeStore(not_sqlite)


# --------------------------------------------------------------------------------- atomicity
KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from qarm.quantize import store as S

    target, mode = sys.argv[1], sys.argv[2]
    cls = S.RedisCodeStore if target.startswith("redis://") else S.SQLiteCodeStore
    original = cls._write_chunk
    calls = []

    def write_then_die(self, *args):
        original(self, *args)
        calls.append(1)
        if len(calls) == 3:  # three chunks are written (or queued): die without any cleanup
            os.kill(os.getpid(), signal.SIGKILL)

    cls._write_chunk = write_then_die
    if target.startswith("redis://"):
        url, prefix = target.split("#", 1)
        store = S.RedisCodeStore.from_url(url, prefix="test:" + prefix)
    else:
        store = S.SQLiteCodeStore(target)
    store.chunk_size = 100
    n = 1000
    ids = np.arange(n, dtype=np.int64) + (0 if mode == "replace" else 10**6)
    codes = {{"rq": np.full((n, 3), 7), "vq": np.full((n, 4), 9)}}
    store.put("v2" if mode == "replace" else "v1", ids, codes, replace=(mode == "replace"))
    print("the put finished: it should have been killed", flush=True)
""")


@pytest.mark.parametrize("mode", ["replace", "upsert"])
def test_a_write_killed_midway_leaves_the_old_codes(target: str, mode: str, tmp_path: Path):
    ids, codes = example(50)
    with open_target(target) as s:
        s.put("v1", ids, codes)
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), target, mode], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    with open_target(target) as s:
        assert s.version() == "v1" and len(s) == 50
        np.testing.assert_array_equal(s.get(ids, "rq"), codes["rq"])
        np.testing.assert_array_equal(s.get(ids, "vq"), codes["vq"])
        if mode == "upsert":
            assert not s.contains(np.arange(1000) + 10**6).any()
        # the store still takes writes after the crash
        s.put("v3", ids[:5], {"rq": codes["rq"][:5]}, replace=True)
        assert s.version() == "v3" and len(s) == 5


def test_readers_never_see_a_half_replaced_store(target: str):
    """While one connection replaces v1 by v2, another reads: every read is wholly v1 or wholly v2."""
    import threading

    n = 20_000
    ids = np.arange(n, dtype=np.int64)
    with open_target(target) as s:
        s.put("v1", ids, {"rq": np.full((n, 2), 1)})
    seen: list[tuple[str | None, int, set[int]]] = []
    done = threading.Event()

    def writer() -> None:
        with open_target(target) as w:
            w.chunk_size = 1000
            w.put("v2", ids, {"rq": np.full((n, 2), 2)}, replace=True)
        done.set()

    thread = threading.Thread(target=writer)
    with open_target(target) as r:
        thread.start()
        while not done.is_set() or len(seen) < 3:
            head, found, blobs = r._fetch(None, "rq")
            values = {int(v) for v in np.frombuffer(b"".join(blobs), dtype=np.int32)} if blobs else set()
            seen.append((head.version, len(found), values))
        thread.join()
        assert r.version() == "v2" and (r.get(ids[::997], "rq") == 2).all()
    for version, count, values in seen:
        assert count == n and values == ({1} if version == "v1" else {2}), (version, count, values)


def test_redis_replace_cleans_up_generations_left_by_killed_writes(redis_url: str):
    import redis

    prefix = "test:cleanup"
    s = RedisCodeStore.from_url(redis_url, prefix=prefix)
    ids, codes = example()
    s.put("v1", ids, codes)
    client = redis.Redis.from_url(redis_url)
    client.hset(f"{prefix}:gen:deadbeef:rq", "1", b"x")  # what a killed staging write leaves
    s.put("v2", ids, codes, replace=True)
    keys = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:*"))
    assert len(keys) == 3 and f"{prefix}:head" in keys and not any("deadbeef" in k for k in keys)
    s.close()
    client.close()


def test_redis_refuses_decoding_clients(redis_url: str):
    import redis

    with pytest.raises(ConfigError, match="decode_responses=False"):
        RedisCodeStore(redis.Redis.from_url(redis_url, decode_responses=True))


def test_redis_upsert_removes_old_orphan_generations_and_keeps_a_concurrent_writers(redis_url: str):
    import time

    import redis

    prefix = "test:orphans"
    s = RedisCodeStore.from_url(redis_url, prefix=prefix)
    ids, codes = example()
    s.put("v1", ids, codes)
    client = redis.Redis.from_url(redis_url)
    client.hset(f"{prefix}:gen:deadbeef:rq", "1", b"x")  # a killed write of an older qarm: no birth time
    client.hset(f"{prefix}:gen:{int(time.time()) - 7200}-aa:rq", "1", b"x")  # killed two hours ago
    young = f"{prefix}:gen:{int(time.time())}-bb:rq"  # a concurrent writer filling its generation now
    client.hset(young, "1", b"x")
    s.put("v1", ids[:3], {name: value[:3] for name, value in codes.items()})  # same version: an upsert
    keys = {k.decode() for k in client.scan_iter(match=f"{prefix}:gen:*")}
    assert young in keys and not any("deadbeef" in k or "-aa:" in k for k in keys), keys
    assert np.array_equal(s.get(ids, "rq"), codes["rq"])
    s.close()
    client.close()

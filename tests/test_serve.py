"""The serving path: bundles, the HTTP service (rank / items / events / health / metrics), hot reload,
the live stores (SQLite and a real Redis), and a fuzz of the request schemas.

One small synthetic ``qarm run`` (module fixture, ~30 s) gives a real trained QARM bundle; every check
is against an independent path: the run's own offline predictions, the bundle files' bytes, the
store's rows.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from qarm.data.io import load_dataset
from qarm.errors import ConfigError
from qarm.quantize.store import CodeVersionError
from qarm.serve.app import Service, create_app
from qarm.serve.bundle import (
    READY_FILE,
    WEIGHTS_FILE,
    BundleError,
    current_version,
    export_bundle,
    find_run,
    list_versions,
    load_bundle,
    set_current,
)
from qarm.serve.store import Event, ItemUpload, LiveStore, RedisLiveStore, SQLiteLiveStore, open_live_store


@pytest.fixture
def client(models: Path, text_model) -> Iterator[TestClient]:
    app = create_app(models, models / "live.sqlite", reload_interval=0, text_model=text_model, warm_encoder=False)
    with TestClient(app) as c:
        yield c


def rank(client: TestClient, user: str, items: list[str], **context) -> dict:
    body = {"user_id": user, "candidates": items, **({"context": context} if context else {})}
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------ bundles

def test_qarm_run_ends_by_exporting_its_qarm_model(run_dir: Path):
    bundle = load_bundle(run_dir / "models" / "versions" / current_version(run_dir / "models"))
    assert bundle.manifest["model"] == "qarm" and bundle.manifest["source"]["row"] == "+ VQ & RQ"
    assert json.loads((run_dir / "report.json").read_text())["serving"]["version"] == bundle.version
    files = bundle.manifest["files"]
    assert {"weights.safetensors", "tables.safetensors", "ids.parquet", "rq_codebooks.safetensors",
            "vq_codebook.safetensors"} <= set(files)
    assert any(name.startswith("encoder/") for name in files)


def test_versions_are_kept_pruned_and_made_current_atomically(run_dir: Path, tmp_path: Path):
    folder = tmp_path / "m"
    for v in ("v1", "v2", "v3"):
        export_bundle(run_dir, folder, version=v, keep=2)
    assert list_versions(folder) == ["v2", "v3"] and current_version(folder) == "v3"
    export_bundle(run_dir, folder, version="v4", keep=5, make_current=False)
    assert current_version(folder) == "v3" and (folder / "versions" / "v4" / READY_FILE).exists()
    set_current(folder, "v2")
    export_bundle(run_dir, folder, version="v5", keep=1, make_current=False)
    assert current_version(folder) == "v2" and "v2" in list_versions(folder)  # the current one is never pruned
    assert not list(folder.rglob("*.tmp*"))
    with pytest.raises(Exception, match="already exists"):
        export_bundle(run_dir, folder, version="v5")


def test_a_corrupt_or_unready_bundle_is_refused_before_it_is_read(models: Path, tmp_path: Path):
    good = models / "versions" / "v1"
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    data = bytearray((bad / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors"):
        load_bundle(bad)
    shutil.rmtree(bad)
    shutil.copytree(good, bad)
    (bad / READY_FILE).unlink()
    with pytest.raises(BundleError, match="READY"):
        load_bundle(bad)


def test_export_refuses_what_it_cannot_serve(run_dir: Path, tmp_path: Path):
    with pytest.raises(Exception, match="no row"):
        export_bundle(run_dir, tmp_path / "m", row="+ nothing")
    with pytest.raises(Exception, match="neither"):
        export_bundle(tmp_path, tmp_path / "m")
    assert find_run(run_dir, row="ID-only").row == "ID-only"


# ------------------------------------------------------------------------------------------ ranking

def test_service_scores_equal_the_runs_offline_predictions(run_dir: Path, client: TestClient):
    """1,000 test rows, each one /v1/rank request as of the row's time, against ``predict``'s output."""
    run = find_run(run_dir)
    offline = pd.read_parquet(run.run_dir / "predictions.parquet")
    dataset = load_dataset(run_dir / "data")
    rows = offline.sample(n=min(1000, len(offline)), random_state=0)
    inter = dataset.interactions
    users = dataset.users.set_index("user_id")["source_id"].astype(str)
    items = dataset.items.set_index("item_id")["source_id"].astype(str)
    worst = 0.0
    for r in rows.itertuples():
        t = int(inter["time"].iloc[int(r.row)])
        got = rank(client, users[r.user_id], [items[r.item_id]], time=t)["scores"][0]
        worst = max(worst, abs(got["click"] - r.score_click), abs(got["convert"] - r.score_convert))
    assert worst < 1e-5, worst


def test_a_calibrated_run_is_served_calibrated(run_dir: Path, tmp_path: Path, text_model):
    """A run trained with ``calibration`` (here its report given one by hand: the weights are the same) is
    exported with its per-task scale and bias, and the service answers sigmoid(scale * logit + bias) of the
    raw model's offline predictions."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("models", "live.sqlite"))
    run = find_run(copy)
    report = json.loads((run.run_dir / "report.json").read_text())
    report["calibration"] = {"method": "platt", "fitted_on": "valid", "scale": [0.5, 2.0], "bias": [0.25, -0.5],
                             "tasks": ["click", "convert"]}
    (run.run_dir / "report.json").write_text(json.dumps(report))
    models = tmp_path / "models"
    manifest = export_bundle(copy, models, version="v1")
    assert manifest["calibration"]["scale"] == [0.5, 2.0]
    offline = pd.read_parquet(run.run_dir / "predictions.parquet").sample(n=50, random_state=1)
    dataset = load_dataset(copy / "data")
    users = dataset.users.set_index("user_id")["source_id"].astype(str)
    items = dataset.items.set_index("item_id")["source_id"].astype(str)
    app = create_app(models, models / "live.sqlite", reload_interval=0, text_model=text_model, warm_encoder=False)
    worst = 0.0
    with TestClient(app) as client:
        for r in offline.itertuples():
            t = int(dataset.interactions["time"].iloc[int(r.row)])
            got = rank(client, users[r.user_id], [items[r.item_id]], time=t)["scores"][0]
            for task, raw, a, b in (("click", r.score_click, 0.5, 0.25), ("convert", r.score_convert, 2.0, -0.5)):
                expected = 1.0 / (1.0 + np.exp(-(a * np.log(raw / (1.0 - raw)) + b)))
                worst = max(worst, abs(got[task] - expected))
    assert worst < 1e-5, worst


def test_unknown_users_are_new_users_and_unknown_items_a_404_naming_them(client: TestClient, models: Path):
    out = rank(client, "a-user-never-seen", ["1", "2", "3"])
    assert [s["item_id"] for s in out["scores"]] == ["1", "2", "3"]
    assert all(0 < s["click"] < 1 and 0 < s["convert"] < 1 for s in out["scores"])
    assert out["model_version"] == "v1" and out["codes_version"].startswith("codes-")
    r = client.post("/v1/rank", json={"user_id": "1", "candidates": ["1", "no-such-item", "also-not"]})
    assert r.status_code == 404
    assert r.json()["detail"]["unknown_item_ids"] == ["no-such-item", "also-not"]


def test_events_put_a_new_positive_at_the_head_of_the_users_history(client: TestClient):
    service: Service = client.app.state.service
    user, item = "5", "17"
    before = rank(client, user, ["17", "18"])
    r = client.post("/v1/events", json={"events": [{"user_id": user, "item_id": item, "time": 2_000_000_000,
                                                    "labels": {"click": 1, "convert": 0}},
                                                   {"user_id": user, "item_id": "18", "time": 2_000_000_001,
                                                    "labels": {"click": 0}}]})
    assert r.status_code == 200 and r.json() == {"accepted": 2, "log_length": 2, "positives": 1}
    scorer = service.scorer
    live = service.store.user_positives(user, 50)
    assert live == [(item, 2_000_000_000)]  # the negative is logged but is not a positive
    assert scorer.history(user, live)[0] == scorer.item_index[item]
    after = rank(client, user, ["17", "18"])
    assert after["scores"] != before["scores"]
    as_before = rank(client, user, ["17", "18"], time=2_000_000_000)  # as of then, the event is in the future
    assert as_before["scores"] == before["scores"]
    assert [e.item_id for e in service.store.events_since(0)] == [item, "18"]
    bad = client.post("/v1/events", json={"events": [{"user_id": user, "item_id": "nope", "time": 1,
                                                      "labels": {"click": 1}}]})
    assert bad.status_code == 404 and "nope" in bad.text
    assert service.store.n_events() == 2  # nothing of a refused request is written


# ----------------------------------------------------------------------------------------- new items

def test_an_uploaded_item_gets_codes_and_is_ranked_at_once_in_every_worker(client: TestClient, models: Path,
                                                                          text_model):
    r = client.post("/v1/items", json={"item_id": "upload-1", "text": "a short video about cooking pasta"})
    assert r.status_code == 200, r.text
    codes = r.json()["items"][0]
    service: Service = client.app.state.service
    scorer = service.scorer
    assert codes["added"] and codes["ordinal"] == 0
    assert len(codes["rq"]) == scorer.bundle.manifest["rq_sizes"].__len__()
    assert len(codes["vq"]) == 25 and all(v in scorer.item_index for v in codes["vq"])
    # the VQ code is the catalogue's top-25 by the aligned vector (an independent exact search)
    aligned = scorer.codebooks.encode(["a short video about cooking pasta"], {})
    catalogue = scorer.bundle.item_tables().vectors["aligned"][:scorer.n_catalogue]
    top = np.argsort(-(catalogue / np.linalg.norm(catalogue, axis=1, keepdims=True)) @ (aligned[0] / np.linalg.norm(
        aligned[0])))[:25]
    names = scorer.bundle.item_source_ids
    assert len(set(codes["vq"]) & {str(names[i]) for i in top}) >= 23  # ties at the boundary may swap
    out = rank(client, "3", ["upload-1", "1"])
    assert out["scores"][0]["item_id"] == "upload-1"
    again = client.post("/v1/items", json={"items": [{"item_id": "upload-1", "text": "other text"},
                                                     {"item_id": "upload-2", "text": "news about football"}]})
    assert [(i["item_id"], i["added"], i["ordinal"]) for i in again.json()["items"]] == [
        ("upload-1", False, 0), ("upload-2", True, 1)]
    assert again.json()["items"][0]["rq"] == codes["rq"]  # a retried upload keeps its codes
    # a second process on the same store (another worker) ranks both without being told
    other = create_app(models, models / "live.sqlite", reload_interval=0, text_model=text_model, warm_encoder=False)
    with TestClient(other) as c2:
        assert rank(c2, "3", ["upload-1", "upload-2"])["scores"] == rank(client, "3", ["upload-1", "upload-2"])["scores"]
    clash = client.post("/v1/items", json={"item_id": "1", "text": "x"})
    assert clash.status_code == 409 and "'1'" in clash.text


def test_a_store_of_other_codes_is_refused_naming_both_versions(models: Path, text_model):
    store = SQLiteLiveStore(models / "other.sqlite")
    store.bind("codes-0000000000000000")
    version = load_bundle(models / "versions" / "v1").codes_version
    with pytest.raises(CodeVersionError, match=f"codes-0000000000000000.*{version}"):
        create_app(models, store, reload_interval=0, text_model=text_model, warm_encoder=False)


# --------------------------------------------------------------------------------------- hot reload

def test_hot_reload_swaps_versions_and_refuses_a_corrupt_one(run_dir: Path, models: Path, client: TestClient):
    service: Service = client.app.state.service
    export_bundle(run_dir, models, version="v2")
    assert service.reload_if_changed() and rank(client, "1", ["1"])["model_version"] == "v2"
    export_bundle(run_dir, models, version="v3", make_current=False)
    weights = models / "versions" / "v3" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern in the middle of the tensors
    weights.write_bytes(bytes(data))
    set_current(models, "v3")
    assert not service.reload_if_changed()
    assert rank(client, "1", ["1"])["model_version"] == "v2"
    assert 'qarm_reloads_total{outcome="refused"} 1.0' in client.get("/metrics").text
    assert not service.reload_if_changed()  # refused once, not retried every poll


def test_requests_in_flight_during_reloads_all_succeed(run_dir: Path, models: Path, client: TestClient):
    service: Service = client.app.state.service
    for v in ("v2", "v3", "v4"):
        export_bundle(run_dir, models, version=v, make_current=False, keep=10)
    seen: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        for _ in range(400):
            if stop.is_set():
                break
            r = client.post("/v1/rank", json={"user_id": "2", "candidates": [str(i) for i in range(50)]})
            if r.status_code != 200:
                errors.append(r.text)
            else:
                seen.append(r.json()["model_version"])

    thread = threading.Thread(target=load)
    thread.start()
    try:
        for v in ("v2", "v3", "v4"):
            set_current(models, v)
            assert service.reload_if_changed()
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors and set(seen) <= {"v1", "v2", "v3", "v4"} and seen[-1] in {"v3", "v4"}


# ------------------------------------------------------------------------------------ health, metrics

def test_health_readiness_and_metrics(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["model_version"] == "v1" and ready["tasks"] == ["click", "convert"]
    rank(client, "1", ["1", "2"])
    text = client.get("/metrics").text
    assert 'qarm_requests_total{endpoint="/v1/rank",status="200"} 1.0' in text
    assert 'qarm_request_seconds_count{endpoint="/v1/rank"} 1.0' in text
    assert 'model_version="v1"' in text and "qarm_items_added_total 0.0" in text
    assert "/v1/rank" in client.get("/openapi.json").json()["paths"]


# ------------------------------------------------------------------------------------- live stores

@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveStore]:
    if request.param == "sqlite":
        s: LiveStore = SQLiteLiveStore(tmp_path / "live.sqlite")
    else:
        url = request.getfixturevalue("redis_url")
        s = RedisLiveStore.from_url(url, prefix=f"test:{request.node.name}")
    yield s
    s.close()


def upload(name: str, seed: int = 0) -> ItemUpload:
    rng = np.random.default_rng(seed)
    return ItemUpload(name, rng.normal(size=8).astype(np.float32), rng.integers(0, 100, 5), rng.integers(0, 16, 3),
                      "cat" if seed % 2 else None)


def test_store_items_are_ordered_idempotent_and_versioned(store: LiveStore):
    assert store.codes_version() is None and store.n_items() == 0
    first = store.add_items("codes-a", [upload("x", 1), upload("y", 2)])
    assert [(i.ordinal, i.source_id) for i in first] == [(0, "x"), (1, "y")]
    again = store.add_items("codes-a", [upload("z", 3), upload("x", 9)])
    assert [(i.ordinal, i.source_id) for i in again] == [(2, "z"), (0, "x")]
    np.testing.assert_array_equal(again[1].vector, upload("x", 1).vector)  # the stored item, not the retry
    back = store.items_since(1)
    assert [i.source_id for i in back] == ["y", "z"] and back[1].category == "cat"
    np.testing.assert_array_equal(back[1].vq, upload("z", 3).vq)
    with pytest.raises(CodeVersionError, match="codes-a.*codes-b"):
        store.add_items("codes-b", [upload("w")])
    with pytest.raises(CodeVersionError):
        store.bind("codes-b")
    assert store.n_items() == 3 and store.codes_version() == "codes-a"


def test_store_events_are_an_ordered_log_with_per_user_positives(store: LiveStore):
    events = [Event(f"u{i % 3}", f"i{i}", 100 + i, {"click": i % 2}, i % 2 == 1) for i in range(10)]
    assert store.append_events(events[:4]) == 4 and store.append_events(events[4:]) == 10
    assert store.events_since(0) == events and store.events_since(7, limit=2) == events[7:9]
    assert store.user_positives("u1", 50) == [("i1", 101), ("i7", 107)]
    assert store.user_positives("u0", 1) == [("i9", 109)]
    assert store.user_positives("nobody", 5) == [] and store.n_events() == 10 and store.ping()


def test_concurrent_uploads_get_distinct_ordinals(store: LiveStore, tmp_path: Path):
    def add(k: int) -> None:
        s = store if isinstance(store, RedisLiveStore) else SQLiteLiveStore(store.path)  # type: ignore[attr-defined]
        for j in range(10):
            s.add_items("codes-a", [upload(f"t{k}-{j}", j)])

    threads = [threading.Thread(target=add, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    items = store.items_since(0)
    assert [i.ordinal for i in items] == list(range(40)) and len({i.source_id for i in items}) == 40


def test_open_live_store_reads_urls_and_paths(tmp_path: Path):
    assert isinstance(open_live_store(tmp_path / "a.sqlite"), SQLiteLiveStore)
    assert isinstance(open_live_store(f"sqlite:///{tmp_path}/b.sqlite"), SQLiteLiveStore)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(Exception, match="junk.sqlite"):
        SQLiteLiveStore(tmp_path / "junk.sqlite")


def test_the_service_runs_on_redis(models: Path, redis_url: str, text_model):
    store = RedisLiveStore.from_url(redis_url, prefix="test:service")
    app = create_app(models, store, reload_interval=0, text_model=text_model, warm_encoder=False)
    with TestClient(app) as c:
        assert c.post("/v1/items", json={"item_id": "r-1", "text": "cats"}).status_code == 200
        assert c.post("/v1/events", json={"events": [{"user_id": "9", "item_id": "r-1", "time": 5,
                                                      "labels": {"click": 1}}]}).status_code == 200
        assert rank(c, "9", ["r-1", "1"])["scores"][0]["item_id"] == "r-1"
        assert c.get("/readyz").json()["store"].startswith("redis")
    assert store.user_positives("9", 5) == [("r-1", 5)]


def test_the_service_runs_its_model_on_the_device_asked(models: Path, text_model):
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    app = create_app(models, models / "live.sqlite", reload_interval=0, text_model=text_model, warm_encoder=False,
                     device="auto")
    scorer = app.state.service.scorer
    assert scorer.describe()["device"] == expected
    assert {p.device.type for p in scorer.model.parameters()} == {expected.split(":")[0]}
    assert np.isfinite(scorer.score(next(iter(scorer.user_index)), list(scorer.item_index)[:3])).all()
    with pytest.raises(ConfigError, match="--device must be one of cpu, cuda, auto; got 'gpu'"):
        create_app(models, models / "live.sqlite", reload_interval=0, text_model=text_model, device="gpu")


def test_a_bundle_from_before_a_default_changed_is_read_with_the_old_default(run_dir: Path, tmp_path: Path):
    """qarm 0.2.0 made QARM's 32-d sequences and target the default: a bundle written by 0.1.0 that does not name
    them was the paper's layout, and is read so (its weights would not fit today's default)."""
    import hashlib

    from qarm.serve.bundle import MANIFEST_FILE

    folder = tmp_path / "m"
    export_bundle(run_dir, folder, version="v1")
    bundle_dir = folder / "versions" / "v1"
    assert load_bundle(bundle_dir).manifest["model_config"] == {}  # written by today's qarm: its defaults
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    manifest["qarm_version"] = "0.1.0"
    data = json.dumps(manifest, indent=2).encode()
    (bundle_dir / MANIFEST_FILE).write_bytes(data)
    (bundle_dir / READY_FILE).write_text(hashlib.sha256(data).hexdigest())
    old = load_bundle(bundle_dir)
    assert old.manifest["model_config"] == {"sequence_dim": None, "target_dim": None}
    assert old.manifest["ranking_config"]["model_config"] == {"sequence_dim": None, "target_dim": None}

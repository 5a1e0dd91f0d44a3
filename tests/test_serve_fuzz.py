"""Fuzz of the service's request schemas (Hypothesis): whatever the body, no 5xx, and every refusal is a
4xx whose message names the field.

Bodies are drawn near the schema (right keys, wrong types, sizes and values; valid requests too) and
far from it (any JSON, not JSON at all). ``QARM_FUZZ_EXAMPLES`` sets the examples per endpoint (the
default suite: 120 each; ``benchmarks/serve_fuzz.sh`` runs 400 each, 1,200 requests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qarm.serve.app import create_app
from qarm.serve.bundle import export_bundle

EXAMPLES = int(os.environ.get("QARM_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SEEN: dict[str, dict[int, int]] = {}


@pytest.fixture(scope="module")
def client(run_dir: Path, tmp_path_factory: pytest.TempPathFactory, text_model) -> Iterator[TestClient]:
    models = tmp_path_factory.mktemp("fuzz") / "models"
    export_bundle(run_dir, models, version="v1")
    app = create_app(models, models / "live.sqlite", reload_interval=0, text_model=text_model, warm_encoder=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    print("fuzz status counts:", json.dumps(SEEN, sort_keys=True))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=30))
any_json = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=12), inner, max_size=4), max_leaves=12)
item_id = st.one_of(st.sampled_from(["1", "2", "3", "42", "1199"]), st.text(max_size=260), st.integers(-5, 5),
                    st.none(), st.just(""))
user_id = st.one_of(st.sampled_from(["1", "7", "someone-new"]), st.text(max_size=260), st.integers(), st.none())
time_value = st.one_of(st.integers(-10, 2**64), st.floats(allow_nan=True), st.text(max_size=5), st.none())
labels = st.one_of(st.dictionaries(st.sampled_from(["click", "convert", "like", ""]), st.one_of(
    st.integers(-1, 2), st.booleans(), st.floats(), st.text(max_size=3)), max_size=3), any_json)


def near(required: dict[str, Any], optional: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Objects with the schema's keys (some dropped, some extra), or any JSON at all."""
    shaped = st.fixed_dictionaries(required, optional={**(optional or {}), "extra": any_json})
    dropped = shaped.flatmap(lambda d: st.sets(st.sampled_from(sorted(d) or [""])).map(
        lambda gone: {k: v for k, v in d.items() if k not in gone}))
    return st.one_of(shaped, shaped, dropped, any_json)


rank_body = near({"user_id": user_id, "candidates": st.one_of(st.lists(item_id, max_size=6),
                                                               st.just(["1"] * 1001), any_json)},
                 {"context": st.one_of(st.fixed_dictionaries({}, optional={"time": time_value}), any_json)})
vectors = st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.lists(st.floats(allow_nan=True), max_size=4),
                                               max_size=2), any_json)
one_item = near({"item_id": item_id, "text": st.one_of(st.text(max_size=60), st.integers(), st.none())},
                {"vectors": vectors, "category": st.one_of(st.text(max_size=5), st.integers())})
items_body = st.one_of(one_item, near({"items": st.one_of(st.lists(one_item, max_size=3), any_json)}))
event = near({"user_id": user_id, "item_id": item_id, "time": time_value, "labels": labels})
events_body = near({"events": st.one_of(st.lists(event, max_size=4), any_json)})


def check(client: TestClient, path: str, body: Any, raw: bool = False) -> None:
    if raw:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    SEEN.setdefault(path, {}).setdefault(r.status_code, 0)
    SEEN[path][r.status_code] += 1
    assert r.status_code < 500, (path, body, r.text)
    if r.status_code >= 400:
        assert 400 <= r.status_code < 500
        detail = r.json()["detail"]
        if isinstance(detail, list):  # pydantic's validation errors: each names where (loc) and what
            assert detail and all(e["loc"] and e["msg"] for e in detail), r.text
        else:
            assert detail["message"] and detail["field"], r.text


@FUZZ
@given(body=rank_body)
def test_fuzz_rank(client: TestClient, body: Any):
    check(client, "/v1/rank", body)


@FUZZ
@given(body=items_body)
def test_fuzz_items(client: TestClient, body: Any):
    check(client, "/v1/items", body)


@FUZZ
@given(body=events_body)
def test_fuzz_events(client: TestClient, body: Any):
    check(client, "/v1/events", body)


@settings(max_examples=max(20, EXAMPLES // 6), deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=40), path=st.sampled_from(["/v1/rank", "/v1/items", "/v1/events"]))
def test_fuzz_bytes_that_are_not_json(client: TestClient, body: bytes, path: str):
    check(client, path, body, raw=True)

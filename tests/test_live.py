"""The live loop (``qarm learn``): exactly the events after the consumed position, nothing twice, a killed
update that leaves the serving version alone and is redone from the same position, new users and uploaded
items that get rows, and the service serving what was learned after its hot reload.

The bundle is the session's small synthetic ``qarm run`` (``run_dir`` in conftest); its test-split exposures
are the live events. Checks are against independent paths: the store's log, the bundle files, a second
uninterrupted trainer, the service's own responses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import qarm.serve.bundle as bundle_module
import qarm.train.live as live_module
from qarm.cli import app as cli_app
from qarm.data import schema as S
from qarm.data.io import load_dataset
from qarm.errors import ConfigError
from qarm.serve.app import create_app
from qarm.serve.bundle import current_version, export_bundle, list_versions, load_bundle, load_current
from qarm.serve.scorer import Scorer
from qarm.serve.store import Event, ItemUpload, LiveStore, RedisLiveStore, SQLiteLiveStore
from qarm.train.live import (
    LearnConfig,
    consumed_position,
    learn,
    learn_once,
    read_optimizer_state,
    trainer_lock,
)
from qarm.train.trainer import TrainConfig

FAST = LearnConfig(train=TrainConfig(epochs=1, batch_size=256, checkpoint_every=10**9))


@pytest.fixture(scope="module")
def exposures(run_dir: Path) -> list[Event]:
    """The run's test-split exposures (no sampled negatives) as live events, in time order."""
    data = load_dataset(run_dir / "data")
    inter = data.interactions
    rows = inter[(inter[S.SPLIT].astype(str) == "test")].sort_values([S.TIME, S.SEQ]).head(600)
    users = data.users[S.SOURCE_ID].astype(str).to_numpy()
    items = data.items[S.SOURCE_ID].astype(str).to_numpy()
    tasks = list(data.meta.label_columns)
    return [Event(str(users[u]), str(items[i]), int(t), {k: int(r[k]) for k in tasks}, int(r[tasks[0]]) == 1)
            for (_, r), u, i, t in zip(rows.iterrows(), rows[S.USER_ID], rows[S.ITEM_ID], rows[S.TIME])]


@pytest.fixture
def store(models: Path) -> LiveStore:
    live = SQLiteLiveStore(models / "live.sqlite")
    live.bind(str(load_current(models).codes_version))
    return live


def trained_positions(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Spy on the trainer: the log positions of each update's training rows."""
    seen: list[list[int]] = []
    real = live_module.train

    def spy(model, source, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(source.time[source.rows("train")].tolist())
        return real(model, source, *args, **kwargs)

    monkeypatch.setattr(live_module, "train", spy)
    return seen


def test_learn_trains_exactly_the_events_after_the_consumed_position(models: Path, store: LiveStore,
                                                                   exposures: list[Event],
                                                                   monkeypatch: pytest.MonkeyPatch):
    seen = trained_positions(monkeypatch)
    store.append_events(exposures[:200])
    first = learn_once(models, store, FAST)
    assert first is not None and first["previous_position"] == 0 and first["position"] == 200
    assert current_version(models) == first["version"] != "v1"
    assert first["steps"] == 1 and first["train_loss"] > 0  # 200 events, batch 256: one step
    assert consumed_position(load_current(models)) == 200
    store.append_events(exposures[200:350])
    second = learn_once(models, store, FAST)
    assert second is not None and (second["previous_position"], second["position"]) == (200, 350)
    assert second["learned_from"] == first["version"]
    # Adam's moments: fresh from an exported run, then carried from one update to the next
    assert (first["optimizer_state"], second["optimizer_state"]) == ("fresh", "carried")
    assert read_optimizer_state(load_current(models)) is not None
    assert seen == [list(range(200)), list(range(200, 350))]  # each event trained once, none lost
    # the weights moved: the update learned something
    before, after = load_bundle(models / "versions" / "v1").weights, load_current(models).weights
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].shape == after[k].shape)
    # each learned version is a run of its own, made from the version it learned from
    exported, learned = (load_bundle(models / "versions" / "v1").manifest["provenance"],
                         load_current(models).manifest["provenance"])
    first_learned = load_bundle(models / "versions" / first["version"]).manifest["provenance"]
    assert learned["run_id"] != first_learned["run_id"] != exported["run_id"]
    assert learned["made_from"] == {"bundle": first_learned["digest"]} != first_learned["made_from"]
    assert first_learned["made_from"] == {"bundle": exported["digest"]}


def test_a_run_with_no_new_events_does_nothing(models: Path, store: LiveStore, exposures: list[Event],
                                               monkeypatch: pytest.MonkeyPatch):
    seen = trained_positions(monkeypatch)
    assert learn(models, store, LearnConfig(once=True)) == []  # an empty log
    store.append_events(exposures[:100])
    assert len(learn(models, store, replace_config(once=True))) == 1
    version, versions = current_version(models), list_versions(models)
    assert learn(models, store, replace_config(once=True)) == []  # nothing new since
    assert learn_once(models, store, FAST) is None
    assert current_version(models) == version and list_versions(models) == versions and len(seen) == 1


def replace_config(**changes: object) -> LearnConfig:
    return LearnConfig(**{"train": FAST.train, **changes})  # type: ignore[arg-type]


def test_the_loop_updates_every_k_events_and_leaves_fewer_waiting_until_once(models: Path, store: LiveStore,
                                                                 exposures: list[Event]):
    store.append_events(exposures[:250])
    idle_polls = []

    def stop() -> bool:  # 20 polls after the second update, then stop (a bound: --max-seconds 120)
        if consumed_position(load_current(models)) >= 200:
            idle_polls.append(1)
        return len(idle_polls) >= 20

    updates = learn(models, store, replace_config(every_events=100, max_events=100, max_updates=5, max_seconds=120,
                                                  poll_seconds=0.01), should_stop=stop)
    # 250 waiting, K = 100, 100 per update: two updates, then 50 wait (< K) and are not trained
    assert [u["position"] for u in updates] == [100, 200]
    assert consumed_position(load_current(models)) == 200
    assert learn(models, store, replace_config(max_updates=1, poll_seconds=0.01, once=True))[0]["position"] == 250


def test_a_killed_update_leaves_the_serving_version_and_is_redone_from_the_same_position(
        models: Path, store: LiveStore, exposures: list[Event], run_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    store.append_events(exposures[:150])

    def killed(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("killed while writing the bundle")

    with monkeypatch.context() as m:  # killed inside the export, after the weights were written
        m.setattr(bundle_module, "write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            learn_once(models, store, FAST)
    assert current_version(models) == "v1" and list_versions(models) == ["v1"]
    assert [p.name for p in (models / "versions").iterdir()] == ["v1"]  # no temporary left behind
    with monkeypatch.context() as m:  # killed after the version was written, before CURRENT moved
        m.setattr(live_module, "commit_version",
                  lambda *a, **k: bundle_module.commit_version(*a, **{**k, "make_current": False}))
        learn_once(models, store, FAST)
    assert current_version(models) == "v1"
    redone = learn_once(models, store, FAST)
    assert redone is not None and (redone["previous_position"], redone["position"]) == (0, 150)
    assert current_version(models) == redone["version"]
    # the redone update equals an uninterrupted trainer's on a fresh copy of v1
    other = tmp_path / "other"
    export_bundle(run_dir, other, version="v1")
    other_store = SQLiteLiveStore(other / "live.sqlite")
    other_store.append_events(exposures[:150])
    learn_once(other, other_store, FAST)
    a, b = load_current(models).weights, load_current(other).weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_new_users_and_uploaded_items_get_rows_and_the_service_serves_the_learned_version(
        models: Path, store: LiveStore, exposures: list[Event], text_model):
    bundle = load_current(models)
    catalogue = Scorer(bundle).tables
    # an uploaded item: the store holds its vector and codes (here a catalogue item's, as an upload gets them)
    donor = int(np.flatnonzero(catalogue.id_index > 0)[0])
    upload = ItemUpload("upload-1", catalogue.vectors["aligned"][donor], catalogue.vq[donor], catalogue.rq[donor])
    store.add_items(str(bundle.codes_version), [upload])
    fresh_users = [Event(f"new-user-{k}", "upload-1", exposures[0].time + k, {"click": k % 2, "convert": 0},
                         k % 2 == 1) for k in range(40)]
    store.append_events(exposures[:100] + fresh_users)
    app = create_app(models, SQLiteLiveStore(models / "live.sqlite"), reload_interval=0, text_model=text_model,
                     warm_encoder=False)
    with TestClient(app) as client:
        body = {"user_id": "new-user-1", "candidates": ["upload-1", exposures[0].item_id]}
        old = client.post("/v1/rank", json=body).json()
        assert old["model_version"] == "v1"
        record = learn_once(models, store, FAST)
        assert record is not None and record["new_users"] == 40 and record["added_items"] == 1
        learned = load_current(models)
        assert learned.arrays["added_id_index"][0] > catalogue.n_vocab  # the upload has its own ID row now
        assert list(learned.added_source_ids) == ["upload-1"]
        assert learned.spec().n_users == bundle.spec().n_users + 40
        assert list(learned.user_source_ids[-40:]) == [f"new-user-{k}" for k in range(40)]
        assert learned.weights["user_id.weight"].shape[0] == bundle.weights["user_id.weight"].shape[0] + 40
        assert app.state.service.reload_if_changed()
        new = client.post("/v1/rank", json=body).json()
        assert new["model_version"] == record["version"]
        assert new["scores"][0]["click"] != old["scores"][0]["click"]
        # a known user's scores come from the learned weights too
        assert json.loads(client.get("/readyz").text)["model_version"] == record["version"]


def test_a_second_trainer_on_one_models_folder_is_refused(models: Path):
    with trainer_lock(models):
        with pytest.raises(ConfigError, match="another qarm learn"):
            with trainer_lock(models):
                pass


def test_redis_log_is_followed_by_position_the_same_way(models: Path, exposures: list[Event], redis_url: str):
    live = RedisLiveStore.from_url(redis_url, prefix=f"qarm:test-live:{models.parent.name}")
    live.append_events(exposures[:120])
    assert learn_once(models, live, FAST)["position"] == 120  # type: ignore[index]
    live.append_events(exposures[120:150])
    assert learn_once(models, live, FAST)["previous_position"] == 120  # type: ignore[index]
    assert learn_once(models, live, FAST) is None


def test_cli_learn_once_and_its_errors(models: Path, store: LiveStore, exposures: list[Event]):
    store.append_events(exposures[:80])
    runner = CliRunner()
    result = runner.invoke(cli_app, ["learn", str(models), "--store", str(models / "live.sqlite"), "--once",
                                     "--set", "train.batch_size=256"])
    assert result.exit_code == 0, result.output
    assert consumed_position(load_current(models)) == 80
    result = runner.invoke(cli_app, ["learn", str(models), "--store", str(models / "live.sqlite"),
                                     "--every-events", "5", "--every-seconds", "1"])
    assert result.exit_code == 2 and "exclude each other" in result.output
    missing = models.parent / "no-models"
    result = runner.invoke(cli_app, ["learn", str(missing), "--store", str(models / "live.sqlite"), "--once"])
    assert result.exit_code == 2 and "no current bundle" in result.output and not missing.exists()

"""Continuous training: append-only vocabularies, warm starts that reproduce the last model, a killed update
that resumes without touching the serving version, and the day-by-day replay.

The trained model is the session's small synthetic ``qarm run`` (``run_dir`` in conftest); every check
compares against an independent path: the last model's own predictions and weights, an uninterrupted
run, a hand-worked vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qarm.errors import ConfigError, DataError
from qarm.features.examples import ExampleSource
from qarm.models import build_model
from qarm.serve.bundle import current_version, export_bundle, find_run, list_versions, load_bundle
from qarm.train.continual import (
    ReplayConfig,
    check_codes_version,
    grow_id_index,
    grow_optimizer_state,
    parse_window,
    read_last_model,
    replay,
    train_warm_start,
    warm_start,
    window_rows,
)
from qarm.train.stage import RankingConfig, build_tables
from qarm.train.trainer import TrainConfig, predict


def test_grow_id_index_keeps_old_rows_and_appends_new_items_in_first_event_order():
    old = np.array([0, 1, 0, 2, 0, 0])  # items 1 and 3 have rows 1 and 2
    grown = grow_id_index(old, 6, np.array([5, 3, 2, 5, 0]))
    assert grown.tolist() == [5, 1, 4, 2, 0, 3]  # 5 first seen -> row 3, then 2 -> 4, then 0 -> 5
    assert grow_id_index(None, 3, np.array([2, 2, 0])).tolist() == [2, 0, 1]
    with pytest.raises(DataError, match="covers 6 items"):
        grow_id_index(old, 7, np.array([1]))


def test_parse_window_reads_both_sides_and_names_bad_input():
    assert parse_window("10:20") == (10, 20)
    assert parse_window(":20") == (None, 20)
    assert parse_window("10:") == (10, None)
    for bad in ("10", "a:b", "20:10"):
        with pytest.raises(ConfigError, match="--window"):
            parse_window(bad)


@pytest.fixture(scope="module")
def last(run_dir: Path):
    folders = find_run(run_dir)
    previous = read_last_model(folders.run_dir)
    ranking = RankingConfig.from_dict(previous.ranking)
    source = ExampleSource.from_folder(folders.dataset_dir, history_length=ranking.history_length)
    tables = build_tables(source, folders.dataset_dir, ranking.model, quantize_dir=folders.quantize_dir,
                          align_dir=folders.align_dir)
    return folders, previous, ranking, source, tables


def _first_days(source: ExampleSource, days: int) -> tuple[int, int]:
    cut = int(source.time[source.split > 0].min())
    return cut, cut + days * 86_400


def test_warm_start_reproduces_the_last_model_and_keeps_old_rows_bit_identical(last):
    folders, previous, ranking, source, tables = last
    old = build_model(ranking.model, source.spec, tables, ranking.model_config, seed=0)
    old.load_state_dict(previous.state)
    start, end = _first_days(source, 5)
    window = window_rows(source, start, end)
    grown = warm_start(ranking.model, ranking.model_config, source, tables, previous.state, tables.id_index, window,
                       optimizer_state=previous.optimizer_state, seed=3)
    assert grown.new_items > 0, "the window must bring items the last model had no ID row for"
    new_state = grown.model.state_dict()
    for name, value in previous.state.items():
        if new_state[name].shape == value.shape:
            assert torch.equal(new_state[name], value), name
        else:  # the grown ID table: old rows bit-identical, new rows the fresh initialisation (not zeros)
            assert torch.equal(new_state[name][: value.shape[0]], value), name
            assert new_state[name].shape[0] == value.shape[0] + grown.new_items
            assert new_state[name][value.shape[0]:].abs().sum() > 0
    # Predictions: equal on every row that touches no new item (target or history), before any step.
    rows = source.rows("test")
    is_new = (grown.tables.id_index != 0) & (tables.id_index == 0)
    history = source.history.gather(rows, source.history_length)
    touches = is_new[source.item[rows]] | (is_new[np.maximum(history, 0)] & (history >= 0)).any(axis=1)
    assert touches.any() and (~touches).sum() > 100
    a = predict(old, source, "test", rows=rows[~touches])
    b = predict(grown.model, source, "test", rows=rows[~touches])
    for task in source.tasks:
        np.testing.assert_array_equal(a[f"score_{task}"].to_numpy(), b[f"score_{task}"].to_numpy())
    # Adam's moments carried over, padded with zeros for the new rows.
    assert previous.optimizer_state is not None and grown.optimizer_state is not None
    params = list(grown.model.parameters())
    for pid, entries in grown.optimizer_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.shape == params[pid].shape
                before = previous.optimizer_state["state"][pid][key]
                assert torch.equal(value[: before.shape[0]], before)
                assert not value[before.shape[0]:].any()


def test_optimizer_state_of_another_model_is_refused(last):
    _, previous, ranking, source, tables = last
    model = build_model("id_only", source.spec, tables, {}, seed=0)
    fake = {"state": {10_000: {"step": torch.tensor(1.0)}}, "param_groups": previous.optimizer_state["param_groups"]}
    with pytest.raises(ConfigError, match="parameter 10000"):
        grow_optimizer_state(fake, model)


def test_a_bundle_of_other_codes_is_refused_naming_both_versions():
    with pytest.raises(ConfigError, match="codes-aaa.*codes-bbb.*without --warm-start"):
        check_codes_version("codes-aaa", "codes-bbb", "models/v1")
    check_codes_version("codes-aaa", "codes-aaa", "models/v1")


def _warm(folders, last_dir: Path, out: Path, window, **kw) -> dict:
    return train_warm_start(folders.dataset_dir, out, last_dir, window, quantize_dir=folders.quantize_dir,
                            align_dir=folders.align_dir,
                            train_config=TrainConfig(epochs=1, batch_size=64, checkpoint_every=1, seed=0), **kw)


def test_a_killed_update_leaves_the_serving_version_untouched_and_resumes_exactly(last, run_dir: Path, tmp_path: Path):
    folders, previous, ranking, source, tables = last
    models = tmp_path / "models"
    export_bundle(run_dir, models, version="v1")
    window = _first_days(source, 2)

    class Killed(Exception):
        pass

    def kill(step: int, loss: float) -> None:
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        _warm(folders, models, tmp_path / "update", window, on_step=kill)
    assert current_version(models) == "v1" and list_versions(models) == ["v1"]
    assert not (tmp_path / "update" / "report.json").exists()
    resumed = _warm(folders, models, tmp_path / "update", window)
    assert resumed["history"]["resumed_from"] == [3]
    straight = _warm(folders, models, tmp_path / "straight", window)
    a = load_file(str(tmp_path / "update" / "train" / "best.safetensors"))
    b = load_file(str(tmp_path / "straight" / "train" / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["warm_start"]["new_id_rows"] > 0
    assert straight["warm_start"]["optimizer_state"].startswith("fresh")  # a bundle carries no Adam state
    # The update becomes a new version that serves its grown vocabulary; v1 stays as it was.
    export_bundle(tmp_path / "update", models, version="v2")
    assert current_version(models) == "v2"
    v2 = load_bundle(models / "versions" / "v2")
    assert v2.arrays["id_index"].max() == tables.id_index.max() + straight["warm_start"]["new_id_rows"]
    assert load_bundle(models / "versions" / "v1").arrays["id_index"].max() == tables.id_index.max()


def test_warm_start_from_a_run_carries_adam_state_and_names_empty_windows(last, tmp_path: Path):
    folders, previous, ranking, source, tables = last
    report = _warm(folders, previous.where, tmp_path / "u", _first_days(source, 1), replay_fraction=0.5)
    assert report["warm_start"]["optimizer_state"] == "carried"
    assert report["warm_start"]["replayed_rows"] == round(0.5 * report["warm_start"]["window_rows"])
    with pytest.raises(DataError, match="holds no events"):
        _warm(folders, previous.where, tmp_path / "e", (1, 2))


def test_replay_scores_each_day_with_yesterdays_model_and_resumes(last, tmp_path: Path):
    folders, *_ = last
    config = ReplayConfig(days=3, initial_epochs=1, retrain_epochs=1, seeds=(0,), batch_size=256)
    lines: list[str] = []
    result = replay(folders.dataset_dir, tmp_path / "replay", config, quantize_dir=folders.quantize_dir,
                    align_dir=folders.align_dir, log=lines.append)
    strategies = result["strategies"]
    assert set(strategies) == {"frozen", "incremental", "retrain"}
    days = {s: r["days"] for s, r in strategies.items()}
    assert all(len(d) == 3 for d in days.values())
    # Day 1 is scored by the same initial model under every strategy; afterwards they differ.
    g = {s: d[0]["gauc"]["click"] for s, d in days.items()}
    assert g["frozen"] == g["incremental"] == g["retrain"]
    # (a later day's GAUC on this tiny log, a few rows per user, can tie by chance: any later day will do)
    assert any(days["frozen"][i]["gauc"] != days["incremental"][i]["gauc"] for i in (1, 2))
    assert all(e["seconds"] < 0.05 for e in days["frozen"])
    assert strategies["retrain"]["update_seconds"] > strategies["incremental"]["update_seconds"]
    assert sum(d["new_items"] for d in result["days"]) > 0
    for name in ("replay.json", "replay.md", "replay.png", "seed-0.json"):
        assert (tmp_path / "replay" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "replay" / "replay.json").read_text())
    assert saved["strategies"]["frozen"]["days"][0]["gauc"]["click"] == g["frozen"]
    again: list[str] = []
    replay(folders.dataset_dir, tmp_path / "replay", config, quantize_dir=folders.quantize_dir,
           align_dir=folders.align_dir, log=again.append)
    assert any("read back" in line for line in again)


def test_replay_config_names_unknown_strategies():
    with pytest.raises(ConfigError, match="unknown strategies"):
        ReplayConfig(strategies=("frozen", "daily"))

"""The CLI end to end on small generated data: prepare, describe, run (with its stage cache), errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qarm.cli import app

runner = CliRunner()
SMALL = ["--set", "n_items=400", "--set", "n_users=100", "--set", "n_interactions=5000"]


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_data_list_names_every_loader():
    result = invoke("data", "list")
    assert result.exit_code == 0
    for name in ("synthetic", "microlens50k", "ml-latest-small", "ml100k", "lastfm2k", "frappe", "amazon", "generic"):
        assert name in result.output


def test_prepare_then_describe_json(tmp_path: Path):
    out = tmp_path / "syn"
    result = invoke("data", "prepare", "--dataset", "synthetic", "--out", str(out), *SMALL,
                    "--set", "split.cold_item_fraction=0.2")
    assert result.exit_code == 0, result.output
    result = invoke("data", "describe", str(out), "--json")
    stats = json.loads(result.output)
    assert (stats["users"], stats["items"], stats["interactions"]) == (100, 400, 5000)
    assert stats["splits"]["prepared"]["split"]["strategy"] == "time"
    assert stats["splits"]["prepared"]["split"]["cold_item_fraction"] == 0.2
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["prepare"]["split"]["cold_item_fraction"] == 0.2
    assert meta["config"]["n_items"] == 400 and meta["seed"] == 0


def test_unknown_dataset_lists_the_available_ones(tmp_path: Path):
    result = invoke("data", "prepare", "--dataset", "movielens-10m", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "unknown dataset 'movielens-10m'; available: [" in result.output
    assert not (tmp_path / "x").exists()


def test_bad_options_are_named(tmp_path: Path):
    result = invoke("data", "prepare", "--dataset", "synthetic", "--out", str(tmp_path / "x"), "--set", "n_itemz=5")
    assert result.exit_code == 2
    assert "unknown key(s) ['n_itemz'] for SyntheticConfig" in result.output
    result = invoke("data", "prepare", "--dataset", "synthetic", "--out", str(tmp_path / "x"), "--set", "seed")
    assert "--set expects KEY=VALUE, got 'seed'" in result.output
    result = invoke("data", "prepare", "--dataset", "synthetic", "--out", str(tmp_path / "x"),
                    "--set", "negatives.ratio=0")
    assert "The 'ratio' parameter of NegativeConfig must be an int >= 1. Got 0 instead." in result.output
    assert not (tmp_path / "x").exists()


def test_missing_source_is_a_clear_error(tmp_path: Path):
    result = invoke("data", "prepare", "--dataset", "microlens50k", "--source", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "source not found for dataset 'microlens50k'" in result.output


def test_describe_a_folder_that_is_not_a_dataset(tmp_path: Path):
    result = invoke("data", "describe", str(tmp_path))
    assert result.exit_code == 2
    assert "meta.json: missing" in result.output


FAST_RUN = [*SMALL, "--set", "align.train.max_steps=4", "--set", "align.train.eval_every=2",
            "--set", "align.user2item.epochs=1", "--set", "align.tsne_sample=0",
            "--set", "quantize.rq.codebook_size=8", "--set", "quantize.vq.k=5",
            "--set", "rank.train.max_steps=6", "--set", "rank.train.eval_batch_size=512"]


@pytest.mark.slow
def test_run_writes_reports_and_caches_stages(tmp_path: Path):
    out = tmp_path / "run"
    result = invoke("run", "--out", str(out), *FAST_RUN)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["prepare"] == report["stages"]["align"] == report["stages"]["quantize"] == "ran"
    assert report["stages"]["rank"] == report["stages"]["report"] == "ran"
    variants = report["ranking"]["variants"]
    assert list(variants) == ["ID-only", "Baseline", "+ VQ & RQ"]
    for row in variants.values():
        assert 0.0 <= row["metrics"]["click"]["overall"]["gauc"] <= 1.0
        assert row["per_seed"]["0"]["click"]["overall"]["n"] == report["ranking"]["variants"]["ID-only"][
            "per_seed"]["0"]["click"]["overall"]["n"]  # one test split for every variant
    assert variants["Baseline"]["model_config"] == {} and variants["+ VQ & RQ"]["model"] == "qarm"
    md = (out / "report.md").read_text()
    assert "## Ranking" in md and "gain of + VQ & RQ over" in md
    assert report["data"]["items"] == 400
    assert report["config"]["align"]["train"]["max_steps"] == 4
    assert report["config"]["align"]["train"]["lr"] == 5e-5  # untouched fields keep the run's defaults
    assert report["codes"]["rq"]["levels"][0]["codebook_size"] == 8
    assert "Held-out pair Recall@10".lower() in (out / "report.md").read_text().lower()
    again = invoke("run", "--out", str(out), *FAST_RUN)
    assert "prepare: cached" in again.output and "align: cached" in again.output
    assert "quantize: cached" in again.output and "rank: cached" in again.output
    requantize = invoke("run", "--out", str(out), *FAST_RUN, "--set", "quantize.vq.k=4")
    assert "align: cached" in requantize.output and "quantize: done" in requantize.output
    assert "rank: done" in requantize.output  # new codes: the models that use them are retrained
    assert json.loads((out / "report.json").read_text())["codes"]["vq"]["k"] == 4


def test_quantize_and_inspect_a_dataset_with_vectors(tmp_path: Path):
    import numpy as np

    from qarm.data.io import save_dataset
    from qarm.data.prepare import prepare_dataset
    from qarm.data.synthetic import SyntheticConfig, generate

    ds = prepare_dataset(generate(SyntheticConfig(n_items=600, n_users=100, n_interactions=5000)))
    business = ds.ground_truth["items"][[f"b{i}" for i in range(16)]].to_numpy(np.float32)
    ds.item_vectors["business"] = business
    save_dataset(ds, tmp_path / "data")
    out = tmp_path / "codes"
    result = invoke("quantize", str(tmp_path / "data"), "--out", str(out), "--set", "rq.codebook_size=8",
                    "--set", "rq.levels=3", "--set", "vq.k=5")
    assert result.exit_code == 0, result.output
    report = json.loads(invoke("codes", "inspect", str(out), "--json").output)
    assert report["quality"]["rq"]["levels"][0]["codebook_size"] == 8
    assert len(report["quality"]["rq"]["levels"]) == 3
    bad = invoke("quantize", str(tmp_path / "data"), "--out", str(tmp_path / "x"), "--set", "rq.levels=0")
    assert bad.exit_code == 2 and "The 'levels' parameter of ResidualKMeans must be an int >= 1. Got 0" in bad.output


@pytest.mark.slow
def test_run_from_a_prepared_folder_reads_it_and_never_writes_it(tmp_path: Path):
    data = tmp_path / "prepared"
    prepared = invoke("data", "prepare", "--dataset", "synthetic", "--out", str(data), *SMALL)
    assert prepared.exit_code == 0, prepared.output
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    out = tmp_path / "run"
    fast = FAST_RUN[len(SMALL):]  # the loader options went to the prepare
    result = invoke("run", "--data", str(data), "--out", str(out), *fast)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["prepare"] == "given" and report["stages"]["rank"] == "ran"
    assert not (out / "data").exists() and (out / "models" / "CURRENT").exists()
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    again = invoke("run", "--data", str(data), "--out", str(out), *fast)
    assert "align: cached" in again.output and "rank: cached" in again.output
    # rows without QARM's: the ranking is kept, the export skipped with a message, not an error
    id_only = invoke("run", "--data", str(data), "--out", str(out), *fast, "--set", 'rank.rows=["ID-only"]')
    assert id_only.exit_code == 0, id_only.output
    assert "export: skipped (rank.rows has no '+ VQ & RQ' row" in id_only.output
    report = json.loads((out / "report.json").read_text())
    assert list(report["ranking"]["variants"]) == ["ID-only"] and report["stages"]["export"] == "skipped"
    refused = invoke("run", "--data", str(data), "--source", str(data), "--out", str(out))
    assert refused.exit_code == 2 and "exclude each other" in refused.output

"""The ablation command: the right variants, shared runs, seed aggregation, resume, gain tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from qarm.align.contrastive import RECORD_FILE, VECTORS_FILE
from qarm.data.io import save_dataset
from qarm.data.prepare import prepare_dataset
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.errors import ConfigError
from qarm.quantize.api import QuantizeConfig, RQConfig, VQConfig, quantize_items
from qarm.train.ablation import QARM_ROW, TABLE1, AblationConfig, gain_table, run_ablation, run_key
from qarm.train.trainer import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:k-means of")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A prepared synthetic dataset, an align folder (vectors: noisy ground truth) and its codes."""
    root = tmp_path_factory.mktemp("ablation")
    dataset = prepare_dataset(generate(SyntheticConfig(n_items=300, n_users=200, n_interactions=8_000)))
    save_dataset(dataset, root / "data")
    truth = dataset.ground_truth["items"][[f"b{j}" for j in range(16)]].to_numpy(np.float32)
    rng = np.random.default_rng(0)
    (root / "align").mkdir()
    save_file({"pretrained": truth + rng.normal(0, 1, truth.shape).astype(np.float32), "aligned": truth},
              str(root / "align" / VECTORS_FILE))
    (root / "align" / RECORD_FILE).write_text(json.dumps({"note": "test vectors"}))
    quantize_items(truth, None, root / "quantize", QuantizeConfig(rq=RQConfig(codebook_size=8, levels=2),
                                                                  vq=VQConfig(k=6), write_store=False))
    return root


def test_variants_share_runs_where_configs_are_equal():
    config = AblationConfig(ks=(3, 6), code_dims=(16, 32))
    variants = config.variants(vq_k_stored=6)
    assert list(variants)[:6] == list(TABLE1)
    assert variants["ID-only"] == ("id_only", {}) and variants["Baseline"] == ("baseline", {})
    assert variants["+ aligned vector"][1] == {"use_vq": False, "use_rq": False, "use_code_matching": False}
    assert variants["K=3"][1]["vq_k"] == 3
    qarm_key = run_key(*variants[QARM_ROW])
    # K = every stored code and d = the default size are the QARM row itself: trained once.
    assert run_key(*variants["K=6"]) == run_key(*variants["d=32"]) == qarm_key
    assert run_key(*variants["d=16"]) != qarm_key
    with pytest.raises(ConfigError, match="ks asks for K=9 VQ codes but the codes store K=6"):
        AblationConfig(studies=("k",), ks=(9,)).variants(vq_k_stored=6)


def test_shared_model_settings_reach_every_variant():
    variants = AblationConfig(model={"id_dim": 16, "code_dim": 8}, studies=("table1",)).variants(vq_k_stored=25)
    assert variants["Baseline"][1] == {"id_dim": 16}  # the baseline has no code_dim
    assert variants[QARM_ROW][1] == {"id_dim": 16, "code_dim": 8}


@pytest.mark.parametrize("params, message", [
    ({"studies": ("table2",)}, "'studies' parameter of AblationConfig must name some of"),
    ({"rows": ("QARM",)}, "'rows' parameter of AblationConfig must name some of"),
    ({"seeds": (0, 0)}, "has repeats"),
    ({"seeds": ()}, "'seeds' parameter of AblationConfig must be a non-empty list of ints"),
    ({"workers": 0}, "'workers' parameter of AblationConfig must be an int >= 1"),
    ({"model": {"colour": 1}}, "colour"),
])
def test_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        AblationConfig(**params)


def test_run_aggregates_seeds_and_resumes(folders, tmp_path):
    config = AblationConfig(studies=("table1", "groups"), rows=("ID-only", "Baseline", QARM_ROW), seeds=(0, 1),
                            history_length=10, train=TrainConfig(max_steps=8, batch_size=256))
    lines: list[str] = []
    result = run_ablation(folders / "data", tmp_path, config, quantize_dir=folders / "quantize",
                          align_dir=folders / "align", log=lines.append)
    assert list(result["variants"]) == ["ID-only", "Baseline", QARM_ROW]
    qarm = result["variants"][QARM_ROW]
    per_seed = [qarm["per_seed"][s]["click"]["overall"]["gauc"] for s in ("0", "1")]
    assert per_seed[0] != per_seed[1]  # the seeds differ
    assert qarm["metrics"]["click"]["overall"]["gauc"] == pytest.approx(np.mean(per_seed))
    assert qarm["metrics"]["click"]["overall"]["gauc_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert qarm["epochs_trained"] > 0 and qarm["train_seconds"] > 0
    # training time is the runs' optimiser time (summed over resumptions), not the wall time of the call
    histories = [json.loads((tmp_path / "runs" / qarm["run_key"] / f"seed{s}" / "report.json").read_text())["history"]
                 for s in (0, 1)]
    assert qarm["train_seconds"] == pytest.approx(np.mean([h["train_seconds"] for h in histories]))
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["config"]["seeds"] == [0, 1] and saved["tables"]["vq_k"] == 6
    md = (tmp_path / "ablation.md").read_text()
    assert "Table 1" in md and "gain of + VQ & RQ over" in md and "Table 7" not in md
    # A second call reads every finished run back instead of training again.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed*/report.json")}
    assert len(before) == 6
    lines.clear()
    again = run_ablation(folders / "data", tmp_path, config, quantize_dir=folders / "quantize",
                         align_dir=folders / "align", log=lines.append)
    assert any("6 runs already finished" in line for line in lines)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed*/report.json")} == before
    # (compared as JSON text: a segment without both classes is NaN, and NaN != NaN)
    assert json.dumps(again["variants"]) == json.dumps(result["variants"])


def test_gain_table_is_the_difference_of_means():
    def report(overall, cold, std):
        return {"click": {"overall": {"gauc": overall, "gauc_std": std}, "cold_start": {"gauc": cold,
                                                                                        "gauc_std": std}}}
    variants = {"a": {"metrics": report(0.70, 0.60, 0.003)}, "b": {"metrics": report(0.68, 0.50, 0.004)}}
    lines = gain_table(variants, "click", "a", ["b"])
    assert lines[2] == f"| b | +2.00 ± {100 * math.hypot(0.003, 0.004):.2f} | +10.00 ± 0.50 |"


def test_leaderboard_trains_every_system_and_shares_qarm_runs(folders, tmp_path):
    """DIN, Baseline, FGCNN, EM3 (its own budget) and the QARM rows on one split; EM3 reads item texts."""
    train = TrainConfig(max_steps=4, batch_size=128)
    ablation = AblationConfig(studies=("table1",), rows=("ID-only", QARM_ROW), seeds=(0,), history_length=10,
                              train=train)
    run_ablation(folders / "data", tmp_path, ablation, quantize_dir=folders / "quantize",
                 align_dir=folders / "align")
    board = AblationConfig(studies=("leaderboard",), seeds=(0,), history_length=10, train=train,
                           models={"em3": {"content_history_length": 0, "max_seq_length": 16}},
                           train_overrides={"em3": {"batch_size": 32, "max_steps": 2}})
    lines: list[str] = []
    result = run_ablation(folders / "data", tmp_path, board, quantize_dir=folders / "quantize",
                          align_dir=folders / "align", log=lines.append, report_name="leaderboard")
    rows = result["variants"]
    assert list(rows) == ["DIN (ID-only)", "Baseline", "FGCNN", "EM3", "QARM + aligned vector", "QARM + VQ",
                          "QARM + RQ", "QARM VQ & RQ"]
    assert any("2 runs already finished" in line for line in lines)  # DIN and QARM VQ & RQ: from the ablation
    em3 = json.loads((tmp_path / "runs" / rows["EM3"]["run_key"] / "seed0" / "report.json").read_text())
    assert em3["config"]["train"]["batch_size"] == 32 and em3["history"]["steps"] == 2
    assert em3["tables"]["texts"] == em3["tables"]["n_items"] == 300  # one text per item, read from the folder
    assert rows["FGCNN"]["parameters"] > 0 and rows["EM3"]["parameters"] > rows["FGCNN"]["parameters"] / 100
    md = (tmp_path / "leaderboard.md").read_text()
    assert md.startswith("# Leaderboard on") and "| EM3 | em3" in md


def test_runs_on_other_codes_are_retrained_not_read_back(folders, tmp_path):
    """A finished run is only read back for the same examples and item tables: re-quantising the
    catalogue (other codes) retrains every row, and its stale checkpoints do not block the new runs."""
    config = AblationConfig(studies=("table1",), rows=("ID-only", QARM_ROW), seeds=(0,), history_length=10,
                            train=TrainConfig(max_steps=4, batch_size=256))
    first = run_ablation(folders / "data", tmp_path / "ab", config, quantize_dir=folders / "quantize",
                         align_dir=folders / "align")
    rng = np.random.default_rng(1)
    truth = np.asarray(load_vectors(folders)["aligned"])
    quantize_items(truth + rng.normal(0, 2, truth.shape).astype(np.float32), None, tmp_path / "other",
                   QuantizeConfig(rq=RQConfig(codebook_size=8, levels=2), vq=VQConfig(k=6), write_store=False))
    lines: list[str] = []
    second = run_ablation(folders / "data", tmp_path / "ab", config, quantize_dir=tmp_path / "other",
                          align_dir=folders / "align", log=lines.append)
    assert not any("already finished" in line for line in lines)
    assert second["tables"]["digest"] != first["tables"]["digest"]
    qarm = [second["variants"][QARM_ROW]["per_seed"]["0"], first["variants"][QARM_ROW]["per_seed"]["0"]]
    assert json.dumps(qarm[0]) != json.dumps(qarm[1])  # trained on the other codes
    # an interrupted run on the old codes leaves a checkpoint: the new run replaces it instead of failing
    run_dir = tmp_path / "ab" / "runs" / second["variants"][QARM_ROW]["run_key"] / "seed0"
    (run_dir / "report.json").unlink()
    lines.clear()
    third = run_ablation(folders / "data", tmp_path / "ab", config, quantize_dir=folders / "quantize",
                         align_dir=folders / "align", log=lines.append)
    assert any("starting that run over" in line for line in lines)
    assert json.dumps(third["variants"][QARM_ROW]["per_seed"]) == json.dumps(first["variants"][QARM_ROW]["per_seed"])


def test_a_run_of_a_model_whose_defaults_changed_is_retrained(folders, tmp_path):
    """Runs are keyed by the settings that differ from the defaults: a finished run whose model was built
    with another default must be trained again, not read back as today's model; a setting its report does
    not list (added to the model later) counts as its default."""
    config = AblationConfig(studies=("table1",), rows=(QARM_ROW,), seeds=(0,), history_length=10,
                            train=TrainConfig(max_steps=2, batch_size=256))
    kwargs = {"quantize_dir": folders / "quantize", "align_dir": folders / "align"}
    result = run_ablation(folders / "data", tmp_path, config, **kwargs)
    path = tmp_path / "runs" / result["variants"][QARM_ROW]["run_key"] / "seed0" / "report.json"

    def rerun_with(edit) -> list[str]:
        report = json.loads(path.read_text())
        edit(report["model"]["config"])
        path.write_text(json.dumps(report))
        lines: list[str] = []
        run_ablation(folders / "data", tmp_path, config, log=lines.append, **kwargs)
        return lines

    lines = rerun_with(lambda built: built.pop("target_dim"))  # a report from before the setting existed
    assert any("1 runs already finished" in line for line in lines)
    lines = rerun_with(lambda built: built.update(match_length=7))  # made when the default was 7
    assert not any("already finished" in line for line in lines)
    assert json.loads(path.read_text())["model"]["config"]["match_length"] == 10


def load_vectors(folders):
    from safetensors.numpy import load_file

    return load_file(str(folders / "align" / VECTORS_FILE))


def test_run_flags_hand_case():
    from qarm.train.stage import run_flags

    def report(valid_gaucs, logloss, constant):
        return {"eval_split": "test",
                "history": {"evals": [{"valid": {"click": {"gauc": g}}} for g in valid_gaucs]},
                "metrics": {"click": {"overall": {"logloss": logloss, "constant_logloss": constant}}}}

    assert run_flags(report([0.55, 0.61], 0.40, 0.50)) == []
    flags = run_flags(report([0.41, 0.47, 0.49], 0.52, 0.50))
    assert flags == ["click: validation GAUC below 0.5 at every validation (best 49.00)",
                     "click: test log loss 0.5200 worse than the constant base rate's 0.5000"]
    assert run_flags(report([0.41, 0.51], 0.49, 0.50)) == []  # one validation above 0.5 is enough


def test_flags_reach_the_ablation_table():
    from qarm.train.ablation import _cost_table

    rows = {"ID-only": {"model": "id_only", "model_config": {}, "parameters": 10, "train_seconds": 1.0,
                        "train_seconds_std": 0.0, "examples_per_second": 5.0, "epochs_trained": 1.0,
                        "seeds": [0, 1], "flags": {"1": ["click: validation GAUC below 0.5 at every validation"]}},
            "QARM": {"model": "qarm", "model_config": {}, "parameters": 10, "train_seconds": 1.0,
                     "train_seconds_std": 0.0, "examples_per_second": 5.0, "epochs_trained": 1.0, "seeds": [0, 1],
                     "flags": {}}}
    text = "\n".join(_cost_table(rows))
    assert "| (!) 1 of 2 seeds |" in text
    assert "- ID-only, seed 1: click: validation GAUC below 0.5 at every validation" in text


def test_logloss_tables_show_the_constant_and_mark_worse_models():
    from qarm.evaluate.report import render_markdown

    def segment(logloss):
        return {"auc": 0.6, "uauc": 0.6, "gauc": 0.6, "logloss": logloss, "constant_logloss": 0.5, "n": 10,
                "n_pos": 2, "n_users": 2, "users_with_both_classes": 2}

    reports = {"good": {"click": {"overall": segment(0.45)}}, "bad": {"click": {"overall": segment(0.55)}}}
    text = render_markdown(reports, "click", "logloss")
    assert "| good | 0.4500 |" in text and "| bad | 0.5500 (!) |" in text
    assert "| constant (the segment's base rate) | 0.5000 |" in text


def test_sigterm_stops_the_workers_of_a_parallel_ablation(folders, tmp_path):
    """Killing `qarm ablate` (a scheduler's SIGTERM) must not leave its worker processes training into the
    run folders as orphans."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    command = [sys.executable, "-c", "from qarm.cli import app; app()", "ablate", str(folders / "data"),
               "--out", str(tmp_path / "out"), "--codes", str(folders / "quantize"), "--vectors",
               str(folders / "align"), "--set", "studies=[table1]", "--set", "rows=[ID-only, Baseline]",
               "--set", "seeds=[0]", "--set", "workers=2", "--set", "history_length=10", "--set",
               "train.epochs=1000"]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [p for p in psutil.Process(parent.pid).children(recursive=True)
                       if "spawn_main" in " ".join(p.cmdline())]
            time.sleep(0.5)
        assert len(workers) == 2, "the ablation never started its two workers"
        time.sleep(3)  # the workers are training now
        os.kill(parent.pid, signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers left running: {[p.pid for p in alive]}"
    finally:
        if parent.poll() is None:
            parent.kill()

"""benchmarks/learning_curves.py on a hand-made leaderboard folder: times, lookups, the PNG and errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_curves.py"


@pytest.fixture(scope="module")
def learning_curves():
    spec = importlib.util.spec_from_file_location("learning_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(tmp_path: Path) -> Path:
    variants = {"EM3": {"run_key": "em3-x", "seeds": [0]}, "QARM VQ & RQ": {"run_key": "qarm-y", "seeds": [0, 1]}}
    (tmp_path / "leaderboard.json").write_text(json.dumps({"variants": variants}))
    histories = {("em3-x", 0): (400, 1000.0, [(100, 0.55), (200, 0.60), (400, 0.70)]),
                 ("qarm-y", 0): (30, 60.0, [(10, 0.80), (20, 0.82), (30, 0.81)]),
                 ("qarm-y", 1): (20, 50.0, [(10, 0.79), (20, 0.83)])}
    for (key, seed), (steps, seconds, evals) in histories.items():
        run = tmp_path / "runs" / key / f"seed{seed}"
        run.mkdir(parents=True)
        history = {"steps": steps, "train_seconds": seconds,
                   "evals": [{"step": s, "metric": m} for s, m in evals]}
        (run / "report.json").write_text(json.dumps({"history": history}))
    return tmp_path


def test_curves_scale_steps_by_the_run_mean_step_time(tmp_path, learning_curves):
    data = learning_curves.curves(_folder(tmp_path), ["EM3", "QARM VQ & RQ"])
    assert data["EM3"][0] == [(250.0, 0.55), (500.0, 0.60), (1000.0, 0.70)]  # 2.5 s a step
    assert data["QARM VQ & RQ"][1] == [(25.0, 0.79), (50.0, 0.83)]  # 2.5 s a step too
    assert data["QARM VQ & RQ"][0][-1] == (60.0, 0.81)
    assert learning_curves.value_at(data["EM3"][0], 600.0) == 0.60
    assert learning_curves.value_at(data["EM3"][0], 100.0) is None


def test_main_writes_the_png_and_the_table(tmp_path, learning_curves, capsys):
    folder = _folder(tmp_path)
    png = tmp_path / "out" / "curves.png"
    assert learning_curves.main([str(folder), "--rows", "EM3,QARM VQ & RQ", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| EM3 | 0 | 55.00 (250) | - | 70.00 (1,000) |" in printed  # 1/10 of 1,000 s: before any validation
    assert "| QARM VQ & RQ | 0 | 80.00 (20) | 81.00 | 81.00 (60) |" in printed


def test_unknown_row_and_missing_report_name_the_file(tmp_path, learning_curves):
    with pytest.raises(SystemExit, match="no rows \\['FGCNN'\\]"):
        learning_curves.curves(_folder(tmp_path), ["FGCNN"])
    with pytest.raises(SystemExit, match="no leaderboard.json or ablation.json"):
        learning_curves.curves(tmp_path / "empty", ["EM3"])

"""Data-parallel training with 2 gloo processes on the CPU, and --device: a 2-rank run trains, rank 0 alone
writes, its checkpoint resumes in 1 process, and 2 ranks take the steps 1 rank takes with the same global
batch (to float tolerance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qarm.cli import app
from qarm.distributed import rank, resolve_device, spawn
from qarm.errors import ConfigError, QarmError
from qarm.features import ExampleSource
from qarm.models import build_model
from qarm.train import RankingConfig, TrainConfig, train, train_ranking
from qarm.train.stage import build_tables
from qarm.train.trainer import BEST_FILE, CHECKPOINT_FILE

runner = CliRunner()
SMALL = ["--set", "n_items=400", "--set", "n_users=100", "--set", "n_interactions=5000"]
# 3,686 training rows: 15 batches of 245, the last of 11 rows split 6 / 5 between the ranks.
TRAIN = TrainConfig(epochs=1, batch_size=245, seed=3)


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "syn"
    result = invoke("data", "prepare", "--dataset", "synthetic", "--out", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    return out


def trained_weights(data_dir: Path, config: TrainConfig, model_config: dict[str, Any] | None = None,
                    ) -> dict[str, torch.Tensor]:
    source = ExampleSource.from_folder(data_dir, history_length=20)
    model = build_model("id_only", source.spec, build_tables(source, data_dir, "id_only"), model_config, seed=0)
    return train(model, source, config, progress=False).model.state_dict()


def train_on_rank(data_dir: Path, config: TrainConfig, out: Path, model_config: dict[str, Any] | None = None) -> None:
    """Run in each spawned rank: train, and save this rank's weights for the test to compare."""
    torch.save(trained_weights(data_dir, config, model_config), out / f"weights{rank()}.pt")


def ranking_on_rank(data_dir: Path, out: Path, returns: Path) -> None:
    """Run in each spawned rank: one ranking run into a shared folder; keep what each rank returned."""
    report = train_ranking(data_dir, out, RankingConfig(model="id_only", history_length=20, train=TRAIN))
    (returns / f"return{rank()}.json").write_text(json.dumps(sorted(report)))


# sparse tables: DDP all-reduces their sparse gradients (gloo) and each rank's SparseAdam steps alike
@pytest.mark.parametrize("model_config", [None, {"sparse_tables": True}], ids=["dense", "sparse_tables"])
def test_two_ranks_take_the_steps_of_one_rank_with_the_same_global_batch(data_dir, tmp_path, model_config):
    spawn(2, train_on_rank, data_dir, TRAIN, tmp_path, model_config)
    rank0 = torch.load(tmp_path / "weights0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights1.pt", weights_only=True)
    single = trained_weights(data_dir, TRAIN, model_config)
    assert rank0.keys() == rank1.keys() == single.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP: both ranks hold the same parameters
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


def test_only_rank_zero_evaluates_and_writes(data_dir, tmp_path):
    out = tmp_path / "run"
    spawn(2, ranking_on_rank, data_dir, out, tmp_path)
    assert "metrics" in json.loads((tmp_path / "return0.json").read_text())
    assert json.loads((tmp_path / "return1.json").read_text()) == ["history", "rank"]
    assert sorted(p.name for p in out.iterdir()) == ["predictions.parquet", "report.json", "train"]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["history"]["examples"] == 3686


def test_cli_nproc_2_then_resume_in_one_process(data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["train", str(data_dir), "--out", str(out), "--model", "id_only", "--set", "history_length=20",
              "--set", "train.batch_size=245"]
    result = invoke(*common, "--nproc", "2", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    first = json.loads((out / "report.json").read_text())
    assert first["world_size"] == 2 and first["history"]["steps"] == 16
    assert (out / "train" / CHECKPOINT_FILE).exists() and (out / "train" / BEST_FILE).exists()
    assert (out / "metrics.md").exists()

    result = invoke(*common, "--set", "train.epochs=2")  # one process continues the 2-rank checkpoint
    assert result.exit_code == 0, result.output
    second = json.loads((out / "report.json").read_text())
    assert second["world_size"] == 1
    assert second["history"]["resumed_from"] == [16] and second["history"]["steps"] == 32
    weights = load_file(out / "train" / BEST_FILE)
    assert weights and all(value.device.type == "cpu" for value in weights.values())


def test_nproc_errors_name_the_flag(data_dir, tmp_path):
    result = invoke("train", str(data_dir), "--out", str(tmp_path / "x"), "--nproc", "0")
    assert result.exit_code == 2 and "--nproc must be >= 1, got 0" in result.output
    result = invoke("train", str(data_dir), "--out", str(tmp_path / "x"), "--nproc", "2", "--warm-start",
                    str(tmp_path), "--window", "0:")
    assert result.exit_code == 2 and "--nproc with --warm-start is not supported" in result.output


def test_a_failing_rank_fails_the_call_with_its_message(tmp_path):
    with pytest.raises(QarmError, match=r"^rank \d: .*missing: not a dataset folder"):
        spawn(2, ranking_on_rank, tmp_path / "missing", tmp_path / "out", tmp_path)


# ------------------------------------------------------------------------------------------- devices

def test_devices_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device must be one of cpu, cuda, auto; got 'gpu'"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_names_the_flag(data_dir, tmp_path):
    result = invoke("train", str(data_dir), "--out", str(tmp_path / "x"), "--device", "cuda")
    assert result.exit_code == 2 and "--device cuda: torch sees no CUDA device here" in result.output


def test_train_on_device_auto_runs_and_records_the_device(data_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", str(data_dir), "--out", str(out), "--model", "id_only", "--device", "auto",
                    "--set", "train.max_steps=3")
    assert result.exit_code == 0, result.output
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert json.loads((out / "report.json").read_text())["device"] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (untested on this CPU machine)")
def test_cuda_training_matches_cpu_training(data_dir):
    config = TrainConfig(epochs=1, batch_size=245, seed=3, max_steps=5)
    on_cpu = trained_weights(data_dir, config)
    on_cuda = trained_weights(data_dir, TrainConfig(**{**config.__dict__, "device": "cuda"}))
    for name, value in on_cpu.items():
        assert on_cuda[name].device.type == "cuda"
        torch.testing.assert_close(on_cuda[name].cpu(), value, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("command", ["train", "align"])
def test_a_bad_device_is_named_as_the_flag(data_dir, tmp_path, command):
    result = invoke(command, str(data_dir), "--out", str(tmp_path / "x"), "--device", "gpu")
    assert result.exit_code == 2 and "--device must be one of cpu, cuda, auto; got 'gpu'" in result.output


def test_cli_align_nproc_2_writes_one_report(data_dir, tmp_path):
    out = tmp_path / "align"
    result = invoke("align", str(data_dir), "--out", str(out), "--nproc", "2", "--set", "train.max_steps=8",
                    "--set", "train.eval_every=4", "--set", "train.batch_size=64", "--set", "user2item.epochs=1",
                    "--set", "tsne_sample=0")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "align_report.json").read_text())
    assert report["training"]["stopped"] == "max_steps" and len(report["training"]["steps"]) == 8
    assert (out / "vectors.safetensors").exists() and (out / "encoder").is_dir()


def test_torchrun_runs_the_same_entry_point(data_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "qarm",
               "train", str(data_dir), "--out", str(out), "--model", "id_only", "--set", "train.epochs=1",
               "--set", "train.batch_size=245", "--set", "history_length=20"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["history"]["examples"] == 3686
    assert done.stdout.count("### click: GAUC") == 1  # rank 0 alone prints the metrics

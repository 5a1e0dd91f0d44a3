"""Shared fixtures. Tests that read ../shared/data skip with a clear message when it is absent."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Tests run as two xdist workers on two cores: one torch thread each. Two threads per worker
# oversubscribe the cores, and torch's spinning threads then run many times slower.
torch.set_num_threads(1)

from qarm.data.shared import find_shared_data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = find_shared_data()
    if root is None:
        pytest.skip("../shared/data is absent (set QARM_SHARED_DATA to its path to run real-data tests)")
    return root


def shared_folder(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent; this real-data test needs it")
    return path


# --------------------------------------------------------------------------------- a real Redis
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``redis-server`` on 127.0.0.1:<free port>; yield its URL; stop it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server); "
                    "the Redis code-store tests need a real server")
    import redis

    workdir = tmp_path_factory.mktemp("redis")
    log = workdir / "redis.log"
    proc = None
    for _ in range(3):  # another process may take the free port between finding and binding it
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
            continue
        client.close()
        break
    else:
        text = log.read_text() if log.exists() else ""
        pytest.skip(f"redis-server could not be started on 127.0.0.1 (log: {text[-500:]!r})")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------- a trained bundle
SMALL_RUN: dict[str, Any] = {
    "loader_options": {"n_items": 1200, "n_users": 400, "n_interactions": 30_000},
    "align": {"user2item": {"epochs": 1}, "train": {"max_steps": 30, "eval_every": 15}, "tsne_sample": 0},
    "quantize": {"rq": {"codebook_size": 16}},
    "rank": {"rows": ["ID-only", "+ VQ & RQ"], "train": {"epochs": 1}},
}


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic `qarm run` (~15 s): a trained QARM model exported to <run>/models, for the serving tests."""
    from qarm.pipeline import run_config_from_dict, run_pipeline

    out = tmp_path_factory.mktemp("serve") / "run"
    run_pipeline(run_config_from_dict(SMALL_RUN), out, log=lambda line: None)
    return out


@pytest.fixture
def models(run_dir: Path, tmp_path: Path) -> Path:
    """A fresh bundles' folder holding one current version ``v1`` of the run's QARM model."""
    from qarm.serve.bundle import export_bundle

    folder = tmp_path / "models"
    export_bundle(run_dir, folder, version="v1")
    return folder


@pytest.fixture(scope="session")
def text_model():  # one MiniLM for the module's apps (the service shares one per process anyway)
    from qarm.serve.scorer import shared_text_model

    return shared_text_model()

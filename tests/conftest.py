"""Shared fixtures. Tests that read ../shared/data skip with a clear message when it is absent."""

from __future__ import annotations

from pathlib import Path

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

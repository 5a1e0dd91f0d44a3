"""qarm's FGCNN computes FuxiCTR's FGCNN's function (benchmarks/peer_fgcnn_fuxictr.py's same-function check).

Needs the ``fuxictr`` package (the ``bench`` extra), a clone of reczoo/FuxiCTR (``$FUXICTR_REPO``) and Frappe in
../shared/data; skips with a message without any of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def peer(shared_data):
    pytest.importorskip("fuxictr", reason="the fuxictr package is not installed (pip install -e '.[bench]')")
    repo = os.environ.get("FUXICTR_REPO")
    if not repo or not (Path(repo) / "model_zoo" / "FGCNN" / "src" / "__init__.py").is_file():
        pytest.skip("no FuxiCTR clone: set FUXICTR_REPO to a clone of https://github.com/reczoo/FuxiCTR")
    if not (shared_data / "frappe_nfm_partial").is_dir():
        pytest.skip(f"{shared_data / 'frappe_nfm_partial'} is absent")
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling _frappe
    try:
        spec = importlib.util.spec_from_file_location("peer_fgcnn_fuxictr", BENCHMARKS / "peer_fgcnn_fuxictr.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        data = sys.modules["_frappe"].load(0)
    finally:
        sys.path.remove(str(BENCHMARKS))
    args = argparse.Namespace(dim=16, batch_norm=False, epochs=2, no_lr_decay=False, qarm_init="xavier",
                              fuxictr_repo=Path(repo))
    return module, data, args


def test_qarm_fgcnn_with_fuxictr_weights_gives_fuxictr_probabilities(peer):
    module, data, args = peer
    same = module.same_function_check(data, args, rows=2048)
    low, high = same["probability_range"]
    assert high - low > 0.1  # outputs that differ from row to row, or the check proves nothing
    assert same["max_abs_probability_difference"] < 1e-5


def test_the_check_sees_a_different_pooling(peer):
    """Rounding up puts the short window last where FuxiCTR's padding puts it first: another function."""
    module, data, args = peer
    assert module.same_function_check(data, args, rows=2048, pooling_round="up")["max_abs_probability_difference"] > 1e-3

"""Alignment evaluation: pair Recall@K on a hand case, business rank correlation, the t-SNE figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qarm.align.evaluate import business_rank_correlation, pair_recall, plot_tsne
from qarm.errors import ConfigError, DataError

# Item 0 points right; from it, item 1 is nearest, then 4, 2 and 3 (cosines ~0.99, 0.71, 0, -1).
VECTORS = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]], dtype=np.float32)


def pairs(*rows: tuple[int, int]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["trigger", "target"])


def test_pair_recall_hand_case() -> None:
    result = pair_recall(VECTORS, pairs((0, 1), (0, 2), (0, 3)), ks=(1, 3))
    # ranks (other items at least as close as the target): 0, 2, 3
    assert result == pytest.approx({"recall@1": 1 / 3, "recall@3": 2 / 3, "mrr": (1 + 1 / 3 + 1 / 4) / 3,
                                    "n_pairs": 3})
    # with the trigger left in, item 0 outranks every target: ranks 1, 3, 4
    kept = pair_recall(VECTORS, pairs((0, 1), (0, 2), (0, 3)), ks=(1, 3), exclude_self=False)
    assert kept["recall@1"] == 0 and kept["recall@3"] == pytest.approx(1 / 3)


def test_pair_recall_ties_count_against_the_target_and_scale_does_not_matter() -> None:
    vectors = np.vstack([VECTORS, VECTORS[1] * 3])  # item 5: same direction as item 1
    result = pair_recall(vectors, pairs((0, 1)), ks=(1, 2), chunk_size=1)
    assert result["recall@1"] == 0 and result["recall@2"] == 1


def test_score_blocks_are_bounded_and_change_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A catalogue too large for the wanted block is scored in smaller blocks, with the same ranks."""
    import qarm.align.user2item as user2item

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 4)).astype(np.float32)
    held_out = pairs(*[(int(a), int(b)) for a, b in rng.integers(0, 50, size=(30, 2)) if a != b])
    whole = pair_recall(vectors, held_out, ks=(1, 5, 10))
    monkeypatch.setattr(user2item, "SCORE_BLOCK_ELEMENTS", 7 * 50)  # 7 triggers a block against 50 items
    assert user2item.score_block_rows(50, 1024) == 7 and user2item.score_block_rows(10**9, 1024) == 1
    assert pair_recall(vectors, held_out, ks=(1, 5, 10)) == whole


def test_pair_recall_input_errors() -> None:
    with pytest.raises(ConfigError, match=r"The 'ks' parameter of pair_recall must be ints >= 1. Got \[0\]"):
        pair_recall(VECTORS, pairs((0, 1)), ks=(0,))
    with pytest.raises(DataError, match=r"item ids outside \[0, 5\)"):
        pair_recall(VECTORS, pairs((0, 7)))
    with pytest.raises(DataError, match="NaN"):
        pair_recall(np.full((5, 2), np.nan, np.float32), pairs((0, 1)))
    assert pair_recall(VECTORS, pairs((2, 2)))["n_pairs"] == 0  # self-pairs are dropped


def truth_table(business: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame(business, columns=[f"b{i}" for i in range(business.shape[1])])
    table.insert(0, "item_id", np.arange(len(business)))
    table["business_group"] = 0  # a non-vector column that must be ignored
    return table


def test_business_rank_correlation_hand_cases() -> None:
    rng = np.random.default_rng(0)
    business = rng.standard_normal((300, 6)).astype(np.float32)
    truth = truth_table(business)
    # any rotation and scaling of the business vectors keeps every cosine: rho = 1
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    rotated = (business @ rotation * rng.uniform(0.5, 2.0, (300, 1))).astype(np.float32)
    assert business_rank_correlation(rotated, truth, n_pairs=5000) == pytest.approx(1.0, abs=1e-6)
    # unrelated vectors: rho near 0; partly related ones in between
    unrelated = rng.standard_normal((300, 6)).astype(np.float32)
    assert abs(business_rank_correlation(unrelated, truth, n_pairs=20_000)) < 0.05
    noisy = business_rank_correlation(business + unrelated, truth, n_pairs=20_000)
    assert 0.3 < noisy < 0.9
    # the sample is a function of the seed
    assert business_rank_correlation(business + unrelated, truth, seed=3) == \
        business_rank_correlation(business + unrelated, truth, seed=3) != noisy


def test_business_rank_correlation_checks_the_truth_table() -> None:
    with pytest.raises(DataError, match=r"one row per item \(5\)"):
        business_rank_correlation(VECTORS, truth_table(np.ones((4, 3), np.float32)))
    with pytest.raises(ConfigError, match="The 'n_pairs' parameter"):
        business_rank_correlation(VECTORS, truth_table(np.ones((5, 3), np.float32)), n_pairs=1)


def test_plot_tsne_writes_a_png(tmp_path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 20)
    centres = {"a": 0.0, "b": 3.0, "c": -3.0}
    before = rng.standard_normal((60, 8)).astype(np.float32)
    after = before + np.array([[centres[x]] * 8 for x in labels], dtype=np.float32)
    path = plot_tsne(before, after, labels, tmp_path / "figs" / "tsne.png", sample=45, label_name="group")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "figs").iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(DataError, match="must describe the same items"):
        plot_tsne(before, after[:10], labels, tmp_path / "x.png")

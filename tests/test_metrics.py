"""Evaluation metrics: AUC / per-user AUC / UAUC / GAUC / log loss against scikit-learn and hand-worked
cases, segment selection (cold-start, L1..L6), input errors, seed aggregation, comparison and the files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from qarm.errors import ConfigError, DataError
from qarm.evaluate import (
    aggregate_seeds,
    auc,
    compare,
    evaluate_predictions,
    gauc,
    grouped_auc,
    logloss,
    render_markdown,
    uauc,
    write_report,
)


def random_case(seed: int, n: int = 600, n_users: int = 40, levels: int = 8):
    """Labels, coarse scores (many ties) and users; three users hold one class only (all negatives, all
    positives, a single row), the others usually both."""
    rng = np.random.default_rng(seed)
    users = np.concatenate([rng.integers(0, n_users, size=n - 6), np.repeat([n_users, n_users + 1, n_users + 2],
                                                                           [3, 2, 1])])
    labels = rng.random(n) < 0.3
    labels[n - 6:] = [False, False, False, True, True, False]
    scores = np.round(rng.random(n) + 0.3 * labels, 1) / levels  # ties within and across classes
    return labels.astype(np.int64), scores, users


def reference_per_user(labels, scores, users):
    """A plain loop over users with scikit-learn: {user: (auc, n_rows)} for users with both classes."""
    out = {}
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            out[u] = (roc_auc_score(labels[m], scores[m]), int(m.sum()))
    return out


# --------------------------------------------------------------------------------------------------
# AUC and per-user AUC against scikit-learn


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    labels, scores, _ = random_case(seed)
    assert len(np.unique(scores)) < len(scores) // 10  # the case really has ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # float32 scores, bool labels and lists give the same answer
    assert auc(labels.astype(bool), scores.astype(np.float32)) == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float32)), abs=1e-12)
    assert auc(labels.tolist(), scores.tolist()) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_hand_cases() -> None:
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied: every pair counts one half
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))  # no negative: undefined
    assert math.isnan(auc([], []))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_auc_matches_a_loop_over_users(seed: int) -> None:
    labels, scores, users = random_case(seed)
    ref = reference_per_user(labels, scores, users)
    got = grouped_auc(labels, scores, users)
    assert got.groups.tolist() == sorted(ref)
    assert got.auc == pytest.approx([ref[u][0] for u in got.groups], abs=1e-12)
    assert got.counts.tolist() == [ref[u][1] for u in got.groups]
    assert got.n_positive.tolist() == [int(labels[users == u].sum()) for u in got.groups]
    assert got.n_groups == len(np.unique(users)) and got.n_used == len(ref) < got.n_groups
    # UAUC and GAUC against the same loop
    aucs = np.array([a for a, _ in ref.values()])
    sizes = np.array([n for _, n in ref.values()])
    assert uauc(labels, scores, users) == pytest.approx(aucs.mean(), abs=1e-12)
    assert gauc(labels, scores, users) == pytest.approx((aucs * sizes).sum() / sizes.sum(), abs=1e-12)


def test_grouped_auc_accepts_string_user_keys() -> None:
    labels, scores, users = random_case(5, n=200, n_users=6)
    names = np.array([f"user-{u}" for u in users], dtype=object)
    by_int, by_name = grouped_auc(labels, scores, users), grouped_auc(labels, scores, names)
    assert by_name.auc == pytest.approx(by_int.auc) and by_name.groups[0] == f"user-{by_int.groups[0]}"


# Three users, worked by hand. A pair (positive, negative) scores 1 when the positive is higher, 1/2 tied.
#   user 0 (4 rows): positives 0.9, 0.4; negatives 0.3, 0.5
#       pairs: 0.9>0.3 -> 1, 0.9>0.5 -> 1, 0.4>0.3 -> 1, 0.4<0.5 -> 0      AUC = 3/4 = 0.75
#   user 1 (3 rows): positive 0.2; negatives 0.2, 0.6
#       pairs: 0.2=0.2 -> 1/2, 0.2<0.6 -> 0                                AUC = 0.5/2 = 0.25
#   user 2 (2 rows): positives only -> no AUC, left out of both averages
# UAUC = (0.75 + 0.25) / 2 = 0.5
# GAUC = (4 * 0.75 + 3 * 0.25) / (4 + 3) = (3 + 0.75) / 7 = 3.75 / 7 = 0.535714...
HAND_USERS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
HAND_LABELS = np.array([1, 0, 0, 1, 1, 0, 0, 1, 1])
HAND_SCORES = np.array([0.9, 0.3, 0.5, 0.4, 0.2, 0.2, 0.6, 0.7, 0.1])


def test_uauc_and_gauc_hand_case() -> None:
    got = grouped_auc(HAND_LABELS, HAND_SCORES, HAND_USERS)
    assert got.groups.tolist() == [0, 1] and got.auc.tolist() == [0.75, 0.25]
    assert got.counts.tolist() == [4, 3] and got.n_positive.tolist() == [2, 1] and got.n_groups == 3
    assert uauc(HAND_LABELS, HAND_SCORES, HAND_USERS) == pytest.approx(0.5)
    assert gauc(HAND_LABELS, HAND_SCORES, HAND_USERS) == pytest.approx(3.75 / 7)
    # one class for everyone: no user enters, the averages are undefined
    assert math.isnan(uauc([1, 0], [0.3, 0.4], [0, 1])) and math.isnan(gauc([1, 0], [0.3, 0.4], [0, 1]))


# --------------------------------------------------------------------------------------------------
# Log loss


@pytest.mark.parametrize("seed", [0, 1])
def test_logloss_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.01, 0.99, size=500)
    labels = (rng.random(500) < probs).astype(int)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-12)


def test_logloss_clips_confident_misses() -> None:
    # label 1 at p=0 costs -log(1e-7); label 0 at p=0 costs -log(1 - 1e-7)
    expected = (-math.log(1e-7) - math.log(1 - 1e-7)) / 2
    assert logloss([1, 0], [0.0, 0.0]) == pytest.approx(expected)
    assert logloss([1, 0], [1.0, 0.0], eps=1e-3) == pytest.approx(-math.log(1 - 1e-3))
    assert math.isnan(logloss([], []))


# --------------------------------------------------------------------------------------------------
# Input errors


def test_input_errors_name_the_problem() -> None:
    with pytest.raises(DataError, match=r"^labels and scores must have the same length, got 3 and 2$"):
        auc([0, 1, 0], [0.1, 0.2])
    with pytest.raises(DataError, match=r"labels must hold only 0 and 1 \(3 rows do not\); offending: \[2.0, -1.0\]"):
        auc([0, 2, -1, 2], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(DataError, match=r"labels must hold only 0 and 1 \(1 rows do not\); offending: \[nan\]"):
        logloss([0, np.nan], [0.1, 0.2])
    with pytest.raises(DataError, match=r"scores holds NaN or infinite values \(1 rows\); offending: \[1\]"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(DataError, match=r"labels must be a 1-D array, got shape \(2, 1\)"):
        auc([[0], [1]], [0.1, 0.2])
    with pytest.raises(DataError, match=r"labels and groups must have the same length, got 2 and 3"):
        grouped_auc([0, 1], [0.1, 0.2], [0, 0, 1])
    with pytest.raises(DataError, match=r"groups holds missing values \(1 rows\)"):
        uauc([0, 1], [0.1, 0.2], [0.0, np.nan])
    with pytest.raises(DataError, match=r"probs must be probabilities in \[0, 1\], not logits \(1 rows outside\)"):
        logloss([0, 1], [0.1, 2.5])
    with pytest.raises(ConfigError, match=r"The 'eps' parameter of logloss must be a float in \(0, 0.5\)\. Got 0"):
        logloss([0, 1], [0.1, 0.2], eps=0)


# --------------------------------------------------------------------------------------------------
# Reports: segment selection


def hand_frame() -> pd.DataFrame:
    """8 rows, 2 users; cold rows 0, 1, 7; L1 rows 2, 3, 4; L2 rows 5, 6; L3..L6 empty."""
    return pd.DataFrame({
        "user_id": [0, 0, 0, 0, 1, 1, 1, 1],
        "item_id": [10, 11, 12, 13, 14, 15, 16, 17],
        "cold_item": [True, True, False, False, False, False, False, True],
        "longtail_group": [0, 0, 1, 1, 1, 2, 2, 0],
        "label_click": [1, 0, 1, 0, 0, 1, 0, 0],
        "score_click": [0.9, 0.2, 0.6, 0.7, 0.1, 0.8, 0.3, 0.4],
        "label_like": [0, 0, 0, 0, 0, 1, 0, 0],
        "score_like": [0.5] * 8,
    })


def test_evaluate_predictions_selects_segments_hand_case() -> None:
    frame = hand_frame()
    report = evaluate_predictions(frame, ["click", "like"])
    assert list(report) == ["click", "like"]
    click = report["click"]
    assert list(click) == ["overall", "warm", "cold_start", "L1", "L2", "L3", "L4", "L5", "L6"]
    y, p = frame["label_click"].to_numpy(), frame["score_click"].to_numpy()
    assert click["overall"]["auc"] == pytest.approx(roc_auc_score(y, p))
    assert click["overall"]["logloss"] == pytest.approx(log_loss(y, p))
    # cold rows 0, 1, 7: labels 1, 0, 0 at 0.9, 0.2, 0.4 -> the positive beats both negatives: AUC 1.
    # user 0 has both classes there (AUC 1), user 1 only a negative.
    assert click["cold_start"] == pytest.approx({
        "auc": 1.0, "uauc": 1.0, "gauc": 1.0, "logloss": log_loss([1, 0, 0], [0.9, 0.2, 0.4]),
        "constant_logloss": log_loss([1, 0, 0], [1 / 3] * 3),
        "n": 3, "n_pos": 1, "n_users": 2, "users_with_both_classes": 1})
    # warm rows 2..6: labels 1 0 0 1 0 at 0.6 0.7 0.1 0.8 0.3. Pairs: 0.6 beats 0.1 and 0.3, loses to 0.7;
    # 0.8 beats all three -> AUC 5/6. User 0 (rows 2, 3): 0.6 < 0.7 -> 0; user 1 (rows 4, 5, 6): 1.
    # GAUC weights users by rows: (2 * 0 + 3 * 1) / 5 = 0.6; UAUC (0 + 1) / 2. Constant: rate 2/5.
    assert click["warm"] == pytest.approx({
        "auc": 5 / 6, "uauc": 0.5, "gauc": 0.6, "logloss": log_loss([1, 0, 0, 1, 0], [0.6, 0.7, 0.1, 0.8, 0.3]),
        "constant_logloss": -(0.4 * math.log(0.4) + 0.6 * math.log(0.6)),
        "n": 5, "n_pos": 2, "n_users": 2, "users_with_both_classes": 2})
    assert click["warm"]["gauc"] == pytest.approx(
        gauc(y[[2, 3, 4, 5, 6]], p[[2, 3, 4, 5, 6]], frame["user_id"].to_numpy()[[2, 3, 4, 5, 6]]))
    # L1 rows 2, 3, 4: positive 0.6 vs negatives 0.7 (0) and 0.1 (1) -> AUC 1/2; per user only user 0
    # (0.6 < 0.7) -> 0
    assert click["L1"]["auc"] == 0.5 and click["L1"]["uauc"] == 0.0 and click["L1"]["gauc"] == 0.0
    assert (click["L1"]["n"], click["L1"]["n_pos"], click["L1"]["users_with_both_classes"]) == (3, 1, 1)
    # L2 rows 5, 6 (user 1): 0.8 > 0.3
    assert click["L2"]["gauc"] == 1.0 and click["L2"]["n"] == 2
    # empty groups: NaN metrics, zero counts
    for g in ("L3", "L6"):
        assert math.isnan(click[g]["auc"]) and math.isnan(click[g]["gauc"]) and math.isnan(click[g]["logloss"])
        assert (click[g]["n"], click[g]["n_users"], click[g]["users_with_both_classes"]) == (0, 0, 0)
    # 'like' has its only positive in L2 with tied scores: AUC 1/2 overall, undefined on cold-start
    assert report["like"]["overall"]["auc"] == 0.5 and math.isnan(report["like"]["cold_start"]["auc"])
    # JSON-ready: plain Python types only
    for segment in click.values():
        assert all(type(v) in (float, int) for v in segment.values())
    json.dumps(report)


def test_evaluate_predictions_other_number_of_groups_and_int_cold_flags() -> None:
    frame = hand_frame().assign(cold_item=lambda f: f["cold_item"].astype(int))
    report = evaluate_predictions(frame, ["click"], n_longtail_groups=2)
    assert list(report["click"]) == ["overall", "warm", "cold_start", "L1", "L2"]
    assert report["click"]["cold_start"]["n"] == 3


def test_evaluate_predictions_input_errors() -> None:
    frame = hand_frame()
    with pytest.raises(DataError, match=r"predictions lack the columns \['label_buy', 'score_buy'\]"):
        evaluate_predictions(frame, ["click", "buy"])
    with pytest.raises(DataError, match=r"column 'longtail_group': must lie in 0\.\.1 \(n_longtail_groups=1\); "
                                        r"offending: \[2\]"):
        evaluate_predictions(frame, ["click"], n_longtail_groups=1)
    with pytest.raises(DataError, match=r"score_click must be probabilities in \[0, 1\], not logits"):
        evaluate_predictions(frame.assign(score_click=frame["score_click"] * 10 - 5), ["click"])
    with pytest.raises(DataError, match=r"label_click must hold only 0 and 1"):
        evaluate_predictions(frame.assign(label_click=2), ["click"])
    with pytest.raises(ConfigError, match=r"The 'tasks' parameter of evaluate_predictions must be a non-empty "
                                          r"list of task names\. Got 'click' instead\."):
        evaluate_predictions(frame, "click")


# --------------------------------------------------------------------------------------------------
# Seeds, comparison, rendering, files


def tiny_report(gauc_value: float, auc_value: float = 0.7, n: int = 100) -> dict:
    metrics = {"auc": auc_value, "uauc": 0.6, "gauc": gauc_value, "logloss": 0.5,
               "n": n, "n_pos": 30, "n_users": 10, "users_with_both_classes": 8}
    return {"click": {"overall": dict(metrics), "cold_start": dict(metrics, gauc=float("nan")), "L1": dict(metrics)}}


def test_aggregate_seeds_hand_case() -> None:
    # gauc 0.70, 0.72, 0.74: mean 0.72; sample std sqrt((0.02^2 + 0 + 0.02^2) / (3 - 1)) = 0.02
    agg = aggregate_seeds([tiny_report(0.70), tiny_report(0.72), tiny_report(0.74, n=103)])
    overall = agg["click"]["overall"]
    assert overall["gauc"] == pytest.approx(0.72) and overall["gauc_std"] == pytest.approx(0.02)
    assert overall["auc"] == pytest.approx(0.7) and overall["auc_std"] == pytest.approx(0.0, abs=1e-15)
    assert overall["n_pos"] == 30 and type(overall["n_pos"]) is int  # equal over seeds: kept
    assert overall["n"] == pytest.approx(101.0)  # differs over seeds: averaged
    assert overall["n_seeds"] == 3
    assert math.isnan(agg["click"]["cold_start"]["gauc"])  # NaN in a seed stays NaN
    assert math.isnan(aggregate_seeds([tiny_report(0.7)])["click"]["overall"]["gauc_std"])  # one seed
    with pytest.raises(DataError, match=r"reports\[0\] and reports\[1\] cover different tasks"):
        aggregate_seeds([tiny_report(0.7), {"like": tiny_report(0.7)["click"]}])


def test_compare_in_points() -> None:
    diff = compare(tiny_report(0.70), tiny_report(0.7235, auc_value=0.69))
    assert diff["click"]["overall"]["gauc"] == pytest.approx(2.35)
    assert diff["click"]["overall"]["auc"] == pytest.approx(-1.0)
    assert math.isnan(diff["click"]["cold_start"]["gauc"])


def test_render_markdown_table() -> None:
    agg = aggregate_seeds([tiny_report(0.70), tiny_report(0.72), tiny_report(0.74)])
    text = render_markdown({"baseline": tiny_report(0.7), "qarm": agg}, "click", "gauc")
    lines = text.splitlines()
    assert lines[0] == "### click: GAUC"
    assert lines[2] == "| model | overall | cold-start | L1 |"
    assert lines[3] == "|---|---:|---:|---:|"
    assert lines[4] == "| baseline | 70.00 | - | 70.00 |"
    assert lines[5] == "| qarm | 72.00 ± 2.00 | - | 72.00 ± 2.00 |"
    assert "overall 100 (30 pos, 8 users with both classes)" in lines[7]
    assert "| baseline | 0.5000 |" in render_markdown({"baseline": tiny_report(0.7)}, "click", "logloss")
    with pytest.raises(ConfigError, match=r"unknown task 'like' in report 'baseline'; available: \['click'\]"):
        render_markdown({"baseline": tiny_report(0.7)}, "like")
    with pytest.raises(ConfigError, match=r"The 'metric' parameter of render_markdown must be one of"):
        render_markdown({"baseline": tiny_report(0.7)}, "click", "ndcg")


def test_write_report_json_and_markdown(tmp_path) -> None:
    json_path, md_path = write_report(tmp_path / "out" / "results.v1", {"a": tiny_report(0.7)}, title="Ranking")
    assert json_path.name == "results.v1.json" and md_path.name == "results.v1.md"
    data = json.loads(json_path.read_text())  # strict JSON: NaN became null
    assert data["a"]["click"]["cold_start"]["gauc"] is None and data["a"]["click"]["L1"]["gauc"] == 0.7
    md = md_path.read_text()
    assert md.startswith("# Ranking") and "### click: GAUC" in md and "### click: LOGLOSS" in md
    # a report read back from JSON (null for NaN) renders and compares like the original
    assert "| a | 70.00 | - | 70.00 |" in render_markdown(data, "click")
    assert compare(data["a"], tiny_report(0.71))["click"]["L1"]["gauc"] == pytest.approx(1.0)
    with pytest.raises(DataError, match=r"write_report needs \{name: report\}, got a single report"):
        write_report(tmp_path / "x", tiny_report(0.7))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.v1.json", "results.v1.md"]

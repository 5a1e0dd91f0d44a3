"""Swing item2item scores: a hand-worked example, a brute-force reference, the cap, and bad input."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from qarm.align.swing import Swing
from qarm.errors import ConfigError, DataError, QarmError

# The hand-worked example (documented formula, alpha = 1, unordered user pairs counted once):
HAND_USERS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
HAND_ITEMS = [0, 1, 2, 0, 1, 0, 1, 2, 3, 1, 2, 3]


def test_hand_worked_example():
    r"""Four users, four items, alpha = 1.

    Histories::

        I_0 = {0, 1, 2}   I_1 = {0, 1}   I_2 = {0, 1, 2, 3}   I_3 = {1, 2, 3}

    Users per item::

        U_0 = {0, 1, 2}   U_1 = {0, 1, 2, 3}   U_2 = {0, 2, 3}   U_3 = {2, 3}

    Overlaps |I_u ∩ I_v| and weights 1 / (1 + overlap)::

        (0,1): {0,1}   = 2 -> 1/3      (0,2): {0,1,2} = 3 -> 1/4      (0,3): {1,2}   = 2 -> 1/3
        (1,2): {0,1}   = 2 -> 1/3      (1,3): {1}     = 1 -> 1/2      (2,3): {1,2,3} = 3 -> 1/4

    Scores, summing over the user pairs inside U_i ∩ U_j::

        swing(0,1): U_0 ∩ U_1 = {0,1,2}: (0,1) + (0,2) + (1,2) = 1/3 + 1/4 + 1/3 = 11/12
        swing(0,2): {0,2}:               (0,2)                 = 1/4
        swing(0,3): {2}:                 no pair               -> no score
        swing(1,2): {0,2,3}:             (0,2) + (0,3) + (2,3) = 1/4 + 1/3 + 1/4 = 5/6
        swing(1,3): {2,3}:               (2,3)                 = 1/4
        swing(2,3): {2,3}:               (2,3)                 = 1/4

    Neighbours by decreasing score, ties by increasing id, top_n = 3, -1 / 0.0 padding::

        item 0: 1 (11/12), 2 (1/4)
        item 1: 0 (11/12), 2 (5/6), 3 (1/4)
        item 2: 1 (5/6), 0 (1/4), 3 (1/4)
        item 3: 1 (1/4), 2 (1/4)
    """
    swing = Swing(alpha=1.0, top_n=3, max_users_per_item=None).fit(np.array(HAND_USERS), np.array(HAND_ITEMS), 4)
    np.testing.assert_array_equal(swing.neighbors_, [[1, 2, -1], [0, 2, 3], [1, 0, 3], [1, 2, -1]])
    f = float
    expected = [[f(Fraction(11, 12)), 0.25, 0.0], [f(Fraction(11, 12)), f(Fraction(5, 6)), 0.25],
                [f(Fraction(5, 6)), 0.25, 0.25], [0.25, 0.25, 0.0]]
    np.testing.assert_allclose(swing.scores_, expected, rtol=1e-6)
    assert swing.scores_.dtype == np.float32 and swing.neighbors_.dtype == np.int64
    assert swing.n_users_ == 4 and swing.n_items_ == 4 and swing.n_capped_items_ == 0

    frame = swing.to_frame()
    assert list(frame.columns) == ["item", "neighbor", "score"]
    assert len(frame) == 10  # 5 scored unordered pairs, both directions
    assert len(swing.to_frame(min_score=0.5)) == 4  # (0,1), (1,0), (1,2), (2,1)
    assert swing.to_frame(top_n=1)["neighbor"].tolist() == [1, 0, 1, 1]


def test_alpha_zero_and_duplicates_count_once():
    """alpha = 0 divides by the overlap alone (always >= 2 for a scoring pair); repeated events are one edge."""
    users = np.array(HAND_USERS + [0, 0, 2])
    items = np.array(HAND_ITEMS + [0, 1, 3])
    swing = Swing(alpha=0.0, top_n=3, max_users_per_item=None).fit(users, items, 4)
    # swing(0,1) = 1/2 + 1/3 + 1/2
    assert swing.scores_[0, 0] == pytest.approx(4 / 3, rel=1e-6)


def _brute_force(users, items, n_items, alpha):
    by_user = {u: set(items[users == u]) for u in np.unique(users)}
    by_item = {i: set(users[items == i]) for i in range(n_items)}
    scores = np.zeros((n_items, n_items))
    for i, j in itertools.permutations(range(n_items), 2):
        for u, v in itertools.combinations(sorted(by_item[i] & by_item[j]), 2):
            scores[i, j] += 1.0 / (alpha + len(by_user[u] & by_user[v]))
    return scores


def _dense(swing, n_items):
    out = np.zeros((n_items, n_items))
    rows, cols = np.nonzero(swing.neighbors_ >= 0)
    out[rows, swing.neighbors_[rows, cols]] = swing.scores_[rows, cols]
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 2048])
def test_matches_brute_force_on_random_data(chunk_size):
    rng = np.random.default_rng(3)
    n_users, n_items = 40, 18
    users = rng.integers(0, n_users, 400) * 10 + 5  # sparse, non-dense user ids are fine
    items = rng.integers(0, n_items, 400)
    swing = Swing(alpha=0.5, top_n=n_items, max_users_per_item=None, chunk_size=chunk_size)
    swing.fit(users, items, n_items)
    expected = _brute_force(users, items, n_items, 0.5)
    np.testing.assert_allclose(_dense(swing, n_items), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expected, expected.T)  # symmetric by construction


def test_top_n_keeps_the_best_by_score_then_id():
    rng = np.random.default_rng(5)
    users, items = rng.integers(0, 30, 300), rng.integers(0, 12, 300)
    full = Swing(top_n=12, max_users_per_item=None).fit(users, items, 12)
    top = Swing(top_n=3, max_users_per_item=None).fit(users, items, 12)
    np.testing.assert_array_equal(top.neighbors_, full.neighbors_[:, :3])
    scores = full.scores_
    assert (np.diff(scores, axis=1) <= 0).all()


def test_cap_keeps_the_most_recent_users():
    """Item 1 has users 0..3; with a cap of 3 and ``time``, user 0 (its oldest) leaves item 1 only.

    Capped matrix: I_0 = {0, 2}, I_1 = {0, 1}, I_2 = {0, 1, 2, 3}, I_3 = {1, 2, 3}, so U_1 = {1, 2, 3} and
    swing(0, 1) = pair (1, 2) only (overlap {0, 1} = 2) = 1 / 3.
    """
    time = np.arange(len(HAND_USERS))
    time[1] = -1  # user 0 met item 1 first of all
    swing = Swing(alpha=1.0, top_n=3, max_users_per_item=3).fit(np.array(HAND_USERS), np.array(HAND_ITEMS), 4,
                                                                 time=time)
    assert swing.n_capped_items_ == 1
    row = dict(zip(swing.neighbors_[0].tolist(), swing.scores_[0].tolist()))
    assert row[1] == pytest.approx(1 / 3, rel=1e-6)
    # Without time the cap is a seeded random draw: reproducible, and still 3 users on item 1.
    a = Swing(max_users_per_item=3, random_state=1).fit(np.array(HAND_USERS), np.array(HAND_ITEMS), 4)
    b = Swing(max_users_per_item=3, random_state=1).fit(np.array(HAND_USERS), np.array(HAND_ITEMS), 4)
    np.testing.assert_array_equal(a.neighbors_, b.neighbors_)


def test_no_pairs_gives_padding():
    swing = Swing(top_n=2).fit(np.array([0, 1]), np.array([0, 1]), 3)
    assert (swing.neighbors_ == -1).all() and (swing.scores_ == 0).all()
    assert swing.to_frame().empty


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"top_n": 0}, "The 'top_n' parameter of Swing must be an int >= 1. Got 0 instead."),
        ({"alpha": -1.0}, "The 'alpha' parameter of Swing must be a float >= 0. Got -1.0 instead."),
        ({"max_users_per_item": 1}, "The 'max_users_per_item' parameter of Swing must be an int >= 2 or None. Got 1"),
        ({"chunk_size": 2.5}, "The 'chunk_size' parameter of Swing must be an int >= 1. Got 2.5 instead."),
    ],
)
def test_bad_parameters(params, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Swing(**params).fit(np.array([0]), np.array([0]), 1)


def test_bad_events_and_not_fitted():
    with pytest.raises(DataError, match=r"item ids must lie in \[0, 2\)"):
        Swing().fit(np.array([0, 1]), np.array([0, 2]), 2)
    with pytest.raises(DataError, match="1-D and of one length"):
        Swing().fit(np.array([0, 1]), np.array([0]), 2)
    with pytest.raises(QarmError, match="not fitted yet"):
        Swing().to_frame()

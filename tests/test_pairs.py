"""Pair mining: triggers never come from the target's future, nor from valid / test / cold-start events;
union and hold-out split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qarm.align.pairs import (
    PairMiningConfig,
    fit_swing,
    mine_pairs,
    mine_user2item_pairs,
    split_pairs,
    swing_pairs,
    union_pairs,
)
from qarm.align.user2item import positive_events
from qarm.data.prepare import prepare_dataset
from qarm.data.schema import Dataset, DatasetMeta
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.errors import ConfigError, DataError

N_ITEMS = 16


def _hand_dataset() -> Dataset:
    """Three users, hand-placed events (user, seq, item, split, positive):

    user 0: seq 0 item 0, seq 1 item 1, seq 2 item 2, seq 3 item 3 (all train); plus a same-seq positive
            (seq 2, item 4) and a sampled negative (seq 3, item 5)
    user 1: seq 0 item 6 (train), seq 1 item 7 (valid), seq 2 item 9 (train, cold item), seq 3 item 8 (train)
    users 1, 2 both have items 10 and 11 only in valid / test: Swing on all data would pair them
    user 2: seq 0 item 12 (train), seq 1 item 13 (train), seq 2 item 10 (valid), seq 3 item 11 (test)
    """
    rows = [  # user, seq, item, split, click, sampled_negative
        (0, 0, 0, "train", 1, False), (0, 1, 1, "train", 1, False), (0, 2, 2, "train", 1, False),
        (0, 2, 4, "train", 1, False), (0, 3, 3, "train", 1, False), (0, 3, 5, "train", 0, True),
        (1, 0, 6, "train", 1, False), (1, 1, 7, "valid", 1, False), (1, 2, 9, "train", 1, False),
        (1, 3, 8, "train", 1, False), (1, 4, 10, "valid", 1, False), (1, 5, 11, "test", 1, False),
        (2, 0, 12, "train", 1, False), (2, 1, 13, "train", 1, False), (2, 2, 10, "valid", 1, False),
        (2, 3, 11, "test", 1, False),
    ]
    inter = pd.DataFrame(rows, columns=["user_id", "seq", "item_id", "split", "click", "sampled_negative"])
    inter["time"] = inter["seq"]
    inter["split"] = pd.Categorical(inter["split"], categories=["train", "valid", "test"])
    inter["click"] = inter["click"].astype(np.int8)
    cold = np.zeros(N_ITEMS, dtype=bool)
    cold[9] = True
    inter["cold_item"] = cold[inter["item_id"].to_numpy()]
    items = pd.DataFrame({"item_id": np.arange(N_ITEMS), "cold_start": cold})
    users = pd.DataFrame({"user_id": np.arange(3)})
    meta = DatasetMeta(name="hand", source="test", loader="test", label_columns=["click"], time_unit="order")
    return Dataset(items=items, interactions=inter, users=users, meta=meta)


def _hand_embeddings() -> np.ndarray:
    """Item 2's nearest items are its future (3) and its same-seq twin (4); item 1 is the best allowed one.
    Item 8's nearest are the valid item 7 and the cold item 9; item 6 is the allowed one."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(N_ITEMS, 8))
    e = base / np.linalg.norm(base, axis=1, keepdims=True)
    e[3] = e[2] + 0.01 * base[3]
    e[4] = e[2] + 0.01 * base[4]
    e[1] = e[2] + 0.6 * base[1]
    e[0] = -e[2]
    e[7] = e[8] + 0.01 * base[7]
    e[9] = e[8] + 0.01 * base[9]
    e[6] = e[8] + 0.8 * base[6]
    return e


def test_trigger_is_never_at_or_after_the_target_nor_outside_train():
    dataset = _hand_dataset()
    pairs = mine_user2item_pairs(dataset, _hand_embeddings(), min_similarity=None)
    by_target = {(u, t): trig for u, t, trig in zip(pairs["user_id"], pairs["target_seq"], pairs["trigger"])}
    assert by_target[(0, 2)] == 1  # not 3 (future) nor 4 (same seq), although both are closer
    assert by_target[(0, 3)] in (2, 4)  # both are earlier than seq 3; 4 is not a self-pair
    assert (0, 0) not in by_target  # no earlier candidate
    assert by_target[(1, 3)] == 6  # not 7 (valid row) nor 9 (cold item)
    assert not pairs["trigger"].isin([5, 7, 9, 10, 11]).any() and not pairs["target"].isin([5, 7, 9, 10, 11]).any()
    assert (pairs["trigger_seq"] < pairs["target_seq"]).all()
    assert set(pairs.columns) >= {"trigger", "target", "score", "source", "user_id", "trigger_seq", "target_seq"}
    assert (pairs["source"] == "user2item").all()


def test_history_len_and_threshold():
    dataset = _hand_dataset()
    embeddings = _hand_embeddings()
    short = mine_user2item_pairs(dataset, embeddings, history_len=1, min_similarity=None)
    # With one candidate, the trigger of (user 0, seq 3) is the latest earlier positive (seq 2: item 2 or 4).
    row = short[(short["user_id"] == 0) & (short["target_seq"] == 3)]
    assert row["trigger_seq"].tolist() == [2]
    strict = mine_user2item_pairs(dataset, embeddings, min_similarity=0.9)
    assert (strict["score"] >= 0.9).all() and len(strict) < len(short) + 10
    with pytest.raises(ConfigError, match="The 'history_len' parameter of mine_user2item_pairs must be an int >= 1"):
        mine_user2item_pairs(dataset, embeddings, history_len=0)
    with pytest.raises(DataError, match=r"item_embeddings must be \(n_items, dim\) = \(16, dim\), got \(3, 8\)"):
        mine_user2item_pairs(dataset, embeddings[:3])


def test_swing_pairs_use_training_events_only():
    dataset = _hand_dataset()
    pairs = swing_pairs(fit_swing(dataset, max_users_per_item=None))
    # 10 and 11 share two users, but only in valid / test: no pair; nothing else has two common users.
    assert pairs.empty


@pytest.fixture(scope="module")
def synthetic():
    return prepare_dataset(generate(SyntheticConfig(n_items=600, n_users=300, n_interactions=30_000)))


def test_mined_pairs_on_random_data(synthetic):
    """Property: for every mined pair the trigger is a training positive of the same user, earlier than the
    target, among its latest ``history_len`` earlier positives, and the most similar of them."""
    history_len = 5
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(synthetic.n_items, 16)).astype(np.float32)
    pairs = mine_user2item_pairs(synthetic, embeddings, history_len=history_len, min_similarity=None)
    events = positive_events(synthetic, "train")
    assert len(pairs) > 100
    assert (pairs["trigger_seq"] < pairs["target_seq"]).all()
    assert (pairs["trigger"] != pairs["target"]).all()

    # Brute force on every row: rebuild the candidates with a plain loop over the user's events.
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    per_user = {u: (events.seq[events.user_ids == u], events.item_ids[events.user_ids == u])
                for u in np.unique(pairs["user_id"])}
    for user, target, t_seq, trigger, trig_seq, score in zip(
        pairs["user_id"], pairs["target"], pairs["target_seq"], pairs["trigger"], pairs["trigger_seq"], pairs["score"]
    ):
        seqs, items = per_user[user]
        assert target in items[seqs == t_seq]
        earlier = seqs < t_seq
        cand_items, cand_seqs = items[earlier][-history_len:], seqs[earlier][-history_len:]
        assert trig_seq in cand_seqs and trigger == cand_items[cand_seqs == trig_seq][0]
        allowed = cand_items[cand_items != target]
        best = (unit[allowed] @ unit[target]).max()
        assert score == pytest.approx(best, abs=1e-5)

    # Every event of a mined pair is a training, non-cold positive.
    inter = synthetic.interactions
    key = inter.set_index(["user_id", "seq"])
    for column, seq in (("trigger", "trigger_seq"), ("target", "target_seq")):
        merged = pairs[["user_id", column, seq]].merge(
            inter, left_on=["user_id", seq, column], right_on=["user_id", "seq", "item_id"], how="left")
        assert (merged["split"] == "train").all() and (~merged["cold_item"].astype(bool)).all()
        assert (merged["click"] == 1).all()
    assert len(key) == len(inter)


def test_mine_pairs_union_has_no_cold_items_and_counts(synthetic):
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(synthetic.n_items, 16)).astype(np.float32)
    config = PairMiningConfig(min_similarity=0.0, holdout_fraction=0.1, swing_top_n=10)
    mined = mine_pairs(synthetic, embeddings, config)
    cold = synthetic.items["cold_start"].to_numpy()
    union = mined.pairs
    assert not cold[union["trigger"]].any() and not cold[union["target"]].any()
    assert (union["trigger"] < union["target"]).all()
    assert not union.duplicated(["trigger", "target"]).any()
    counts = mined.counts
    assert counts["cold_pairs_dropped"] == 0
    assert counts["union"] == len(union) == counts["train"] + counts["holdout"]
    assert counts["user2item_pairs"] + counts["swing_pairs"] - counts["both"] == counts["union"]
    assert counts["user2item_pairs"] > 0 and counts["swing_pairs"] > 0
    assert abs(counts["holdout"] - round(0.1 * len(union))) == 0
    # Only items with training positives appear.
    trained = np.zeros(synthetic.n_items, dtype=bool)
    trained[positive_events(synthetic, "train").item_ids] = True
    assert trained[union["trigger"]].all() and trained[union["target"]].all()


def test_union_dedups_unordered_and_records_sources():
    u2i = pd.DataFrame({"trigger": [1, 2, 3, 5, 4], "target": [2, 1, 3, 6, 9], "score": [0.9, 0.8, 1.0, 0.7, 0.6],
                        "source": "user2item"})
    swing = pd.DataFrame({"trigger": [2, 1, 7], "target": [1, 2, 8], "score": [3.0, 3.0, 0.5], "source": "swing"})
    union = union_pairs(u2i, swing)
    assert union[["trigger", "target"]].values.tolist() == [[1, 2], [4, 9], [5, 6], [7, 8]]  # self-pair 3-3 dropped
    assert union["sources"].tolist() == ["swing,user2item", "user2item", "user2item", "swing"]
    assert union["score_user2item"].iloc[0] == pytest.approx(0.9)
    assert union["support_user2item"].tolist() == [2, 1, 1, 0]
    assert union["support_swing"].tolist() == [2, 0, 0, 1]
    assert np.isnan(union["score_swing"].iloc[1])
    only_u2i = union_pairs(u2i, swing.iloc[:0], sources=("swing", "user2item"))
    assert list(only_u2i.columns) == ["trigger", "target", "sources", "score_swing", "support_swing",
                                      "score_user2item", "support_user2item"]
    assert only_u2i["score_swing"].isna().all() and (only_u2i["support_swing"] == 0).all()
    with pytest.raises(DataError, match=r"pair frame 0 lacks column\(s\) \['score', 'source'\]"):
        union_pairs(pd.DataFrame({"trigger": [1], "target": [2]}))


def test_split_pairs_is_seeded_and_disjoint():
    pairs = pd.DataFrame({"trigger": np.arange(100), "target": np.arange(100) + 1000})
    train, holdout = split_pairs(pairs, 0.2, seed=4)
    again, _ = split_pairs(pairs, 0.2, seed=4)
    other, _ = split_pairs(pairs, 0.2, seed=5)
    assert len(holdout) == 20 and len(train) == 80
    assert set(train["trigger"]).isdisjoint(holdout["trigger"])
    pd.testing.assert_frame_equal(train, again)
    assert not train.equals(other)
    with pytest.raises(ConfigError, match=r"The 'holdout_fraction' parameter of split_pairs must be in \[0, 1\)"):
        split_pairs(pairs, 1.0)


def test_split_holdout_keeps_the_test_pairs_apart_from_early_stopping() -> None:
    from qarm.align.stage import split_holdout

    holdout = pd.DataFrame({"trigger": np.arange(100), "target": np.arange(100) + 1000, "score": 0.5})
    stopping, test = split_holdout(holdout, 30, seed=0)
    assert len(stopping) == 30 and len(test) == 70
    keys = lambda f: set(zip(f["trigger"], f["target"]))  # noqa: E731
    assert not keys(stopping) & keys(test) and keys(stopping) | keys(test) == keys(holdout)
    again, _ = split_holdout(holdout, 30, seed=0)
    pd.testing.assert_frame_equal(again, stopping)  # seeded
    assert keys(split_holdout(holdout, 30, seed=1)[0]) != keys(stopping)
    small_stop, small_test = split_holdout(holdout.iloc[:9], 1024)
    assert (len(small_stop), len(small_test)) == (4, 5)  # never more than half for stopping

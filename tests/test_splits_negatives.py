"""Splits, the cold-start hold-out, long-tail groups and negative sampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qarm.data import schema as S
from qarm.data.build import assemble
from qarm.data.negatives import (
    NegativeConfig,
    add_sampled_negatives,
    sample_excluding,
    sampling_weights,
    training_counts,
    training_rates,
)
from qarm.data.prepare import PrepareConfig, prepare_dataset
from qarm.data.schema import DatasetMeta
from qarm.data.splits import SplitConfig, leave_last_out, longtail_groups, split_dataset, time_split
from qarm.errors import ConfigError, DataError


def implicit_dataset(n_users=300, n_items=200, events=20, seed=0, time_unit="order"):
    """Positive-only events with Zipf-ish item popularity."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1)
    rows = []
    for u in range(n_users):
        k = rng.integers(1, events + 1)
        chosen = rng.choice(n_items, size=min(k, n_items), replace=False, p=pop / pop.sum())
        times = np.sort(rng.integers(0, 10_000, size=len(chosen))) if time_unit == "seconds" else np.arange(len(chosen))
        rows += [(u, i, t) for i, t in zip(chosen, times)]
    inter = pd.DataFrame(rows, columns=["user", "item", "time"])
    inter["click"] = np.int8(1)
    items = pd.DataFrame({"source_id": np.arange(n_items), "title": "x"})
    meta = DatasetMeta(name="imp", source="t", loader="t", text_columns=["title"], label_columns=["click"],
                       positive_only=True, time_unit=time_unit)
    return assemble(items=items, interactions=inter, meta=meta)


def test_leave_last_out_hand_case():
    # user 0: 4 events, user 1: 2 events, user 2: 1 event, user 3: 3 events (seq 1 shared by a negative)
    users = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    seq = np.array([0, 1, 2, 3, 0, 1, 0, 0, 1, 1, 2])
    codes = leave_last_out(users, seq)
    assert codes.tolist() == [0, 0, 1, 2, 0, 2, 0, 0, 1, 1, 2]


def test_time_split_never_puts_train_after_test():
    time = np.random.default_rng(0).integers(0, 1_000_000, size=10_000)
    codes, (valid_from, test_from) = time_split(time, 0.1, 0.1)
    assert time[codes == 0].max() < time[codes == 1].min() <= time[codes == 1].max() < time[codes == 2].min()
    assert abs((codes == 2).mean() - 0.1) < 0.01 and abs((codes == 1).mean() - 0.1) < 0.01
    assert time[codes == 2].min() == test_from and time[codes == 1].min() == valid_from


def test_time_split_on_one_timestamp_is_an_error():
    with pytest.raises(DataError, match="all events share one timestamp"):
        time_split(np.zeros(10, dtype=np.int64), 0.1, 0.1)


def test_longtail_groups_hand_case():
    counts = np.array([0, 1, 1, 2, 4, 0, 8])  # total 16 over 5 seen items -> two groups of ~8
    groups, bounds = longtail_groups(counts, 2)
    assert groups.tolist() == [0, 1, 1, 1, 1, 0, 2]
    assert bounds == [{"group": 1, "items": 4, "events": 8, "min_count": 1, "max_count": 4},
                      {"group": 2, "items": 1, "events": 8, "min_count": 8, "max_count": 8}]


def test_split_dataset_cold_items_never_train_and_groups_from_train_counts():
    ds = split_dataset(implicit_dataset(), SplitConfig(cold_item_fraction=0.1, seed=3))
    inter, items = ds.interactions, ds.items
    cold = items[S.COLD_START].to_numpy()
    assert cold.sum() == round(0.1 * inter[S.ITEM_ID].nunique())
    train = inter[ds.training_mask()]
    assert not np.isin(train[S.ITEM_ID], np.flatnonzero(cold)).any()
    assert (items.loc[cold, S.LONGTAIL_GROUP] == 0).all()
    counts = np.bincount(train[S.ITEM_ID], minlength=len(items))
    g = items[S.LONGTAIL_GROUP].to_numpy()
    for a in range(1, 6):  # every item of a rarer group is at most as frequent as any of the next group
        assert counts[g == a].max() <= counts[g == a + 1].min()
    record = ds.meta.prepared["split"]
    assert record["strategy"] == "leave_last_out" and record["cold_items"] == int(cold.sum())


def test_predefined_split_uses_the_source_parts():
    ds = implicit_dataset()
    ds.interactions["source_part"] = np.where(np.arange(len(ds.interactions)) % 3 == 0, "test", "validation")
    out = split_dataset(ds, SplitConfig(predefined_valid_fraction=0.2))
    split = out.interactions[S.SPLIT].astype(str).to_numpy()
    assert (split[ds.interactions["source_part"] == "test"] == "test").all()
    rest = split[ds.interactions["source_part"] == "validation"]
    assert abs((rest == "valid").mean() - 0.2) < 0.01


def test_negatives_exclude_user_items_and_copy_the_impression():
    ds = prepare_dataset(implicit_dataset(), PrepareConfig(negatives=NegativeConfig(ratio=3, seed=1)))
    inter = ds.interactions
    neg = inter[inter[S.SAMPLED_NEGATIVE]]
    pos = inter[~inter[S.SAMPLED_NEGATIVE]]
    assert len(neg) == 3 * len(pos)
    assert (neg["click"] == 0).all() and (pos["click"] == 1).all()
    # a row's negatives avoid the user's items of its split and the splits before it (train < valid < test)
    order = {"train": 0, "valid": 1, "test": 2}
    pos_rank = pos[S.SPLIT].astype(str).map(order).to_numpy()
    neg_rank = neg[S.SPLIT].astype(str).map(order).to_numpy()
    for rank in range(3):
        known = set(zip(pos[S.USER_ID][pos_rank <= rank], pos[S.ITEM_ID][pos_rank <= rank]))
        chosen = neg_rank == rank
        assert chosen.any()
        assert not any(pair in known for pair in zip(neg[S.USER_ID][chosen], neg[S.ITEM_ID][chosen]))
    # each negative shares user, seq, time and split with exactly one positive
    key = [S.USER_ID, S.SEQ]
    merged = neg.merge(pos[key + [S.TIME, S.SPLIT]], on=key, suffixes=("", "_pos"), validate="many_to_one")
    assert (merged[S.TIME] == merged[S.TIME + "_pos"]).all()
    assert (merged[S.SPLIT].astype(str) == merged[S.SPLIT + "_pos"].astype(str)).all()
    cold = ds.items[S.COLD_START].to_numpy()
    assert (neg[S.COLD_ITEM].to_numpy() == cold[neg[S.ITEM_ID].to_numpy()]).all()
    assert ds.meta.prepared["negatives"]["sampler"] == "popularity"


def test_popularity_sampler_follows_its_weights():
    n_items = 50
    weights = np.arange(1, n_items + 1, dtype=float) ** 1.0
    users = np.arange(2000) % 7 + 10_000  # users without items: nothing excluded
    draws = sample_excluding(users, np.zeros_like(users), n_items, weights, ratio=50, seed=0)
    draws = draws[draws != 0]  # item 0 is each user's positive and is excluded
    freq = np.bincount(draws, minlength=n_items)[1:] / len(draws)
    expected = weights[1:] / weights[1:].sum()
    assert np.abs(freq - expected).max() < 0.003


def test_sampling_is_deterministic_by_seed():
    ds = implicit_dataset()
    a = add_sampled_negatives(split_dataset(ds, SplitConfig()), NegativeConfig(seed=5)).interactions
    b = add_sampled_negatives(split_dataset(implicit_dataset(), SplitConfig()), NegativeConfig(seed=5)).interactions
    c = add_sampled_negatives(split_dataset(implicit_dataset(), SplitConfig()), NegativeConfig(seed=6)).interactions
    pd.testing.assert_frame_equal(a, b)
    assert not a[S.ITEM_ID].equals(c[S.ITEM_ID])


def test_user_who_saw_every_item_gets_a_clear_error():
    items = pd.DataFrame({"source_id": ["a", "b"], "title": ["x", "y"]})
    inter = pd.DataFrame({"user": ["greedy", "greedy", "ok"], "item": ["a", "b", "a"], "time": [0, 1, 0],
                          "click": np.int8(1)})
    meta = DatasetMeta(name="t", source="t", loader="t", text_columns=["title"], label_columns=["click"],
                       positive_only=True)
    ds = split_dataset(assemble(items=items, interactions=inter, meta=meta), SplitConfig(cold_item_fraction=0.0))
    with pytest.raises(DataError, match=r"users have interacted with every item.*offending: \[0\]"):
        add_sampled_negatives(ds, NegativeConfig())


def test_negatives_need_the_split_first():
    with pytest.raises(DataError, match="split the dataset first"):
        add_sampled_negatives(implicit_dataset(), NegativeConfig())


def test_popularity_weights_are_training_counts_plus_smoothing_hand_case():
    # user u1: a, a (train), b (valid), c (test); user u2: a, c (train), d (valid), b (test)
    items = pd.DataFrame({"source_id": ["a", "b", "c", "d"], "title": ["w", "x", "y", "z"]})
    inter = pd.DataFrame({"user": ["u1", "u1", "u1", "u1", "u2", "u2", "u2", "u2"],
                          "item": ["a", "a", "b", "c", "a", "c", "d", "b"], "time": [0, 1, 2, 3, 0, 1, 2, 3],
                          "click": np.int8(1)})
    meta = DatasetMeta(name="t", source="t", loader="t", text_columns=["title"], label_columns=["click"],
                       positive_only=True)
    ds = split_dataset(assemble(items=items, interactions=inter, meta=meta), SplitConfig(cold_item_fraction=0.0))
    assert ds.interactions[S.SPLIT].astype(str).tolist() == ["train", "train", "valid", "test",
                                                               "train", "train", "valid", "test"]
    # training counts: a 3, b 0 (its events are valid / test only), c 1, d 0
    np.testing.assert_array_equal(training_counts(ds), [3, 0, 1, 0])
    plain = NegativeConfig(smoothing=0.5, popularity_alpha=2.0, unseen="smoothing")
    np.testing.assert_allclose(sampling_weights(ds, "popularity", plain), [3.5 ** 2, 0.25, 1.5 ** 2, 0.25])
    # Good-Turing: one of the 4 training events is of an item seen once -> unseen items get 1/4 of the
    # next draws: (1/4) / (3/4) of the seen items' weight (3.5^2 + 1.5^2 = 14.5), shared by b and d.
    turing = NegativeConfig(smoothing=0.5, popularity_alpha=2.0)
    np.testing.assert_allclose(sampling_weights(ds, "popularity", turing),
                               [3.5 ** 2, 14.5 / 3 / 2, 1.5 ** 2, 14.5 / 3 / 2])


def _perturb_evaluation_rows(ds, seed):
    """The same dataset with every valid / test positive moved to another random item."""
    inter = ds.interactions.copy()
    rows = np.flatnonzero(inter[S.SPLIT].astype(str).to_numpy() != "train")
    rng = np.random.default_rng(seed)
    inter.loc[rows, S.ITEM_ID] = rng.integers(0, ds.n_items, size=len(rows))
    return type(ds)(items=ds.items, interactions=inter, users=ds.users, meta=ds.meta)


@pytest.mark.parametrize("time_unit", ["order", "seconds"])
def test_training_negatives_do_not_depend_on_valid_or_test_rows(time_unit):
    split = split_dataset(implicit_dataset(time_unit=time_unit), SplitConfig(cold_item_fraction=0.0))
    config = NegativeConfig(ratio=4, seed=3)
    a = add_sampled_negatives(split, config).interactions
    b = add_sampled_negatives(_perturb_evaluation_rows(split, 1), config).interactions
    train_a, train_b = (x[(x[S.SPLIT].astype(str) == "train").to_numpy()] for x in (a, b))
    pd.testing.assert_frame_equal(train_a.reset_index(drop=True), train_b.reset_index(drop=True))
    test_a, test_b = (x[(x[S.SPLIT].astype(str) == "test").to_numpy() & x[S.SAMPLED_NEGATIVE].to_numpy()]
                      for x in (a, b))
    assert not test_a[S.ITEM_ID].reset_index(drop=True).equals(test_b[S.ITEM_ID].reset_index(drop=True))
    # whole-log counts (the old rule) would move the training weights with the test rows:
    whole_a = np.bincount(split.interactions[S.ITEM_ID], minlength=split.n_items)
    whole_b = np.bincount(_perturb_evaluation_rows(split, 1).interactions[S.ITEM_ID], minlength=split.n_items)
    assert not np.array_equal(whole_a, whole_b)


def test_items_are_never_negatives_before_they_exist():
    ds = implicit_dataset(time_unit="seconds", n_items=200)
    created = np.full(ds.n_items, -1, dtype=np.int64)
    late = np.arange(ds.n_items) % 2 == 1  # odd items appear at time 5,000
    created[late] = 5_000
    ds.items[S.CREATED_AT] = created
    inter = ds.interactions  # keep the data valid: no event on an item before it exists
    ok = ~(late[inter[S.ITEM_ID].to_numpy()] & (inter[S.TIME].to_numpy() < 5_000))
    ds = type(ds)(items=ds.items, interactions=inter.loc[ok].reset_index(drop=True), users=ds.users, meta=ds.meta)
    out = prepare_dataset(ds, PrepareConfig(split=SplitConfig(cold_item_fraction=0.0),
                                            negatives=NegativeConfig(ratio=4)))
    neg = out.interactions[out.interactions[S.SAMPLED_NEGATIVE]]
    drawn_created = created[neg[S.ITEM_ID].to_numpy()]
    assert (drawn_created <= neg[S.TIME].to_numpy()).all()
    after = neg[S.TIME].to_numpy() >= 5_000
    assert after.any() and late[neg[S.ITEM_ID].to_numpy()[after]].any()  # late items are drawn once they exist
    assert out.meta.prepared["negatives"]["created_at"]


@pytest.mark.parametrize("kwargs,message", [
    ({"valid_fraction": 1.5}, r"The 'valid_fraction' parameter of SplitConfig must be in \[0, 1\)\. Got 1\.5"),
    ({"valid_fraction": 0.5, "test_fraction": 0.5}, r"valid_fraction \+ test_fraction must be < 1"),
    ({"n_longtail_groups": 0}, r"'n_longtail_groups' parameter of SplitConfig must be an int >= 1\. Got 0"),
])
def test_bad_split_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SplitConfig(**kwargs)


def test_bad_negative_config():
    with pytest.raises(ConfigError, match=r"'ratio' parameter of NegativeConfig must be an int >= 1\. Got 0"):
        NegativeConfig(ratio=0)


def test_training_counts_become_rates_when_items_are_created_during_training():
    # train spans t = 0 .. 100; item 0 exists from the start (created -5), item 1 from t = 50, item 2 from
    # t = 99.5 (floored at 1% of the span), item 3 has no creation time (always existed).
    ds = implicit_dataset(time_unit="seconds")
    ds = split_dataset(ds, SplitConfig(cold_item_fraction=0.0))
    inter = ds.interactions
    train = (inter[S.SPLIT].astype(str) == "train").to_numpy()
    times = inter[S.TIME].to_numpy()[train]
    start, end = times.min(), times.max()
    created = np.full(ds.n_items, np.nan)
    created[[0, 1, 2]] = [start - 5, start + (end - start) / 2, end - 0.001 * (end - start)]
    ds.items[S.CREATED_AT] = created
    counts = np.zeros(ds.n_items)
    counts[[0, 1, 2, 3]] = [100, 50, 3, 7]
    rates = training_rates(ds, counts)
    np.testing.assert_allclose(rates[[0, 1, 3]], [100, 100, 7], rtol=1e-6)
    assert rates[2] == pytest.approx(3 / 0.01)
    ds.meta.time_unit = "order"  # no timestamps: the counts as they are
    np.testing.assert_array_equal(training_rates(ds, counts), counts)

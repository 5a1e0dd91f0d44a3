"""The synthetic generator: determinism, the contract, and the latent structure it promises."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.neighbors import NearestCentroid

from qarm.data.build import sequence_numbers
from qarm.data.io import load_dataset, save_dataset
from qarm.data.loaders import LOADERS, load
from qarm.data.synthetic import (
    SyntheticConfig,
    business_similarity,
    generate,
    topic_business_table,
)
from qarm.data.validate import validate_dataset
from qarm.errors import ConfigError

SMALL = dict(n_items=800, n_users=300, n_interactions=20_000)


@pytest.fixture(scope="module")
def default():
    """The embedded default dataset (5k items, 2k users, 200k exposures; well under a second)."""
    return generate(SyntheticConfig())


def _all_tables(dataset):
    return {"items": dataset.items, "users": dataset.users, "interactions": dataset.interactions,
            **{f"truth_{k}": v for k, v in dataset.ground_truth.items()}}


def test_same_seed_same_tables_and_other_seed_differs():
    a = _all_tables(generate(SyntheticConfig(seed=3, **SMALL)))
    b = _all_tables(generate(SyntheticConfig(seed=3, **SMALL)))
    c = _all_tables(generate(SyntheticConfig(seed=4, **SMALL)))
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)
    assert not a["items"]["title"].equals(c["items"]["title"])
    assert not a["interactions"]["item_id"].equals(c["interactions"]["item_id"])


def test_contract_and_meta(default):
    validate_dataset(default)
    meta = default.meta
    assert meta.loader == "synthetic" and meta.time_unit == "seconds" and meta.seed == 0
    assert meta.label_columns == ["click", "convert"] and meta.text_columns == ["title"]
    assert meta.user_feature_columns == ["age_bucket", "region"] and not meta.positive_only
    assert meta.config["n_items"] == 5000 and meta.config["interest_alpha"] == 0.1
    assert meta.counts == {"users": 2000, "items": 5000, "interactions": 200_000}
    assert list(default.items.columns) == ["item_id", "source_id", "title", "category", "created_at"]
    inter = default.interactions
    assert inter["click"].dtype == np.int8 and inter["convert"].dtype == np.int8
    assert inter["time"].dtype == np.int64 and default.items["created_at"].dtype == np.int64
    # Chronological per user, numbered by sequence_numbers.
    order = np.lexsort((inter["time"].to_numpy(), inter["user_id"].to_numpy()))
    assert np.array_equal(order, np.arange(len(inter)))
    assert np.array_equal(inter["seq"].to_numpy(), sequence_numbers(inter["user_id"].to_numpy()))
    assert (inter.groupby("user_id").size() >= 5).all()


def test_registered_loader_needs_no_source():
    spec = LOADERS["synthetic"]
    assert not spec.needs_source and spec.shared_folder is None
    dataset = load("synthetic", options={"seed": 1, **SMALL})
    assert dataset.n_items == 800 and dataset.n_users == 300 and dataset.n_interactions == 20_000


def test_ground_truth_is_aligned_and_calibrated(default):
    truth = default.ground_truth
    assert set(truth) == {"items", "users", "interactions", "topic_business"}
    items, users, inter = truth["items"], truth["users"], truth["interactions"]
    assert np.array_equal(items["item_id"], default.items["item_id"])
    assert np.array_equal(users["user_id"], default.users["user_id"])
    assert len(inter) == default.n_interactions
    assert [c for c in items.columns if c.startswith("b") and c[1:].isdigit()] == [f"b{k}" for k in range(16)]
    assert items["b0"].dtype == np.float32 and users["u15"].dtype == np.float32
    assert (items["topic_name"] == default.items["category"]).all()
    assert (users["top1_weight"] >= users["top2_weight"]).all()
    p_click, p_convert = inter["p_click"].to_numpy(), inter["p_convert"].to_numpy()
    assert p_click.dtype == np.float32 and ((p_click > 0) & (p_click < 1)).all()
    assert (p_convert <= p_click).all()
    # The labels were drawn from these probabilities.
    labels = default.interactions
    assert abs(labels["click"].mean() - p_click.mean()) < 0.005
    assert abs(labels["convert"].mean() - p_convert.mean()) < 0.005
    assert not (labels["convert"].astype(bool) & ~labels["click"].astype(bool)).any()


def test_label_rates_in_target_ranges(default):
    inter = default.interactions
    assert 0.10 <= inter["click"].mean() <= 0.30
    assert 0.02 <= inter["convert"].mean() <= 0.10
    assert 0.6 < default.ground_truth["interactions"]["interest_driven"].mean() < 0.75


def test_long_tail_and_skewed_activity(default):
    counts = np.sort(np.bincount(default.interactions["item_id"], minlength=default.n_items))[::-1]
    assert counts[: default.n_items // 10].sum() > 0.4 * counts.sum()
    per_user = default.interactions.groupby("user_id").size()
    assert per_user.max() > 5 * per_user.median()


def test_items_are_shown_only_after_creation_and_late_items_are_cold(default):
    inter = default.interactions
    created = default.items["created_at"].to_numpy()
    assert (inter["time"].to_numpy() > created[inter["item_id"].to_numpy()]).all()
    start = default.meta.config["start_time"]
    span = default.meta.config["time_span_seconds"]
    events = np.bincount(inter["item_id"], minlength=default.n_items)
    old = created < start
    late = created >= start + span * 3 // 4
    assert old.any() and late.any()
    assert events[late].mean() < 0.5 * events[old].mean()


def test_titles_cluster_by_topic(default):
    titles = default.items["title"].to_numpy()
    topics = default.ground_truth["items"]["topic"].to_numpy()
    features = TfidfVectorizer(token_pattern=r"[#\w]+").fit_transform(titles)
    half = len(titles) // 2
    model = NearestCentroid().fit(features[:half], topics[:half])
    purity = (model.predict(features[half:]) == topics[half:]).mean()
    assert purity > 0.9
    assert all("#" in t for t in titles[:50]) and default.items["title"].str.len().min() > 5


def test_business_groups_are_not_a_function_of_topic(default):
    table = topic_business_table(SyntheticConfig())
    assert set(table["kind"]) == {"split", "merge", "one_to_one"}
    truth = default.ground_truth["items"]
    regular = truth[~truth["random_business"]]
    assert (regular.groupby("topic")["business_group"].nunique() > 1).any()
    assert (regular.groupby("business_group")["topic"].nunique() > 1).any()
    # The map in the ground truth is the one the items follow.
    pairs = set(map(tuple, regular[["topic", "business_group"]].drop_duplicates().to_numpy().tolist()))
    assert pairs == set(map(tuple, table[["topic", "business_group"]].to_numpy().tolist()))
    assert 0.03 < truth["random_business"].mean() < 0.07


def test_business_similarity_follows_groups(default):
    truth = default.ground_truth["items"]
    group = truth["business_group"].to_numpy()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(truth), (2, 5000))
    sim = business_similarity(truth, a, b)
    assert sim.shape == (5000,) and sim.dtype == np.float32
    same = group[a] == group[b]
    assert sim[same].mean() > 0.7 > 0.2 > sim[~same].mean()
    assert np.allclose(business_similarity(truth, [0, 1], [0, 1]), 1.0, atol=1e-5)


def test_clicks_concentrate_on_top_interests(default):
    inter = default.interactions
    truth = default.ground_truth
    item_group = truth["items"]["business_group"].to_numpy()[inter["item_id"].to_numpy()]
    top1 = truth["users"]["top1_group"].to_numpy()[inter["user_id"].to_numpy()]
    on_top = item_group == top1
    click = inter["click"].to_numpy()
    assert on_top.mean() > 0.3
    assert click[on_top].mean() > 2 * click[~on_top].mean()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_items": 0}, "n_items must be >= 1, got 0"),
        ({"n_users": -2}, "n_users must be >= 1, got -2"),
        ({"label_noise": 1.5}, "label_noise must be in [0, 1], got 1.5"),
        ({"interest_alpha": 0.0}, "interest_alpha must be > 0, got 0.0"),
        ({"n_topics": 99}, "n_topics must be <= 24"),
        ({"n_topics": 4}, "n_split_topics + 2 * n_merged_pairs must be <= n_topics (4), got 9"),
        ({"n_users": 10, "n_interactions": 49}, "n_interactions must be >= n_users * min_user_exposures (50)"),
        ({"initial_item_fraction": 0.0}, "initial_item_fraction must be in (0, 1], got 0.0"),
    ],
)
def test_bad_parameters_raise_config_error(options, message):
    with pytest.raises(ConfigError) as info:
        SyntheticConfig(**options)
    assert message in str(info.value)


def test_bad_loader_options_raise_config_error():
    with pytest.raises(ConfigError, match="n_items must be >= 1, got 0"):
        load("synthetic", options={"n_items": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        load("synthetic", options={"n_item": 10})


def test_tiny_configs_work():
    dataset = generate(SyntheticConfig(n_items=1, n_users=1, n_interactions=5, n_topics=1, n_split_topics=0,
                                       n_merged_pairs=0))
    assert dataset.n_items == 1 and dataset.n_interactions == 5
    assert (dataset.ground_truth["users"]["top2_group"] == -1).all()
    split_only = generate(SyntheticConfig(n_items=50, n_users=5, n_interactions=100, n_topics=1, n_split_topics=1,
                                          n_merged_pairs=0))
    assert split_only.ground_truth["items"]["business_group"].nunique() == 2


def test_save_load_round_trip_keeps_ground_truth(tmp_path):
    dataset = generate(SyntheticConfig(**SMALL))
    folder = save_dataset(dataset, tmp_path / "synthetic")
    loaded = load_dataset(folder, ground_truth=True)
    assert loaded.meta.config == dataset.meta.config and loaded.meta.seed == 0
    for name in ("items", "users", "interactions"):
        pd.testing.assert_frame_equal(getattr(loaded, name), getattr(dataset, name), obj=name)
    assert set(loaded.ground_truth) == set(dataset.ground_truth)
    for name, table in dataset.ground_truth.items():
        pd.testing.assert_frame_equal(loaded.ground_truth[name], table, obj=name)


def test_word_lists_are_distinct_per_topic():
    words = json.loads(resources.files("qarm.data").joinpath("synthetic_words.json").read_text(encoding="utf-8"))
    topics = words["topics"]
    assert len(topics) >= 20
    owner: dict[str, str] = {}
    for topic in topics:
        assert len(topic["words"]) == 30 and len(set(topic["words"])) == 30, topic["name"]
        for word in topic["words"]:
            assert word not in owner, f"{word!r} is in {owner.get(word)!r} and {topic['name']!r}"
            owner[word] = topic["name"]

"""The two-tower User2Item model: histories, loss, training beats popularity, cold items, save / load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qarm.align.user2item import (
    TwoTower,
    User2ItemConfig,
    evaluate_popularity,
    evaluate_user2item,
    gather_histories,
    history_windows,
    in_batch_softmax_loss,
    item_embeddings,
    load_user2item,
    positive_events,
    recommend_frame,
    save_user2item,
    train_user2item,
)
from qarm.data.prepare import prepare_dataset
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.errors import ConfigError, DataError

# Small enough to train in seconds, large enough for interest structure to beat popularity clearly.
SYNTHETIC = SyntheticConfig(n_items=600, n_users=500, n_interactions=30_000)
FAST = dict(dim=32, hidden_dim=64, epochs=5, batch_size=256, lr=5e-3, history_len=20, temperature=0.1)


@pytest.fixture(scope="module")
def synthetic():
    return prepare_dataset(generate(SYNTHETIC))


@pytest.fixture(scope="module")
def trained(synthetic):
    return train_user2item(synthetic, User2ItemConfig(**FAST), progress=False)


def test_history_windows_are_strictly_before_and_right_aligned():
    class Events:  # two users: user 0 at seq 0, 2, 5, 6; user 1 at seq 1, 3
        user_ids = np.array([0, 0, 0, 0, 1, 1])
        seq = np.array([0, 2, 5, 6, 1, 3])
        item_ids = np.array([10, 11, 12, 13, 20, 21])

    start, end = history_windows(Events, np.array([0, 0, 0, 1, 1, 2]), np.array([0, 5, 9, 3, 0, 4]), 2)
    # (0, seq 0): nothing before; (0, 5): seq 0, 2; (0, 9): the last two (5, 6); (1, 3): seq 1; (1, 0): none;
    # user 2 has no events at all.
    np.testing.assert_array_equal(start, [0, 0, 2, 4, 4, 6])
    np.testing.assert_array_equal(end, [0, 2, 4, 5, 4, 6])
    histories = gather_histories(Events.item_ids, start, end, 3, pad=99)
    np.testing.assert_array_equal(
        histories, [[99, 99, 99], [99, 10, 11], [99, 12, 13], [99, 99, 20], [99, 99, 99], [99, 99, 99]])


def test_loss_matches_a_hand_computation():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    items = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.8, 0.6]])
    ids = torch.tensor([5, 7, 5])  # rows 0 and 2 share item 5: not each other's negative
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.5]))
    loss = in_batch_softmax_loss(users, items, ids, 0.5, log_q)
    logits = (users @ items.T / 0.5 - log_q[None, :]).numpy()
    expected = 0.0
    for row, masked in ((0, 2), (1, None), (2, 0)):
        allowed = [c for c in range(3) if c != masked]
        expected += -logits[row, row] + math.log(sum(math.exp(logits[row, c]) for c in allowed))
    assert float(loss) == pytest.approx(expected / 3, rel=1e-5)


def _popularity_recall_by_hand(dataset, k):
    """Independent loop: rank non-cold items by training positives (ties by id), skip the user's own."""
    inter = dataset.interactions
    positive = (inter["click"] == 1) & ~inter["sampled_negative"]
    train = inter[positive & (inter["split"] == "train") & ~inter["cold_item"]]
    counts = train["item_id"].value_counts()
    cold = set(np.flatnonzero(dataset.items["cold_start"].to_numpy()))
    ranking = sorted((i for i in range(dataset.n_items) if i not in cold), key=lambda i: (-counts.get(i, 0), i))
    seen = train.groupby("user_id")["item_id"].apply(set).to_dict()
    valid = inter[positive & (inter["split"] == "valid") & ~inter["cold_item"]]
    hits = []
    for user, item in zip(valid["user_id"], valid["item_id"]):
        own = seen.get(user, set())
        top = [i for i in ranking if i not in own][:k]
        hits.append(item in top)
    return float(np.mean(hits)), len(hits)


def test_trains_and_beats_popularity(synthetic, trained):
    model, metrics = trained
    recall, n_events = _popularity_recall_by_hand(synthetic, 50)
    popularity = evaluate_popularity(synthetic, k=50)
    assert popularity["recall@50"] == pytest.approx(recall) and popularity["n_valid_events"] == n_events
    assert metrics["n_valid_events"] == n_events > 100
    assert metrics["epoch_loss"][-1] < metrics["epoch_loss"][0]
    assert metrics["recall@50"] > popularity["recall@50"] + 0.03, (metrics, popularity)
    assert 0 < metrics["ndcg@50"] < metrics["recall@50"]
    assert metrics["steps"] == FAST["epochs"] * (metrics["n_train_examples"] // FAST["batch_size"])
    again = evaluate_user2item(model, synthetic, k=50)
    assert again["recall@50"] == pytest.approx(metrics["recall@50"])


def test_cold_items_get_no_embedding_and_are_never_recommended(synthetic, trained):
    model, _ = trained
    cold = np.array(synthetic.items["cold_start"].to_numpy())
    assert cold.any()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the trainer's seed: the same initial table
        fresh = TwoTower(synthetic.n_items, synthetic.n_users, User2ItemConfig(**FAST), cold)
    weights = model.item_embedding.weight.detach()
    torch.testing.assert_close(weights[:-1][torch.from_numpy(cold)], fresh.item_embedding.weight[:-1][cold])
    assert not torch.equal(weights[:-1][torch.from_numpy(~cold)], fresh.item_embedding.weight[:-1][~cold])
    assert (weights[-1] == 0).all()  # the padding row

    vectors = item_embeddings(model)
    assert vectors.shape == (synthetic.n_items, FAST["dim"]) and vectors.dtype == np.float32
    assert (vectors[cold] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(vectors[~cold], axis=1), 1.0, rtol=1e-5)

    events = positive_events(synthetic, "train")
    history = events.item_ids[events.user_ids == events.user_ids[0]].tolist() + [int(np.flatnonzero(cold)[0])]
    items, scores = model.recommend(history, k=100)
    assert items.shape == (100,) and not cold[items].any()
    assert not set(items.tolist()) & set(history)
    assert (np.diff(scores) <= 1e-6).all()


def test_recommend_batches_and_pads(trained, synthetic):
    model, _ = trained
    cold = synthetic.items["cold_start"].to_numpy()
    warm = np.flatnonzero(~cold)[:3].tolist()
    items, scores = model.recommend([warm, []], k=synthetic.n_items + 5)
    assert items.shape == (2, synthetic.n_items + 5)
    assert (items[0] >= 0).sum() == (~cold).sum() - 3 and (items[1] >= 0).sum() == (~cold).sum()
    assert (items[:, -5:] == -1).all() and np.isneginf(scores[:, -5:]).all()
    frame = recommend_frame(model, {7: [1, 2, 3], 9: [4]}, k=5)
    assert frame["user_id"].tolist() == [7] * 5 + [9] * 5 and frame["rank"].tolist() == list(range(5)) * 2
    with pytest.raises(DataError, match=r"history item ids must lie in \[0, 600\)"):
        model.recommend([1, 5000])
    with pytest.raises(ConfigError, match="The 'k' parameter of recommend must be an int >= 1. Got 0 instead."):
        model.recommend([1], k=0)


def test_save_load_round_trip(trained, tmp_path):
    model, metrics = trained
    folder = save_user2item(model, tmp_path / "u2i", metrics=metrics)
    info = json.loads((folder / "config.json").read_text())
    assert info["config"]["dim"] == FAST["dim"] and info["n_items"] == model.n_items
    assert info["metrics"]["recall@50"] == pytest.approx(metrics["recall@50"])
    loaded = load_user2item(folder)
    np.testing.assert_array_equal(item_embeddings(loaded), item_embeddings(model))
    np.testing.assert_array_equal(loaded.recommend([1, 2, 3], k=10)[0], model.recommend([1, 2, 3], k=10)[0])
    assert torch.equal(loaded.cold_items, model.cold_items)
    with pytest.raises(DataError, match="not a saved User2Item model"):
        load_user2item(tmp_path / "missing")


def test_attention_pooling_and_user_embedding_train(synthetic):
    config = User2ItemConfig(**{**FAST, "epochs": 1, "pooling": "attention", "user_embedding": True,
                                "max_train_examples": 2000})
    model, metrics = train_user2item(synthetic, config, progress=False)
    assert metrics["n_train_examples"] == 2000 and np.isfinite(metrics["epoch_loss"]).all()
    items, _ = model.recommend([[1, 2]], k=3, user_ids=[0])
    assert items.shape == (1, 3)


def test_sparse_tables_train_lazily_and_as_well(synthetic, trained):
    """The sparse path (SparseAdam on the ID tables) still beats popularity by the same margin as the
    dense path, leaves the rows no batch read untouched (lazy: dense Adam moves every row), and the size
    rule picks it for large tables only."""
    from qarm.align.user2item import uses_sparse_embeddings
    from qarm.optim import SPARSE_ROWS

    config = User2ItemConfig(**FAST, sparse_embeddings=True, user_embedding=True)
    model, metrics = train_user2item(synthetic, config, progress=False)
    assert model.item_embedding.sparse and model.user_embedding.sparse
    popularity = evaluate_popularity(synthetic, k=50)
    assert metrics["recall@50"] > popularity["recall@50"] + 0.03, (metrics, popularity)
    assert metrics["recall@50"] > trained[1]["recall@50"] - 0.03, (metrics, trained[1])
    # Items with no training positive and never in a history are never read: their rows keep their init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        init = TwoTower(synthetic.n_items, synthetic.n_users, config).item_embedding.weight.detach()
    read = np.zeros(synthetic.n_items + 1, dtype=bool)
    events = positive_events(synthetic, "train", "click")
    read[events.item_ids] = True
    unread = np.flatnonzero(~read)
    assert len(unread) > 0
    torch.testing.assert_close(model.item_embedding.weight.detach()[unread], init[unread])
    assert not torch.equal(model.item_embedding.weight.detach()[read], init[read])
    assert not uses_sparse_embeddings(User2ItemConfig(), SPARSE_ROWS - 1)
    assert uses_sparse_embeddings(User2ItemConfig(), SPARSE_ROWS)
    assert not uses_sparse_embeddings(User2ItemConfig(sparse_embeddings=False), 10 * SPARSE_ROWS)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sparse_embeddings": True, "weight_decay": 0.1}, "SparseAdam has no weight decay"),
        ({"dim": 0}, "The 'dim' parameter of User2ItemConfig must be an int >= 1. Got 0 instead."),
        ({"batch_size": 1}, "The 'batch_size' parameter of User2ItemConfig must be an int >= 2"),
        ({"temperature": 0.0}, "The 'temperature' parameter of User2ItemConfig must be a float > 0. Got 0.0 instead."),
        ({"pooling": "max"}, "The 'pooling' parameter of User2ItemConfig must be one of \\['mean', 'attention'\\]"),
        ({"max_train_examples": 0}, "The 'max_train_examples' parameter of User2ItemConfig must be an int >= 2 or None"),
    ],
)
def test_bad_config(params, message):
    with pytest.raises(ConfigError, match=message):
        User2ItemConfig(**params)


def test_unknown_label(synthetic):
    with pytest.raises(ConfigError, match=r"unknown label column 'like'; available: \['click', 'convert'\]"):
        train_user2item(synthetic, User2ItemConfig(label="like"), progress=False)


def test_valid_split_without_positives_gives_nan(synthetic):
    empty = synthetic.interactions.copy()
    empty.loc[empty["split"] == "valid", "click"] = 0
    dataset = type(synthetic)(items=synthetic.items, interactions=empty, users=synthetic.users, meta=synthetic.meta)
    result = evaluate_popularity(dataset)
    assert result["n_valid_events"] == 0 and math.isnan(result["recall@50"])


def test_same_seed_same_model(synthetic):
    config = User2ItemConfig(**{**FAST, "epochs": 1, "max_train_examples": 1500, "seed": 3})
    first, _ = train_user2item(synthetic, config, progress=False)
    second, _ = train_user2item(synthetic, config, progress=False)
    np.testing.assert_array_equal(item_embeddings(first), item_embeddings(second))

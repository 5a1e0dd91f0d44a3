"""Ranking features: histories without look-ahead, the batch, example splits, item tables (OOV, codes)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from qarm.data import schema as S
from qarm.data.io import save_dataset
from qarm.data.prepare import prepare_dataset
from qarm.data.schema import Dataset, DatasetMeta
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.errors import ConfigError, DataError
from qarm.features import OOV, PAD, ExampleSource, HistoryIndex, ItemTables, RankingBatch
from qarm.quantize.api import QuantizeConfig, RQConfig, VQConfig, quantize_items

SYNTHETIC = SyntheticConfig(n_items=300, n_users=150, n_interactions=6000)
pytestmark = pytest.mark.filterwarnings("ignore:k-means of")  # tiny catalogues: few points per centroid


@pytest.fixture(scope="module")
def synthetic() -> Dataset:
    return prepare_dataset(generate(SYNTHETIC))


@pytest.fixture(scope="module")
def source(synthetic) -> ExampleSource:
    return ExampleSource(synthetic, history_length=20)


@pytest.fixture(scope="module")
def codes_dir(synthetic, tmp_path_factory):
    vectors = synthetic.ground_truth["items"][[f"b{j}" for j in range(16)]].to_numpy(np.float32)
    out = tmp_path_factory.mktemp("codes") / "quantize"
    quantize_items(vectors, None, out, QuantizeConfig(rq=RQConfig(codebook_size=8, levels=3), vq=VQConfig(k=5),
                                                      write_store=False))
    return out


def hand_dataset(rows: list[tuple], *, splits: list[str] | None = None, n_items: int = 10,
                 cold_items: tuple[int, ...] = ()) -> Dataset:
    """A prepared dataset from (user, item, time, seq, click, sampled_negative) tuples."""
    frame = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.TIME, S.SEQ, "click", S.SAMPLED_NEGATIVE])
    frame["click"] = frame["click"].astype(np.int8)
    frame[S.SAMPLED_NEGATIVE] = frame[S.SAMPLED_NEGATIVE].astype(bool)
    frame[S.SPLIT] = pd.Categorical(splits or ["train"] * len(frame), categories=list(S.SPLITS))
    frame[S.COLD_ITEM] = frame[S.ITEM_ID].isin(cold_items)
    items = pd.DataFrame({S.ITEM_ID: np.arange(n_items), S.SOURCE_ID: [str(i) for i in range(n_items)],
                          S.COLD_START: np.isin(np.arange(n_items), cold_items),
                          S.LONGTAIL_GROUP: np.ones(n_items, dtype=np.int8)})
    n_users = int(frame[S.USER_ID].max()) + 1
    users = pd.DataFrame({S.USER_ID: np.arange(n_users), S.SOURCE_ID: [str(u) for u in range(n_users)]})
    meta = DatasetMeta(name="hand", source="test", loader="test", label_columns=["click"])
    return Dataset(items=items, interactions=frame, users=users, meta=meta)


def reference_history(user, item, time, seq, positive, row, n):
    """The definition, one row at a time: latest n positives of the user with time and seq before the row."""
    past = np.flatnonzero((user == user[row]) & positive & (seq < seq[row]) & (time < time[row]))
    past = past[np.lexsort((seq[past],))][::-1][:n]
    return list(item[past]) + [PAD] * (n - len(past))


# -- history ---------------------------------------------------------------------------------------


def test_history_hand_case_excludes_the_present_and_the_future():
    # user 0 watches 1, 2, 3 then 9 (the "answer"); row (seq 2) must see only 2, 1.
    data = hand_dataset([(0, 1, 10, 0, 1, False), (0, 2, 20, 1, 1, False), (0, 3, 30, 2, 1, False),
                         (0, 5, 30, 2, 0, True), (0, 9, 40, 3, 1, False), (1, 9, 5, 0, 1, False)])
    src = ExampleSource(data, history_length=4)
    history = src.history.gather(np.arange(6), 4)
    assert history[0].tolist() == [PAD] * 4
    assert history[2].tolist() == [2, 1, PAD, PAD]  # most recent first, own event excluded
    assert history[3].tolist() == [2, 1, PAD, PAD]  # the sampled negative shares its positive's seq: excluded
    assert history[4].tolist() == [3, 2, 1, PAD]  # the sampled negative (item 5) never enters a history
    assert history[5].tolist() == [PAD] * 4  # another user's events never leak in
    assert 9 not in history[:4]


def test_history_excludes_events_at_the_same_time_even_with_a_smaller_seq():
    data = hand_dataset([(0, 1, 10, 0, 1, False), (0, 2, 20, 1, 1, False), (0, 3, 20, 2, 1, False)])
    history = HistoryIndex(*(data.interactions[c].to_numpy() for c in (S.USER_ID, S.ITEM_ID, S.TIME, S.SEQ)),
                           np.ones(3, dtype=bool)).gather(np.arange(3), 3)
    assert history[2].tolist() == [1, PAD, PAD]  # item 2 shares the example's timestamp


def test_history_crosses_splits_and_keeps_cold_items():
    data = hand_dataset([(0, 1, 1, 0, 1, False), (0, 4, 2, 1, 1, False), (0, 2, 3, 2, 1, False),
                         (0, 3, 4, 3, 1, False)], splits=["train", "train", "valid", "test"], cold_items=(4,))
    src = ExampleSource(data, history_length=5)
    test_row = src.rows("test")
    assert src.history.gather(test_row, 5)[0].tolist() == [2, 4, 1, PAD, PAD]
    assert src.rows("train").tolist() == [0]  # the cold item's event is not a training row
    assert src.rows("valid").tolist() == [2]


def test_history_matches_the_definition_on_random_rows(synthetic, source):
    inter = synthetic.interactions
    user, item = inter[S.USER_ID].to_numpy(), inter[S.ITEM_ID].to_numpy()
    time, seq = inter[S.TIME].to_numpy(), inter[S.SEQ].to_numpy()
    positive = inter["click"].to_numpy() == 1
    rows = np.random.default_rng(0).choice(len(inter), 300, replace=False)
    history = source.history.gather(rows, 20)
    for r, got in zip(rows, history):
        assert got.tolist() == reference_history(user, item, time, seq, positive, r, 20)


def test_no_history_event_at_or_after_the_example(source):
    rows = np.random.default_rng(1).choice(source.n_rows, 2000, replace=False)
    pos = source.history.positions(rows, 20)
    filled = pos >= 0
    assert filled.any()
    r = np.broadcast_to(rows[:, None], pos.shape)[filled]
    p = pos[filled]
    assert (source.history.seq[p] < source.seq[r]).all()
    assert (source.history.time[p] < source.time[r]).all()
    # same user: a positive's index lies in the user's block of positives
    assert (p >= source.history.start[r]).all() and (p < source.history.cutoff[r]).all()
    assert (source.history.items[p] == source.history.gather(rows, 20)[filled]).all()


def test_history_rejects_time_going_backwards():
    with pytest.raises(DataError, match="seq is not chronological"):
        HistoryIndex(np.array([0, 0]), np.array([1, 2]), np.array([20, 10]), np.array([0, 1]), np.ones(2, bool))


# -- examples and batches --------------------------------------------------------------------------


def test_batch_fields_shapes_and_dtypes(source):
    rows = source.order("train", shuffle=True, seed=3)[:64]
    batch = source.batch(rows)
    assert isinstance(batch, RankingBatch) and len(batch) == 64
    assert batch.history.shape == (64, 20) and batch.history.dtype == torch.int64
    assert batch.labels.shape == (64, 2) and batch.labels.dtype == torch.float32
    assert batch.user_features.shape == (64, 2) and batch.category.shape == (64,)
    assert torch.equal(batch.row, torch.from_numpy(rows))
    assert torch.equal(batch.history_len, (batch.history >= 0).sum(1))
    # empty slots come after the filled ones
    assert torch.equal(batch.history_mask, torch.arange(20)[None, :] < batch.history_len[:, None])
    assert source.spec.tasks == ("click", "convert")
    assert all(size >= 2 for _, size in source.spec.user_features)
    assert int(batch.category.max()) < source.spec.n_categories


def test_splits_train_has_no_cold_item_and_eval_splits_keep_them(source):
    assert not source.cold_item[source.rows("train")].any()
    assert source.cold_item[source.rows("valid")].any() or source.cold_item[source.rows("test")].any()
    every = np.concatenate([source.rows(s) for s in ("valid", "test")])
    assert len(np.unique(every)) == len(every)


def test_batch_order_depends_only_on_seed_and_epoch(source):
    a = source.order("train", shuffle=True, seed=1, epoch=2)
    assert np.array_equal(a, source.order("train", shuffle=True, seed=1, epoch=2))
    assert not np.array_equal(a, source.order("train", shuffle=True, seed=1, epoch=3))
    resumed = list(source.batches("train", 100, shuffle=True, seed=1, epoch=2, start=3))
    assert torch.equal(resumed[0].row, torch.from_numpy(a[300:400]))


def test_from_folder_reads_a_saved_dataset(synthetic, tmp_path):
    path = save_dataset(synthetic, tmp_path / "data")
    src = ExampleSource.from_folder(path, history_length=7)
    assert src.spec.history_length == 7 and src.n_rows == synthetic.n_interactions
    assert src.describe()["dataset"] == synthetic.meta.name


def test_frame_has_the_evaluation_columns(source):
    frame = source.frame(source.rows("valid")[:10])
    assert list(frame.columns) == ["user_id", "item_id", "label_click", "label_convert", "cold_item",
                                   "longtail_group"]


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_history_length_is_checked(synthetic, value):
    with pytest.raises(ConfigError, match="The 'history_length' parameter of ExampleSource must be an int >= 1"):
        ExampleSource(synthetic, history_length=value)


def test_unknown_split_lists_the_splits(source):
    with pytest.raises(ConfigError, match=r"unknown split 'dev'; available: \['train', 'valid', 'test'\]"):
        source.rows("dev")


def test_batch_checks_shapes():
    with pytest.raises(DataError, match="history must be"):
        RankingBatch(user=torch.zeros(3, dtype=torch.long), item=torch.zeros(3, dtype=torch.long),
                     history=torch.zeros(2, 5, dtype=torch.long))


# -- item tables ------------------------------------------------------------------------------------


def test_cold_items_are_out_of_vocabulary_but_keep_their_codes(synthetic, source, codes_dir):
    tables = ItemTables.build(source, quantize_dir=codes_dir)
    cold = np.flatnonzero(source.item_cold)
    assert len(cold) > 0
    assert (tables.id_index[cold] == OOV).all()
    trained = np.unique(source.item[source.training])
    assert (tables.id_index[trained] > 0).all()
    assert len(np.unique(tables.id_index[trained])) == len(trained) == tables.n_vocab
    assert tables.vq.shape == (source.spec.n_items, 5) and tables.rq.shape == (source.spec.n_items, 3)
    assert (tables.vq[cold] >= 0).all() and (tables.rq[cold] >= 0).all()
    assert tables.rq_sizes == (8, 8, 8)
    assert not (tables.vq == np.arange(source.spec.n_items)[:, None]).any()  # an item is not its own code
    assert tables.codes_version is not None


def test_tables_check_vector_shapes_and_code_coverage(source, codes_dir, tmp_path):
    with pytest.raises(DataError, match=r"vectors 'pretrained' must be \(n_items=300, dim\)"):
        ItemTables.build(source, vectors={"pretrained": np.zeros((5, 4))})
    half = np.random.default_rng(0).normal(size=(150, 8)).astype(np.float32)
    quantize_items(half, np.arange(150), tmp_path / "q", QuantizeConfig(
        rq=RQConfig(codebook_size=4, levels=2), vq=VQConfig(k=3), write_store=False))
    with pytest.raises(DataError, match="no codes for some of the dataset's items"):
        ItemTables.build(source, quantize_dir=tmp_path / "q")

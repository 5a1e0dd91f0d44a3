"""Alignment training: the InfoNCE loss against a hand computation, false-negative masking, the
trainer's checkpoints (a resumed run ends where an uninterrupted one does), and the whole stage."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qarm.align.contrastive import (
    AlignConfig,
    false_negative_mask,
    info_nce,
    read_alignment,
    run_alignment,
    train_alignment,
)
from qarm.data.schema import Dataset, DatasetMeta
from qarm.encode import ContentEncoder, ContentEncoderConfig, encode_items, load_text_model
from qarm.encode.content import load_encoder
from qarm.errors import ConfigError, DataError

# -- the loss ------------------------------------------------------------------------------------------


def hand_info_nce(a, b, tau, masked=()):
    """Symmetric InfoNCE with explicit exp / log; ``masked`` lists (i, j) trigger->target logits dropped
    (their transposes are dropped from the target->trigger direction)."""
    n = len(a)

    def dot(x, y):
        return sum(p * q for p, q in zip(x, y))

    total = 0.0
    for i in range(n):
        denominator = sum(math.exp(dot(a[i], b[j]) / tau) for j in range(n) if (i, j) not in masked)
        total += -(dot(a[i], b[i]) / tau - math.log(denominator))
        denominator = sum(math.exp(dot(b[i], a[j]) / tau) for j in range(n) if (j, i) not in masked)
        total += -(dot(b[i], a[i]) / tau - math.log(denominator))
    return total / (2 * n)


def test_info_nce_2x2_closed_form() -> None:
    eye = torch.eye(2)
    # logits [[1, 0], [0, 1]] at tau = 1: each row costs log(e + 1) - 1 = log(1 + e^-1)
    assert float(info_nce(eye, eye, temperature=1.0)) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_info_nce_3x3_matches_hand_computation() -> None:
    a = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    b = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    loss = info_nce(torch.tensor(a), torch.tensor(b), temperature=0.5)
    assert float(loss) == pytest.approx(hand_info_nce(a, b, 0.5), abs=1e-5)
    # symmetric: swapping the roles of triggers and targets changes nothing
    assert float(info_nce(torch.tensor(b), torch.tensor(a), temperature=0.5)) == pytest.approx(float(loss), abs=1e-6)


def test_false_negative_mask_hand_cases() -> None:
    # the same pair twice: each row's duplicate is masked, the third pair is a real negative
    mask = false_negative_mask(torch.tensor([0, 0, 2]), torch.tensor([1, 1, 3]))
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    # a reverse pair (5,6)/(6,5), the anchor itself among the candidates, the same target twice (5)
    mask = false_negative_mask(torch.tensor([5, 6, 7]), torch.tensor([6, 5, 5]))
    assert mask.tolist() == [[False, True, True], [True, False, True], [False, True, False]]


def test_info_nce_masks_duplicates_like_the_hand_computation() -> None:
    a = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    b = [[0.6, 0.8], [0.6, 0.8], [0.8, -0.6]]
    ids_a, ids_b = [0, 0, 2], [1, 1, 3]
    loss = info_nce(torch.tensor(a), torch.tensor(b), 0.1, np.array(ids_a), np.array(ids_b))
    assert float(loss) == pytest.approx(hand_info_nce(a, b, 0.1, masked={(0, 1), (1, 0)}), abs=1e-5)
    assert float(loss) != pytest.approx(float(info_nce(torch.tensor(a), torch.tensor(b), 0.1)), abs=1e-3)


def test_perfect_vectors_reach_zero_loss_only_with_masking() -> None:
    v = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0], [1.0, 2.0]]), dim=1)
    ids = torch.tensor([4, 4]), torch.tensor([9, 9])
    assert float(info_nce(v, v, 0.05, *ids)) == pytest.approx(0.0, abs=1e-6)
    assert float(info_nce(v, v, 0.05)) == pytest.approx(math.log(2), abs=1e-5)  # unmasked: a false negative


def test_info_nce_checks_its_inputs() -> None:
    x = torch.eye(3)
    with pytest.raises(ConfigError, match=r"The 'temperature' parameter of info_nce must be > 0. Got 0 instead."):
        info_nce(x, x, temperature=0)
    with pytest.raises(ValueError, match="must both be"):
        info_nce(x, x[:2])


def test_align_config_messages() -> None:
    with pytest.raises(ConfigError, match=r"The 'temperature' parameter of AlignConfig must be > 0. Got -1.0"):
        AlignConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match=r"The 'batch_size' parameter of AlignConfig must be an int >= 2"):
        AlignConfig(batch_size=1)
    with pytest.raises(ConfigError, match="The 'trainable_layers' parameter of AlignConfig"):
        AlignConfig(trainable_layers="top")
    assert AlignConfig.from_dict({"trainable_layers": "all"}).trainable_layers == "all"
    with pytest.raises(ConfigError, match="unknown key"):
        AlignConfig.from_dict({"temprature": 0.1})


# -- training ------------------------------------------------------------------------------------------

TOPICS = {
    "pets": ["cat", "dog", "puppy", "kitten"],
    "cooking": ["pasta", "recipe", "soup", "grill"],
    "games": ["speedrun", "boss", "sniper", "raid"],
    "money": ["stocks", "budget", "crypto", "taxes"],
}


def tiny_dataset() -> tuple[Dataset, np.ndarray]:
    titles, topic = [], []
    for t, words in enumerate(TOPICS.values()):
        for w in words:
            titles.append(f"my {w} video")
            topic.append(t)
    n = len(titles)
    items = pd.DataFrame({"item_id": np.arange(n), "source_id": [str(i) for i in range(n)], "title": titles})
    vectors = {"audio": np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)}
    meta = DatasetMeta(name="tiny", source="test", loader="test", text_columns=["title"])
    return Dataset(items, pd.DataFrame(), pd.DataFrame(), meta, vectors), np.array(topic)


def same_topic_pairs(topic: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [(i, j) for i in range(len(topic)) for j in range(len(topic)) if i != j and topic[i] == topic[j]]
    pairs = pd.DataFrame(rows, columns=["trigger", "target"])
    holdout = pairs.iloc[::6]
    return pairs.drop(holdout.index).reset_index(drop=True), holdout.reset_index(drop=True)


@pytest.fixture(scope="module")
def text_model():
    return load_text_model()


@pytest.fixture(scope="module")
def data():
    dataset, topic = tiny_dataset()
    train, holdout = same_topic_pairs(topic)
    return dataset, train, holdout


def fresh_encoder(text_model, dataset) -> ContentEncoder:
    return ContentEncoder(ContentEncoderConfig(out_dim=8), text_model=copy.deepcopy(text_model)).fit(
        dataset, progress=False)


CONFIG = AlignConfig(batch_size=4, max_steps=6, warmup_steps=2, eval_every=2, eval_pairs=8, checkpoint_every=3,
                     trainable_layers=1, patience=10, lr=1e-4, head_lr=1e-2, monitor="holdout_loss")


def test_resumed_run_ends_where_an_uninterrupted_run_does(text_model, data, tmp_path) -> None:
    dataset, train, holdout = data
    straight, history = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, CONFIG,
                                        tmp_path / "straight", progress=False)
    assert len(history.steps) == 6 and history.stopped == "max_steps" and history.resumed_from == []
    assert [e["step"] for e in history.evals] == [0, 2, 4, 6]

    class Crash(Exception):
        pass

    def crash_at_4(step: int, loss: float) -> None:
        if step == 4:  # after step 4, whose checkpoint was not written (checkpoints at 3 and 6)
            raise Crash

    with pytest.raises(Crash):
        train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, CONFIG, tmp_path / "resumed",
                        progress=False, on_step=crash_at_4)
    resumed, resumed_history = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, CONFIG,
                                               tmp_path / "resumed", progress=False)
    assert resumed_history.resumed_from == [3]
    np.testing.assert_allclose([s["loss"] for s in resumed_history.steps], [s["loss"] for s in history.steps],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([e["holdout_loss"] for e in resumed_history.evals],
                               [e["holdout_loss"] for e in history.evals], rtol=1e-4, atol=1e-5)
    assert resumed_history.best_step == history.best_step
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys() and any(k.startswith("text_model.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # training moved the weights (so the comparison above means something)
    start = fresh_encoder(text_model, dataset).set_trainable(1).trainable_state()
    assert any(not torch.allclose(start[k], a[k]) for k in a)

    # the checkpoint is plain tensors and data (weights_only), the returned encoder carries the best weights
    payload = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert payload["step"] == 6
    for key, value in payload["best_model"].items():
        torch.testing.assert_close(a[key], value, msg=key)

    # resuming a finished run returns at once with the same result
    again, again_history = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, CONFIG,
                                           tmp_path / "straight", progress=False)
    assert len(again_history.steps) == 6
    torch.testing.assert_close(again.trainable_state()["projections.0.weight"], a["projections.0.weight"])


def test_checkpoint_of_another_config_is_refused(text_model, data, tmp_path) -> None:
    dataset, train, holdout = data
    small = AlignConfig(batch_size=4, max_steps=1, eval_every=1, eval_pairs=4, checkpoint_every=1, trainable_layers=0)
    train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, small, tmp_path, progress=False)
    other = AlignConfig(**{**small.__dict__, "temperature": 0.2})
    with pytest.raises(ConfigError, match=r"another run \(different config keys \['temperature'\]\)"):
        train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, other, tmp_path, progress=False)
    _, history = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, other, tmp_path,
                                 resume=False, progress=False)
    assert history.resumed_from == [] and len(history.steps) == 1


def test_bad_pairs_are_reported(text_model, data) -> None:
    dataset, train, holdout = data
    encoder = fresh_encoder(text_model, dataset)
    with pytest.raises(DataError, match=r"lacks columns \['target'\]"):
        train_alignment(encoder, dataset, train.rename(columns={"target": "dst"}), holdout, CONFIG, progress=False)
    with pytest.raises(DataError, match=r"item ids outside \[0, 16\).*offending: \[99\]"):
        train_alignment(encoder, dataset, pd.DataFrame({"trigger": [0], "target": [99]}), None, CONFIG,
                        progress=False)
    with pytest.raises(DataError, match="no pair of two different items"):
        train_alignment(encoder, dataset, pd.DataFrame({"trigger": [3], "target": [3]}), None, CONFIG,
                        progress=False)


def test_run_alignment_writes_vectors_record_and_encoder(text_model, data, tmp_path) -> None:
    dataset, train, holdout = data
    config = AlignConfig(batch_size=4, max_steps=2, eval_every=1, eval_pairs=8, trainable_layers=1)
    result = run_alignment(dataset, train, holdout, tmp_path / "align", config=config,
                           encoder_config=ContentEncoderConfig(out_dim=8), cache_dir=tmp_path / "cache",
                           progress=False, text_model=copy.deepcopy(text_model))
    vectors, record = read_alignment(tmp_path / "align")
    assert vectors["pretrained"].shape == vectors["aligned"].shape == (16, 8)
    np.testing.assert_array_equal(vectors["aligned"], result.aligned)
    assert record["encoder"]["parts"] == ["text", "audio"] and record["align"]["max_steps"] == 2
    assert record["history"]["evals"][0]["step"] == 0 and set(record["timings"]) == {
        "encode_pretrained", "train", "encode_aligned"}
    loaded = load_encoder(tmp_path / "align" / "encoder", text_model=copy.deepcopy(text_model))
    np.testing.assert_allclose(encode_items(loaded, dataset, progress=False), result.aligned, atol=1e-5)


def test_time_budget_stops_with_a_checkpoint_and_resume_continues(text_model, data, tmp_path) -> None:
    dataset, train, holdout = data
    base = dict(batch_size=4, max_steps=3, eval_every=10, eval_pairs=4, trainable_layers=0, warmup_steps=0)
    _, history = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout,
                                 AlignConfig(**base, time_budget_s=1e-6), tmp_path, progress=False)
    assert history.stopped == "time_budget" and len(history.steps) == 1
    assert [e["step"] for e in history.evals] == [0, 1]  # the last weights are evaluated too
    _, history = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout,
                                 AlignConfig(**base, time_budget_s=None), tmp_path, progress=False)
    assert history.resumed_from == [1] and history.stopped == "max_steps" and len(history.steps) == 3


def test_early_stopping_returns_the_best_weights(text_model, data, monkeypatch) -> None:
    import qarm.align.contrastive as contrastive

    dataset, train, holdout = data
    scripted = iter([1.0, 0.5, 0.7, 0.1])  # holdout losses at steps 0, 1, 2, (3)

    def fake_evaluate(self):
        return {"step": self.step, "holdout_loss": next(scripted), "holdout_recall@10": 0.0}

    monkeypatch.setattr(contrastive._Trainer, "evaluate", fake_evaluate)
    states = {}

    def remember(step: int, loss: float) -> None:
        states[step] = encoder.trainable_state()

    encoder = fresh_encoder(text_model, dataset)
    config = AlignConfig(batch_size=4, max_steps=5, eval_every=1, patience=1, trainable_layers=0, head_lr=0.1,
                         monitor="holdout_loss")
    encoder, history = train_alignment(encoder, dataset, train, holdout, config, progress=False, on_step=remember)
    assert history.stopped == "early_stopping" and len(history.steps) == 2
    assert history.best_step == 1 and history.best_metric == 0.5
    final = encoder.trainable_state()
    assert not torch.equal(states[1]["mix.weight"], states[2]["mix.weight"])
    for key, value in states[1].items():
        torch.testing.assert_close(final[key], value, msg=key)


# -- sampling-bias correction and the frozen-state cache -----------------------------------------------


def test_info_nce_logq_correction_matches_the_hand_computation() -> None:
    a = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    b = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    log_qa, log_qb = [-1.0, -2.0, -0.5], [-3.0, -0.2, -1.0]
    tau, n = 0.5, 3

    def dot(x, y):
        return sum(p * q for p, q in zip(x, y))

    total = 0.0
    for i in range(n):  # every candidate's logit is lowered by its own log q, the positive's too
        logits = [dot(a[i], b[j]) / tau - log_qb[j] for j in range(n)]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        logits = [dot(b[i], a[j]) / tau - log_qa[j] for j in range(n)]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    loss = info_nce(torch.tensor(a), torch.tensor(b), tau, a_logq=torch.tensor(log_qa), b_logq=torch.tensor(log_qb))
    assert float(loss) == pytest.approx(total / (2 * n), abs=1e-5)
    # a uniform q changes nothing
    flat = torch.full((3,), -2.0)
    assert float(info_nce(torch.tensor(a), torch.tensor(b), tau, a_logq=flat, b_logq=flat)) == pytest.approx(
        float(info_nce(torch.tensor(a), torch.tensor(b), tau)), abs=1e-6)


def test_cached_frozen_layers_train_exactly_like_the_full_forward(text_model, data) -> None:
    """Same batches, same dropout masks on the trainable layer, same losses and weights: the cache only
    skips work whose result is fixed."""
    dataset, train, holdout = data
    config = AlignConfig(**{**CONFIG.__dict__, "max_steps": 4})
    full, full_history = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout,
                                         AlignConfig(**{**config.__dict__, "frozen_cache": "off"}), progress=False)
    encoder = fresh_encoder(text_model, dataset)
    cached, history = train_alignment(encoder, dataset, train, holdout, config, progress=False)
    assert cached.frozen_states_ is not None and cached.frozen_states_.n_frozen == 5
    np.testing.assert_allclose([s["loss"] for s in history.steps], [s["loss"] for s in full_history.steps],
                               rtol=1e-5, atol=1e-5)
    a, b = full.trainable_state(), cached.trainable_state()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_head_only_training_never_runs_the_text_model(text_model, data, monkeypatch) -> None:
    dataset, train, holdout = data
    encoder = ContentEncoder(ContentEncoderConfig(out_dim=8), text_model=copy.deepcopy(text_model)).fit(
        dataset, progress=False, keep_frozen_states=0)
    before = encoder.trainable_state()

    def forbidden(*args, **kwargs):
        raise AssertionError("head-only training must not run the text model")

    monkeypatch.setattr(type(encoder.text_model), "forward", forbidden)
    config = AlignConfig(batch_size=8, max_steps=50, eval_every=25, eval_pairs=8, trainable_layers=0, head_lr=1e-2,
                         warmup_steps=5, monitor="holdout_loss")
    encoder, history = train_alignment(encoder, dataset, train, holdout, config, progress=False)
    vectors = encode_items(encoder, dataset, progress=False)  # the aligned encoding: the head on cached vectors
    assert len(history.steps) == 50 and vectors.shape == (16, 8)
    assert history.steps[-1]["loss"] < history.steps[0]["loss"]
    assert not torch.equal(before["projections.0.weight"], encoder.trainable_state()["projections.0.weight"])


def test_head_only_evaluation_ranks_targets_among_all_items(text_model, data) -> None:
    """With the text model frozen, early stopping watches the stage's own measure: held-out Recall@10
    among every item, the same number pair_recall computes."""
    from qarm.align.evaluate import pair_recall

    dataset, train, holdout = data
    encoder = ContentEncoder(ContentEncoderConfig(out_dim=8), text_model=copy.deepcopy(text_model)).fit(
        dataset, progress=False, keep_frozen_states=0)
    config = AlignConfig(batch_size=8, max_steps=3, eval_every=3, eval_pairs=len(holdout), trainable_layers=0)
    encoder, history = train_alignment(encoder, dataset, train, holdout, config, progress=False)
    assert [e["pool_items"] for e in history.evals] == [dataset.n_items, dataset.n_items]
    vectors = encode_items(encoder, dataset, progress=False)
    assert history.evals[-1]["holdout_recall@10"] == pytest.approx(pair_recall(vectors, holdout, ks=(10,))["recall@10"])
    pooled = AlignConfig(**{**config.__dict__, "eval_candidates": "pool"})
    _, history = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, pooled, progress=False)
    assert history.evals[0]["pool_items"] < dataset.n_items


def test_device_auto_trains_where_cuda_is_and_returns_the_encoder_on_the_cpu(text_model, data) -> None:
    dataset, train, holdout = data
    on_cpu, _ = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, CONFIG, progress=False)
    auto, _ = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout,
                              AlignConfig(**{**CONFIG.__dict__, "device": "auto"}), progress=False)
    assert {p.device.type for p in auto.parameters()} == {"cpu"}
    for name, value in on_cpu.trainable_state().items():  # on this CPU machine: the same run
        torch.testing.assert_close(auto.trainable_state()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ConfigError, match="The 'device' parameter of AlignConfig must be 'cpu', 'cuda' or 'auto'"):
        AlignConfig(device="gpu")


HEAD_ONLY = AlignConfig(batch_size=8, max_steps=6, warmup_steps=2, eval_every=3, eval_pairs=8, checkpoint_every=3,
                        trainable_layers=0, patience=10, head_lr=1e-2, monitor="holdout_loss")


def align_on_rank(out: Path) -> None:
    """In each spawned rank: the head-only alignment of the tiny dataset; save this rank's weights."""
    from qarm.distributed import rank

    dataset, train, holdout = tiny_dataset_pairs()
    encoder, _ = train_alignment(fresh_encoder(load_text_model(), dataset), dataset, train, holdout, HEAD_ONLY,
                                 out / "train", progress=False)
    torch.save(encoder.trainable_state(), out / f"weights{rank()}.pt")


def tiny_dataset_pairs():
    dataset, topic = tiny_dataset()
    return (dataset, *same_topic_pairs(topic))


def test_two_ranks_align_like_one_process_with_the_same_global_batch(text_model, data, tmp_path) -> None:
    from qarm.distributed import spawn

    spawn(2, align_on_rank, tmp_path)
    dataset, train, holdout = data
    single, _ = train_alignment(fresh_encoder(text_model, dataset), dataset, train, holdout, HEAD_ONLY,
                                progress=False)
    ranks = [torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in range(2)]
    for name, value in single.trainable_state().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp_path / "train" / "checkpoint.pt").exists()  # rank 0's


def test_auto_candidates_use_the_pool_on_large_catalogues() -> None:
    """'auto' ranks among all items only for a frozen text model and a catalogue up to AUTO_ALL_MAX_ITEMS
    (among 1M items 1,024 held-out pairs gave early stopping no signal); 'all' and 'pool' are as set."""
    from qarm.align.contrastive import AUTO_ALL_MAX_ITEMS, ranks_among_all

    assert ranks_among_all("auto", 19_220, text_frozen=True)
    assert ranks_among_all("auto", AUTO_ALL_MAX_ITEMS, text_frozen=True)
    assert not ranks_among_all("auto", AUTO_ALL_MAX_ITEMS + 1, text_frozen=True)
    assert not ranks_among_all("auto", 5_000, text_frozen=False)
    assert ranks_among_all("all", 10**6, text_frozen=False)
    assert not ranks_among_all("pool", 10, text_frozen=True)

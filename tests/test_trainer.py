"""The trainer: it learns, it is deterministic by seed, an interrupted run resumes to the same result."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from qarm.data.prepare import prepare_dataset
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.errors import CheckpointMismatch, ConfigError
from qarm.evaluate.metrics import evaluate_predictions
from qarm.features import ExampleSource, ItemTables
from qarm.models import build_model
from qarm.quantize.api import QuantizeConfig, RQConfig, VQConfig, quantize_items
from qarm.train import RankingConfig, TrainConfig, load_weights, predict, train, train_ranking
from qarm.train.trainer import BEST_FILE, CHECKPOINT_FILE, STATE_FILE

pytestmark = pytest.mark.filterwarnings("ignore:k-means of")  # tiny catalogues: few points per centroid

# Large enough that one epoch shows learning, small enough for seconds of training.
SYNTHETIC = SyntheticConfig(n_items=400, n_users=300, n_interactions=15_000)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def data():
    dataset = prepare_dataset(generate(SYNTHETIC))
    source = ExampleSource(dataset, history_length=20)
    truth = dataset.ground_truth["items"][[f"b{j}" for j in range(16)]].to_numpy(np.float32)
    return source, truth


@pytest.fixture(scope="module")
def tables(data, tmp_path_factory):
    source, truth = data
    out = tmp_path_factory.mktemp("codes") / "quantize"
    quantize_items(truth, None, out, QuantizeConfig(rq=RQConfig(codebook_size=8, levels=2), vq=VQConfig(k=5),
                                                    write_store=False))
    return ItemTables.build(source, quantize_dir=out, vectors={"pretrained": truth, "aligned": truth})


def scores(model, source):
    frame = predict(model, source, "valid")
    return frame[[c for c in frame.columns if c.startswith("score_")]].to_numpy()


def test_qarm_learns_in_one_epoch(data, tables, tmp_path):
    source, _ = data
    model = build_model("qarm", source.spec, tables)
    result = train(model, source, TrainConfig(epochs=1, batch_size=256), tmp_path, progress=False)
    frame = predict(result.model, source, "valid")
    report = evaluate_predictions(frame, list(source.tasks))
    assert report["click"]["overall"]["auc"] > 0.6
    assert result.history.stopped == "epochs" and result.history.best_step == result.history.steps
    assert result.examples_per_second > 0
    assert (tmp_path / CHECKPOINT_FILE).exists() and (tmp_path / BEST_FILE).exists()
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["step"] == result.history.steps and state["history"]["evals"][-1]["valid"]["click"]["auc"] > 0.6


# one step after a checkpoint (4), three steps after one (8); and with sparse tables (SparseAdam's state)
@pytest.mark.parametrize(("stop_at", "sparse"), [(5, False), (11, False), (5, True)])
def test_resume_after_interruption_equals_an_uninterrupted_run(data, tables, tmp_path, stop_at, sparse):
    source, _ = data
    config = TrainConfig(epochs=2, batch_size=512, eval_every=6, checkpoint_every=4, seed=1)
    model_config = {"sparse_tables": sparse}
    whole = train(build_model("qarm", source.spec, tables, model_config, seed=1), source, config,
                  tmp_path / "whole", progress=False)

    def interrupt(step: int, loss: float) -> None:
        if step == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(build_model("qarm", source.spec, tables, model_config, seed=1), source, config, tmp_path / "cut",
              progress=False, on_step=interrupt)
    # a fresh process would rebuild the model from its seed; a different seed must not matter either
    resumed = train(build_model("qarm", source.spec, tables, model_config, seed=99), source, config,
                    tmp_path / "cut", progress=False)
    assert resumed.history.resumed_from == [stop_at // 4 * 4]  # the last checkpoint before the interruption
    assert resumed.history.steps == whole.history.steps
    assert resumed.history.best_step == whole.history.best_step
    assert [e["metric"] for e in resumed.history.evals] == [e["metric"] for e in whole.history.evals]
    assert [e["train_loss"] for e in resumed.history.evals] == [e["train_loss"] for e in whole.history.evals]
    assert np.array_equal(scores(resumed.model, source), scores(whole.model, source))
    for key, value in whole.best_state.items():
        assert torch.equal(value, resumed.best_state[key]), key


def test_sparse_tables_train_lazily_with_sparse_adam(data, tables, tmp_path, monkeypatch):
    """``sparse_tables=True``: the ID and VQ tables get sparse gradients and SparseAdam (lazy: rows no batch
    read keep their initial values, where dense Adam's moments move every row), the model learns as the dense
    one does, and the settings SparseAdam cannot honour are refused by name."""
    source, _ = data
    config = TrainConfig(epochs=1, batch_size=256, seed=0)
    dense = train(build_model("qarm", source.spec, tables, seed=0), source, config, tmp_path / "dense",
                  progress=False)
    model = build_model("qarm", source.spec, tables, {"sparse_tables": True}, seed=0)
    assert model.item_id.table.sparse and model.vq.table.sparse and model.user_id.sparse
    assert not model.rq.table.sparse  # L x 256 rows: small, dense
    with monkeypatch.context() as patch:  # the size rule (None): ID tables above SPARSE_ROWS, the VQ table dense
        patch.setattr("qarm.optim.SPARSE_ROWS", 10)
        auto = build_model("qarm", source.spec, tables, seed=0)
        assert auto.item_id.table.sparse and auto.user_id.sparse and not auto.vq.table.sparse
        assert not build_model("qarm", source.spec, tables, {"sparse_tables": False}, seed=0).item_id.table.sparse
    sparse = train(model, source, config, tmp_path / "sparse", progress=False)
    assert type(sparse.optimizer_state) is dict and len(sparse.optimizer_state["param_groups"]) == 2
    auc = {name: evaluate_predictions(predict(r.model, source, "valid"), list(source.tasks))["click"]["overall"]["auc"]
           for name, r in (("dense", dense), ("sparse", sparse))}
    assert auc["sparse"] > 0.6 and abs(auc["sparse"] - auc["dense"]) < 0.03, auc
    # Lazy: a user row read by step 1's batch but not step 2's stays put in step 2 (dense Adam's momentum
    # moves it); rows step 2 reads move.
    order = source.order("train", shuffle=True, seed=0, epoch=0)
    second = np.unique(source.user[order[256:512]])
    first_only = np.setdiff1d(np.unique(source.user[order[:256]]), second)
    assert len(first_only) > 0
    for sparse_tables, lazy in ((True, True), (False, False)):
        model = build_model("qarm", source.spec, tables, {"sparse_tables": sparse_tables}, seed=0)
        rows: dict[int, torch.Tensor] = {}
        train(model, source, TrainConfig(max_steps=2, batch_size=256, seed=0), progress=False,
              on_step=lambda step, loss, m=model, r=rows: r.__setitem__(step, m.user_id.weight.detach().clone()))
        assert torch.equal(rows[2][first_only], rows[1][first_only]) == lazy
        assert not torch.equal(rows[2][second], rows[1][second])
    with pytest.raises(ConfigError, match="weight_decay.*sparse"):
        train(build_model("qarm", source.spec, tables, {"sparse_tables": True}), source,
              TrainConfig(max_steps=1, weight_decay=1e-4), progress=False)
    with pytest.raises(ConfigError, match="grad_clip.*sparse"):
        train(build_model("qarm", source.spec, tables, {"sparse_tables": True}), source,
              TrainConfig(max_steps=1, grad_clip=1.0), progress=False)


def test_training_is_deterministic_by_seed(data, tables):
    source, _ = data
    config = TrainConfig(epochs=1, batch_size=512, max_steps=6)

    def run(seed: int) -> np.ndarray:
        cfg = TrainConfig(**{**config.__dict__, "seed": seed})
        return scores(train(build_model("baseline", source.spec, tables, seed=seed), source, cfg,
                            progress=False).model, source)

    assert np.array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_training_runs_in_deterministic_mode_and_restores_the_callers(data, tables):
    """Several torch threads add floats in timing-dependent order unless deterministic algorithms are
    on (qarm.determinism): the trainer turns them on for its loop only."""
    source, _ = data
    seen = []
    assert not torch.are_deterministic_algorithms_enabled()
    train(build_model("qarm", source.spec, tables, {"vector": "pretrained"}), source,
          TrainConfig(max_steps=2, batch_size=256), progress=False,
          on_step=lambda *args: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def test_resume_refuses_a_checkpoint_built_on_other_item_tables(data, tables, tmp_path):
    """The tables (codes, vectors) are not in a checkpoint; the identity records their digest."""
    source, _ = data
    config = TrainConfig(max_steps=2, batch_size=256)
    train(build_model("qarm", source.spec, tables, {"vector": "pretrained"}), source, config, tmp_path,
          progress=False)
    other = ItemTables(id_index=tables.id_index, vq=tables.vq[:, ::-1].copy(), rq=tables.rq, rq_sizes=tables.rq_sizes,
                       vectors=tables.vectors)
    with pytest.raises(CheckpointMismatch, match="different tables"):
        train(build_model("qarm", source.spec, other, {"vector": "pretrained"}), source, config, tmp_path,
              progress=False)


def test_early_stopping_keeps_the_best_weights(data, tables, tmp_path):
    source, _ = data
    config = TrainConfig(epochs=4, batch_size=256, lr=3e-2, eval_every=3, patience=1, monitor="auc")
    result = train(build_model("id_only", source.spec, tables), source, config, tmp_path, progress=False)
    assert result.history.stopped in ("early_stopping", "epochs")
    if result.history.stopped == "early_stopping":
        assert result.history.best_step < result.history.steps
    best = load_weights(build_model("id_only", source.spec, tables), tmp_path / BEST_FILE)
    assert np.array_equal(scores(best, source), scores(result.model, source))
    metrics = [e["metric"] for e in result.history.evals]
    assert result.history.best_metric == max(metrics)
    # resuming a finished run trains no further
    again = train(build_model("id_only", source.spec, tables), source, config, tmp_path, progress=False)
    assert again.history.steps == result.history.steps


def test_resume_refuses_a_checkpoint_of_another_run(data, tables, tmp_path):
    source, _ = data
    train(build_model("id_only", source.spec, tables), source, TrainConfig(max_steps=2, batch_size=256), tmp_path,
          progress=False)
    with pytest.raises(ConfigError, match="was written by another run \\(different (model, )?shapes|model"):
        train(build_model("baseline", source.spec, tables), source, TrainConfig(max_steps=2, batch_size=256),
              tmp_path, progress=False)
    with pytest.raises(ConfigError, match="different train"):
        train(build_model("id_only", source.spec, tables), source, TrainConfig(max_steps=2, batch_size=128),
              tmp_path, progress=False)
    # a larger budget continues the same run
    more = train(build_model("id_only", source.spec, tables), source, TrainConfig(max_steps=4, batch_size=256),
                 tmp_path, progress=False)
    assert more.history.resumed_from == [2] and more.history.steps == 4


def test_predict_frame_feeds_the_metrics(data, tables):
    source, _ = data
    frame = predict(build_model("qarm", source.spec, tables), source, "test")
    assert len(frame) == len(source.rows("test"))
    assert {"user_id", "item_id", "label_click", "score_click", "label_convert", "score_convert", "cold_item",
            "longtail_group"} <= set(frame.columns)
    assert frame["score_click"].between(0, 1).all()
    report = evaluate_predictions(frame, ["click", "convert"])
    assert report["click"]["cold_start"]["n"] == int(frame["cold_item"].sum()) > 0


@pytest.mark.parametrize("params, message", [
    ({"batch_size": 0}, "The 'batch_size' parameter of TrainConfig must be an int >= 1. Got 0 instead."),
    ({"lr": 0.0}, "The 'lr' parameter of TrainConfig must be > 0. Got 0.0 instead."),
    ({"monitor": "ndcg"}, "The 'monitor' parameter of TrainConfig must be one of 'gauc', 'auc', 'logloss'"),
    ({"max_seconds": -1}, "The 'max_seconds' parameter of TrainConfig must be > 0 or None. Got -1 instead."),
])
def test_train_config_errors(params, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        TrainConfig(**params)


def test_train_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\]"):
        TrainConfig.from_dict({"epoch": 3})
    assert TrainConfig.from_dict({"epochs": 3, "monitor": "auc"}).epochs == 3


def test_train_ranking_writes_a_report(data, tables, tmp_path):
    source, _ = data
    config = RankingConfig(model="qarm", model_config={"vector": "pretrained", "vq_k": 3}, history_length=20,
                           train=TrainConfig(max_steps=3, batch_size=256))
    report = train_ranking(None, tmp_path, config, source=source, tables=tables)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["config"]["model_config"] == {"vector": "pretrained", "vq_k": 3}
    assert saved["history"]["steps"] == 3 and saved["eval_split"] == "test"
    assert set(saved["metrics"]) == {"click", "convert"} and "cold_start" in saved["metrics"]["click"]
    assert report["examples_per_second"] > 0
    assert len(pd.read_parquet(tmp_path / "predictions.parquet")) == len(source.rows("test"))
    with pytest.raises(ConfigError, match="the source was built with history_length=20"):
        train_ranking(None, tmp_path / "x", RankingConfig(history_length=50), source=source, tables=tables)
    with pytest.raises(ConfigError, match=r"unknown model 'dien'; available"):
        RankingConfig(model="dien")


@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_train_ranking_calibrates_on_valid_and_keeps_the_ranking(data, tables, tmp_path, method):
    """``calibration``: fitted on the valid split's logits (the same fit done here by hand), the test
    predictions are the raw ones through ``sigmoid(scale * logit + bias)``; GAUC is unchanged."""
    from qarm.train.calibration import fit_calibration
    from qarm.train.trainer import predict_logits

    source, _ = data
    config = RankingConfig(model="qarm", history_length=20, train=TrainConfig(epochs=1, batch_size=256),
                           calibration=method)
    report = train_ranking(None, tmp_path, config, source=source, tables=tables)
    fitted = report["calibration"]
    assert fitted["method"] == method and fitted["fitted_on"] == "valid" and fitted["tasks"] == ["click", "convert"]
    model = load_weights(build_model("qarm", source.spec, tables), tmp_path / "train" / BEST_FILE)
    valid = source.rows("valid")
    expected = fit_calibration(predict_logits(model, source, valid), source.labels[valid], method)
    np.testing.assert_allclose(fitted["scale"], expected.scale, rtol=1e-5)
    np.testing.assert_allclose(fitted["bias"], expected.bias, atol=1e-6)
    test = source.rows("test")
    probabilities = expected.probabilities(predict_logits(model, source, test))
    frame = pd.read_parquet(tmp_path / "predictions.parquet")
    np.testing.assert_allclose(frame[["score_click", "score_convert"]].to_numpy(), probabilities, atol=1e-5)
    raw = predict_logits(model, source, test)
    for t, task in enumerate(("click", "convert")):
        # The ranking is kept: the calibrated scores are a non-decreasing function of the raw logits ...
        calibrated_scores = frame[f"score_{task}"].to_numpy()[np.argsort(raw[:, t], kind="stable")]
        assert (np.diff(calibrated_scores) >= 0).all()
        # ... so GAUC moves only where float32 rounding of the map makes two close logits equal.
        assert report["metrics"][task]["overall"]["gauc"] == pytest.approx(fitted["uncalibrated"][task]["gauc"],
                                                                           abs=2e-3)
    with pytest.raises(ConfigError, match="calibration"):
        RankingConfig(calibration="isotonic")


def test_a_calibration_that_cannot_be_fitted_keeps_the_raw_predictions_and_flags_the_run(data, tables, tmp_path,
                                                                                        monkeypatch):
    import qarm.train.stage as stage

    def refuse(*args, **kwargs):
        raise ConfigError("fit_calibration: task 0's fitted scale is -0.5 <= 0")

    source, _ = data
    monkeypatch.setattr(stage, "calibrate", refuse)
    config = RankingConfig(model="qarm", history_length=20, train=TrainConfig(max_steps=3, batch_size=256),
                           calibration="temperature")
    report = train_ranking(None, tmp_path, config, source=source, tables=tables)
    assert "scale" not in report["calibration"] and "-0.5 <= 0" in report["calibration"]["skipped"]
    assert any(flag.startswith("calibration not applied") for flag in report["flags"])
    for task in ("click", "convert"):
        assert report["metrics"][task]["overall"]["logloss"] == report["calibration"]["uncalibrated"][task]["logloss"]
    with pytest.raises(ConfigError, match="fitted on the valid split"):
        RankingConfig(calibration="platt", eval_split="valid")


def test_bf16_training_keeps_float32_weights_learns_and_predicts_close_to_float32(data, tables, tmp_path):
    source, _ = data
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16")  # type: ignore[arg-type]
    model = build_model("qarm", source.spec, tables)
    result = train(model, source, TrainConfig(epochs=1, batch_size=256, precision="bf16"), tmp_path, progress=False)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    bf16 = predict(result.model, source, "valid", precision="bf16")
    fp32 = predict(result.model, source, "valid")
    assert bf16["score_click"].dtype == np.float64
    assert evaluate_predictions(bf16, list(source.tasks))["click"]["overall"]["auc"] > 0.6
    # bfloat16 keeps 8 bits of mantissa: probabilities agree to about 1e-2, not to float32's 1e-6
    difference = np.abs(bf16["score_click"].to_numpy() - fp32["score_click"].to_numpy())
    assert 0 < difference.max() < 0.05


def test_a_resumed_run_says_it_resumed(data, tables, tmp_path):
    source, _ = data
    config = TrainConfig(epochs=1, batch_size=512, checkpoint_every=2, seed=3)

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(build_model("id_only", source.spec, tables, seed=3), source, config, tmp_path, progress=False,
              on_step=interrupt)
    said: list[str] = []
    train(build_model("id_only", source.spec, tables, seed=3), source, config, tmp_path, progress=False,
          log=said.append)
    assert said and said[0].startswith("resuming from step 2 of "), said


def _drop_from_checkpoint_identity(folder, drop) -> None:
    """Rewrite a checkpoint as an older qarm would have written it: without some config fields."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["state"])
    drop(state["identity"])
    save_file(tensors, str(path), metadata={**meta, "state": json.dumps(state)})


def test_a_checkpoint_from_before_a_new_config_field_resumes_when_the_field_keeps_its_default(data, tables, tmp_path):
    """A field a later qarm adds with a default that keeps the old behaviour (QARMConfig.sparse_tables,
    TrainConfig.precision) is the same run at its default, and another run at any other value; a field whose
    default changed since (QARMConfig.sequence_dim, qarm 0.2.0) takes the value it had then."""
    source, _ = data
    config = TrainConfig(max_steps=2, batch_size=256)
    train(build_model("qarm", source.spec, tables), source, config, tmp_path, progress=False)

    def drop(identity) -> None:
        del identity["model"]["config"]["sparse_tables"], identity["train"]["precision"]
        del identity["model"]["config"]["head"]["dropout"]  # nested configs too

    _drop_from_checkpoint_identity(tmp_path, drop)
    said: list[str] = []
    more = train(build_model("qarm", source.spec, tables), source, TrainConfig(max_steps=3, batch_size=256),
                 tmp_path, progress=False, log=said.append)
    assert more.history.steps == 3 and said[0].startswith("resuming from step 2 of "), said
    _drop_from_checkpoint_identity(tmp_path, drop)
    with pytest.raises(CheckpointMismatch, match="different model"):
        train(build_model("qarm", source.spec, tables, {"sparse_tables": True}), source,
              TrainConfig(max_steps=4, batch_size=256), tmp_path, progress=False)
    # a checkpoint that does not name sequence_dim was written before its default became 32: None then
    _drop_from_checkpoint_identity(tmp_path, lambda identity: identity["model"]["config"].pop("sequence_dim"))
    with pytest.raises(CheckpointMismatch, match="different model"):
        train(build_model("qarm", source.spec, tables), source, TrainConfig(max_steps=4, batch_size=256), tmp_path,
              progress=False)

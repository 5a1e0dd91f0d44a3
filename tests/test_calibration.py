"""Temperature and Platt scaling: the fit against scikit-learn's unregularised LogisticRegression on the
logits, the order kept, the wrapper module, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from qarm.errors import ConfigError
from qarm.train.calibration import Calibrated, calibrate, fit_calibration


def _overconfident(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(s) with s ~ N(-0.5, 1.5); the 'model' reports 3 s + 1: too sharp, shifted."""
    rng = np.random.default_rng(seed)
    s = rng.normal(-0.5, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(np.float64)
    return 3.0 * s + 1.0, y


def _sklearn(z: np.ndarray, y: np.ndarray, intercept: bool) -> tuple[float, float]:
    lr = LogisticRegression(C=np.inf, fit_intercept=intercept, tol=1e-12, max_iter=10_000)  # unregularised
    lr.fit(z[:, None], y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0]) if intercept else 0.0


@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_fit_equals_sklearn_logistic_regression_on_the_logits(method):
    z, y = _overconfident()
    cal = fit_calibration(z, y, method)
    a, b = _sklearn(z, y, intercept=method == "platt")
    assert cal.scale[0] == pytest.approx(a, rel=1e-5)
    assert cal.bias[0] == pytest.approx(b, abs=1e-5)
    if method == "platt":  # the generating map is s = (z - 1) / 3: Platt recovers it up to sampling noise
        assert cal.scale[0] == pytest.approx(1 / 3, abs=0.03) and cal.bias[0] == pytest.approx(-1 / 3, abs=0.06)
    else:
        assert cal.temperature[0] > 2  # the over-confident logits are softened
        assert cal.bias == (0.0,)


def test_calibration_lowers_log_loss_and_keeps_auc():
    z, y = _overconfident(seed=1)
    fit_z, fit_y, test_z, test_y = z[:2000], y[:2000], z[2000:], y[2000:]  # fitted on other rows than scored
    before = 1 / (1 + np.exp(-test_z))
    for method in ("temperature", "platt"):
        after = fit_calibration(fit_z, fit_y, method).probabilities(test_z)
        assert log_loss(test_y, after) < log_loss(test_y, before) - 0.1
        assert roc_auc_score(test_y, after) == pytest.approx(roc_auc_score(test_y, before), abs=1e-12)


def test_one_fit_per_task_and_the_module_applies_it():
    z1, y1 = _overconfident(seed=2)
    z2, y2 = _overconfident(seed=3)
    z = np.stack([z1, 0.5 * z2], axis=1)
    y = np.stack([y1, y2], axis=1)
    cal = fit_calibration(torch.tensor(z), torch.tensor(y), "platt")
    for t in range(2):
        a, b = _sklearn(z[:, t], y[:, t], intercept=True)
        assert cal.scale[t] == pytest.approx(a, rel=1e-5) and cal.bias[t] == pytest.approx(b, abs=1e-5)
    model = torch.nn.Linear(3, 2)
    wrapped = Calibrated(model, cal)
    x = torch.randn(5, 3)
    expected = model(x) * torch.tensor(cal.scale, dtype=torch.float32) + torch.tensor(cal.bias, dtype=torch.float32)
    torch.testing.assert_close(wrapped(x), expected)
    assert set(wrapped.state_dict()) == {"scale", "bias", "model.weight", "model.bias"}
    assert not [p for n, p in wrapped.named_parameters() if not n.startswith("model.")]  # never trained
    np.testing.assert_allclose(cal.apply(z), z * np.array(cal.scale) + np.array(cal.bias))


def test_errors_name_the_problem():
    z, y = _overconfident(n=100)
    with pytest.raises(ConfigError, match="must be one of 'temperature', 'platt'. Got 'isotonic'"):
        fit_calibration(z, y, "isotonic")
    with pytest.raises(ConfigError, match="only one label value"):
        fit_calibration(z, np.zeros_like(y))
    with pytest.raises(ConfigError, match="differ in shape"):
        fit_calibration(z, y[:50])
    with pytest.raises(ConfigError, match="reverse the order"):
        fit_calibration(-z, y)  # logits that rank worse than chance
    with pytest.raises(ConfigError, match="2 task logits"):
        Calibrated(torch.nn.Linear(3, 2), fit_calibration(z, y))(torch.randn(4, 3))


def test_calibrate_a_trained_ranking_model_on_the_valid_split():
    from qarm.data.prepare import prepare_dataset
    from qarm.data.synthetic import SyntheticConfig, generate
    from qarm.features import ExampleSource, ItemTables
    from qarm.models import build_model
    from qarm.train import TrainConfig, predict, train

    source = ExampleSource(prepare_dataset(generate(SyntheticConfig(n_items=300, n_users=150, n_interactions=6000))),
                           history_length=20)
    torch.manual_seed(0)
    model = build_model("fgcnn", source.spec, ItemTables.build(source), {"hidden": (32,), "embedding_dim": 8})
    result = train(model, source, TrainConfig(epochs=2, batch_size=256, eval_every=None))
    ranker = calibrate(result.model, source, "valid", "platt")
    raw, cal = predict(result.model, source, "valid"), predict(ranker, source, "valid")
    for j, task in enumerate(source.tasks):
        p, y = raw[f"score_{task}"].to_numpy(), raw[f"label_{task}"].to_numpy()
        z = np.log(p) - np.log1p(-p)  # the raw logits, back from the float32 probabilities
        a, b = _sklearn(z, y, intercept=True)
        assert ranker.scale[j].item() == pytest.approx(a, rel=1e-3) and ranker.bias[j].item() == pytest.approx(b, abs=1e-3)
        expected = 1 / (1 + np.exp(-(a * z + b)))
        np.testing.assert_allclose(cal[f"score_{task}"].to_numpy(), expected, rtol=1e-4, atol=1e-6)
        assert log_loss(y, cal[f"score_{task}"]) <= log_loss(y, p) + 1e-9  # the raw map (1, 0) is a candidate
    with pytest.raises(ConfigError, match="unknown split 'nope'"):
        calibrate(result.model, source, "nope")

"""Post-hoc calibration of a model's logits: temperature scaling and Platt scaling.

A model trained until its validation AUC stops improving is usually over-confident: its ranking (AUC) is
the best seen, but its probabilities are too close to 0 and 1, and the log loss suffers. A monotone map of
the logits, fitted on held-out rows, repairs the probabilities without changing any ranking:

* ``"temperature"`` (Guo et al., ICML 2017): ``z / T``, one parameter ``T > 0`` per task;
* ``"platt"`` (Platt, 1999): ``a z + b``, a one-feature logistic regression on the logit, per task.

Both minimise the mean binary cross-entropy of ``sigmoid(a z + b)`` on the rows given (Newton's method in
float64 with a backtracking line search; ``b = 0`` for temperature scaling), which is what an
unregularised ``sklearn.linear_model.LogisticRegression`` on the logits computes (tested). Fit them on a
validation or holdout split, never on the rows being reported. ``a > 0`` keeps AUC and GAUC unchanged;
a fit that would flip the order (``a <= 0``: the logits rank worse than chance) is refused.

:class:`Calibrated` wraps a model whose ``forward`` returns logits ``(B, T)`` and returns the calibrated
logits; :func:`fit_calibration` gives the parameters from logits and labels; :func:`calibrate` does both for
a ranking model on a split of an :class:`~qarm.features.ExampleSource` (the ``valid`` split by default).

    from qarm.train.calibration import Calibrated, calibrate, fit_calibration
    calibration = fit_calibration(holdout_logits, holdout_labels, "temperature")   # (N, T) or (N,)
    model = Calibrated(model, calibration)          # forward: scale * model(x) + bias
    ranker = calibrate(result.model, source)        # a trained ranking model, fitted on source's valid split
    frame = qarm.train.predict(ranker, source, "test")   # calibrated probabilities
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from qarm.errors import ConfigError
from qarm.features.examples import ExampleSource
from qarm.train.trainer import predict_logits

Method = Literal["temperature", "platt"]
METHODS: tuple[Method, ...] = ("temperature", "platt")


@dataclass(frozen=True)
class Calibration:
    """Per-task ``scale`` and ``bias``: calibrated logit = ``scale * logit + bias`` (temperature ``1 / scale``)."""

    method: Method
    scale: tuple[float, ...]
    bias: tuple[float, ...]

    @property
    def temperature(self) -> tuple[float, ...]:
        return tuple(1.0 / a for a in self.scale)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated logits, ``(N, T)`` or ``(N,)`` like the input."""
        z = np.asarray(logits, dtype=np.float64)
        scale, bias = np.asarray(self.scale), np.asarray(self.bias)
        return z * scale + bias if z.ndim == 2 else z * scale[0] + bias[0]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.apply(logits)))

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "scale": list(self.scale), "bias": list(self.bias)}


def fit_calibration(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                    method: str = "temperature", *, max_iter: int = 100, tol: float = 1e-9) -> Calibration:
    """Fit ``method`` on logits ``(N,)`` or ``(N, T)`` and 0/1 labels of the same shape, one fit per task.

    Raises a ConfigError for an unknown method, mismatched shapes, a task whose labels are all equal (there
    is nothing to calibrate against) or a fit whose scale is not positive.
    """
    if method not in METHODS:
        raise ConfigError(f"The 'method' parameter of fit_calibration must be one of "
                          f"{', '.join(repr(m) for m in METHODS)}. Got {method!r} instead.")
    z = _as_2d(logits, "logits")
    y = _as_2d(labels, "labels")
    if z.shape != y.shape:
        raise ConfigError(f"fit_calibration: logits {z.shape} and labels {y.shape} differ in shape.")
    scales, biases = [], []
    for t in range(z.shape[1]):
        col, target = z[:, t], y[:, t]
        if not np.isfinite(col).all():
            raise ConfigError(f"fit_calibration: task {t} has non-finite logits.")
        if target.min() == target.max():
            raise ConfigError(f"fit_calibration: task {t} has only one label value ({target[0]:g}) in the "
                              f"{len(target):,} rows; nothing to calibrate against.")
        a, b = _newton(col, target, intercept=method == "platt", max_iter=max_iter, tol=tol)
        if not a > 0:
            raise ConfigError(f"fit_calibration: task {t}'s fitted scale is {a:.4g} <= 0 (its logits rank the "
                              f"rows worse than chance); calibration would reverse the order.")
        scales.append(a)
        biases.append(b)
    return Calibration(method=method, scale=tuple(scales), bias=tuple(biases))


class Calibrated(nn.Module):
    """A model whose logits ``(B, T)`` pass through a fitted :class:`Calibration`: ``scale * z + bias``.

    The parameters are buffers (saved in the ``state_dict``, never trained); ``model`` is the wrapped module.
    """

    scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, model: nn.Module, calibration: Calibration) -> None:
        super().__init__()
        self.model = model
        self.method = calibration.method
        self.register_buffer("scale", torch.tensor(calibration.scale, dtype=torch.float32))
        self.register_buffer("bias", torch.tensor(calibration.bias, dtype=torch.float32))

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        logits: torch.Tensor = self.model(*args, **kwargs)
        if logits.shape[-1] != self.scale.numel():
            raise ConfigError(f"Calibrated: the model gives {logits.shape[-1]} task logits, the calibration "
                              f"has {self.scale.numel()}.")
        return logits * self.scale.to(logits.dtype) + self.bias.to(logits.dtype)


def calibrate(model: nn.Module, source: ExampleSource, split: str = "valid", method: str = "temperature", *,
              batch_size: int = 8192) -> Calibrated:
    """``Calibrated(model, fit_calibration(logits, labels, method))`` with the ranking model's float32 logits
    and the labels of ``split``'s rows (one fit per task). Use a split the reported metrics do not come from."""
    rows = source.rows(split)
    if len(rows) == 0:
        raise ConfigError(f"calibrate: the {split!r} split has no labelled rows.")
    logits = predict_logits(model, source, rows, batch_size=batch_size)
    return Calibrated(model, fit_calibration(logits, source.labels[rows], method))


def _as_2d(values: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) \
        else np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or len(array) == 0:
        raise ConfigError(f"fit_calibration: {name} must be (N,) or (N, T) with N > 0. Got shape {array.shape}.")
    return array


def _loss(z: np.ndarray, y: np.ndarray, a: float, b: float) -> float:
    s = a * z + b
    return float(np.mean(np.logaddexp(0.0, s) - y * s))  # the BCE of sigmoid(s), stable for any |s|


def _newton(z: np.ndarray, y: np.ndarray, *, intercept: bool, max_iter: int, tol: float) -> tuple[float, float]:
    """Minimise the mean BCE of ``sigmoid(a z + b)`` over ``(a, b)`` (``b = 0`` without ``intercept``), until
    the gradient's largest entry is below ``tol``."""
    a, b = 1.0, 0.0
    loss = _loss(z, y, a, b)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(a * z + b)))
        r, w = p - y, p * (1.0 - p)
        if intercept:
            grad = np.array([np.mean(r * z), np.mean(r)])
            hess = np.array([[np.mean(w * z * z), np.mean(w * z)], [np.mean(w * z), np.mean(w)]])
            step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        else:
            grad = np.array([np.mean(r * z), 0.0])
            step = np.array([grad[0] / (np.mean(w * z * z) + 1e-12), 0.0])
        if float(np.abs(grad).max()) < tol:
            break
        t = 1.0
        while True:  # backtracking: Newton's full step can overshoot far from the optimum
            new_loss = _loss(z, y, a - t * step[0], b - t * step[1])
            if new_loss <= loss or t < 1e-8:
                break
            t *= 0.5
        a, b, loss = a - t * step[0], b - t * step[1], new_loss
    return float(a), float(b)

"""Training a ranking model: mini-batches, Adam, validation with early stopping, resumable checkpoints.

The model maps a :class:`~qarm.features.RankingBatch` to logits ``(B, T)``; this module owns everything
else (TorchRec / nanoGPT split: the model is not the trainer):

* **loss**: the sum over tasks of each task's mean binary cross-entropy with logits, plus the model's own
  auxiliary loss when it has one (a method ``auxiliary_loss()`` returning a scalar tensor or None, computed
  during the last forward, e.g. EM3's content-ID contrastive loss);
* **batches**: epoch ``e`` visits the training rows in the order ``default_rng([seed, e])``; global step
  ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, so the step number alone
  says where the data stands and a resumed run replays nothing and skips nothing;
* **validation** every ``eval_every`` steps (default: at each epoch end) and when training stops:
  :func:`predict` on the valid split, AUC / GAUC / log loss per task (:mod:`qarm.evaluate.metrics`),
  the monitored value averaged over tasks; ``patience`` evaluations without improvement stop training,
  and the best weights are the result;
* **checkpoints** every ``checkpoint_every`` steps, at each epoch end and when training stops:
  ``checkpoint.safetensors`` (model, best model, Adam state, torch RNG state; the JSON training state
  in its metadata, so one atomic rename writes everything), ``state.json`` (a readable copy of that
  state) and ``best.safetensors`` (the best weights alone). ``resume=True`` continues from the
  checkpoint, and an interrupted and resumed run ends with exactly the weights of an uninterrupted one;
* **data parallel**: called inside a process group (``torchrun``, or ``qarm train --nproc N``:
  :mod:`qarm.distributed`), :func:`train` wraps the model in ``DistributedDataParallel`` (gloo on the CPU,
  NCCL on CUDA). Every rank draws the same global batch (the epoch's permutation by seed and epoch) and
  trains on its share ``rows[rank::world]``; each rank's loss is weighted by its share of the global batch,
  so the averaged gradient is the global batch's mean gradient and N ranks take the steps one rank takes
  with the same ``batch_size`` (up to float summation order). Every rank validates on the whole split (the
  same numbers, so the same stopping decision); only rank 0 writes files. The checkpoint holds the
  unwrapped model and the optimiser, and no world size: a run resumes under any number of ranks;
* **device**: ``device`` ``"cpu"`` (default), ``"cuda"`` or ``"auto"`` (CUDA when available): the model and
  every batch go there; checkpoints are written from CPU copies and load onto any device.

Out folder::

    checkpoint.safetensors   the latest state (resume)
    state.json               step, epoch, history, best metric, identity of the run (readable copy)
    best.safetensors         the best weights (model ``state_dict``)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from torch import nn

from qarm.config import from_dict, to_dict
from qarm.data.io import atomic_write_bytes, write_json
from qarm.determinism import deterministic
from qarm.distributed import DEVICES, DeviceName, barrier, rank, resolve_device, world_size
from qarm.errors import CheckpointMismatch, ConfigError, QarmError
from qarm.evaluate import metrics as M
from qarm.features.batch import RankingBatch
from qarm.features.examples import ExampleSource
from qarm.models import describe_model, recorded_model_config
from qarm.models.layers import required
from qarm.optim import make_adam, sparse_tables
from qarm.precision import PRECISIONS, Precision, autocast
from qarm.progress import progress_bar
from qarm.quantize._common import check_float, check_int, check_option

CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_FILE = "state.json"
BEST_FILE = "best.safetensors"
CHECKPOINT_FORMAT = "qarm.train/1"
MONITORS = ("gauc", "auc", "logloss")
# Settings that may change between an interrupted run and its resumption (budgets, speed, output).
_RESUMABLE = ("epochs", "max_steps", "max_seconds", "threads", "checkpoint_every", "eval_batch_size", "device")

Log = Callable[[str], None]
OnStep = Callable[[int, float], None]


@dataclass
class TrainConfig:
    """The training loop. Defaults train MicroLens-50k (1.3M rows per epoch) in minutes on 2 cores."""

    epochs: int = 5  # an upper bound: early stopping usually ends training after 1-3 epochs
    batch_size: int = 1024  # large batches keep 2 CPU cores busy; Adam at 1e-3 is stable at this size
    lr: float = 1e-3  # Adam's default, the usual rate of DIN / MMoE models
    weight_decay: float = 0.0  # L2 on every parameter would shrink rare IDs' embeddings; off
    grad_clip: float | None = None  # the BCE loss is bounded in practice: no clipping needed
    monitor: Literal["gauc", "auc", "logloss"] = "gauc"  # the paper's user-level AUC, mean over tasks
    patience: int = 2  # validations without improvement before stopping
    min_delta: float = 1e-4  # an AUC change below 0.01 points is noise
    eval_every: int | None = None  # steps between validations; None: at each epoch end
    eval_batch_size: int = 8192  # no backward pass: larger batches are faster
    checkpoint_every: int = 500  # steps (~30 s of training on MicroLens): little work lost to an interruption
    seed: int = 0  # batch order (per-epoch permutations) and dropout
    max_steps: int | None = None  # an upper bound on optimiser steps (smoke tests, quick runs)
    max_seconds: float | None = None  # a training-time budget across resumptions; validation not counted
    threads: int | None = None  # torch intra-op threads during training; None: leave torch's setting
    precision: Precision = "fp32"  # "bf16": matrix products in bfloat16 autocast (qarm.precision), weights fp32
    device: DeviceName = "cpu"  # "cuda" or "auto" (CUDA when available): where the model and batches live

    def __post_init__(self) -> None:
        name = "TrainConfig"
        for param, low in (("epochs", 1), ("batch_size", 1), ("patience", 1), ("eval_batch_size", 1),
                           ("checkpoint_every", 1)):
            check_int(name, param, getattr(self, param), low)
        for param in ("eval_every", "max_steps", "threads"):
            check_int(name, param, getattr(self, param), 1, none_ok=True)
        check_int(name, "seed", self.seed, 0)
        check_float(name, "lr", self.lr, 0.0)
        if not self.lr > 0:
            raise ConfigError(f"The 'lr' parameter of {name} must be > 0. Got {self.lr!r} instead.")
        check_float(name, "weight_decay", self.weight_decay, 0.0)
        check_float(name, "min_delta", self.min_delta, 0.0)
        for param in ("grad_clip", "max_seconds"):
            value = getattr(self, param)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0 or not math.isfinite(value)):
                raise ConfigError(f"The '{param}' parameter of {name} must be > 0 or None. Got {value!r} instead.")
        check_option(name, "monitor", self.monitor, MONITORS)
        check_option(name, "precision", self.precision, PRECISIONS)
        check_option(name, "device", self.device, DEVICES)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainConfig:
        return from_dict(cls, data, where="train")


@dataclass
class TrainHistory:
    """What happened (JSON-ready through :meth:`to_dict`).

    ``evals``: one ``{"step", "epoch", "train_loss", "metric", "valid": {task: {"auc", "gauc",
    "logloss"}}, "seconds"}`` per validation, ``train_loss`` being the mean loss of the steps since the
    previous validation; ``stopped``: ``"epochs"``, ``"max_steps"``, ``"early_stopping"``,
    ``"time_budget"``, or ``""`` while running.
    """

    evals: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_metric: float | None = None
    stopped: str = ""
    resumed_from: list[int] = field(default_factory=list)
    steps: int = 0
    examples: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainHistory:
        return cls(**data)


@dataclass
class TrainResult:
    """The trained model (best weights loaded), its history and speed.

    Attributes
    ----------
    model : nn.Module, the unwrapped model with the best weights
    best_state : dict name -> tensor, the best weights (``model.state_dict()``)
    history : TrainHistory
    examples_per_second : float, training examples per second of training time (validation excluded)
    out_dir : Path or None
    optimizer_state : dict or None, Adam's ``state_dict()`` when training stopped (a warm start carries it
        over: :mod:`qarm.train.continual`)
    """

    model: nn.Module
    best_state: dict[str, torch.Tensor]
    history: TrainHistory
    examples_per_second: float
    out_dir: Path | None
    optimizer_state: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"history": self.history.to_dict(), "examples_per_second": self.examples_per_second,
                "model": describe_model(self.model), "out_dir": None if self.out_dir is None else str(self.out_dir)}


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over tasks of the mean BCE-with-logits: ``logits``, ``labels`` ``(B, T)`` -> scalar."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none").mean(dim=0).sum()


@torch.no_grad()
def predict(model: nn.Module, source: ExampleSource, split: str, *, batch_size: int = 8192,
            rows: np.ndarray | None = None, precision: Precision = "fp32") -> pd.DataFrame:
    """Scores of every example of a split (or of ``rows``), for :func:`qarm.evaluate.metrics.evaluate_predictions`.
    ``precision="bf16"`` runs the matrix products in bfloat16 autocast (:mod:`qarm.precision`).

    Returns
    -------
    DataFrame, one row per example in row order: ``user_id, item_id, label_<task>..., cold_item,
    longtail_group, score_<task>...`` (probabilities, float64) and ``row`` (the interaction row).
    """
    rows = source.rows(split) if rows is None else np.asarray(rows, dtype=np.int64)
    return predictions_frame(source, rows, predict_logits(model, source, rows, batch_size=batch_size,
                                                          precision=precision))


def predictions_frame(source: ExampleSource, rows: np.ndarray, logits: torch.Tensor) -> pd.DataFrame:
    """:func:`predict`'s frame for the examples ``rows`` from their logits ``(len(rows), T)``."""
    scores = torch.sigmoid(logits).double().numpy()
    frame = source.frame(rows)
    for j, task in enumerate(source.tasks):
        frame[f"{M.SCORE_PREFIX}{task}"] = scores[:, j]
    frame["row"] = rows
    return frame


def predict_logits(model: nn.Module, source: ExampleSource, rows: np.ndarray, *, batch_size: int = 8192,
                   precision: Precision = "fp32") -> torch.Tensor:
    """Float32 logits ``(len(rows), T)`` of the examples ``rows``, in row order, on the CPU (eval mode)."""
    model = _unwrap(model)
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(precision, device.type):
            chunks = [model(source.batch(rows[s:s + batch_size]).to(device)).float().cpu()
                      for s in range(0, len(rows), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros((0, len(source.tasks)))


def validation_metrics(frame: pd.DataFrame, tasks: tuple[str, ...] | list[str]) -> dict[str, dict[str, float]]:
    """AUC, GAUC and log loss per task of a :func:`predict` frame: ``{task: {"auc", "gauc", "logloss"}}``."""
    users = frame["user_id"].to_numpy()
    out = {}
    for task in tasks:
        y = frame[f"{M.LABEL_PREFIX}{task}"].to_numpy()
        p = frame[f"{M.SCORE_PREFIX}{task}"].to_numpy()
        out[task] = {"auc": M.auc(y, p), "gauc": M.gauc(y, p, users), "logloss": M.logloss(y, p)}
    return out


def train(model: nn.Module, source: ExampleSource, config: TrainConfig | None = None,
          out_dir: str | Path | None = None, *, resume: bool = True, progress: bool = True,
          log: Log | None = None, on_step: OnStep | None = None,
          optimizer_state: dict[str, Any] | None = None) -> TrainResult:
    """Train ``model`` on ``source``'s training rows, validating on its valid split.

    A source whose valid split is empty (a time window of continuous training: no future to validate on)
    trains for its budget without validation, and the result is the last weights.

    Parameters
    ----------
    model : nn.Module, ``forward(RankingBatch) -> logits (B, T)`` (or a DDP wrapper of one); moved to
        ``config.device``, and wrapped in DDP when called inside a process group
    source : ExampleSource
    config : TrainConfig
    out_dir : path or None
        Checkpoints go here; None trains in memory only (no resume).
    resume : bool
        Continue from ``out_dir``'s checkpoint when there is one (written by the same run settings);
        False starts over and replaces it.
    progress : bool
        A progress bar on stderr with the running loss and the last validation metric.
    log : callable or None
        Receives one line per validation.
    on_step : callable ``(step, loss)`` or None
        Called after every step (after its checkpoint, if any); tests raise from it to interrupt.
    optimizer_state : dict or None
        Adam's ``state_dict()`` to start from (a warm start), unless a checkpoint is resumed.

    Returns
    -------
    TrainResult, the model holding its best weights.
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    with deterministic():  # repeatable on several threads, and faster here (qarm.determinism)
        return _Trainer(model, source, config, out_dir, progress, log, on_step, optimizer_state).run(resume)


class _Trainer:
    def __init__(self, model: nn.Module, source: ExampleSource, config: TrainConfig, out_dir: str | Path | None,
                 progress: bool, log: Log | None, on_step: OnStep | None,
                 optimizer_state: dict[str, Any] | None = None) -> None:
        self.device = resolve_device(config.device, "--device (train.device)")
        self.module, self.source, self.config = _unwrap(model).to(self.device), source, config
        self.rank, self.world = rank(), world_size()
        self.model = _data_parallel(model, self.device) if self.world > 1 else model
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.progress = progress and self.rank == 0
        self.log = log if log is not None and self.rank == 0 else (lambda line: None)
        self.on_step = on_step
        self.tasks = tuple(source.tasks)
        model_tasks = tuple(getattr(self.module, "tasks", self.tasks))
        if model_tasks != self.tasks:
            raise ConfigError(f"the model predicts {list(model_tasks)} but the data has {list(self.tasks)}")
        self.n_train = len(source.rows("train"))
        if self.n_train == 0:
            raise QarmError("no training rows (the train split is empty once cold-start items are removed)")
        self.steps_per_epoch = -(-self.n_train // config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        # The fused kernel updates the embedding tables ~3x faster than the loop on CPU; same numbers.
        # Tables built sparse (a model's size rule, e.g. 1M items) train with SparseAdam (qarm.optim).
        self.optimizer = make_adam(self.module, config.lr, config.weight_decay, fused=True)
        if config.grad_clip is not None and sparse_tables(self.module):
            raise ConfigError(f"grad_clip={config.grad_clip!r} but the model has sparse embedding tables "
                              "(gradient clipping needs dense gradients): set grad_clip to null or build the "
                              "model with sparse_tables: false")
        self.initial_optimizer_state = optimizer_state
        self.validates = len(source.rows("valid")) > 0
        self.history = TrainHistory()
        self.step = 0
        self.bad_evals = 0
        self.loss_sum, self.loss_count = 0.0, 0  # since the last validation
        self.best_state: dict[str, torch.Tensor] | None = None
        self._epoch_rows: tuple[int, np.ndarray] | None = None
        self.tables_digest = _lookup_digest(self.module)

    # -- data ----------------------------------------------------------------------------------------

    def batch_at(self, step: int) -> tuple[RankingBatch, int, float]:
        """Global step ``step``'s batch: this rank's share of it (on the device), the global batch's size,
        and the weight of this rank's loss (its share of the global batch times the world size, so that
        DDP's average of the ranks' gradients is the global batch's mean gradient). A rank whose share is
        empty (a last batch smaller than the world) runs one row at weight 0, since every rank must step."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            self._epoch_rows = (epoch, self.source.order("train", shuffle=True, seed=self.config.seed, epoch=epoch))
        size = self.config.batch_size
        rows = self._epoch_rows[1][index * size:(index + 1) * size]
        if self.world == 1:
            return self.source.batch(rows).to(self.device), len(rows), 1.0
        share = rows[self.rank::self.world]
        weight = len(share) * self.world / len(rows)
        return self.source.batch(share if len(share) else rows[:1]).to(self.device), len(rows), weight

    # -- steps and validation ------------------------------------------------------------------------

    def train_step(self, batch: RankingBatch, weight: float = 1.0) -> float:
        """One optimiser step; returns this rank's (unweighted) loss."""
        self.model.train()
        with autocast(self.config.precision, self.device.type):
            logits = self.model(batch)
        loss = loss_fn(logits, required(batch.labels, "labels"))
        auxiliary = getattr(self.module, "auxiliary_loss", None)
        extra = auxiliary() if callable(auxiliary) else None
        if extra is not None:
            loss = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        (loss if weight == 1.0 else loss * weight).backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def validate(self) -> bool:
        """Validate, keep the best weights; True when early stopping should end training."""
        if not self.validates:  # no valid rows: the last weights are the result
            return False
        start = time.perf_counter()
        frame = predict(self.module, self.source, "valid", batch_size=self.config.eval_batch_size,
                        precision=self.config.precision)
        valid = validation_metrics(frame, self.tasks)
        values = [v[self.config.monitor] for v in valid.values() if not math.isnan(v[self.config.monitor])]
        if not values:
            raise QarmError(f"the validation {self.config.monitor} is undefined for every task (the valid split "
                            "needs positives and negatives; per user for gauc); choose another monitor")
        metric = float(np.mean(values))
        seconds = time.perf_counter() - start
        self.history.eval_seconds += seconds
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                  "train_loss": self.loss_sum / self.loss_count if self.loss_count else None,
                  "metric": metric, "valid": valid, "seconds": round(seconds, 3)}
        self.history.evals.append(record)
        self.loss_sum, self.loss_count = 0.0, 0
        improved = self._improved(metric)
        loss_text = "-" if record["train_loss"] is None else f"{record['train_loss']:.5f}"
        self.log(f"step {self.step:,} (epoch {record['epoch']:.2f}): train loss {loss_text}, "
                 f"valid {self.config.monitor} {metric:.5f}" + (" (best)" if improved else ""))
        if improved:
            self.history.best_metric, self.history.best_step = metric, self.step
            self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self.bad_evals = 0
            if self.out_dir is not None and self.rank == 0:
                atomic_write_bytes(self.out_dir / BEST_FILE, save_tensors(
                    _contiguous(self.best_state), {"format": CHECKPOINT_FORMAT, "step": str(self.step),
                                                   "monitor": self.config.monitor, "metric": repr(metric)}))
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.config.patience

    def _improved(self, metric: float) -> bool:
        best = self.history.best_metric
        if best is None:
            return True
        if self.config.monitor == "logloss":
            return metric < best - self.config.min_delta
        return metric > best + self.config.min_delta

    # -- checkpoints ---------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: settings, model, parameter shapes, data."""
        settings = {k: v for k, v in to_dict(self.config).items() if k not in _RESUMABLE}
        shapes = {k: list(v.shape) for k, v in self.module.state_dict().items()}
        return {"train": settings, "model": describe_model(self.module), "shapes": shapes,
                "data": self.source.describe(), "tables": self.tables_digest}

    def _with_new_defaults(self, identity: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's identity with the settings its writer did not have (fields a later qarm added to the
        training or model config) at their defaults: a field added with a default that keeps the old
        behaviour must not make an unfinished run "another run" and restart it from scratch."""
        filled = dict(identity)
        filled.pop("world_size", None)  # recorded until resumes under any number of ranks were allowed
        if isinstance(identity.get("train"), dict):
            defaults = {k: v for k, v in to_dict(TrainConfig()).items() if k not in _RESUMABLE}
            filled["train"] = _merge_defaults(defaults, identity["train"])
        model, config = identity.get("model"), getattr(self.module, "config", None)
        if isinstance(model, dict) and isinstance(model.get("config"), dict) and config is not None:
            try:
                defaults = to_dict(type(config)())
            except TypeError:  # a config without defaults for every field: nothing to fill
                return filled
            recorded = recorded_model_config(str(model.get("name")), model["config"], None)  # old defaults first
            filled["model"] = {**model, "config": _merge_defaults(defaults, recorded)}
        return filled

    def save_checkpoint(self) -> None:
        if self.out_dir is None or self.rank != 0:
            return
        tensors = {f"model/{k}": v for k, v in self.module.state_dict().items()}
        tensors |= {f"best/{k}": v for k, v in (self.best_state or {}).items()}
        optimizer = self.optimizer.state_dict()
        for pid, entries in optimizer["state"].items():
            for key, value in entries.items():
                tensors[f"optim/{pid}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tensors["rng/torch"] = torch.get_rng_state()  # the CPU generator (CUDA dropout is not replayed)
        state = {"format": CHECKPOINT_FORMAT, "step": self.step, "bad_evals": self.bad_evals,
                 "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                 "param_groups": optimizer["param_groups"], "history": self.history.to_dict(),
                 "identity": self.identity(), "config": to_dict(self.config)}
        text = json.dumps(state)
        atomic_write_bytes(self.out_dir / CHECKPOINT_FILE,
                           save_tensors(_contiguous(tensors), {"format": CHECKPOINT_FORMAT, "state": text}))
        write_json(self.out_dir / STATE_FILE, state)

    def load_checkpoint(self) -> bool:
        path = None if self.out_dir is None else self.out_dir / CHECKPOINT_FILE
        if path is None or not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            state = json.loads(meta["state"])
        except Exception as exc:  # a truncated or foreign file: say which, do not guess
            raise QarmError(f"{path}: cannot read the checkpoint ({exc}); remove it or pass resume=False") from exc
        mine, theirs = self.identity(), self._with_new_defaults(state.get("identity", {}))
        if mine != theirs:
            differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise CheckpointMismatch(f"{path} was written by another run (different {', '.join(differing)}); "
                              "pass resume=False to start over or use another out_dir")
        self.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
        self.best_state = best or None
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, pid, name = key.split("/", 2)
                optim_state.setdefault(int(pid), {})[name] = value
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
        torch.set_rng_state(tensors["rng/torch"])
        self.step, self.bad_evals = int(state["step"]), int(state["bad_evals"])
        self.loss_sum, self.loss_count = float(state["loss_sum"]), int(state["loss_count"])
        self.history = TrainHistory.from_dict(state["history"])
        self.history.resumed_from.append(self.step)
        barrier()  # every rank has read the checkpoint before rank 0 may replace it
        return True

    # -- loop ----------------------------------------------------------------------------------------

    def run(self, resume: bool) -> TrainResult:
        threads_before = torch.get_num_threads()
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        try:
            return self._run(resume)
        finally:
            torch.set_num_threads(threads_before)

    def _run(self, resume: bool) -> TrainResult:
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not resume and self.rank == 0:
                for name in (CHECKPOINT_FILE, STATE_FILE, BEST_FILE):
                    (self.out_dir / name).unlink(missing_ok=True)
        torch.manual_seed(self.config.seed)
        loaded = resume and self.load_checkpoint()
        if not loaded and self.initial_optimizer_state is not None:
            self.optimizer.load_state_dict(self.initial_optimizer_state)
            for group in self.optimizer.param_groups:  # this run's settings, the carried moments
                group["lr"], group["weight_decay"] = self.config.lr, self.config.weight_decay
        # A finished run stays finished unless a larger budget (epochs, max_steps, max_seconds) is given.
        stop = "early_stopping" if loaded and self.history.stopped == "early_stopping" else self._budget_spent()
        seconds_before, start = self.history.train_seconds, time.perf_counter()
        if loaded:
            self.log(f"resuming from step {self.step:,} of {self.total_steps:,} ({self.out_dir})")
        with progress_bar(self.total_steps, "training", self.progress, completed=min(self.step, self.total_steps)) \
                as advance:
            while not stop:
                batch, global_size, weight = self.batch_at(self.step)
                loss = self.train_step(batch, weight)
                self.step += 1
                self.loss_sum += loss
                self.loss_count += 1
                self.history.steps, self.history.examples = self.step, self.history.examples + global_size
                self.history.train_seconds = seconds_before + time.perf_counter() - start
                epoch_end = self.step % self.steps_per_epoch == 0
                stop = self._budget_spent()
                every = self.config.eval_every
                if (every is not None and self.step % every == 0) or (every is None and epoch_end) or stop:
                    paused = time.perf_counter()
                    if self.validate() and not stop:
                        stop = "early_stopping"
                    start += time.perf_counter() - paused  # validation time is not training time
                self.history.stopped = stop
                if stop or epoch_end or self.step % self.config.checkpoint_every == 0:
                    paused = time.perf_counter()
                    self.save_checkpoint()
                    start += time.perf_counter() - paused
                best = self.history.best_metric
                advance(1, loss=self.loss_sum / max(self.loss_count, 1),
                        **({f"val_{self.config.monitor}": best} if best is not None else {}))
                if self.on_step is not None:
                    self.on_step(self.step, loss)
        if self.best_state is None or not self.validates:  # nothing validated: the current weights
            self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            if not self.validates and self.out_dir is not None and self.rank == 0:
                atomic_write_bytes(self.out_dir / BEST_FILE, save_tensors(
                    _contiguous(self.best_state), {"format": CHECKPOINT_FORMAT, "step": str(self.step),
                                                   "monitor": "none (no valid rows: the last weights)"}))
        self.module.load_state_dict(self.best_state)
        seconds = self.history.train_seconds
        speed = self.history.examples / seconds if seconds > 0 else float("nan")
        return TrainResult(model=self.module, best_state=self.best_state, history=self.history,
                           examples_per_second=speed, out_dir=self.out_dir,
                           optimizer_state=self.optimizer.state_dict())

    def _budget_spent(self) -> str:
        if self.step >= self.total_steps:
            at_epochs = self.total_steps == self.config.epochs * self.steps_per_epoch
            return "epochs" if at_epochs else "max_steps"
        budget = self.config.max_seconds
        if budget is not None:
            spent = self.history.train_seconds >= budget
            if self.world > 1:  # the ranks' clocks differ: rank 0's decides, or a rank would wait forever
                flag = torch.tensor([float(spent)], device=self.device)
                torch.distributed.broadcast(flag, src=0)
                spent = bool(flag.item())
            if spent:
                return "time_budget"
        return ""


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``best.safetensors`` (or a checkpoint's current weights) into ``model``; returns it."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if any(k.startswith("model/") for k in keys):
            state = {k[6:]: f.get_tensor(k) for k in keys if k.startswith("model/")}
        else:
            state = {k: f.get_tensor(k) for k in keys}
    _unwrap(model).load_state_dict(state)
    return model


def _lookup_digest(module: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's non-persistent buffers: the item tables it looks up (codes,
    frozen vectors, vocabulary). They are not in its checkpoints, so the identity records them: a
    checkpoint of the same model built on other codes or vectors is not resumed."""
    persistent = set(module.state_dict())
    h = hashlib.sha256()
    for name, buffer in sorted(module.named_buffers()):
        if name in persistent or buffer is None:
            continue
        value = buffer.detach().cpu().contiguous()
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _merge_defaults(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with the keys of ``defaults`` it lacks added (nested dicts merged the same way)."""
    merged = dict(given)
    for key, default in defaults.items():
        if key not in given:
            merged[key] = default
        elif isinstance(default, dict) and isinstance(given[key], dict):
            merged[key] = _merge_defaults(default, given[key])
    return merged


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (unless already wrapped). Buffers are synced once, at the
    wrapping, not at each step: a model's buffers are its item lookup tables (codes, frozen vectors), built
    alike on every rank and never updated."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    return nn.parallel.DistributedDataParallel(
        _unwrap(model), device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither."""
    tensors = [*model.parameters(), *model.buffers()][:1]
    return tensors[0].device if tensors else torch.device("cpu")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

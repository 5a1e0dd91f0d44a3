"""Alignment training: symmetric in-batch InfoNCE over item2item (trigger, target) pairs.

QARM's alignment step fine-tunes the content encoder so that items users treat alike (mined
item2item pairs) get close vectors. A batch is ``B`` pairs; both items of every pair go through the
:class:`~qarm.encode.content.ContentEncoder` (text model with its top layers trainable, plus the fusion
head) and the loss is :func:`info_nce`. The model is not the trainer: the encoder maps content to
vectors; :func:`train_alignment` owns the loop, the optimiser, evaluation, early stopping and the
checkpoints.

Loss
----
With ``a``, ``b`` the L2-normalised ``(B, d)`` vectors of triggers and targets and ``tau`` the
temperature, ``S = a b^T / tau`` and::

    L = 1/2 [ mean_i -log softmax_j(S_ij)[i]  +  mean_i -log softmax_j(S_ji)[i] ]

(trigger -> target and target -> trigger; every other item of the batch is a negative).

False negatives. With popular items a batch often holds the same item twice. For the row of pair ``i``
a candidate ``j != i`` is masked out of the softmax (logit -inf) when it is the anchor item itself or
a positive of the anchor within the batch: the same target twice, the same trigger with another target
(that target is also its positive), or the reverse pair. Pairs are treated as undirected (item2item
similarity is symmetric). The diagonal is never masked. Without this the loss would push an item away
from itself or from a known neighbour, and it could not reach zero even for perfect vectors.

Budget
------
Training is a budget of steps (``max_steps``, optionally ``max_epochs`` and a wall ``time_budget_s``),
not full epochs: MicroLens-50k has 19k items and 10^5+ pairs, and the whole stage must fit 15 minutes on
2 cores. By default the text model is frozen and its output cached (``trainable_layers=0``), so a step
of 256 pairs is the head alone (~10 ms); with transformer layers trainable a 64-pair step costs ~1-2 s.

Checkpoints and resume
----------------------
Every ``checkpoint_every`` steps (and when training stops) ``out_dir/checkpoint.pt`` is written
atomically: the trainable tensors and the head, the AdamW and scheduler states, the torch RNG state
(dropout), the step, the early-stopping state and the history, plus the config, the encoder record and
a digest of the pairs. It holds only tensors and plain data and is read with
``torch.load(weights_only=True)``: no pickle code runs. Batches are a pure function of ``(seed, step)``
(one seeded permutation of the pairs per epoch), so ``resume=True`` continues exactly where the
checkpoint left off and ends where an uninterrupted run would (up to float rounding). The best
evaluation's weights are kept in ``best.safetensors``; training returns the encoder with those weights.
A checkpoint from another config (``time_budget_s`` aside), another encoder or other pairs is refused.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_torch

from qarm.align.user2item import score_block_rows
from qarm.config import from_dict, to_dict
from qarm.data.io import atomic_write_bytes
from qarm.data.schema import Dataset
from qarm.determinism import deterministic
from qarm.distributed import DEVICES, DeviceName, barrier, rank, resolve_device, world_size
from qarm.encode.cache import VectorCache, digest_arrays
from qarm.encode.content import ContentEncoder, ContentEncoderConfig, ItemInputs, encode_items, save_encoder
from qarm.encode.frozen import FrozenTextStates, build_text_states
from qarm.errors import CheckpointMismatch, ConfigError, DataError, QarmError
from qarm.progress import progress_bar
from qarm.provenance import RUN_ID_KEY

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

TRIGGER = "trigger"
TARGET = "target"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.safetensors"
VECTORS_FILE = "vectors.safetensors"
RECORD_FILE = "alignment.json"
Monitor = Literal["holdout_loss", "holdout_recall@10"]
_RESUMABLE_KEYS_IGNORED = ("time_budget_s", "device")  # may change between a run and its resume


# --------------------------------------------------------------------------------------------------
# Loss


def false_negative_mask(a_ids: torch.Tensor, b_ids: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` bool mask of the trigger -> target logits to drop (see the module docstring).

    ``mask[i, j]`` (``j != i``) is True when item ``b_ids[j]`` is the anchor ``a_ids[i]`` itself or is
    paired with it somewhere in the batch (in either direction). The target -> trigger mask is its
    transpose, because the relation is symmetric.
    """
    a_ids = torch.as_tensor(a_ids, dtype=torch.int64)
    b_ids = torch.as_tensor(b_ids, dtype=torch.int64)
    # Batch-local item indices and the (symmetric) adjacency of the batch's pairs: O(B^2), no search.
    items, local = torch.unique(torch.cat([a_ids, b_ids]), return_inverse=True)
    a_local, b_local = local[: len(a_ids)], local[len(a_ids):]
    related = torch.zeros((len(items), len(items)), dtype=torch.bool)
    related[a_local, b_local] = True
    related[b_local, a_local] = True
    related.fill_diagonal_(True)  # the anchor itself
    mask = related[a_local][:, b_local]
    mask.fill_diagonal_(False)
    return mask


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.05,
    a_ids: torch.Tensor | np.ndarray | None = None,
    b_ids: torch.Tensor | np.ndarray | None = None,
    *,
    a_logq: torch.Tensor | None = None,
    b_logq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE of row-aligned pairs ``(a[i], b[i])``.

    Parameters
    ----------
    a, b : (B, d) float tensors, L2-normalised (cosine = dot product); row ``i`` of both is a positive pair.
    temperature : float > 0, the softmax temperature ``tau`` (logits are ``a b^T / tau``).
    a_ids, b_ids : (B,) item ids of the rows; when given, false negatives are masked (module docstring).
    a_logq, b_logq : (B,) log sampling probabilities of the rows' items; when given, the logit of every
        candidate is lowered by its own ``log q`` (sampling-bias correction, module docstring): the
        trigger -> target logits by ``b_logq``, the target -> trigger ones by ``a_logq``.

    Returns
    -------
    Scalar tensor: the mean of the trigger -> target and target -> trigger cross-entropies.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"The 'temperature' parameter of info_nce must be > 0. Got {temperature!r} instead.")
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 1:
        raise ValueError(f"a and b must both be (B, d) with B >= 1, got {tuple(a.shape)} and {tuple(b.shape)}")
    if (a_ids is None) != (b_ids is None):
        raise ValueError("pass both a_ids and b_ids, or neither")
    if (a_logq is None) != (b_logq is None):
        raise ValueError("pass both a_logq and b_logq, or neither")
    logits = (a / temperature) @ b.T
    # Masks and corrections enter as one additive (B, B) bias per direction, made without autograd:
    # at B = 4096 every extra elementwise pass over the logits costs ~20-50 ms on 2 cores.
    bias_ab = bias_ba = None
    with torch.no_grad():
        if a_logq is not None and b_logq is not None:  # both or neither (checked above)
            bias_ab = (-b_logq.to(logits))[None, :].expand_as(logits).clone()
            bias_ba = (-a_logq.to(logits))[None, :].expand_as(logits).clone()
        if a_ids is not None:
            a_ids = torch.as_tensor(np.asarray(a_ids) if not isinstance(a_ids, torch.Tensor) else a_ids)
            b_ids = torch.as_tensor(np.asarray(b_ids) if not isinstance(b_ids, torch.Tensor) else b_ids)
            if a_ids.shape != (a.shape[0],) or b_ids.shape != (a.shape[0],):
                raise ValueError(f"a_ids and b_ids must be ({a.shape[0]},), got {tuple(a_ids.shape)} and "
                                 f"{tuple(b_ids.shape)}")
            mask = false_negative_mask(a_ids, b_ids).to(logits.device)
            if bias_ab is None or bias_ba is None:  # both or neither
                bias_ab = torch.zeros_like(logits)
                bias_ba = torch.zeros_like(logits)
            bias_ab.masked_fill_(mask, float("-inf"))
            bias_ba.masked_fill_(mask.T, float("-inf"))
    logits_ab = logits if bias_ab is None else logits + bias_ab
    logits_ba = logits.T if bias_ba is None else logits.T + bias_ba
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (torch.nn.functional.cross_entropy(logits_ab, labels)
                  + torch.nn.functional.cross_entropy(logits_ba, labels))


# --------------------------------------------------------------------------------------------------
# Config and history


def target_ranks(vectors: torch.Tensor, triggers: torch.Tensor, targets: torch.Tensor, *,
                 exclude_self: bool = True, block: int = 1024) -> torch.Tensor:
    """For each (trigger, target) pair of row indices, the number of other rows of ``vectors`` whose dot
    product with the trigger is at least the target's (ties count against the target; the trigger itself
    is left out with ``exclude_self``): int64 ``(n_pairs,)``. Scored ``block`` triggers at a time, fewer
    where that would exceed 256 MiB of scores (:func:`~qarm.align.user2item.score_block_rows`)."""
    ranks = torch.empty(len(triggers), dtype=torch.int64)
    block = score_block_rows(len(vectors), block)
    with torch.no_grad():
        for start in range(0, len(triggers), block):
            t, g = triggers[start:start + block], targets[start:start + block]
            rows = torch.arange(len(t))
            scores = vectors[t] @ vectors.T  # (block, n_items)
            if exclude_self:
                scores[rows, t] = float("-inf")
            target_score = scores[rows, g]
            ranks[start:start + len(t)] = (scores >= target_score[:, None]).sum(dim=1) - 1
    return ranks


AUTO_ALL_MAX_ITEMS = 100_000
"""``eval_candidates="auto"`` ranks among all items up to this many. Among 1M items the 1,024 held-out
pairs of early stopping found 1 target in the top 10 at every evaluation (measured: recall@10 0.00098 from
step 0 to 1,000 while the held-out loss fell 6.39 -> 5.61), so nothing counted as an improvement and the
stage kept step 0; the evaluation sample's own items (the pool) keep the measure informative."""


def ranks_among_all(eval_candidates: str, n_items: int, text_frozen: bool) -> bool:
    """Whether early stopping ranks held-out targets among all items: ``"all"`` / ``"pool"`` as set;
    ``"auto"``: all items when the text model is frozen (cheap: the head on cached vectors) and the catalogue
    has at most ``AUTO_ALL_MAX_ITEMS`` items, the pool otherwise."""
    if eval_candidates != "auto":
        return eval_candidates == "all"
    return text_frozen and n_items <= AUTO_ALL_MAX_ITEMS


@dataclass
class AlignConfig:
    """Alignment training. Defaults measured on MicroLens-50k on 2 CPU cores (RESULTS.md, issue 3): the
    head-only path (``trainable_layers=0``: MiniLM frozen and cached; the projections, the fusion layer
    and the residual MLP trained) at 4,000 steps of 256 pairs takes about a minute and gave ~2.5x the
    pre-trained held-out pair Recall@10, where two trainable MiniLM layers reached 1.07x in 10 minutes
    (a transformer step costs ~1-2 s on 2 cores: a few hundred steps fit the budget).

    ``eval_candidates``: held-out Recall@10 ranks each target among ``"all"`` items (the stage's real
    measure; every item is encoded at each evaluation) or among the items of the evaluation sample
    (``"pool"``, cheap when transformer layers train); ``"auto"``: all items when the text model is
    frozen (the head runs on cached vectors, milliseconds) and the catalogue has at most
    ``AUTO_ALL_MAX_ITEMS`` (100,000) items, the pool otherwise."""

    temperature: float = 0.1  # measured on MicroLens (0.05 / 0.1 / 0.2): 0.1 and 0.2 beat SimCSE's 0.05 by ~1.3x
    batch_size: int = 256  # pairs per step: 255 in-batch negatives per direction; head-only steps cost ~10 ms
    max_steps: int = 4000  # ~10 passes over MicroLens' 107k training pairs; ~1 min head-only on 2 cores
    max_epochs: float | None = None  # optional cap in passes over the training pairs (small pair sets)
    time_budget_s: float | None = 600.0  # guard: 10 min of training leaves 5 for the two encoding passes
    lr: float = 5e-5  # transformer layers (trainable_layers > 0): above BERT's usual 2e-5, few steps must count
    head_lr: float = 3e-3  # the head (projections, fusion, residual MLP): 3e-3 beat 1e-3 with the MLP
    weight_decay: float = 0.1  # AdamW decay; 0.1 beat BERT's usual 0.01 for the residual MLP (less overfitting)
    warmup_steps: int = 100  # linear warm-up then linear decay to 0 at max_steps: no early shock
    trainable_layers: int | Literal["all"] = 0  # 0: head only (MiniLM frozen and cached); 2: MiniLM's top 2 too
    grad_clip: float | None = 1.0  # clip the global grad norm: contrastive losses spike on odd batches
    eval_every: int = 250  # steps between held-out evaluations (head-only: ~0.1 s each on MicroLens)
    eval_pairs: int = 1024  # held-out pairs per evaluation (fixed seeded sample): a stable, cheap estimate
    eval_candidates: Literal["auto", "all", "pool"] = "auto"  # rank targets among all items or the sample's
    monitor: Monitor = "holdout_recall@10"  # early stopping on what the stage is judged by
    patience: int = 4  # evaluations without improvement before stopping (recall on 1k pairs is noisy)
    min_delta: float = 1e-4  # the smallest change that counts as an improvement
    checkpoint_every: int = 500  # steps between checkpoints (also written when training stops)
    seed: int = 0  # batch order (per-epoch permutations), eval sample and dropout
    logq_correction: bool = True  # subtract each candidate's log pair frequency (measured: 0.046 -> 0.070 R@10)
    frozen_cache: Literal["float32", "float16", "off"] = "float32"  # cache the frozen layers' output (exact)
    device: DeviceName = "cpu"  # where the encoder trains: "cuda", or "auto" (CUDA when available)

    def __post_init__(self) -> None:
        name = type(self).__name__

        def bad(param: str, what: str) -> ConfigError:
            return ConfigError(f"The '{param}' parameter of {name} must be {what}. "
                               f"Got {getattr(self, param)!r} instead.")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_num(self.temperature) or not self.temperature > 0:
            raise bad("temperature", "> 0")
        for param, low in (("batch_size", 2), ("max_steps", 1), ("eval_every", 1), ("eval_pairs", 2),
                           ("checkpoint_every", 1), ("patience", 1), ("warmup_steps", 0)):
            if not is_int(getattr(self, param)) or getattr(self, param) < low:
                raise bad(param, f"an int >= {low}")
        if not is_int(self.seed):
            raise bad("seed", "an int")
        for param in ("lr", "head_lr"):
            if not is_num(getattr(self, param)) or not getattr(self, param) > 0:
                raise bad(param, "> 0")
        for param in ("weight_decay", "min_delta"):
            if not is_num(getattr(self, param)) or getattr(self, param) < 0:
                raise bad(param, ">= 0")
        for param in ("max_epochs", "time_budget_s", "grad_clip"):
            value = getattr(self, param)
            if value is not None and (not is_num(value) or not value > 0):
                raise bad(param, "> 0 or None")
        if self.trainable_layers != "all" and (not is_int(self.trainable_layers) or self.trainable_layers < 0):
            raise bad("trainable_layers", "'all' or an int >= 0")
        if not isinstance(self.logq_correction, bool):
            raise bad("logq_correction", "a bool")
        if self.frozen_cache not in ("float32", "float16", "off"):
            raise bad("frozen_cache", "'float32', 'float16' or 'off'")
        if self.eval_candidates not in ("auto", "all", "pool"):
            raise bad("eval_candidates", "'auto', 'all' or 'pool'")
        if self.monitor not in ("holdout_loss", "holdout_recall@10"):
            raise bad("monitor", "'holdout_loss' or 'holdout_recall@10'")
        if self.device not in DEVICES:
            raise bad("device", "'cpu', 'cuda' or 'auto'")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AlignConfig:
        return from_dict(cls, data, where="align")


@dataclass
class AlignHistory:
    """What happened during training (JSON-ready through :meth:`to_dict`).

    ``steps``: one ``{"step", "loss", "lr"}`` per optimiser step (step counts from 1);
    ``evals``: ``{"step", "holdout_loss", "holdout_recall@10", "pool_items", "seconds"}``, step 0 being
    the pre-trained encoder; ``stopped``: ``"max_steps"``, ``"max_epochs"``, ``"early_stopping"``,
    ``"time_budget"`` or ``""`` while running.
    """

    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_metric: float | None = None
    stopped: str = ""
    resumed_from: list[int] = field(default_factory=list)
    train_seconds: float = 0.0
    n_train_pairs: int = 0
    n_holdout_pairs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlignHistory:
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Training


def check_pairs(pairs: pd.DataFrame, n_items: int, *, name: str = "pairs") -> tuple[np.ndarray, np.ndarray]:
    """``(trigger, target)`` int64 arrays of a pairs DataFrame, self-pairs dropped; extra columns ignored."""
    if not isinstance(pairs, pd.DataFrame):
        raise DataError(f"{name} must be a pandas DataFrame with columns 'trigger' and 'target', "
                        f"got {type(pairs).__name__}")
    missing = [c for c in (TRIGGER, TARGET) if c not in pairs.columns]
    if missing:
        raise DataError(f"{name} lacks columns {missing}; it has {list(pairs.columns)}")
    out = []
    for column in (TRIGGER, TARGET):
        values = pairs[column].to_numpy()
        if not np.issubdtype(values.dtype, np.integer):
            raise DataError(f"{name}: item ids must be integers, got dtype {values.dtype}", column=column)
        bad = np.flatnonzero((values < 0) | (values >= n_items))
        if len(bad):
            raise DataError(f"{name}: item ids outside [0, {n_items})", column=column, ids=values[bad])
        out.append(values.astype(np.int64))
    keep = out[0] != out[1]
    return out[0][keep], out[1][keep]


def train_alignment(
    encoder: ContentEncoder,
    dataset: Dataset,
    train_pairs: pd.DataFrame,
    holdout_pairs: pd.DataFrame | None,
    config: AlignConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[ContentEncoder, AlignHistory]:
    """Fine-tune ``encoder`` (fitted on ``dataset``) on item2item pairs; see the module docstring.

    Parameters
    ----------
    encoder : a fitted :class:`ContentEncoder`; trained in place.
    dataset : the items (texts and modality vectors) the pair ids refer to.
    train_pairs, holdout_pairs : DataFrames with int item-id columns ``trigger`` and ``target`` (other
        columns ignored, self-pairs dropped). ``holdout_pairs`` drives early stopping and the best
        checkpoint; ``None`` or empty trains for the whole budget and keeps the last weights.
    config : AlignConfig.
    out_dir : checkpoint folder; ``None`` trains without checkpoints (and cannot resume).
    resume : continue from ``out_dir/checkpoint.pt`` when it exists; ``False`` starts over (and removes it).
    progress : draw a progress bar.
    on_step : called as ``on_step(step, loss)`` after each step and its checkpoint (logging, interruption).

    Returns
    -------
    (encoder, history): the encoder with the best held-out weights loaded, in eval mode, on the CPU (it
    trains on ``config.device``).

    Seeds torch's global RNG with ``config.seed`` (dropout), as training loops do.
    """
    config = config or AlignConfig()
    device = resolve_device(config.device, "--device (train.device)")
    encoder.to(device)
    try:
        with deterministic():  # repeatable on several threads (qarm.determinism)
            trainer = _Trainer(encoder, dataset, train_pairs, holdout_pairs, config, out_dir, progress, on_step)
            return trainer.run(resume)
    finally:
        encoder.to("cpu")


class _Trainer:
    def __init__(self, encoder: ContentEncoder, dataset: Dataset, train_pairs: pd.DataFrame,
                 holdout_pairs: pd.DataFrame | None, config: AlignConfig, out_dir: str | Path | None,
                 progress: bool, on_step: Callable[[int, float], None] | None) -> None:
        if not encoder.is_fitted:
            raise QarmError("train_alignment needs a fitted ContentEncoder; call encoder.fit(dataset) first")
        self.rank, self.world = rank(), world_size()
        if config.batch_size % self.world:
            raise ConfigError(f"train.batch_size {config.batch_size} must split evenly over the {self.world} "
                              "data-parallel processes (--nproc): each encodes an equal share of every batch")
        self.encoder, self.config, self.on_step = encoder, config, on_step
        self.progress = progress and self.rank == 0
        self.out_dir = None if out_dir is None else Path(out_dir)
        n = dataset.n_items
        self.inputs = ItemInputs.from_dataset(dataset, [p for p in encoder.parts_ if p != "text"])
        self.trigger, self.target = check_pairs(train_pairs, n, name="train_pairs")
        if len(self.trigger) == 0:
            raise DataError("train_pairs holds no pair of two different items")
        if holdout_pairs is None:
            holdout_pairs = pd.DataFrame({TRIGGER: np.zeros(0, np.int64), TARGET: np.zeros(0, np.int64)})
        ho_t, ho_g = check_pairs(holdout_pairs, n, name="holdout_pairs")
        rng = np.random.default_rng([config.seed, 1])
        pick = np.sort(rng.permutation(len(ho_t))[: config.eval_pairs])
        self.eval_trigger, self.eval_target = ho_t[pick], ho_g[pick]
        self.pairs_digest = digest_arrays({"trigger": self.trigger, "target": self.target,
                                           "holdout_trigger": ho_t, "holdout_target": ho_g})
        self.history = AlignHistory(n_train_pairs=len(self.trigger), n_holdout_pairs=len(ho_t))
        self.max_steps = config.max_steps
        if config.max_epochs is not None:
            self.max_steps = min(self.max_steps,
                                 max(1, math.ceil(config.max_epochs * len(self.trigger) / config.batch_size)))
        self._perms: dict[int, np.ndarray] = {}

        encoder.set_trainable(config.trainable_layers if encoder.uses_text else 0)
        self.states = self.frozen_states(encoder, config, progress)
        # Sampling-bias correction: an item is a candidate in proportion to its share of the pair ends.
        counts = np.bincount(np.concatenate([self.trigger, self.target]), minlength=n).astype(np.float64)
        self.log_q = torch.from_numpy(np.log(np.maximum(counts, 1.0) / max(1.0, counts.sum()))).float().to(
            next(encoder.parameters()).device)
        head = [p for n_, p in encoder.named_parameters() if p.requires_grad and not n_.startswith("text_model.")]
        text = [p for n_, p in encoder.named_parameters() if p.requires_grad and n_.startswith("text_model.")]
        groups = [{"params": head, "lr": config.head_lr}]
        if text:
            groups.append({"params": text, "lr": config.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        warmup, total = config.warmup_steps, self.max_steps

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0 at max_steps
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0

    def frozen_states(self, encoder: ContentEncoder, config: AlignConfig, progress: bool) -> FrozenTextStates | None:
        """The cached output of the frozen text layers (built here when the encoder holds none that fit)."""
        if config.frozen_cache == "off" or encoder.n_frozen_layers is None:
            return None
        states = encoder.usable_states(self.inputs.texts)
        if states is not None and (states.whole_model_frozen or str(states.tokens.dtype) == f"torch.{config.frozen_cache}"):
            return states
        assert encoder.text_model is not None  # n_frozen_layers is None without a text part
        states = build_text_states(encoder.text_model, self.inputs.texts, encoder.n_frozen_layers,
                                   dtype=config.frozen_cache, pooled=encoder.n_frozen_layers == encoder.n_layers,
                                   progress=progress)
        encoder.frozen_states_ = states  # the aligned encoding (encode_items) reuses them
        return states

    # -- data ----------------------------------------------------------------------------------------

    def batch_indices(self, step: int) -> np.ndarray:
        """Pair rows of 0-based ``step``: positions ``[step*B, (step+1)*B)`` of the endless sequence of
        per-epoch permutations (epoch ``e`` shuffled by ``default_rng([seed, 0, e])``)."""
        n, size = len(self.trigger), self.config.batch_size
        positions = np.arange(step * size, (step + 1) * size)
        epochs, offsets = positions // n, positions % n
        out = np.empty(size, dtype=np.int64)
        for epoch in np.unique(epochs):
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([self.config.seed, 0, int(epoch)]).permutation(n)}
            chosen = epochs == epoch
            out[chosen] = self._perms[epoch][offsets[chosen]]
        return out

    def encode_pairs(self, trigger: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors of both sides; each distinct item is encoded once."""
        items, inverse = np.unique(np.concatenate([trigger, target]), return_inverse=True)
        vectors = self.encoder.embed(items, self.inputs, states=self.states)
        return vectors[inverse[: len(trigger)]], vectors[inverse[len(trigger):]]

    def loss(self, a: torch.Tensor, b: torch.Tensor, trigger: np.ndarray, target: np.ndarray) -> torch.Tensor:
        logq = {}
        if self.config.logq_correction:
            logq = {"a_logq": self.log_q[torch.from_numpy(trigger).to(self.log_q.device)],
                    "b_logq": self.log_q[torch.from_numpy(target).to(self.log_q.device)]}
        return info_nce(a, b, self.config.temperature, trigger, target, **logq)

    # -- evaluation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if len(self.eval_trigger) == 0:
            return None
        start = time.perf_counter()
        n = len(self.eval_trigger)
        pool = np.unique(np.concatenate([self.eval_trigger, self.eval_target]))
        items = np.arange(len(self.inputs)) if self.rank_among_all() else pool
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            vectors = self.encoder.embed(items, self.inputs, states=self.states)
        finally:
            self.encoder.train(was_training)
        t_rows = torch.as_tensor(np.searchsorted(items, self.eval_trigger))
        g_rows = torch.as_tensor(np.searchsorted(items, self.eval_target))
        size = self.config.batch_size
        losses = [float(self.loss(vectors[t_rows[s:s + size]], vectors[g_rows[s:s + size]],
                                  self.eval_trigger[s:s + size], self.eval_target[s:s + size]))
                  for s in range(0, n, size) if n - s >= 2]
        rank = target_ranks(vectors, t_rows, g_rows, block=n)  # Recall@10 among the candidates, trigger left out
        return {"step": self.step, "holdout_loss": float(np.mean(losses)) if losses else float("nan"),
                "holdout_recall@10": float((rank < 10).float().mean()), "pool_items": int(len(items)),
                "seconds": round(time.perf_counter() - start, 3)}

    def rank_among_all(self) -> bool:
        """Whether evaluations rank held-out targets among all items (``eval_candidates``)."""
        frozen = not self.encoder.uses_text or (self.states is not None and self.states.whole_model_frozen)
        return ranks_among_all(self.config.eval_candidates, len(self.inputs), frozen)

    def improved(self, metric: float) -> bool:
        best = self.history.best_metric
        if best is None:
            return True
        if self.config.monitor == "holdout_loss":
            return metric < best - self.config.min_delta
        return metric > best + self.config.min_delta

    def record_eval(self) -> bool:
        """Evaluate, keep the best weights; True when early stopping should stop training."""
        result = self.evaluate()
        if result is None:
            return False
        self.history.evals.append(result)
        metric = result[self.config.monitor]
        if self.improved(metric):
            self.history.best_metric, self.history.best_step = metric, self.step
            self.best_state = self.encoder.trainable_state()
            self.bad_evals = 0
            if self.out_dir is not None and self.rank == 0:
                meta = {"step": str(self.step), "metric": repr(metric), "monitor": self.config.monitor}
                atomic_write_bytes(self.out_dir / BEST_FILE,
                                   save_torch({k: v.contiguous() for k, v in self.best_state.items()}, meta))
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.config.patience

    # -- checkpoints ---------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        cfg = {k: v for k, v in to_dict(self.config).items() if k not in _RESUMABLE_KEYS_IGNORED}
        record = self.encoder.describe()
        return {"config": cfg, "encoder": json.dumps(record, sort_keys=True), "pairs": self.pairs_digest}

    def save_checkpoint(self) -> None:
        if self.out_dir is None or self.rank != 0:
            return
        payload = {
            "format": 1,
            "step": self.step,
            "model": self.encoder.trainable_state(),
            "best_model": self.best_state or {},  # here too, so best and checkpoint never disagree
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "bad_evals": self.bad_evals,
            "history": json.dumps(self.history.to_dict()),
            "identity": self.identity(),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(self.out_dir / CHECKPOINT_FILE, buffer.getvalue())

    def load_checkpoint(self) -> bool:
        path = None if self.out_dir is None else self.out_dir / CHECKPOINT_FILE
        if path is None or not path.exists():
            return False
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which, do not guess
            raise QarmError(f"{path}: cannot read the checkpoint ({exc}); remove it or pass resume=False") from exc
        mine, theirs = self.identity(), payload.get("identity", {})
        if mine != theirs:
            differing = sorted(k for k in set(mine["config"]) | set(theirs.get("config", {}))
                               if mine["config"].get(k) != theirs.get("config", {}).get(k))
            what = [f"config keys {differing}"] if differing else []
            what += [w for w in ("encoder", "pairs") if mine[w] != theirs.get(w)]
            raise CheckpointMismatch(f"{path} was written by another run (different {', '.join(what)}); "
                              "pass resume=False to start over or use another out_dir")
        self.encoder.load_trainable_state(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["torch_rng"])
        self.step = int(payload["step"])
        self.bad_evals = int(payload["bad_evals"])
        self.history = AlignHistory.from_dict(json.loads(payload["history"]))
        self.best_state = payload["best_model"] or None
        self.history.resumed_from.append(self.step)
        barrier()  # every rank has read the checkpoint before rank 0 may replace it
        return True

    # -- loop ----------------------------------------------------------------------------------------

    def run(self, resume: bool) -> tuple[ContentEncoder, AlignHistory]:
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not resume and self.rank == 0:
                for name in (CHECKPOINT_FILE, BEST_FILE):
                    (self.out_dir / name).unlink(missing_ok=True)
            barrier()
        torch.manual_seed(self.config.seed)
        if resume and self.load_checkpoint():
            if self.progress:  # say so, terminal or not: a resumed run must not look like a fresh one
                print(f"aligning: resuming from step {self.step:,} of {self.max_steps:,} ({self.out_dir})",
                      file=sys.stderr, flush=True)
        else:
            self.record_eval()  # step 0: the pre-trained encoder sets the bar (and is the first "best")
        start = time.perf_counter()
        seconds_before = self.history.train_seconds
        self.encoder.train()
        stop = self.history.stopped if self.history.stopped in ("max_steps", "max_epochs", "early_stopping") else ""
        try:
            with progress_bar(self.max_steps, "aligning", self.progress, completed=self.step) as advance:
                while not stop and self.step < self.max_steps:
                    loss = self.train_step()
                    self.history.train_seconds = seconds_before + time.perf_counter() - start
                    advance(1, loss=loss)
                    budget = self.config.time_budget_s
                    if self.step == self.max_steps:
                        stop = "max_steps" if self.max_steps == self.config.max_steps else "max_epochs"
                    elif budget is not None and self._agreed(time.perf_counter() - start >= budget):
                        stop = "time_budget"
                    # the last weights are always evaluated, so they can be the best ones
                    if self.step % self.config.eval_every == 0 or stop:
                        if self.record_eval() and not stop:
                            stop = "early_stopping"
                    self.history.stopped = stop
                    if stop or self.step % self.config.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.on_step is not None:
                        self.on_step(self.step, loss)
        finally:
            self.encoder.eval()
        if self.best_state is not None and self.history.best_step != self.step:
            self.encoder.load_trainable_state(self.best_state)
        return self.encoder, self.history

    def _agreed(self, flag: bool) -> bool:
        """Rank 0's answer on every rank (the ranks' clocks differ; all must stop at the same step)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.log_q.device)
        torch.distributed.broadcast(value, src=0)
        return bool(value.item())

    def train_step(self) -> float:
        """One step on the global batch. With several ranks each encodes its share ``rows[rank::world]``,
        the shares' vectors are gathered (differentiably) so every rank computes the loss of the whole
        batch (all the in-batch negatives), and the gradients are averaged: the step one process takes."""
        rows = self.batch_indices(self.step)
        if self.world > 1:
            rows = np.concatenate([rows[r::self.world] for r in range(self.world)])  # this order once gathered
            mine = rows[self.rank * len(rows) // self.world:(self.rank + 1) * len(rows) // self.world]
            a_mine, b_mine = self.encode_pairs(self.trigger[mine], self.target[mine])
            a = torch.cat(all_gather_with_gradients(a_mine))
            b = torch.cat(all_gather_with_gradients(b_mine))
        else:
            a, b = self.encode_pairs(self.trigger[rows], self.target[rows])
        trigger, target = self.trigger[rows], self.target[rows]
        loss = self.loss(a, b, trigger, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            average_gradients(self.encoder, self.world)
        if self.config.grad_clip is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        value = float(loss.detach())
        self.history.steps.append({"step": self.step, "loss": value, "lr": float(self.scheduler.get_last_lr()[-1])})
        return value


def all_gather_with_gradients(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's ``tensor`` (equal shapes), in rank order; gradients flow back to each rank's own.
    Every rank computing the same loss of the gathered tensors, each rank's share receives ``world`` times
    its gradient, which :func:`average_gradients` divides back."""
    from torch.distributed.nn.functional import all_gather

    return tuple(all_gather(tensor.contiguous()))


def average_gradients(module: torch.nn.Module, world: int) -> None:
    """Sum every parameter's gradient over the ranks and divide by ``world`` (one flat all-reduce)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# --------------------------------------------------------------------------------------------------
# The whole stage


@dataclass
class AlignmentResult:
    """Pre-trained and aligned vectors of every item, ``(n_items, out_dim)`` float32 each."""

    pretrained: np.ndarray
    aligned: np.ndarray
    encoder: ContentEncoder
    history: AlignHistory
    out_dir: Path
    timings: dict[str, float]


def run_alignment(
    dataset: Dataset,
    train_pairs: pd.DataFrame,
    holdout_pairs: pd.DataFrame | None,
    out_dir: str | Path,
    *,
    encoder_config: ContentEncoderConfig | None = None,
    config: AlignConfig | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    text_model: SentenceTransformer | None = None,
    run_id: str | None = None,
) -> AlignmentResult:
    """The alignment stage: fit the encoder (PCA head), encode every item (pre-trained), train on the
    pairs, encode every item again (aligned), and write ``out_dir``::

        vectors.safetensors   "pretrained" and "aligned", (n_items, out_dim) float32, row = item id
        alignment.json        encoder record, align config, history, timings, dataset name and size
        encoder/              the aligned encoder (load_encoder), for items added later
        train/                checkpoint.pt and best.safetensors (resume)

    ``cache_dir`` caches text embeddings and vectors (:class:`~qarm.encode.cache.VectorCache`); ``run_id``
    (:mod:`qarm.provenance`) goes into the vectors' metadata and the record.
    Inside a process group (``qarm align --nproc N``, torchrun) every rank fits and encodes alike, the
    training is data parallel (:func:`train_alignment`) and rank 0 alone writes ``out_dir``.
    """
    out_dir = Path(out_dir)
    config = config or AlignConfig()
    cache = None if cache_dir is None else VectorCache(cache_dir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    keep = None if config.frozen_cache == "off" else config.trainable_layers
    encoder = ContentEncoder(encoder_config, text_model=text_model).fit(
        dataset, progress=progress, cache=cache, keep_frozen_states=keep,
        states_dtype="float32" if config.frozen_cache == "off" else config.frozen_cache)
    pretrained = encode_items(encoder, dataset, progress=progress, cache=cache)
    timings["encode_pretrained"] = time.perf_counter() - clock
    clock = time.perf_counter()
    encoder, history = train_alignment(encoder, dataset, train_pairs, holdout_pairs, config, out_dir / "train",
                                       resume=resume, progress=progress)
    timings["train"] = time.perf_counter() - clock
    clock = time.perf_counter()
    aligned = encode_items(encoder, dataset, progress=progress, cache=cache)
    timings["encode_aligned"] = time.perf_counter() - clock
    if rank() != 0:
        return AlignmentResult(pretrained, aligned, encoder, history, out_dir, timings)
    save_encoder(encoder, out_dir / "encoder")
    atomic_write_bytes(out_dir / VECTORS_FILE, save_numpy({"pretrained": pretrained, "aligned": aligned},
                                                          metadata=None if run_id is None else {RUN_ID_KEY: run_id}))
    record = {
        "run_id": run_id,
        "dataset": dataset.meta.name,
        "n_items": dataset.n_items,
        "encoder": encoder.describe(),
        "align": to_dict(config),
        "history": history.to_dict(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "frozen_states": None if encoder.frozen_states_ is None else encoder.frozen_states_.describe(),
    }
    atomic_write_bytes(out_dir / RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return AlignmentResult(pretrained, aligned, encoder, history, out_dir, timings)


def read_alignment(out_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The vectors (``pretrained``, ``aligned``) and the record written by :func:`run_alignment`."""
    out_dir = Path(out_dir)
    try:
        vectors = load_numpy_file(out_dir / VECTORS_FILE)
        record = json.loads((out_dir / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QarmError(f"{out_dir}: not a finished alignment folder ({exc})") from exc
    return vectors, record

"""User2Item retrieval: a two-tower model on item IDs, its trainer, evaluation and candidate generation.

QARM mines item2item pairs in the item-embedding space of a User2Item retrieval model (paper, Sec. 3.2);
the same model is a candidate generator of its own (:meth:`TwoTower.recommend`).

Model (:class:`TwoTower`)
-------------------------
One item ID embedding table, shared by both towers. The user tower pools the embeddings of the user's
last ``history_len`` positives strictly before the target (mean, or attention with position embeddings),
optionally adds a user ID embedding, then applies a residual MLP; the item tower applies a residual MLP
to the item's embedding. Both outputs are L2-normalised, so a score is a cosine similarity.

Cold-start items are out of vocabulary: they are mapped to the padding id (row ``n_items`` of the table,
kept at zero) wherever they appear, so no ID embedding is ever learnt for them and they are never
retrieved.

Training (:func:`train_user2item`)
----------------------------------
Examples are the training positives: rows of :meth:`Dataset.training_mask` with the label column
(``config.label``, default the dataset's first label column, e.g. ``click``) equal to 1 and not sampled
negatives. The history of an example is the same user's training positives with a smaller ``seq``
(never the target itself, never a later event, never a valid / test / cold row). Loss: in-batch sampled
softmax over the batch's targets with temperature ``temperature``, the logQ correction
``logit - log q(item)`` (``q`` = the item's share of training positives; Yi et al., RecSys 2019), and
the other occurrences of a row's own target in the batch masked out (they are not negatives).

Evaluation (:func:`evaluate_user2item`, :func:`evaluate_popularity`)
--------------------------------------------------------------------
One query per positive event of the split (default ``valid``) whose item is not cold-start. Its history
is the user's training positives before it (the last ``history_len``). Candidates are all non-cold items
except the user's own training positives, which are excluded from the ranking. Recall@K is the share of
events whose item is in the top K (one relevant item per query, so it is also HitRate@K); NDCG@K is
``1 / log2(rank + 2)`` for a hit at 0-based ``rank``, else 0, averaged over events. An event whose item
the user already had in training cannot be retrieved and counts as a miss.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from qarm import __version__
from qarm.config import from_dict, to_dict
from qarm.data import schema as S
from qarm.data.io import atomic_directory, write_json
from qarm.data.schema import Dataset
from qarm.errors import ConfigError, DataError
from qarm.optim import SparseAndDenseAdam, make_adam, wants_sparse
from qarm.progress import progress_bar

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class User2ItemConfig:
    """Configuration of the two-tower User2Item model and its training."""

    dim: int = 64  # output (and ID embedding) size: the item2item mining space
    hidden_dim: int = 128  # width of the towers' residual MLPs
    history_len: int = 50  # the paper's window: the user's latest 50 positives
    pooling: Literal["mean", "attention"] = "mean"  # attention gains ~0.002 Recall@50 on MicroLens, at 2x cost
    user_embedding: bool = False  # most MicroLens users have < 10 training positives: IDs barely train
    epochs: int = 5  # MicroLens-50k valid Recall@50 peaks at 4-5 epochs, then overfits (~1 min on 2 cores)
    batch_size: int = 1024  # in-batch negatives: 1023 per example
    lr: float = 3e-3  # Adam; embeddings train fast with a large step
    weight_decay: float = 0.0
    temperature: float = 0.1  # on cosine scores; 0.1 beat 0.07 and 0.05 on MicroLens-50k valid
    logq_correction: bool = True  # remove the popularity bias of in-batch negatives
    label: str | None = None  # positive label column; None: the dataset's first label column
    max_train_examples: int | None = None  # random subset of training positives (quick runs)
    eval_k: int = 50  # Recall@K / NDCG@K cut-off of the issue
    eval_every_epoch: bool = False  # also evaluate on valid after each epoch (a learning curve; costs time)
    eval_batch_size: int = 1024  # queries scored at a time (a (batch, n_items) float32 block; at most 256 MiB)
    sparse_embeddings: bool | None = None
    """Sparse gradients for the ID tables, trained by ``torch.optim.SparseAdam`` (lazy Adam: a row's
    moments move only in the steps that read it, as TensorFlow's LazyAdam and TorchRec's fused row-wise
    optimisers); the rest trains with Adam. Dense Adam updates every row of the item table at every step:
    at 1M items x 64 that is 64M parameters a step (~0.7 s a step on 2 CPU cores). None: sparse when the
    item table has more than ``qarm.optim.SPARSE_ROWS`` rows (every published catalogue here is smaller: their
    numbers are unchanged)."""
    seed: int = 0  # initialisation and shuffling

    def __post_init__(self) -> None:
        name = type(self).__name__
        for param in ("dim", "hidden_dim", "history_len", "epochs", "batch_size", "eval_k", "eval_batch_size"):
            value = getattr(self, param)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"The '{param}' parameter of {name} must be an int >= 1. Got {value!r} instead.")
        if self.sparse_embeddings is not None and not isinstance(self.sparse_embeddings, bool):
            raise ConfigError(f"The 'sparse_embeddings' parameter of {name} must be true, false or null. "
                              f"Got {self.sparse_embeddings!r} instead.")
        if self.sparse_embeddings and self.weight_decay:
            raise ConfigError(f"The 'sparse_embeddings' parameter of {name} is true but weight_decay is "
                              f"{self.weight_decay!r}: SparseAdam has no weight decay; set one of them off.")
        if self.batch_size < 2:
            raise ConfigError(
                f"The 'batch_size' parameter of {name} must be an int >= 2 (in-batch negatives). "
                f"Got {self.batch_size!r} instead."
            )
        for param in ("lr", "temperature"):
            value = getattr(self, param)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"The '{param}' parameter of {name} must be a float > 0. Got {value!r} instead.")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(
                f"The 'weight_decay' parameter of {name} must be a float >= 0. Got {self.weight_decay!r} instead."
            )
        if self.pooling not in ("mean", "attention"):
            raise ConfigError(
                f"The 'pooling' parameter of {name} must be one of ['mean', 'attention']. Got {self.pooling!r} instead."
            )
        if self.max_train_examples is not None and (
            isinstance(self.max_train_examples, bool) or not isinstance(self.max_train_examples, int)
            or self.max_train_examples < 2
        ):
            raise ConfigError(
                f"The 'max_train_examples' parameter of {name} must be an int >= 2 or None. "
                f"Got {self.max_train_examples!r} instead."
            )


# --------------------------------------------------------------------------------------------------
# Events and histories (vectorised; shared with pair mining)
# --------------------------------------------------------------------------------------------------


@dataclass
class PositiveEvents:
    """Positive events of a dataset, sorted by user then ``seq``.

    Attributes
    ----------
    user_ids, item_ids, seq : ndarray of shape (n_events,), int64
    rows : ndarray of shape (n_events,), int64
        Row positions in ``dataset.interactions``.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    seq: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)


def label_column(dataset: Dataset, label: str | None = None) -> str:
    """The positive label column: ``label`` if given, else the dataset's first label column."""
    labels = dataset.meta.label_columns
    if label is None:
        if not labels:
            raise DataError("the dataset declares no label column (meta.label_columns is empty)", file=S.META_FILE)
        return labels[0]
    if label not in dataset.interactions.columns:
        raise ConfigError(f"unknown label column {label!r}; available: {labels}")
    return label


def positive_events(dataset: Dataset, split: str = "train", label: str | None = None) -> PositiveEvents:
    """Positive, non-sampled events of one split, without cold-start items.

    ``split="train"`` gives exactly the rows a model may train on (:meth:`Dataset.training_mask`) that are
    positives; ``"valid"`` / ``"test"`` give the evaluation events of non-cold items.
    """
    if split not in S.SPLITS:
        raise ConfigError(f"unknown split {split!r}; available: {list(S.SPLITS)}")
    inter = dataset.interactions
    column = label_column(dataset, label)
    if split == "train":
        mask = dataset.training_mask()
    else:
        if not dataset.is_prepared:
            raise DataError("the dataset has no split yet; run qarm data prepare (or split_dataset)")
        mask = inter[S.SPLIT].to_numpy() == split
        if S.COLD_ITEM in inter.columns:
            mask &= ~inter[S.COLD_ITEM].to_numpy(dtype=bool)
    mask &= inter[column].to_numpy() == 1
    if S.SAMPLED_NEGATIVE in inter.columns:
        mask &= ~inter[S.SAMPLED_NEGATIVE].to_numpy(dtype=bool)
    rows = np.flatnonzero(mask)
    users = inter[S.USER_ID].to_numpy(dtype=np.int64)[rows]
    seq = inter[S.SEQ].to_numpy(dtype=np.int64)[rows]
    order = np.lexsort((seq, users))  # the contract sorts already; this makes it a guarantee
    rows = rows[order]
    return PositiveEvents(
        user_ids=users[order], item_ids=inter[S.ITEM_ID].to_numpy(dtype=np.int64)[rows], seq=seq[order], rows=rows
    )


def history_windows(
    events: PositiveEvents, user_ids: np.ndarray, seq: np.ndarray, history_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each query ``(user, seq)``, the positions in ``events`` of the user's last ``history_len`` events
    with a strictly smaller ``seq``.

    Parameters
    ----------
    events : PositiveEvents
        Sorted by user then seq.
    user_ids, seq : ndarray of shape (n_queries,)
    history_len : int

    Returns
    -------
    start, end : ndarray of shape (n_queries,), int64
        The history is ``events[start:end]`` (oldest first); ``end - start <= history_len``.
    """
    user_ids = np.asarray(user_ids, dtype=np.int64)
    seq = np.asarray(seq, dtype=np.int64)
    span = int(max(events.seq.max(initial=0), seq.max(initial=0))) + 1
    keys = events.user_ids * span + events.seq
    end = np.searchsorted(keys, user_ids * span + seq, side="left")  # first event at or after the query
    user_first = np.searchsorted(keys, user_ids * span, side="left")
    start = np.maximum(user_first, end - history_len)
    return start.astype(np.int64), end.astype(np.int64)


def gather_histories(
    item_ids: np.ndarray, start: np.ndarray, end: np.ndarray, history_len: int, pad: int
) -> np.ndarray:
    """Right-aligned padded history matrix: row ``q`` ends with ``item_ids[start[q]:end[q]]``.

    Returns
    -------
    ndarray of shape (n_queries, history_len), int64
        Most recent item in the last column; ``pad`` fills the left of short histories.
    """
    positions = end[:, None] - history_len + np.arange(history_len)
    valid = positions >= start[:, None]
    out = np.full(positions.shape, pad, dtype=np.int64)
    out[valid] = item_ids[positions[valid]]
    return out


def cold_item_mask(dataset: Dataset) -> np.ndarray:
    """Boolean ``(n_items,)``: the items held out as cold-start."""
    if S.COLD_START in dataset.items.columns:
        return np.array(dataset.items[S.COLD_START].to_numpy(dtype=bool))
    return np.zeros(dataset.n_items, dtype=bool)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """``x + W2 relu(W1 LayerNorm(x))``: a tower head that starts near the identity."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden_dim)
        self.down = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.relu(self.up(self.norm(x))))


class HistoryPooling(nn.Module):
    """Pools ``(batch, L, dim)`` history embeddings with a ``(batch, L)`` validity mask into ``(batch, dim)``.

    ``mean``: the average of the valid positions. ``attention``: a softmax over the valid positions of
    ``w . tanh(W (e + p_pos))`` with position embeddings ``p`` counted from the most recent item.
    Empty histories give a zero vector.
    """

    def __init__(self, dim: int, history_len: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "attention":
            self.position = nn.Embedding(history_len, dim)
            nn.init.normal_(self.position.weight, std=0.02)
            self.key = nn.Linear(dim, dim)
            self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, embedded: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        weights = valid.to(embedded.dtype)
        if self.mode == "attention":
            positions = self.position.weight.flip(0)[-embedded.shape[1]:]  # last column = most recent
            logits = self.score(torch.tanh(self.key(embedded + positions))).squeeze(-1)
            logits = logits.masked_fill(~valid, -1e9)
            weights = torch.softmax(logits, dim=1) * weights
        else:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        return torch.einsum("bl,bld->bd", weights, embedded)


def uses_sparse_embeddings(config: User2ItemConfig, n_items: int) -> bool:
    """Whether the ID tables get sparse gradients (``config.sparse_embeddings``, or the size rule)."""
    if config.sparse_embeddings is not None:
        return config.sparse_embeddings
    return wants_sparse(n_items + 1, None) and not config.weight_decay


class TwoTower(nn.Module):
    """Two-tower User2Item model on item IDs.

    Parameters
    ----------
    n_items, n_users : int
    config : User2ItemConfig
    cold_items : ndarray of shape (n_items,), bool, optional
        Items treated as out of vocabulary (mapped to the padding id; never recommended).

    Notes
    -----
    Item ids are ``0..n_items-1``; ``n_items`` is the padding id of histories (its embedding row stays 0).
    """

    cold_items: torch.Tensor  # buffer (n_items + 1,) bool, registered in __init__

    def __init__(
        self, n_items: int, n_users: int, config: User2ItemConfig, cold_items: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.n_items = n_items
        self.n_users = n_users
        self.pad_id = n_items
        sparse = uses_sparse_embeddings(config, n_items)
        self.item_embedding = nn.Embedding(n_items + 1, config.dim, padding_idx=n_items, sparse=sparse)
        nn.init.normal_(self.item_embedding.weight[:n_items], std=0.1)
        self.user_embedding = nn.Embedding(n_users, config.dim, sparse=sparse) if config.user_embedding else None
        if self.user_embedding is not None:
            nn.init.normal_(self.user_embedding.weight, std=0.01)
        self.pooling = HistoryPooling(config.dim, config.history_len, config.pooling)
        self.user_head = ResidualMLP(config.dim, config.hidden_dim)
        self.item_head = ResidualMLP(config.dim, config.hidden_dim)
        cold = np.zeros(n_items, dtype=bool) if cold_items is None else np.asarray(cold_items, dtype=bool)
        if cold.shape != (n_items,):
            raise DataError(f"cold_items must be ({n_items},), got {cold.shape}")
        # One extra False for the padding id, so that a lookup by any history id works.
        self.register_buffer("cold_items", torch.from_numpy(np.append(cold, False)))

    def _in_vocabulary(self, ids: torch.Tensor) -> torch.Tensor:
        """Map cold-start items to the padding id."""
        return torch.where(self.cold_items[ids], torch.full_like(ids, self.pad_id), ids)

    def encode_users(self, histories: torch.Tensor, user_ids: torch.Tensor | None = None) -> torch.Tensor:
        """User vectors.

        Parameters
        ----------
        histories : LongTensor of shape (batch, L), L <= history_len
            Item ids, most recent last, padded on the left with ``pad_id``.
        user_ids : LongTensor of shape (batch,), optional
            Used only when the model has a user embedding.

        Returns
        -------
        Tensor of shape (batch, dim), L2-normalised.
        """
        histories = self._in_vocabulary(histories)
        pooled = self.pooling(self.item_embedding(histories), histories != self.pad_id)
        if self.user_embedding is not None and user_ids is not None:
            pooled = pooled + self.user_embedding(user_ids)
        return F.normalize(self.user_head(pooled), dim=-1)

    def encode_items(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Item vectors of shape ``(*item_ids.shape, dim)``, L2-normalised."""
        return F.normalize(self.item_head(self.item_embedding(self._in_vocabulary(item_ids))), dim=-1)

    def forward(
        self, histories: torch.Tensor, item_ids: torch.Tensor, user_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(user vectors (batch, dim), item vectors (batch, dim))``."""
        return self.encode_users(histories, user_ids), self.encode_items(item_ids)

    @torch.no_grad()
    def item_vectors(self, batch_size: int = 65536) -> torch.Tensor:
        """Item-tower outputs of every item, ``(n_items, dim)``; rows of cold-start items are zero."""
        ids = torch.arange(self.n_items, device=self.cold_items.device)
        vectors = torch.cat([self.encode_items(chunk) for chunk in ids.split(batch_size)])
        return vectors.masked_fill(self.cold_items[: self.n_items, None], 0.0)

    @torch.no_grad()
    def recommend(
        self,
        histories: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
        k: int = 50,
        *,
        exclude_history: bool = True,
        user_ids: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidate generation: the top ``k`` items for each history.

        Parameters
        ----------
        histories : one sequence of item ids, or a list of them (chronological, most recent last)
            Only the last ``history_len`` items are used; cold-start items are ignored.
        k : int
        exclude_history : bool
            Do not recommend items already in the given history.
        user_ids : sequence of int, optional
            For a model with a user embedding.

        Returns
        -------
        items : ndarray of shape (n_histories, k), int64 (``(k,)`` for a single history)
        scores : ndarray of the same shape, float32 (cosine similarities)
            Cold-start items are never returned; ``-1`` / ``-inf`` pad when fewer than ``k`` remain.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"The 'k' parameter of recommend must be an int >= 1. Got {k!r} instead.")
        single = len(histories) == 0 or np.ndim(histories[0]) == 0
        lists = [list(histories)] if single else [list(cast(Sequence[int], h)) for h in histories]
        for h in lists:
            bad = [i for i in h if not 0 <= int(i) < self.n_items]
            if bad:
                raise DataError(f"history item ids must lie in [0, {self.n_items})", ids=bad)
        L = self.config.history_len
        matrix = np.full((len(lists), L), self.pad_id, dtype=np.int64)
        for row, h in enumerate(lists):
            tail = np.asarray(h[-L:], dtype=np.int64)
            if len(tail):
                matrix[row, L - len(tail):] = tail
        device = self.cold_items.device
        users = None if user_ids is None else torch.as_tensor(np.asarray(user_ids), dtype=torch.long, device=device)
        scores = self.encode_users(torch.from_numpy(matrix).to(device), users) @ self.item_vectors().T
        scores[:, self.cold_items[: self.n_items]] = -math.inf
        if exclude_history:
            rows = np.repeat(np.arange(len(lists)), [len(h) for h in lists])
            cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in lists]) if len(rows) else rows
            scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -math.inf
        top = torch.topk(scores, min(k, self.n_items), dim=1)
        items = top.indices.cpu().numpy().astype(np.int64)
        values = top.values.cpu().numpy().astype(np.float32)
        items[~np.isfinite(values)] = -1
        if k > self.n_items:
            items = np.pad(items, ((0, 0), (0, k - self.n_items)), constant_values=-1)
            values = np.pad(values, ((0, 0), (0, k - self.n_items)), constant_values=-np.inf)
        return (items[0], values[0]) if single else (items, values)


def item_embeddings(model: TwoTower) -> np.ndarray:
    """The item-embedding space used for pair mining: item-tower outputs.

    Returns
    -------
    ndarray of shape (n_items, dim), float32
        Unit rows; rows of cold-start items are zero (they have no ID embedding).
    """
    was_training = model.training
    model.eval()
    try:
        return model.item_vectors().cpu().numpy().astype(np.float32)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Loss and training
# --------------------------------------------------------------------------------------------------


def in_batch_softmax_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax with the batch's targets as negatives.

    Parameters
    ----------
    users, items : Tensor of shape (batch, dim)
        Row ``b`` of ``items`` is the positive of row ``b`` of ``users``.
    item_ids : LongTensor of shape (batch,)
        Other rows holding a row's own item are masked (an item is not its own negative).
    temperature : float
    log_q : Tensor of shape (batch,), optional
        Log sampling probability of each batch item; subtracted from its logits (logQ correction).

    Returns
    -------
    Scalar tensor, the mean cross-entropy.
    """
    logits = users @ items.T / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    same = item_ids[:, None] == item_ids[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, -math.inf)
    return F.cross_entropy(logits, torch.arange(len(users), device=users.device))


def make_optimizer(model: TwoTower, config: User2ItemConfig) -> torch.optim.Optimizer | SparseAndDenseAdam:
    """Adam over every parameter, or (sparse ID tables) SparseAdam over the tables and Adam over the rest."""
    return make_adam(model, config.lr, config.weight_decay)


def train_user2item(
    dataset: Dataset, config: User2ItemConfig | None = None, progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[TwoTower, dict[str, Any]]:
    """Train a :class:`TwoTower` on the dataset's training positives and evaluate it on ``valid``.

    Parameters
    ----------
    dataset : Dataset
        A prepared dataset (with ``split`` and ``cold_item``).
    config : User2ItemConfig, optional
    progress : bool
        Show a rich progress bar with the running loss.
    log : callable, optional
        Receives one line per epoch (default: nothing).

    Returns
    -------
    model : TwoTower
        In eval mode.
    metrics : dict
        ``recall@K``, ``ndcg@K``, ``n_valid_events`` (validation), ``epoch_loss`` (list), ``steps``,
        ``seconds_train`` (without per-epoch evaluations), ``seconds_per_step``, ``seconds_eval``,
        ``n_train_examples``, and ``epoch_valid`` (list of per-epoch metrics) with ``eval_every_epoch``.
    """
    config = config or User2ItemConfig()
    label = label_column(dataset, config.label)
    events = positive_events(dataset, "train", label)
    if len(events) < 2:
        raise DataError(f"need at least 2 training positives (label {label!r}), found {len(events)}")
    start, end = history_windows(events, events.user_ids, events.seq, config.history_len)
    rng = np.random.default_rng(config.seed)
    examples = np.arange(len(events))
    if config.max_train_examples is not None and config.max_train_examples < len(examples):
        examples = np.sort(rng.choice(examples, config.max_train_examples, replace=False))

    counts = np.bincount(events.item_ids[examples], minlength=dataset.n_items).astype(np.float64)
    log_q = torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = TwoTower(dataset.n_items, dataset.n_users, config, cold_item_mask(dataset))
    optimizer = make_optimizer(model, config)

    batch_size = min(config.batch_size, len(examples))
    n_batches = len(examples) // batch_size  # drop the ragged last batch: fewer negatives would skew it
    epoch_loss: list[float] = []
    curve: list[dict[str, Any]] = []
    seconds_curve = 0.0  # per-epoch evaluations, not counted as training time
    model.train()
    train_start = time.perf_counter()
    with progress_bar(config.epochs * n_batches, "user2item", progress) as advance:
        for epoch in range(config.epochs):
            order = rng.permutation(examples)
            running, total = float("nan"), 0.0
            for b in range(n_batches):
                batch = order[b * batch_size:(b + 1) * batch_size]
                histories = gather_histories(events.item_ids, start[batch], end[batch], config.history_len,
                                             model.pad_id)
                item_ids = torch.from_numpy(events.item_ids[batch])
                users, items = model(torch.from_numpy(histories), item_ids,
                                     torch.from_numpy(events.user_ids[batch]))
                loss = in_batch_softmax_loss(users, items, item_ids, config.temperature,
                                             log_q[item_ids] if config.logq_correction else None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                total += value
                running = value if math.isnan(running) else 0.98 * running + 0.02 * value
                advance(1, epoch=f"{epoch + 1}/{config.epochs}", loss=running)
            epoch_loss.append(total / max(n_batches, 1))
            line = f"epoch {epoch + 1}/{config.epochs}: loss {epoch_loss[-1]:.4f}"
            if config.eval_every_epoch:
                eval_start = time.perf_counter()
                curve.append(evaluate_user2item(model, dataset, k=config.eval_k, label=label,
                                                batch_size=config.eval_batch_size))
                line += f", valid recall@{config.eval_k} {curve[-1][f'recall@{config.eval_k}']:.4f}"
                seconds_curve += time.perf_counter() - eval_start
            if log is not None:
                log(line)
    seconds_train = time.perf_counter() - train_start - seconds_curve
    model.eval()

    eval_start = time.perf_counter()
    metrics: dict[str, Any] = evaluate_user2item(model, dataset, k=config.eval_k, label=label,
                                                 batch_size=config.eval_batch_size)
    metrics.update(
        epoch_loss=epoch_loss,
        steps=config.epochs * n_batches,
        seconds_train=seconds_train,
        seconds_per_step=seconds_train / max(config.epochs * n_batches, 1),
        seconds_eval=time.perf_counter() - eval_start,
        n_train_examples=int(len(examples)),
    )
    if curve:
        metrics["epoch_valid"] = curve
    return model, metrics


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

ScoreFn = Callable[[np.ndarray, np.ndarray], torch.Tensor]


SCORE_BLOCK_ELEMENTS = 64 * 1024 * 1024  # 256 MiB of float32 scores per evaluation block


def score_block_rows(n_items: int, wanted: int) -> int:
    """Queries per (queries, n_items) score block: ``wanted``, or fewer so that a block holds at most
    ``SCORE_BLOCK_ELEMENTS`` floats (1,024 queries against 1M items would be 4 GiB)."""
    return max(1, min(wanted, SCORE_BLOCK_ELEMENTS // max(n_items, 1)))


def evaluate_retrieval(
    dataset: Dataset,
    score_fn: ScoreFn,
    *,
    k: int = 50,
    split: str = "valid",
    label: str | None = None,
    history_len: int = 50,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Recall@K and NDCG@K of a retriever on a split's positive events (protocol: module docstring).

    Parameters
    ----------
    score_fn : callable ``(histories (b, history_len) int64, user_ids (b,) int64) -> Tensor (b, n_items)``
        Histories are padded on the left with ``n_items``. Higher scores rank first.

    Returns
    -------
    dict with ``recall@K``, ``ndcg@K``, ``n_{split}_events``.
    """
    label = label_column(dataset, label)
    train = positive_events(dataset, "train", label)
    queries = positive_events(dataset, split, label)
    n_items = dataset.n_items
    result: dict[str, Any] = {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"), f"n_{split}_events": 0}
    if len(queries) == 0:
        return result
    start, end = history_windows(train, queries.user_ids, queries.seq, history_len)
    # Each user's training positives, excluded from their ranking: CSR over users.
    user_start = np.searchsorted(train.user_ids, np.arange(dataset.n_users + 1), side="left")
    cold = torch.from_numpy(np.flatnonzero(cold_item_mask(dataset)))
    hits = np.zeros(len(queries), dtype=bool)
    gains = np.zeros(len(queries), dtype=np.float64)
    batch_size = score_block_rows(n_items, batch_size)  # bounded memory at any catalogue size
    for lo in range(0, len(queries), batch_size):
        hi = min(lo + batch_size, len(queries))
        users = queries.user_ids[lo:hi]
        histories = gather_histories(train.item_ids, start[lo:hi], end[lo:hi], history_len, n_items)
        scores = score_fn(histories, users).clone()
        scores.index_fill_(1, cold, -math.inf)
        seen_from, seen_to = user_start[users], user_start[users + 1]
        rows = np.repeat(np.arange(hi - lo), seen_to - seen_from)
        cols = train.item_ids[_ranges(seen_from, seen_to)]
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -math.inf
        top = torch.topk(scores, min(k, n_items), dim=1)
        targets = torch.from_numpy(queries.item_ids[lo:hi])
        match = (top.indices == targets[:, None]) & torch.isfinite(top.values)
        hit = match.any(dim=1)
        rank = match.double().argmax(dim=1)  # 0-based position of the target when it is a hit
        hits[lo:hi] = hit.numpy()
        gains[lo:hi] = torch.where(hit, 1.0 / torch.log2(rank + 2.0), 0.0).numpy()
    result.update({f"recall@{k}": float(hits.mean()), f"ndcg@{k}": float(gains.mean()),
                   f"n_{split}_events": int(len(queries))})
    return result


def evaluate_user2item(
    model: TwoTower, dataset: Dataset, *, k: int = 50, split: str = "valid", label: str | None = None,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Recall@K / NDCG@K of the model (see :func:`evaluate_retrieval`)."""
    if model.n_items != dataset.n_items:
        raise DataError(f"the model has {model.n_items} items, the dataset {dataset.n_items}")
    was_training = model.training
    model.eval()
    item_matrix = model.item_vectors()

    @torch.no_grad()
    def score(histories: np.ndarray, users: np.ndarray) -> torch.Tensor:
        return model.encode_users(torch.from_numpy(histories), torch.from_numpy(users)) @ item_matrix.T

    try:
        return evaluate_retrieval(dataset, score, k=k, split=split, label=label,
                                  history_len=model.config.history_len, batch_size=batch_size)
    finally:
        model.train(was_training)


def evaluate_popularity(
    dataset: Dataset, *, k: int = 50, split: str = "valid", label: str | None = None, batch_size: int = 1024
) -> dict[str, Any]:
    """The popularity baseline under the same protocol: items ranked by their number of training
    positives (ties by id), the user's training positives excluded."""
    label = label_column(dataset, label)
    counts = np.bincount(positive_events(dataset, "train", label).item_ids, minlength=dataset.n_items)
    # Score = minus the item's position in the popularity order (ties by id): exact in float32, no ties.
    order = np.lexsort((np.arange(dataset.n_items), -counts))
    popularity = torch.empty(dataset.n_items, dtype=torch.float32)
    popularity[torch.from_numpy(order)] = -torch.arange(dataset.n_items, dtype=torch.float32)

    def score(histories: np.ndarray, users: np.ndarray) -> torch.Tensor:
        return popularity.expand(len(users), -1)

    return evaluate_retrieval(dataset, score, k=k, split=split, label=label, batch_size=batch_size)


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], stops[i])`` for all i, without a Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total) + offsets


# --------------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------------


def save_user2item(model: TwoTower, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into the folder ``path`` (atomically, replacing it)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    info = {
        "model": "TwoTower",
        "qarm_version": __version__,
        "n_items": model.n_items,
        "n_users": model.n_users,
        "config": to_dict(model.config),
        "metrics": metrics or {},
    }

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE))
        write_json(tmp / CONFIG_FILE, info)

    atomic_directory(path, write)
    return path


def load_user2item(path: str | Path) -> TwoTower:
    """Read a model written by :func:`save_user2item` (in eval mode)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        info = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        state = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: not a saved User2Item model ({exc.filename} is missing)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the saved model ({exc})") from exc
    if info.get("model") != "TwoTower":
        raise DataError(f"{path / CONFIG_FILE}: not a TwoTower model (model = {info.get('model')!r})")
    config = from_dict(User2ItemConfig, info["config"], where=str(path / CONFIG_FILE))
    model = TwoTower(int(info["n_items"]), int(info["n_users"]), config)
    model.load_state_dict(state)
    model.eval()
    return model


def recommend_frame(model: TwoTower, histories: dict[int, Sequence[int]], k: int = 50) -> pd.DataFrame:
    """Candidates as rows ``(user_id, rank, item_id, score)`` for a ``{user_id: history}`` mapping."""
    if not histories:
        return pd.DataFrame({"user_id": [], "rank": [], "item_id": [], "score": []})
    users = np.fromiter(histories.keys(), dtype=np.int64)
    items, scores = model.recommend([list(h) for h in histories.values()], k,
                                    user_ids=users if model.user_embedding is not None else None)
    keep = items >= 0
    return pd.DataFrame({
        "user_id": np.repeat(users, k).reshape(len(users), k)[keep],
        "rank": np.broadcast_to(np.arange(k), items.shape)[keep],
        "item_id": items[keep],
        "score": scores[keep],
    })


__all__ = [
    "PositiveEvents", "TwoTower", "User2ItemConfig", "evaluate_popularity", "evaluate_retrieval",
    "evaluate_user2item", "gather_histories", "history_windows", "in_batch_softmax_loss", "item_embeddings",
    "label_column", "load_user2item", "positive_events", "recommend_frame", "save_user2item", "train_user2item",
]

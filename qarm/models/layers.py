"""Shared parts of the ranking models. A layer knows its inputs' shapes, never the model around it.

* :class:`MLP`: Linear + ReLU stacks;
* :class:`TargetAttention`: DIN's activation unit, history items weighted by their relevance to the
  target and sum-pooled;
* :class:`MMoE` (+ :class:`MMoEConfig`): shared experts, a softmax gate and a tower per task;
* item embeddings from per-item tables held as buffers: :class:`IdEmbedding` (with an OOV row),
  :class:`VQEmbedding` (VQ codes = catalogue item ids, own table, mean over the K codes),
  :class:`RQEmbedding` (one table per level, summed), :class:`FrozenVector` (a fixed vector, projected);
* :class:`CategoricalEmbeddings`: several categorical columns, one table each;
* :class:`PairwiseInnerProducts`: IPNN's product layer, the inner product of every pair of fields;
* :class:`CodeMatchingSequences`: for l = 1..L the latest history items sharing the target's first l
  RQ codes, pooled with target attention;
* :func:`pack`: the packed (jagged) layout of a padded history; :func:`embed_unique`: embed the
  distinct items of a batch once.

The per-item tables are *non-persistent* buffers: a checkpoint holds learned weights only, and the
tables come from the quantize / align folders (or a code store when serving new items).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qarm.errors import ConfigError
from qarm.optim import wants_sparse
from qarm.quantize._common import check_float, check_int

EMBEDDING_STD = 0.01  # small initial embeddings: untrained rows (unseen users, rare codes) stay near 0


def _buffer(values: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(values) if isinstance(values, np.ndarray) else values,
                           dtype=dtype).contiguous()


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for an int64 ``index`` of any shape, by ``index_select``: on CPU two to five times
    faster than advanced indexing forward, and its backward is an ``index_add`` instead of an
    accumulating ``index_put``. Output ``(*index.shape, *table.shape[1:])``."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def embedding_table(rows: int, dim: int, padding_idx: int | None = None, sparse: bool | None = False) -> nn.Embedding:
    """An embedding table initialised N(0, EMBEDDING_STD), its padding row (if any) zero.

    ``sparse``: True gives the table sparse gradients (trained by SparseAdam, see :mod:`qarm.optim`), None
    leaves it to the size rule (sparse above ``qarm.optim.SPARSE_ROWS`` rows), False (default) never."""
    table = nn.Embedding(rows, dim, padding_idx=padding_idx, sparse=wants_sparse(rows, sparse))
    nn.init.normal_(table.weight, std=EMBEDDING_STD)
    if padding_idx is not None:
        with torch.no_grad():
            table.weight[padding_idx].zero_()
    return table


class MLP(nn.Sequential):
    """``in_dim -> hidden[0] -> ... -> hidden[-1]`` (ReLU after each), then ``-> out_dim`` without
    activation when ``out_dim`` is given.

    Input ``(..., in_dim)``, output ``(..., out_features)``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int | None = None, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        super().__init__(*layers)
        self.out_features = width


class TargetAttention(nn.Module):
    """DIN's target attention (Zhou et al., KDD 2018) with sum pooling, on packed sequences.

    Each history item ``h`` of a row gets a weight ``a(h, t) = MLP([h, t, h - t, h * t])`` against the
    row's query (target) ``t``, and the row's output is ``sum_h a(h, t) h``; weights are not
    softmax-normalised, as in DIN, so the pooled vector's size also says how strong the interest is.

    Sequences are *packed* (jagged, as TorchRec's ``KeyedJaggedTensor``): the ``P`` filled slots of all
    rows in one ``(P, D)`` matrix with each slot's row index. Only real items cost work; histories are
    mostly shorter than their ``n`` slots (MicroLens: 7 positives per user on average), so the padded
    form would spend most of its time on padding.

    The first layer acts on ``[h, t, h * t]``: ``h - t`` is a linear function of ``h`` and ``t``, so
    the four-part input spans the same first layer, and splitting it lets the query's part be computed
    once per row instead of once per slot.

    Parameters
    ----------
    dim : int
        ``D``, the size of the query and key vectors.
    hidden : sequence of int
        Sizes of the attention MLP's hidden layers (DIN: 80, 40).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        if not hidden:
            raise ConfigError("TargetAttention needs at least one hidden layer")
        self.key = nn.Linear(dim, hidden[0])
        self.query = nn.Linear(dim, hidden[0], bias=False)
        self.product = nn.Linear(dim, hidden[0], bias=False)
        self.score = MLP(hidden[0], hidden[1:], out_dim=1)

    def weights(self, query: torch.Tensor, keys: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Each slot's attention weight against its row's query.

        Parameters
        ----------
        query : float (R, D), one per row
        keys : float (P, D), the filled slots of all rows
        row : int64 (P,), each slot's row in ``0..R-1``

        Returns
        -------
        float (P, 1), unnormalised.
        """
        q = gather_rows(query, row)  # (P, D)
        hidden = torch.relu(self.key(keys) + gather_rows(self.query(query), row) + self.product(keys * q))  # (P, H)
        return self.score(hidden)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Pool each row's keys by their relevance to the row's query: ``(R, D)``, zeros for rows
        without slots (arguments as in :meth:`weights`)."""
        return torch.zeros_like(query).index_add(0, row, self.weights(query, keys, row) * keys)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """The row of each filled slot of a padded ``(B, n)`` sequence whose filled slots are ``mask``:
    int64 ``(P,)``, in row-major order (the order of ``x[mask]``), so ``x[mask]`` with these rows is
    the packed (jagged) form of ``x``."""
    return mask.nonzero()[:, 0]


@dataclass
class SparseBlocks:
    """Column blocks of a layer's input that are zero in most rows, held as their non-zero entries.

    The full input would be ``(B, in_dim)``, with ``n_blocks`` blocks of ``width`` columns from column
    ``start`` on (block ``j``: columns ``start + j * width`` to ``start + (j + 1) * width``); entry ``q``
    puts ``values[q]`` at row ``row[q]``, block ``block[q]``; every other block cell is zero. QARM's
    code-matching sequences are such blocks: most targets share their first ``l`` RQ codes with no
    history item for all but the coarsest levels (MicroLens-50k: 87 of 6,144 (example, level) cells
    filled in a batch of 1,024), so a dense layer would multiply mostly zeros.
    """

    start: int
    width: int
    n_blocks: int
    row: torch.Tensor  # int64 (Q,)
    block: torch.Tensor  # int64 (Q,)
    values: torch.Tensor  # float (Q, width)

    @property
    def stop(self) -> int:
        """The first column after the blocks."""
        return self.start + self.n_blocks * self.width

    @functools.cached_property
    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' rows that hold entries and where each entry lies among them: ``rows`` int64 ``(R,)``,
        the distinct rows, sorted, and ``cell`` int64 ``(Q,)``, entry ``q``'s cell in the ``(R * n_blocks,
        width)`` compact input whose row ``r * n_blocks + j`` is block ``j`` of row ``rows[r]`` (computed
        once, however many layers read the blocks)."""
        rows, position = torch.unique(self.row, return_inverse=True)
        return rows, position * self.n_blocks + self.block

    def to_dense(self, n_rows: int) -> torch.Tensor:
        """The blocks as the dense ``(n_rows, n_blocks * width)`` columns they stand for."""
        dense = self.values.new_zeros(n_rows * self.n_blocks, self.width)
        dense = dense.index_add(0, self.row * self.n_blocks + self.block, self.values)
        return dense.view(n_rows, self.n_blocks * self.width)


def linear_with_blocks(weight: torch.Tensor, bias: torch.Tensor | None, dense: torch.Tensor,
                       blocks: SparseBlocks | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for the input ``x`` whose columns ``blocks.start:blocks.stop`` are ``blocks``
    and whose other columns are ``dense`` (in order, ``(B, in_dim - n_blocks * width)``).

    The same function as a dense layer on the assembled input (up to float summation order), at the
    cost of the dense columns plus the rows that hold entries: the zero cells are never multiplied,
    forward or backward (see :class:`_LinearWithBlocks`). Without blocks, ``F.linear``.
    """
    if blocks is None:
        return F.linear(dense, weight, bias)
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    rows, cell = blocks.compact
    out: torch.Tensor = _LinearWithBlocks.apply(weight, bias, dense, blocks.values, rows, cell,
                                                blocks.start, blocks.n_blocks)
    return out


class _LinearWithBlocks(torch.autograd.Function):
    """``x @ weight.T + bias`` for ``x`` = ``dense`` with sparse column blocks inserted (see
    :func:`linear_with_blocks`).

    The dense columns are one GEMM against the weight's dense columns gathered into one matrix (no
    slices of the activations); the blocks are one GEMM over the few rows that hold entries, their
    entries laid out as a compact ``(R, n_blocks * width)`` input. Written as one function rather than as
    slices of ``weight`` because autograd's slice backward allocates a zero tensor of the whole weight
    per slice; this backward writes each part of the weight's gradient once.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, bias: torch.Tensor, dense: torch.Tensor, values: torch.Tensor,
                rows: torch.Tensor, cell: torch.Tensor, start: int, n_blocks: int) -> torch.Tensor:
        ctx.dtypes = (weight.dtype, bias.dtype, dense.dtype, values.dtype)
        device = dense.device.type
        if torch.is_autocast_enabled(device):  # compute as autocast would, and keep that type for backward
            dtype = torch.get_autocast_dtype(device)
            weight, bias, dense, values = (t.to(dtype) for t in (weight, bias, dense, values))
        width = values.shape[1]
        stop = start + n_blocks * width
        dense_weight = torch.cat([weight[:, :start], weight[:, stop:]], dim=1)  # (O, in_dim - n_blocks * width)
        out = torch.addmm(bias, dense, dense_weight.t())
        compact = values.new_zeros(len(rows) * n_blocks, width).index_add_(0, cell, values)
        compact = compact.view(len(rows), n_blocks * width)  # (R, n_blocks * width)
        out.index_add_(0, rows, compact @ weight[:, start:stop].t())
        ctx.save_for_backward(weight, dense_weight, dense, compact, rows, cell)
        ctx.layout = (start, stop, width)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, dense_weight, dense, compact, rows, cell = ctx.saved_tensors
        start, stop, width = ctx.layout
        grad = grads[0].contiguous().to(weight.dtype)  # (B, O)
        grad_weight = torch.empty_like(weight)
        grad_dense_weight = grad.t() @ dense  # (O, in_dim - n_blocks * width)
        grad_weight[:, :start] = grad_dense_weight[:, :start]
        grad_weight[:, stop:] = grad_dense_weight[:, start:]
        grad_dense = grad @ dense_weight
        grad_rows = grad.index_select(0, rows)  # (R, O)
        grad_weight[:, start:stop] = grad_rows.t() @ compact
        grad_values = (grad_rows @ weight[:, start:stop]).view(-1, width).index_select(0, cell)
        grad_weight, grad_bias, grad_dense, grad_values = (
            g.to(dtype) for g, dtype in zip((grad_weight, grad.sum(0), grad_dense, grad_values), ctx.dtypes))
        return grad_weight, grad_bias, grad_dense, grad_values, None, None, None, None


@dataclass
class MMoEConfig:
    """The multi-task head (Ma et al., KDD 2018)."""

    n_experts: int = 4  # a few experts suffice for 1-3 tasks; the gate learns how tasks share them
    expert_hidden: tuple[int, ...] = (128,)  # one ReLU layer per expert, as in the MMoE paper; ~1/4 of a CPU step
    tower_hidden: tuple[int, ...] = (64,)  # a small tower per task on top of its expert mixture
    dropout: float = 0.0  # the examples are many and the model small: no dropout by default

    def __post_init__(self) -> None:
        check_int("MMoEConfig", "n_experts", self.n_experts, 1)
        if not self.expert_hidden:
            raise ConfigError("The 'expert_hidden' parameter of MMoEConfig must be a non-empty list of ints. "
                              f"Got {self.expert_hidden!r} instead.")
        for name in ("expert_hidden", "tower_hidden"):
            for size in getattr(self, name):
                check_int("MMoEConfig", name, size, 1)
        check_float("MMoEConfig", "dropout", self.dropout, 0.0, 0.99)


class MMoE(nn.Module):
    """Multi-gate mixture of experts: shared experts, one softmax gate and one tower per task.

    The experts' first layers are one fused ``Linear(in_dim, E * H)`` (one GEMM instead of E; the
    experts' inputs are all the same ``x``), their further layers one batched matmul. The fused weights
    are initialised exactly as E separate ``nn.Linear`` experts built in turn would be, so a seed gives
    the same initial model as the unfused layout.

    Input ``(B, in_dim)``, output logits ``(B, T)``.
    """

    def __init__(self, in_dim: int, n_tasks: int, config: MMoEConfig | None = None) -> None:
        super().__init__()
        config = config or MMoEConfig()
        self.n_tasks, self.n_experts = n_tasks, config.n_experts
        hidden = list(config.expert_hidden)
        # Build the experts as separate MLPs (the RNG draws of the unfused layout), then fuse their weights.
        separate = [MLP(in_dim, hidden) for _ in range(config.n_experts)]
        linears = [[m for m in mlp if isinstance(m, nn.Linear)] for mlp in separate]
        rng = torch.random.get_rng_state()  # the fused layer's own init draws nothing: later layers' stay
        self.expert_in = nn.Linear(in_dim, config.n_experts * hidden[0])
        torch.random.set_rng_state(rng)
        with torch.no_grad():
            self.expert_in.weight.copy_(torch.cat([layers[0].weight for layers in linears], dim=0))
            self.expert_in.bias.copy_(torch.cat([layers[0].bias for layers in linears], dim=0))
        self.expert_weights = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].weight.detach().t() for layers in linears]).contiguous())
            for i in range(1, len(hidden)))  # (E, H_in, H_out) each
        self.expert_biases = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].bias.detach() for layers in linears]).unsqueeze(1).contiguous())
            for i in range(1, len(hidden)))  # (E, 1, H_out) each
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.hidden = hidden
        self.gates = nn.Linear(in_dim, n_tasks * config.n_experts)  # all tasks' gates in one matmul
        width = hidden[-1]
        self.towers = nn.ModuleList(MLP(width, config.tower_hidden, out_dim=1, dropout=config.dropout)
                                    for _ in range(n_tasks))

    def forward(self, x: torch.Tensor, blocks: SparseBlocks | None = None) -> torch.Tensor:
        """Logits ``(B, T)`` of the input ``x`` ``(B, in_dim)``; or, with ``blocks``, of the input whose
        sparse column blocks are ``blocks`` and whose other columns are ``x`` (see :class:`SparseBlocks`)."""
        # The experts' first layer and the gates read the same input: one product for both.
        weight = torch.cat([self.expert_in.weight, self.gates.weight])
        bias = torch.cat([self.expert_in.bias, self.gates.bias])
        first, gate_logits = linear_with_blocks(weight, bias, x, blocks).split(
            [self.expert_in.out_features, self.gates.out_features], dim=1)
        h = self.dropout(torch.relu(first)).view(-1, self.n_experts, self.hidden[0])  # (B, E, H0)
        if len(self.expert_weights):
            h = h.transpose(0, 1)  # (E, B, H)
            for expert_weight, expert_bias in zip(self.expert_weights, self.expert_biases):
                h = self.dropout(torch.relu(torch.baddbmm(expert_bias, h, expert_weight)))
            h = h.transpose(0, 1)  # (B, E, H)
        gates = gate_logits.reshape(-1, self.n_tasks, self.n_experts).softmax(dim=-1)
        mixed = torch.bmm(gates, h)  # (B, T, H)
        return torch.cat([tower(mixed[:, t]) for t, tower in enumerate(self.towers)], dim=1)  # (B, T)


class IdEmbedding(nn.Module):
    """Item ID embeddings through a vocabulary: ``index[item]`` is the item's row, row 0 is OOV.

    Parameters
    ----------
    index : int array (n_items,)
        Vocabulary rows in ``0..n_vocab`` (0: out of vocabulary).
    dim : int
    sparse : bool or None
        Sparse gradients for the table (see :func:`embedding_table`).

    Input: item ids (any shape, >= 0); output ``(..., dim)``.
    """

    index: torch.Tensor

    def __init__(self, index: np.ndarray | torch.Tensor, dim: int, sparse: bool | None = False) -> None:
        super().__init__()
        self.register_buffer("index", _buffer(index, torch.int64), persistent=False)
        self.table = embedding_table(int(self.index.max()) + 1 if len(self.index) else 1, dim, sparse=sparse)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.table(gather_rows(self.index, items))


class _BagSum(torch.autograd.Function):
    """``out[n] = sum_k w[n, k] * weight[index[n, k]]``, differentiable in ``weight`` only.

    Forward is ``F.embedding_bag(mode="sum")``. Backward computes the weight's gradient as another
    bag over the *transposed* index (for each distinct row ``j`` of ``weight``, the outputs that read
    it), so it runs on the same fast kernel instead of a scatter-add of ``N x K`` rows: on one CPU
    thread, 3.8k items x 25 VQ codes, 4.7 ms forward + backward against 15 ms for
    ``embedding_bag(mode="mean", padding_idx=...)`` (3.1 ms since its sort keys are int16 where the table
    allows: MicroLens-50k's 3.6k distinct items a batch). The sort is stable: the result is deterministic.
    With ``sparse`` the gradient is a sparse tensor of the rows read (for SparseAdam, see
    :mod:`qarm.optim`) instead of a dense one of the whole table.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, index: torch.Tensor, per_sample_weights: torch.Tensor,
                sparse: bool) -> torch.Tensor:
        ctx.save_for_backward(index, per_sample_weights)
        ctx.weight_shape, ctx.sparse = weight.shape, sparse
        return F.embedding_bag(index, weight, mode="sum", per_sample_weights=per_sample_weights)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        index, per_sample_weights = ctx.saved_tensors
        grad = grads[0].contiguous()  # (N, D)
        # Row ids as the narrowest integers that hold them: on CPU the sort's time halves with each halving
        # of the key's width (89k keys, one thread: int64 2.9 ms, int32 1.5 ms, int16 0.8 ms).
        key = torch.int16 if ctx.weight_shape[0] <= torch.iinfo(torch.int16).max + 1 else torch.int32
        rows, order = torch.sort(index.reshape(-1).to(key), stable=True)
        unique, counts = torch.unique_consecutive(rows, return_counts=True)
        offsets = torch.zeros_like(counts)
        offsets[1:] = torch.cumsum(counts, 0)[:-1]
        reads = F.embedding_bag(torch.div(order, index.shape[1], rounding_mode="floor"), grad, offsets,
                                mode="sum", per_sample_weights=gather_rows(per_sample_weights.reshape(-1), order))
        if ctx.sparse:  # the rows read, sorted and distinct: already coalesced
            return torch.sparse_coo_tensor(unique.to(torch.int64).unsqueeze(0), reads, ctx.weight_shape,
                                           is_coalesced=True, check_invariants=False), None, None, None
        grad_weight = grad.new_zeros(ctx.weight_shape)
        grad_weight.index_copy_(0, unique.to(torch.int64), reads)
        return grad_weight, None, None, None


def bag_sum(weight: torch.Tensor, index: torch.Tensor, per_sample_weights: torch.Tensor,
            sparse: bool = False) -> torch.Tensor:
    """Weighted bags of rows: int ``index`` (N, K) and float ``per_sample_weights`` (N, K) -> (N, D),
    ``out[n] = sum_k per_sample_weights[n, k] * weight[index[n, k]]`` (see :class:`_BagSum`); ``sparse``:
    the weight's gradient is a sparse tensor."""
    if index.numel() == 0 or not weight.requires_grad or not torch.is_grad_enabled():
        return F.embedding_bag(index, weight, mode="sum", per_sample_weights=per_sample_weights)
    out: torch.Tensor = _BagSum.apply(weight, index, per_sample_weights, sparse)
    return out


class VQEmbedding(nn.Module):
    """VQ codes (catalogue item ids of the top-K neighbours) embedded with their own table, mean over K.

    The table is not the item ID table: a VQ code stands for "similar to catalogue item j", a learned
    meaning of its own, and a cold item reaches trained code embeddings through its warm neighbours.

    Parameters
    ----------
    codes : int array (n_items, K_stored)
        VQ codes, most similar first; -1 marks a missing neighbour (left out of the mean), as does a code
        ``>= n_catalogue`` (an item added to the catalogue after training: it has no trained row).
    n_catalogue : int
        Code values lie in ``0..n_catalogue-1``.
    dim : int
    k : int or None
        Use the first ``k`` codes (the ``k`` nearest); None: all.
    sparse : bool or None
        Sparse gradients for the table (see :func:`embedding_table`).
    """

    codes: torch.Tensor
    mean_weights: torch.Tensor

    def __init__(self, codes: np.ndarray | torch.Tensor, n_catalogue: int, dim: int, k: int | None = None,
                 sparse: bool | None = False) -> None:
        super().__init__()
        codes = _buffer(codes, torch.int64)
        k = codes.shape[1] if k is None else k
        if not 1 <= k <= codes.shape[1]:
            raise ConfigError(f"vq_k must be in 1..{codes.shape[1]} (the stored K), got {k}")
        codes = codes[:, :k].clone()
        # A code outside the catalogue (an item a server added after training) has no trained row either.
        present = (codes >= 0) & (codes < n_catalogue)
        codes[~present] = n_catalogue  # the padding row (zero, weight 0: left out of the mean)
        # The mean as a weighted sum: 1 / (codes present) each, 0 for a missing one. A weighted sum is
        # embedding_bag's fast kernel; its ``padding_idx`` path is ten times slower on CPU.
        weights = present.to(torch.float32) / present.sum(dim=1, keepdim=True).clamp(min=1)
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("mean_weights", weights.contiguous(), persistent=False)
        self.table = embedding_table(n_catalogue + 1, dim, padding_idx=n_catalogue, sparse=sparse)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        flat = items.reshape(-1)
        pooled = bag_sum(self.table.weight, gather_rows(self.codes, flat), gather_rows(self.mean_weights, flat),
                         sparse=self.table.sparse)
        return pooled.view(*items.shape, -1)


class RQEmbedding(nn.Module):
    """RQ codes: one embedding table per level, the levels' embeddings summed.

    Summing per-level embeddings is the "unigram semantic ID" of Singh et al. (2023, *Better
    Generalization with Semantic IDs*): items sharing a coarse code share that part of their
    embedding, and the width does not grow with L. The tables are one matrix with level offsets, so the
    lookup is a single ``embedding_bag``.

    Parameters
    ----------
    codes : int array (n_items, L)
    sizes : sequence of L ints, each level's codebook size
    dim : int
    """

    codes: torch.Tensor
    flat_codes: torch.Tensor

    def __init__(self, codes: np.ndarray | torch.Tensor, sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        codes = _buffer(codes, torch.int64)
        if codes.shape[1] != len(sizes):
            raise ConfigError(f"RQ codes have {codes.shape[1]} levels but {len(sizes)} codebook sizes were given")
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]), dtype=torch.int64)
        self.register_buffer("codes", codes, persistent=False)  # raw codes, for code matching
        self.register_buffer("flat_codes", (codes + offsets).contiguous(), persistent=False)
        self.table = embedding_table(int(sum(sizes)), dim)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        # A gather and a sum over the L levels: on CPU, forward and backward take about half the time of
        # ``embedding_bag(mode="sum")`` (3.6k items x 6 levels, one thread), and the backward (an
        # ``index_add``) is deterministic.
        rows = gather_rows(self.table.weight, gather_rows(self.flat_codes, items))  # (..., L, dim)
        return rows.sum(dim=-2)


class FrozenVector(nn.Module):
    """A fixed item vector (pre-trained or aligned), not trained, through a learned linear projection.

    This is the cascading baseline's feature: the vector itself cannot move with the ranking loss
    (the "representation unlearning" QARM's codes address), only its projection can.

    Parameters
    ----------
    vectors : float array (n_items, D)
    dim : int, the projection's output size
    """

    vectors: torch.Tensor

    def __init__(self, vectors: np.ndarray | torch.Tensor, dim: int) -> None:
        super().__init__()
        self.register_buffer("vectors", _buffer(vectors, torch.float32), persistent=False)
        self.project = nn.Linear(self.vectors.shape[1], dim)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.project(gather_rows(self.vectors, items))


class CategoricalEmbeddings(nn.Module):
    """Several categorical columns, one table each (one matrix with offsets), concatenated.

    Input int ``(B, F)`` with column ``f`` in ``0..sizes[f]-1``; output ``(B, F * dim)``.
    """

    offsets: torch.Tensor

    def __init__(self, sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]),
                                                     dtype=torch.int64), persistent=False)
        self.table = embedding_table(int(sum(sizes)), dim)
        self.out_features = len(sizes) * dim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.table(values + self.offsets).flatten(1)


class PairwiseInnerProducts(nn.Module):
    """IPNN's product layer (Qu et al., ICDM 2016): the inner product of every pair of ``N`` field vectors.

    One batched Gram matrix ``x x^T`` (a single BLAS call) and a gather of its strict upper triangle. It
    computes all ``N^2`` products, twice the ``N (N - 1) / 2`` needed, but that is far cheaper than
    materialising the ``(B, pairs, k)`` left and right operands of a pair-by-pair product.

    Input float ``(B, N, k)``; output ``(B, N (N - 1) / 2)``, pairs ``(a, b)`` with ``a < b`` in row-major
    order (``torch.triu_indices(N, N, 1)``).
    """

    flat_index: torch.Tensor

    def __init__(self, n_fields: int) -> None:
        super().__init__()
        check_int("PairwiseInnerProducts", "n_fields", n_fields, 2)
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("flat_index", rows * n_fields + cols, persistent=False)
        self.n_fields = n_fields
        self.out_features = int(self.flat_index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.n_fields:
            raise ConfigError(f"PairwiseInnerProducts expects (B, {self.n_fields}, k), got {tuple(x.shape)}")
        gram = torch.bmm(x, x.transpose(1, 2))  # (B, N, N)
        return gram.flatten(1).index_select(1, self.flat_index)


class CodeMatchingSequences(nn.Module):
    """QARM's target-aware sequences: for l = 1..L, the latest ``length`` history items whose first
    ``l`` RQ codes equal the target's, each sequence pooled by target attention.

    Level 1 gathers the history in the target's coarsest cluster, level L the items with the target's
    full code (often the target itself or near-duplicates). One attention unit serves every level.

    Parameters
    ----------
    dim : int, ``D``
    length : int, ``m``, items kept per level
    attention_hidden : the attention MLP's hidden sizes
    """

    def __init__(self, dim: int, length: int = 10, attention_hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        self.length = length
        self.attention = TargetAttention(dim, attention_hidden)

    @staticmethod
    def matches(target_codes: torch.Tensor, history_codes: torch.Tensor, row: torch.Tensor,
                length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which history slots enter which level's sequence, on packed slots.

        Parameters
        ----------
        target_codes : int (B, L)
        history_codes : int (P, L), the RQ codes of the filled history slots, packed in row-major
            order (each row's slots together, most recent first; see :func:`pack`)
        row : int64 (P,), each slot's row
        length : m

        Returns
        -------
        slot : int64 (Q,), packed slots, each entering ...
        level : int64 (Q,), ... the sequence of this level (0-based: level ``l`` shares ``l + 1`` codes);
            per (row, level) the latest ``m`` matching slots, most recent first.
        """
        prefix_equal = (history_codes == gather_rows(target_codes, row)).to(torch.int8).cummin(dim=-1).values.bool()  # (P, L)
        # Rank of each match within its (row, level), counted from the row's most recent slot.
        seen = prefix_equal.to(torch.int32).cumsum(dim=0)  # (P, L), matches up to and including the slot
        first = torch.ones_like(row, dtype=torch.bool)
        first[1:] = row[1:] != row[:-1]
        start = torch.cummax(torch.where(first, torch.arange(len(row), device=row.device), 0), dim=0).values
        before = (seen - prefix_equal.to(torch.int32))[start]  # matches of earlier rows
        keep = prefix_equal & (seen - before <= length)
        slot, level = keep.nonzero(as_tuple=True)
        return slot, level

    def forward(self, target: torch.Tensor, history: torch.Tensor, row: torch.Tensor,
                target_codes: torch.Tensor, history_codes: torch.Tensor) -> torch.Tensor:
        """Pooled sequences, dense: float (B, L, D), zeros where a level's sequence is empty (arguments as
        in :meth:`pooled_blocks`)."""
        b, levels = target_codes.shape
        return self.pooled_blocks(target, history, row, target_codes, history_codes).to_dense(b).view(b, levels, -1)

    def pooled_blocks(self, target: torch.Tensor, history: torch.Tensor, row: torch.Tensor,
                      target_codes: torch.Tensor, history_codes: torch.Tensor, start: int = 0) -> SparseBlocks:
        """Pooled sequences, the non-empty ones only: block ``l`` of row ``b`` is level ``l``'s sequence
        of example ``b`` pooled by attention to its target (the blocks start at column ``start`` of the
        input they will join).

        Parameters
        ----------
        target : float (B, D)
        history : float (P, D), the filled history slots, packed (see :func:`pack`)
        row : int64 (P,), each slot's row
        target_codes : int (B, L)
        history_codes : int (P, L), the packed slots' RQ codes

        Returns
        -------
        SparseBlocks of L blocks of width D: one entry per non-empty (example, level) sequence.
        """
        levels = target_codes.shape[1]
        slot, level = self.matches(target_codes, history_codes, row, self.length)
        # A slot's weight depends on (target, slot) only, not on the level: weigh each slot once, however
        # many levels it enters (``slot`` is sorted, so its repeats are consecutive).
        unique, inverse = torch.unique_consecutive(slot, return_inverse=True)  # (U,), (Q,)
        keys, example = gather_rows(history, unique), gather_rows(row, unique)  # (U, D), (U,)
        weighted = self.attention.weights(target, keys, example) * keys  # (U, D): queries once per row
        cells, cell = torch.unique(gather_rows(row, slot) * levels + level, return_inverse=True)  # filled (example, level)
        pooled = target.new_zeros(len(cells), target.shape[1]).index_add(0, cell, gather_rows(weighted, inverse))  # (C, D)
        return SparseBlocks(start=start, width=target.shape[1], n_blocks=levels,
                            row=torch.div(cells, levels, rounding_mode="floor"), block=cells % levels, values=pooled)


def distinct(*ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The distinct ids of several id tensors, and where each id lies among them.

    A batch of B examples with n history slots names ``B (n + 1)`` items but far fewer distinct ones;
    embedding (code lookups, projections) per distinct item and gathering is the cheaper order.
    Negative ids (history padding) count as item 0; mask them downstream.

    Returns
    -------
    unique : int64 ``(U,)``, sorted
    positions : one int64 tensor per input, of its shape: ``unique[positions[i]] == ids[i].clamp(min=0)``
    """
    flat = torch.cat([t.reshape(-1) for t in ids]).clamp(min=0)
    unique, inverse = torch.unique(flat, return_inverse=True)
    positions, begin = [], 0
    for t in ids:
        positions.append(inverse[begin:begin + t.numel()].view(t.shape))
        begin += t.numel()
    return unique, positions


def embed_unique(embed: Callable[[torch.Tensor], torch.Tensor], *ids: torch.Tensor) -> list[torch.Tensor]:
    """``embed`` applied to every id tensor, computing each distinct id once (see :func:`distinct`).

    Parameters
    ----------
    embed : maps int64 ``(N,)`` to float ``(N, D)``
    ids : int64 tensors of any shapes

    Returns
    -------
    One float tensor ``(*ids[i].shape, D)`` per input.
    """
    unique, positions = distinct(*ids)
    vectors = embed(unique)
    return [gather_rows(vectors, at) for at in positions]


def required(value: torch.Tensor | None, name: str) -> torch.Tensor:
    """``value``, or a ConfigError when a model built with feature ``name`` gets a batch without it."""
    if value is None:
        raise ConfigError(f"the model was built with {name} but the batch has none")
    return value

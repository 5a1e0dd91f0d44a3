"""FGCNN (Liu et al., WWW 2019, *Feature Generation by Convolutional Neural Network for CTR Prediction*).

Two parts:

* **feature generation**: the field-embedding matrix, read as a one-channel image with the F fields as
  rows and the k embedding dimensions as columns, goes through blocks of a convolution (kernel ``h x 1``:
  it mixes neighbouring fields, never embedding dimensions), a max-pooling (``p x 1``) and a
  recombination dense layer that turns the pooled maps into ``r`` new feature embeddings per pooled row;
* **deep classifier** (IPNN): the raw and the generated feature embeddings, all pairwise inner products
  and the flattened embeddings, into an MLP.

The generation part has its own embedding tables by default (the paper's choice: the features that
feed the convolutions need not be the ones the classifier multiplies); ``separate_embeddings=False``
shares one set.

Two entry points share one network (:class:`FGCNNNetwork`):

* :class:`FGCNN`: any categorical fields, int codes ``(B, F)`` with per-field sizes -> logits ``(B, T)``
  (Frappe's 10 fields, MovieLens user / item fields, synthetic data);
* :class:`FGCNNRanker`: the ranking stage's model (``build_model("fgcnn", spec, tables, config)``),
  ``forward(batch: RankingBatch) -> logits (B, T)``, on the fields of a ranking example: user ID, target
  item ID (through the ID vocabulary: a cold item reads the OOV row), the target's category and the
  user's side features when the dataset has them, the mean of the history's item-ID embeddings and the
  ID embeddings of the latest ``recent_history`` history items.

Multi-task: ``head="linear"`` (default) puts one linear output per task on the shared MLP, the IPNN
output layer with T units; ``head="mmoe"`` puts an :class:`~qarm.models.layers.MMoE` there instead.

Shapes (B examples, F fields, k = embedding_dim, T tasks)::

    fields            E = [e_1 .. e_F]                                          (B, F, k)
    block i           tanh(conv h_i x 1, c_i channels, 'same' padding)          (B, c_i, F_{i-1}, k)
                      (batch_norm=True: tanh(batch-norm(conv)), per channel)
                      max-pool p_i x 1                                          (B, c_i, F_i, k),  F_i = F_{i-1} // p_i
                                                                 (pooling_round="up": ceil(F_{i-1} / p_i))
                      tanh(dense) -> F_i r_i new features                       (B, F_i r_i, k)
    generated         G, N_new = sum_i F_i r_i  (:func:`generated_feature_count`)   (B, N_new, k)
    classifier input  X = [E | G], N = F + N_new                                (B, N, k)
    IPNN              [X flattened (N k) | <x_a, x_b>, a < b (N (N - 1) / 2)] -> MLP -> head -> (B, T)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qarm.errors import ConfigError
from qarm.features.batch import RankingBatch
from qarm.features.examples import FeatureSpec
from qarm.features.tables import ItemTables
from qarm.models.layers import (
    MLP,
    CategoricalEmbeddings,
    IdEmbedding,
    MMoE,
    MMoEConfig,
    PairwiseInnerProducts,
    embedding_table,
    required,
)
from qarm.quantize._common import check_bool, check_float, check_int, check_option

HEADS = ("linear", "mmoe")
ROUNDING = ("down", "up", "pad")
INITS = ("torch", "xavier")
XAVIER_EMBEDDING_STD = 1e-4  # FuxiCTR's FeatureEmbedding default
_BLOCK_PARAMS = ("channels", "kernel_heights", "pooling", "new_features")


@dataclass
class FGCNNConfig:
    """FGCNN's sizes. The blocks are four parallel lists, one entry per block.

    DeepCTR's reference FGCNN uses four blocks: kernel 7, channels 14 / 16 / 18 / 20, 3 new features per
    pooled row, pooling 2; four pooling steps need at least 16 fields. The defaults keep its sizes with
    two blocks, which a ranking example's 4-8 fields (or Frappe's 10) can feed, and a smaller MLP.
    """

    embedding_dim: int = 16  # k, one size for every field (the convolution needs it); small for CPU
    channels: tuple[int, ...] = (14, 16)  # c_i, convolution channels per block (DeepCTR: 14, 16, 18, 20)
    kernel_heights: tuple[int, ...] = (7, 7)  # h_i, fields one convolution window spans ('same' padding)
    pooling: tuple[int, ...] = (2, 2)  # p_i, fields one max-pooling window spans
    pooling_round: Literal["down", "up", "pad"] = "down"  # F_i = F_{i-1} // p_i, or ceil(F_{i-1} / p_i)
    # ^ "up" keeps the fields a floor drops: the last window spans the remaining F_{i-1} mod p_i rows; "pad" is
    #   FuxiCTR's MaxPool2d(padding=F_{i-1} mod p_i): that many -inf rows on each side (pooling 2: ceil, the
    #   *first* window short); it needs F_{i-1} mod p_i <= p_i // 2 at every block (PyTorch's padding limit)
    batch_norm: bool = False  # batch-norm on each convolution's output, per channel (FuxiCTR's conv_batch_norm)
    init: Literal["torch", "xavier"] = "torch"  # PyTorch's defaults, N(0, 0.01) embeddings; or FuxiCTR's scheme:
    # ^ xavier-normal weights and zero biases in every nn.Linear, N(0, 1e-4) embeddings (convolutions: PyTorch's)
    new_features: tuple[int, ...] = (3, 3)  # r_i, new features per pooled row (the paper's recombination maps)
    hidden: tuple[int, ...] = (256, 128)  # the IPNN MLP, narrow: with the recombination, most of a CPU step
    dropout: float = 0.0  # in the MLP; the examples are many and the model small
    separate_embeddings: bool = True  # the paper's default: own tables for the generation part
    recent_history: int = 4  # ranking model only: the latest n history items as fields of their own
    # ^ beside the history mean; without them a dataset with no side features (MicroLens: user, item,
    #   history) has 3 fields, too few for two pooling blocks, and the order of the history is lost
    head: Literal["linear", "mmoe"] = "linear"  # one linear output per task on the shared MLP, or an MMoE
    mmoe: MMoEConfig = field(default_factory=MMoEConfig)  # used when head="mmoe"

    def __post_init__(self) -> None:
        name = "FGCNNConfig"
        check_int(name, "embedding_dim", self.embedding_dim, 1)
        for param in (*_BLOCK_PARAMS, "hidden"):
            _check_sizes(name, param, getattr(self, param))
        n_blocks = len(self.channels)
        for param in _BLOCK_PARAMS[1:]:
            value = getattr(self, param)
            if len(value) != n_blocks:
                raise ConfigError(f"The '{param}' parameter of {name} must have one entry per block "
                                  f"(len(channels) = {n_blocks}). Got {value!r} instead.")
        check_option(name, "pooling_round", self.pooling_round, ROUNDING)
        check_bool(name, "batch_norm", self.batch_norm)
        check_option(name, "init", self.init, INITS)
        check_float(name, "dropout", self.dropout, 0.0, 0.99)
        check_bool(name, "separate_embeddings", self.separate_embeddings)
        check_int(name, "recent_history", self.recent_history, 0)
        check_option(name, "head", self.head, HEADS)

    def check_fields(self, n_fields: int, names: Sequence[str] | None = None) -> None:
        """Raise a ConfigError unless every block keeps at least one row after its pooling.

        The data-dependent check: ``n_fields`` comes from the dataset (``names`` only for the message).
        """
        if self.pooling_round == "pad":  # each block's input rows: n_fields, then the counts after each pooling
            in_rows = [n_fields, *pooled_field_counts(n_fields, self.pooling, "pad")]
            for i, (rows, p) in enumerate(zip(in_rows, self.pooling)):
                if rows % p > p // 2:
                    raise ConfigError(f"FGCNNConfig(pooling_round='pad') pads {rows} % {p} = {rows % p} rows on each "
                                      f"side of block {i + 1}'s {rows} rows, more than half its pooling {p} "
                                      f"(FuxiCTR's MaxPool2d refuses it too). Use pooling_round='up'.")
        if n_fields < 2 or 0 in pooled_field_counts(n_fields, self.pooling, self.pooling_round):
            need = max(2, math.prod(self.pooling)) if self.pooling_round == "down" else 2
            shown = f" ({', '.join(names)})" if names else ""
            raise ConfigError(f"The 'pooling' parameter of FGCNNConfig, {tuple(self.pooling)!r}, needs at least "
                              f"{need} fields (every block must keep a row after pooling); the data gives "
                              f"{n_fields}{shown}. Use fewer blocks or smaller pooling.")


def pooled_field_counts(n_fields: int, pooling: Sequence[int], rounding: str = "down") -> list[int]:
    """``[F_1, ..., F_n]``: the rows after each block's pooling, ``F_0 = n_fields`` and ``F_i = F_{i-1} // p_i``
    (``rounding="down"``: max-pooling without padding) or ``ceil(F_{i-1} / p_i)`` (``"up"``: the last window
    takes the rows left over, as PyTorch's ``ceil_mode``), or ``(F_{i-1} + 2 m - p_i) // p_i + 1`` with ``m =
    F_{i-1} mod p_i`` (``"pad"``: FuxiCTR's FGCNN, ``m`` padding rows on each side; ``ceil`` for pooling 2)."""
    rows, out = n_fields, []
    for p in pooling:
        if rounding == "pad":
            rows = (rows + 2 * (rows % p) - p) // p + 1
        else:
            rows = -(-rows // p) if rounding == "up" else rows // p
        out.append(rows)
    return out


def pooling_windows(n_rows: int, p: int, rounding: str = "down") -> list[list[int]]:
    """The input rows of each pooling window, in order: ``p`` rows from ``r p`` (``"down"``, ``"up"``: the last
    window may be short), or from ``r p - m`` with ``m = n_rows mod p`` (``"pad"``: the first window short);
    rows past either end are left out."""
    start = -(n_rows % p) if rounding == "pad" else 0
    count = pooled_field_counts(n_rows, (p,), rounding)[0]
    return [[row for row in range(start + r * p, start + (r + 1) * p) if 0 <= row < n_rows] for r in range(count)]


def generated_feature_count(n_fields: int, pooling: Sequence[int], new_features: Sequence[int],
                            rounding: str = "down") -> int:
    """The number of generated features, ``sum_i F_i * r_i`` with ``F_i`` the rows after ``i`` pooling steps
    (:func:`pooled_field_counts`)."""
    return sum(rows * r for rows, r in zip(pooled_field_counts(n_fields, pooling, rounding), new_features))


class FieldConvolution(nn.Module):
    """A convolution over the field axis (kernel ``h x 1``, stride 1, 'same' zero padding), as one matrix product.

    Input float ``(B, k, F, C_in)``, channels last, one column of ``F`` field rows per embedding dimension;
    output ``(B, k, F_out, C_out)``, before the activation: the output rows ``out_rows`` (default all ``F``, in
    order; a row may repeat, and rows left out cost nothing), so that a max-pooling can find its windows laid
    out contiguously.

    With a few dozen fields at most, the convolution of one column is a linear map from its ``F x C_in``
    values to its ``F x C_out`` outputs, the banded (Toeplitz) matrix :meth:`matrix` built from the kernel
    at each step; one GEMM over the ``B k`` columns then replaces a direct convolution, which on CPU spends
    most of its time converting layouts for such thin images. The parameters are those of ``nn.Conv2d``
    (``weight`` ``(C_out, C_in, h)``, ``bias`` ``(C_out,)``), initialised the same way, and the output equals
    ``F.conv2d(x, weight[..., None], bias, padding="same")`` (the odd padding row of an even ``h`` goes after,
    as in PyTorch and TensorFlow).
    """

    tap: torch.Tensor  # buffer (F, F_out) int64, registered in __init__

    def __init__(self, n_fields: int, in_channels: int, out_channels: int, height: int,
                 out_rows: Sequence[int] | None = None) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=(height, 1))  # for its initialisation
        assert conv.bias is not None  # Conv2d has a bias unless bias=False
        self.weight = nn.Parameter(conv.weight.detach()[..., 0].clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())
        rows = torch.arange(n_fields) if out_rows is None else torch.as_tensor(list(out_rows), dtype=torch.int64)
        if rows.numel() == 0 or rows.min() < 0 or rows.max() >= n_fields:
            raise ConfigError(f"FieldConvolution's out_rows must be field indices in 0..{n_fields - 1}. "
                              f"Got {list(rows.tolist())!r} instead.")
        # tap[i, o]: the kernel row linking input row i to output row out_rows[o]; height (a zero row) where none does.
        tap = torch.arange(n_fields)[:, None] - rows[None, :] + (height - 1) // 2
        self.register_buffer("tap", torch.where((tap >= 0) & (tap < height), tap, height), persistent=False)

    def matrix(self) -> torch.Tensor:
        """The ``(F C_in, F_out C_out)`` matrix of the convolution: rows (input field, channel), columns
        (output row, channel)."""
        c_out, c_in, _ = self.weight.shape
        n, n_out = self.tap.shape
        return F.pad(self.weight, (0, 1))[:, :, self.tap].permute(2, 1, 3, 0).reshape(n * c_in, n_out * c_out)

    def forward(self, maps: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``bias=False``: the product alone (the caller adds :attr:`bias` per channel later, e.g. after a pooling,
        which commutes with it)."""
        b, k, n, c_in = maps.shape
        n_out = self.tap.shape[1]
        flat = maps.reshape(b * k, n * c_in)
        out = torch.addmm(self.bias.repeat(n_out), flat, self.matrix()) if bias else torch.mm(flat, self.matrix())
        return out.view(b, k, n_out, -1)


class FeatureGeneration(nn.Module):
    """The generation part: convolution, max-pooling and recombination blocks.

    Input float ``(B, F, k)``; output ``(B, N_new, k)`` with ``N_new`` = :attr:`out_features` =
    :func:`generated_feature_count`. One Python iteration per block, none per field.

    Each block is ``tanh(conv)`` (``tanh(batch_norm(conv))`` with ``batch_norm``), max-pooling, ``tanh(dense)``.
    The pooling runs before the ``tanh``: tanh is increasing, so ``max(tanh(z)) = tanh(max(z))`` (values and
    gradients), and the activation then touches ``1 / p`` of the map. The convolution computes its output rows
    in window-major order (slot ``j`` of every window, then slot ``j + 1``; :attr:`windows`), so the pooling is
    one max over ``p`` contiguous slices of each row, with no padding or strided copies; rounding down, the rows
    past the last full window are never computed; rounding up (``rounding="up"``), the rows past the last full
    window are pooled on their own, and with FuxiCTR's padding (``"pad"``, :func:`pooling_windows`) the rows
    before the first full one; the missing slots of a short window repeat its first row.
    The batch-norm (``nn.BatchNorm2d`` on FuxiCTR's ``(B, c, F, k)`` maps) normalises each channel over the
    examples, fields and embedding columns: a ``BatchNorm1d`` on the ``(B k F, c)`` channels-last rows, on
    the whole map before the pooling.
    """

    def __init__(self, n_fields: int, dim: int, channels: Sequence[int], kernel_heights: Sequence[int],
                 pooling: Sequence[int], new_features: Sequence[int], rounding: str = "down",
                 batch_norm: bool = False) -> None:
        super().__init__()
        self.rows = pooled_field_counts(n_fields, pooling, rounding)
        self.pooling, self.new_features, self.dim = tuple(pooling), tuple(new_features), dim
        self.batch_norm = batch_norm
        in_rows, in_channels = [n_fields, *self.rows[:-1]], [1, *channels[:-1]]
        # The convolution's output rows in window-major order: slot j of window r is its j-th row; a slot past
        # either end (a short window) repeats the window's first row, which max(a, a) = a leaves exact. With
        # batch-norm every row is computed (the statistics span the whole map) and gathered in this order after.
        self.windows = []
        for n, p in zip(in_rows, pooling):
            windows = pooling_windows(n, p, rounding)
            self.windows.append([w[j] if j < len(w) else w[0] for j in range(p) for w in windows])
        self.convs = nn.ModuleList(FieldConvolution(n, c_in, c, h, None if batch_norm else order)
                                   for n, c_in, c, h, order in zip(in_rows, in_channels, channels, kernel_heights,
                                                                   self.windows))
        for i, order in enumerate(self.windows):
            self.register_buffer(f"window_rows_{i}", torch.tensor(order, dtype=torch.int64), persistent=False)
        self.norms = nn.ModuleList(nn.BatchNorm1d(c) if batch_norm else nn.Identity() for c in channels)
        self.recombine = nn.ModuleList(nn.Linear(rows * dim * c, rows * r * dim)
                                       for rows, c, r in zip(self.rows, channels, new_features))
        self.out_features = sum(rows * r for rows, r in zip(self.rows, new_features))

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        b = fields.shape[0]
        maps = fields.transpose(1, 2).unsqueeze(-1)  # (B, k, F, 1): one column of F rows per dimension
        generated = []
        for i, (conv, norm, dense, p, rows, r) in enumerate(zip(self.convs, self.norms, self.recombine, self.pooling,
                                                                 self.rows, self.new_features)):
            # (B, k, p F_i, c_i), window-major rows (all F_{i-1} rows in order with batch-norm). Without batch-norm
            # the bias is added after the pooling (max(a + b, c + b) = max(a, c) + b, exactly in floating point:
            # rounding is monotone), on 1 / p of the map, and its gradient sums 1 / p of the rows.
            z = conv(maps, bias=self.batch_norm)
            if self.batch_norm:
                z = norm(z.flatten(0, 2)).view_as(z).index_select(2, getattr(self, f"window_rows_{i}"))
            c = z.shape[3]
            z = z.view(b * self.dim, p, rows * c)
            z = _window_max(z) if p > 1 else z[:, 0]  # max-pool p x 1: the max over the p slots of each window
            if not self.batch_norm:
                z = (z.view(-1, rows, c) + conv.bias).view(b * self.dim, rows * c)
            maps = torch.tanh(z).view(b, self.dim, rows, c)
            generated.append(torch.tanh(dense(maps.flatten(1))).view(b, rows * r, self.dim))
        return torch.cat(generated, dim=1)


class FGCNNNetwork(nn.Module):
    """Generation + IPNN classifier on field embeddings, whatever made them.

    ``forward(fields, generation_fields)``: float ``(B, F, k)`` each (the same tensor when embeddings are
    shared) -> logits ``(B, T)``.
    """

    def __init__(self, n_fields: int, n_tasks: int, config: FGCNNConfig, field_names: Sequence[str] | None = None
                 ) -> None:
        super().__init__()
        config.check_fields(n_fields, field_names)
        c = config
        self.generation = FeatureGeneration(n_fields, c.embedding_dim, c.channels, c.kernel_heights, c.pooling,
                                            c.new_features, c.pooling_round, c.batch_norm)
        n_all = n_fields + self.generation.out_features
        self.products = PairwiseInnerProducts(n_all)
        self.mlp = MLP(n_all * c.embedding_dim + self.products.out_features, c.hidden, dropout=c.dropout)
        self.head = nn.Linear(self.mlp.out_features, n_tasks) if c.head == "linear" \
            else MMoE(self.mlp.out_features, n_tasks, c.mmoe)

    @property
    def n_generated(self) -> int:
        return self.generation.out_features

    def forward(self, fields: torch.Tensor, generation_fields: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fields, self.generation(generation_fields)], dim=1)  # (B, N, k)
        if not torch.is_autocast_enabled(x.device.type):
            return self.head(self.mlp(torch.cat([x.flatten(1), self.products(x)], dim=1)))
        # Under bf16 autocast (qarm.precision) the inner products and the output layer stay float32: they cost
        # ~3% of the products, and bfloat16 logits (8 significant bits: steps of 0.03 at a logit of 5) would
        # round the loss's inputs; the generation and the MLP run in bfloat16.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            products = self.products(x)
        hidden = self.mlp(torch.cat([x.flatten(1), products], dim=1))
        with torch.autocast(x.device.type, enabled=False):
            out: torch.Tensor = self.head(hidden.float())
        return out


class FGCNN(nn.Module):
    """FGCNN on categorical fields. ``forward(codes) -> logits (B, T)``.

    Parameters
    ----------
    field_sizes : sequence of F ints
        Field ``f``'s codes lie in ``0..field_sizes[f]-1`` (reserve a code for unseen values).
    n_tasks : int
    config : FGCNNConfig

    Input int64 ``(B, F)``.
    """

    def __init__(self, field_sizes: Sequence[int], n_tasks: int = 1, config: FGCNNConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or FGCNNConfig()
        check_int("FGCNN", "n_tasks", n_tasks, 1)
        for size in field_sizes:
            check_int("FGCNN", "field_sizes", size, 1)
        self.n_fields = len(field_sizes)
        self.embedding = CategoricalEmbeddings(field_sizes, c.embedding_dim)
        self.generation_embedding = CategoricalEmbeddings(field_sizes, c.embedding_dim) \
            if c.separate_embeddings else None
        self.network = FGCNNNetwork(self.n_fields, n_tasks, c)
        if c.init == "xavier":
            xavier_init(self)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        shape = (codes.shape[0], self.n_fields, self.config.embedding_dim)
        fields = self.embedding(codes).view(shape)
        generation = fields if self.generation_embedding is None else self.generation_embedding(codes).view(shape)
        return self.network(fields, generation)


class RankingFields(nn.Module):
    """The fields of a ranking example, one k-vector each: ``forward(batch) -> (B, F, k)``.

    Fields, in :attr:`names` order: ``user`` (ID), ``item`` (ID through the vocabulary, row 0 = OOV for cold
    items), ``category`` (when the dataset has one), each user side feature, ``history``: the mean
    of the history items' ID embeddings (zeros for an empty history), and ``recent_1`` .. ``recent_n``:
    the ID embeddings of the latest ``recent`` history items, most recent first (zeros where the
    history is shorter).
    """

    def __init__(self, spec: FeatureSpec, tables: ItemTables, dim: int, recent: int = 0) -> None:
        super().__init__()
        self.user = embedding_table(spec.n_users, dim)
        self.item = IdEmbedding(tables.id_index, dim)
        self.category = embedding_table(spec.n_categories, dim) if spec.n_categories else None
        self.user_side = CategoricalEmbeddings([s for _, s in spec.user_features], dim) \
            if spec.user_features else None
        if recent > spec.history_length:
            raise ConfigError(f"The 'recent_history' parameter of FGCNNConfig ({recent}) exceeds the history "
                              f"length of the examples ({spec.history_length}).")
        self.recent = recent
        self.names = ("user", "item", *(("category",) if self.category is not None else ()),
                      *(name for name, _ in spec.user_features), "history",
                      *(f"recent_{i + 1}" for i in range(recent)))
        self.dim = dim

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        b = len(batch)
        parts = [self.user(batch.user), self.item(batch.item)]
        if self.category is not None:
            parts.append(self.category(required(batch.category, "category")))
        if self.user_side is not None:
            parts.extend(self.user_side(required(batch.user_features, "user_features")).view(b, -1, self.dim)
                         .unbind(1))
        mask = batch.history_mask  # (B, n)
        weights = mask / batch.history_len.clamp(min=1).unsqueeze(1)  # 1/len on filled slots, 0 on padding
        rows = self.item.index[batch.history.clamp(min=0)]  # vocabulary rows; padding reads row 0 at weight 0
        parts.append(F.embedding_bag(rows, self.item.table.weight, mode="sum",
                                     per_sample_weights=weights.to(self.item.table.weight.dtype)))
        if self.recent:
            recent = self.item.table(rows[:, :self.recent]) * mask[:, :self.recent, None]  # (B, n, k), 0 if empty
            parts.extend(recent.unbind(1))
        return torch.stack(parts, dim=1)


class FGCNNRanker(nn.Module):
    """FGCNN as a ranking model. ``forward(batch) -> logits (B, T)``.

    Parameters
    ----------
    spec : FeatureSpec, the dataset's sizes, side features and tasks
    tables : ItemTables, the ID vocabulary (codes and vectors are not used)
    config : FGCNNConfig
    """

    def __init__(self, spec: FeatureSpec, tables: ItemTables, config: FGCNNConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or FGCNNConfig()
        self.tasks = spec.tasks
        self.fields = RankingFields(spec, tables, c.embedding_dim, c.recent_history)
        self.generation_fields = RankingFields(spec, tables, c.embedding_dim, c.recent_history) \
            if c.separate_embeddings else None
        self.network = FGCNNNetwork(len(self.fields.names), len(spec.tasks), c, self.fields.names)
        if c.init == "xavier":
            xavier_init(self)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        fields = self.fields(batch)
        generation = fields if self.generation_fields is None else self.generation_fields(batch)
        return self.network(fields, generation)


def xavier_init(model: nn.Module) -> None:
    """FuxiCTR's initialisation (``BaseModel.reset_parameters``, ``FeatureEmbedding``): every ``nn.Linear``
    xavier-normal with a zero bias, every embedding table N(0, 1e-4) (a padding row stays zero); the
    convolutions keep ``nn.Conv2d``'s default, as in FuxiCTR (its reset covers Linear and Conv1d only)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=XAVIER_EMBEDDING_STD)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()


class _SlotMax(torch.autograd.Function):
    """``(N, 2, M) -> (N, M)``: the larger of the two slots, its gradient to one slot (the first of equal ones).

    Measured on CPU (one thread): ``Tensor.max(dim=1)`` reduces the 2-slot middle axis ~8x slower than
    ``torch.maximum`` of the two slices, and ``torch.where`` (the obvious routing, forward and backward) is
    ~10x slower than a multiply; here the forward saves the comparison as a float 1.0 / 0.0 mask and the
    backward is one multiply and one subtraction into the ``(N, 2, M)`` gradient, all on float tensors. The
    first slot wins ties, so a slot that repeats it (a short window, rounding up) gets no gradient: the kernel's
    gradient counts each row once.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, slots: torch.Tensor) -> torch.Tensor:
        first = torch.ge(slots[:, 0], slots[:, 1], out=torch.empty_like(slots[:, 0]))  # 1.0 / 0.0: a float compare
        ctx.save_for_backward(first)  # half the slots' memory; the slots themselves are freed after the forward
        return torch.maximum(slots[:, 0], slots[:, 1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (first,) = ctx.saved_tensors  # type: ignore[attr-defined]
        out = torch.empty((grad.shape[0], 2, grad.shape[1]), dtype=grad.dtype, device=grad.device)
        torch.mul(grad, first, out=out[:, 0])  # (a bool mask would take the slow mixed-dtype path)
        torch.sub(grad, out[:, 0], out=out[:, 1])
        return out


def _window_max(slots: torch.Tensor) -> torch.Tensor:
    """``(N, p, M) -> (N, M)``, the max over the ``p`` slots of each window (:class:`_SlotMax` for ``p = 2``; a
    chain of ``torch.maximum`` otherwise, whose ties share the gradient: a repeated slot's share reaches the
    same kernel rows, so the parameters' gradients are unchanged)."""
    if slots.shape[1] == 2:
        out: torch.Tensor = _SlotMax.apply(slots)
        return out
    return functools.reduce(torch.maximum, slots.unbind(1))


def _check_sizes(owner: str, param: str, value: object) -> None:
    if not isinstance(value, (tuple, list)) or not value:
        raise ConfigError(f"The '{param}' parameter of {owner} must be a non-empty list of ints >= 1. "
                          f"Got {value!r} instead.")
    for size in value:
        check_int(owner, param, size, 1)


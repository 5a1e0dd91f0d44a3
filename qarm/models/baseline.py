"""The strong baseline: item IDs, DIN target attention over the history, a frozen pre-trained vector,
and an MMoE head. With ``use_frozen_vector=False`` it is the ID-only model.

This is the cascading setup QARM starts from (paper, section 1): a multi-modal vector is computed once
by a pre-trained model and fed, frozen, to the ranking model, which can only project it.

Shapes (B examples, n history slots, T tasks)::

    item representation   e(i) = [id(i) | W v(i)]                      (B, D_item)
    history               e(h_1..h_n), most recent first, packed        (P, D_item), P filled slots
    interest              sum_j a(h_j, target) e(h_j)                   (B, D_item)
    input                 [target | interest | user id | user side | category]
    logits                MMoE(input)                                   (B, T)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qarm.errors import ConfigError
from qarm.features.batch import RankingBatch
from qarm.features.examples import FeatureSpec
from qarm.features.tables import ItemTables
from qarm.models.layers import (
    CategoricalEmbeddings,
    FrozenVector,
    IdEmbedding,
    MMoE,
    MMoEConfig,
    TargetAttention,
    embed_unique,
    embedding_table,
    pack,
    required,
)
from qarm.quantize._common import check_bool, check_int


@dataclass
class BaselineConfig:
    """IDs + DIN + (optionally) the frozen pre-trained vector, MMoE head."""

    id_dim: int = 32  # item and user ID embeddings: DIN-scale; 2 cores train 1.3M rows/epoch in ~1 min
    use_frozen_vector: bool = True  # False: the ID-only model
    vector: str = "pretrained"  # which of the tables' frozen vectors (the cascading baseline's)
    vector_dim: int = 32  # the frozen vector's learned projection, the size of an ID embedding
    side_dim: int = 8  # each user side feature and the category: few values each
    attention_hidden: tuple[int, ...] = (64, 32)  # DIN's activation unit (80, 40), a little smaller for CPU
    head: MMoEConfig = field(default_factory=MMoEConfig)
    sparse_tables: bool | None = None
    """Sparse gradients (SparseAdam, :mod:`qarm.optim`) for the user ID and item ID tables. None: for each
    table with more than ``qarm.optim.SPARSE_ROWS`` rows (a million-item catalogue; every
    catalogue published in RESULTS.md is smaller and trains with dense Adam). Needs ``weight_decay`` 0 and no
    ``grad_clip``."""

    def __post_init__(self) -> None:
        if self.sparse_tables is not None:
            check_bool("BaselineConfig", "sparse_tables", self.sparse_tables)
        for name in ("id_dim", "vector_dim", "side_dim"):
            check_int("BaselineConfig", name, getattr(self, name), 1)
        check_bool("BaselineConfig", "use_frozen_vector", self.use_frozen_vector)
        for size in self.attention_hidden:
            check_int("BaselineConfig", "attention_hidden", size, 1)


class BaselineRanker(nn.Module):
    """The baseline ranking model. ``forward(batch) -> logits (B, T)``.

    Parameters
    ----------
    spec : FeatureSpec, the dataset's sizes and tasks
    tables : ItemTables, the ID vocabulary and (with ``use_frozen_vector``) ``tables.vectors[config.vector]``
    config : BaselineConfig
    """

    def __init__(self, spec: FeatureSpec, tables: ItemTables, config: BaselineConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or BaselineConfig()
        self.tasks = spec.tasks
        # Item side: ID (+ frozen vector).
        self.item_id = IdEmbedding(tables.id_index, c.id_dim, sparse=c.sparse_tables)
        self.vector = None
        if c.use_frozen_vector:
            if c.vector not in tables.vectors:
                raise ConfigError(f"the baseline needs the frozen vector {c.vector!r}; the item tables hold "
                                  f"{sorted(tables.vectors)} (build them with align_dir=...)")
            self.vector = FrozenVector(tables.vectors[c.vector], c.vector_dim)
        item_dim = c.id_dim + (c.vector_dim if c.use_frozen_vector else 0)
        # User side: the history pooled against the target, the user's ID and side features.
        self.interest = TargetAttention(item_dim, c.attention_hidden)
        self.user_id = embedding_table(spec.n_users, c.id_dim, sparse=c.sparse_tables)
        self.user_side = CategoricalEmbeddings([s for _, s in spec.user_features], c.side_dim) \
            if spec.user_features else None
        self.category = embedding_table(spec.n_categories, c.side_dim) if spec.n_categories else None
        # Head.
        in_dim = 2 * item_dim + c.id_dim + (self.user_side.out_features if self.user_side is not None else 0) \
            + (c.side_dim if self.category is not None else 0)
        self.head = MMoE(in_dim, len(spec.tasks), c.head)

    def embed_items(self, items: torch.Tensor) -> torch.Tensor:
        """Item representations: int64 (N,) -> float (N, D_item)."""
        parts = [self.item_id(items)]
        if self.vector is not None:
            parts.append(self.vector(items))
        return torch.cat(parts, dim=-1)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        mask = batch.history_mask  # (B, n)
        row = pack(mask)  # only filled history slots are computed: (P,) rows
        target, history = embed_unique(self.embed_items, batch.item, batch.history[mask])  # (B, D), (P, D)
        interest = self.interest(target, history, row)  # (B, D)
        parts = [target, interest, self.user_id(batch.user)]
        if self.user_side is not None:
            parts.append(self.user_side(required(batch.user_features, "user_features")))
        if self.category is not None:
            parts.append(self.category(required(batch.category, "category")))
        return self.head(torch.cat(parts, dim=-1))


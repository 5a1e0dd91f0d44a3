"""QARM's ranking model (paper, section 2.4): the baseline's IDs and DIN attention, plus the quantitative
codes of every item as learnable ID features, and the target-aware code-matching sequences.

Each addition is a switch, so one class covers the ablation rows (ID-only, + frozen vector,
+ aligned vector, + VQ, + RQ, + VQ & RQ, + code matching):

* ``vector``: ``"none"``, ``"pretrained"`` or ``"aligned"``: a frozen item vector, projected;
* ``use_vq``: the item's first ``vq_k`` VQ codes (ids of its nearest catalogue items), own table, mean;
* ``use_rq``: the item's L RQ codes, one table per level, summed;
* ``use_code_matching``: for l = 1..L, the latest ``match_length`` history items whose first l RQ codes
  equal the target's, each pooled by attention to the target.

Codes enter every item representation, the target's and the history's alike, so the DIN attention
compares items through their codes too; a cold-start item (ID out of vocabulary) is represented by
its codes and vector.

Shapes (B examples, n history slots, L RQ levels, m = match_length, T tasks)::

    item representation   e(i) = [id(i) | W v(i) | mean_k vq_k(i) | sum_l rq_l(i)]   (B, D_item)
    history               e(h_1..h_n), most recent first, packed                        (P, D_item)
    interest              DIN(target, history)                                          (B, D_item)
    code matching         DIN(target, latest m of history with target's l-prefix)       (B, L, D_item)
                          (held as its non-empty (example, level) cells: SparseBlocks)
    (with ``sequence_dim = d``, 32 by default: history, interest and code matching on ``W e(i)``, width d
     instead of D_item; with ``target_dim = t``, 32 by default: the target's column in the input is
     ``W_t e(target)``, width t; both None: the paper's layout, as drawn above)
    input                 [target | interest | code matching (flat) | user id | user side | category]
    logits                MMoE(input)                                                   (B, T)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from qarm.errors import ConfigError
from qarm.features.batch import RankingBatch
from qarm.features.examples import FeatureSpec
from qarm.features.tables import ItemTables
from qarm.models.layers import (
    CategoricalEmbeddings,
    CodeMatchingSequences,
    FrozenVector,
    IdEmbedding,
    MMoE,
    MMoEConfig,
    RQEmbedding,
    TargetAttention,
    VQEmbedding,
    distinct,
    embedding_table,
    gather_rows,
    pack,
    required,
)
from qarm.quantize._common import check_bool, check_int, check_option

VECTORS = ("none", "pretrained", "aligned")


@dataclass
class QARMConfig:
    """The QARM ranking model and its switches."""

    id_dim: int = 32  # item and user ID embeddings, as in the baseline
    vector: Literal["none", "pretrained", "aligned"] = "aligned"  # QARM's aligned vector beside its codes
    vector_dim: int = 32  # the frozen vector's projection
    use_vq: bool = True  # VQ codes: top-K neighbour ids, the paper's "VQ code"
    use_rq: bool = True  # RQ codes: residual k-means semantic ids
    use_code_matching: bool = True  # the l-code matching sequences (needs RQ codes in the tables)
    vq_k: int | None = None  # first k of the stored K codes (the nearest); None: all (the paper: 25)
    code_dim: int = 32  # embedding size of a VQ or RQ code (ablation: 16 / 32 / 64)
    match_length: int = 10  # items per code-matching sequence: the latest few per level suffice
    sequence_dim: int | None = 32
    """Width of the items in the history attention and the code-matching sequences: every item is projected
    once to ``d`` (one learned linear map, per distinct item of the batch) for the sequences only, so the
    attentions and the head's input shrink. None: the full item representation (``D_item``, the paper's
    layout; the default before qarm 0.2.0)."""
    target_dim: int | None = 32
    """Width of the target's column in the head's input: a learned projection ``W_t e(t)`` of its own (not the
    sequences'), so the head's dense input is as narrow as ID-only's; the head's first layer on ``e(t)``
    becomes rank ``t``. None: the full representation ``e(t)`` (``D_item``; the default before qarm 0.2.0).
    The 32-d sequences and target train 1.3x and predict 1.5x faster than the paper's layout on MicroLens-50k
    at the same test GAUC, overall, warm and cold-start (3 seeds; RESULTS.md, issue 12)."""
    side_dim: int = 8  # each user side feature and the category
    attention_hidden: tuple[int, ...] = (64, 32)  # DIN's activation unit, shared size for all attentions
    head: MMoEConfig = field(default_factory=MMoEConfig)
    sparse_tables: bool | None = None
    """Sparse gradients (SparseAdam, :mod:`qarm.optim`) for the embedding tables. None: the user and item ID
    tables with more than ``qarm.optim.SPARSE_ROWS`` rows (a million-item catalogue; every catalogue
    published in RESULTS.md is smaller and trains with dense Adam), the VQ code table dense: each item
    reads 25 of its rows, so a batch reads ~19% of a 1M-row table and SparseAdam's sparse passes cost more
    than one fused dense pass (1M items, measured side by side: all three sparse 0.83-1.10x of dense, the
    ID tables alone sparse 1.17-1.51x; RESULTS.md).
    True: all three sparse; False: none. Sparse tables need ``weight_decay`` 0 and no ``grad_clip``."""

    def __post_init__(self) -> None:
        if self.sparse_tables is not None:
            check_bool("QARMConfig", "sparse_tables", self.sparse_tables)
        check_option("QARMConfig", "vector", self.vector, VECTORS)
        for name in ("id_dim", "vector_dim", "code_dim", "match_length", "side_dim"):
            check_int("QARMConfig", name, getattr(self, name), 1)
        check_int("QARMConfig", "sequence_dim", self.sequence_dim, 1, none_ok=True)
        check_int("QARMConfig", "target_dim", self.target_dim, 1, none_ok=True)
        check_int("QARMConfig", "vq_k", self.vq_k, 1, none_ok=True)
        for name in ("use_vq", "use_rq", "use_code_matching"):
            check_bool("QARMConfig", name, getattr(self, name))
        for size in self.attention_hidden:
            check_int("QARMConfig", "attention_hidden", size, 1)


class QARMRanker(nn.Module):
    """The QARM ranking model. ``forward(batch) -> logits (B, T)``.

    Parameters
    ----------
    spec : FeatureSpec, the dataset's sizes and tasks
    tables : ItemTables, with VQ / RQ codes (``use_vq``, ``use_rq``, ``use_code_matching``) and the
        chosen frozen vector
    config : QARMConfig
    """

    rq_codes: torch.Tensor

    def __init__(self, spec: FeatureSpec, tables: ItemTables, config: QARMConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or QARMConfig()
        self.tasks = spec.tasks
        _check_tables(c, tables)
        # Item side: ID, frozen vector, VQ codes, RQ codes; each optional but the ID.
        self.item_id = IdEmbedding(tables.id_index, c.id_dim, sparse=c.sparse_tables)
        self.vector = FrozenVector(tables.vectors[c.vector], c.vector_dim) if c.vector != "none" else None
        self.vq = VQEmbedding(required_codes(tables.vq, "vq"), tables.n_catalogue, c.code_dim, c.vq_k,
                              sparse=bool(c.sparse_tables)) if c.use_vq else None
        self.rq = RQEmbedding(required_codes(tables.rq, "rq"), tables.rq_sizes, c.code_dim) if c.use_rq else None
        item_dim = c.id_dim + (c.vector_dim if self.vector is not None else 0) \
            + (c.code_dim if self.vq is not None else 0) + (c.code_dim if self.rq is not None else 0)
        # User side: the history against the target, the code-matching sequences, ID and side features.
        self.sequence_project = nn.Linear(item_dim, c.sequence_dim) if c.sequence_dim is not None else None
        self.target_project = nn.Linear(item_dim, c.target_dim) if c.target_dim is not None else None
        seq_dim = c.sequence_dim if c.sequence_dim is not None else item_dim
        self.interest = TargetAttention(seq_dim, c.attention_hidden)
        self.code_matching = None
        if c.use_code_matching:
            self.code_matching = CodeMatchingSequences(seq_dim, c.match_length, c.attention_hidden)
            self.register_buffer("rq_codes", torch.as_tensor(tables.rq, dtype=torch.int64), persistent=False)
        self.user_id = embedding_table(spec.n_users, c.id_dim, sparse=c.sparse_tables)
        self.user_side = CategoricalEmbeddings([s for _, s in spec.user_features], c.side_dim) \
            if spec.user_features else None
        self.category = embedding_table(spec.n_categories, c.side_dim) if spec.n_categories else None
        # Head.
        n_sequences = 1 + (tables.rq_levels if self.code_matching is not None else 0)  # interest, L levels
        target_width = c.target_dim if c.target_dim is not None else item_dim
        in_dim = target_width + n_sequences * seq_dim + c.id_dim \
            + (self.user_side.out_features if self.user_side is not None else 0) \
            + (c.side_dim if self.category is not None else 0)
        self.head = MMoE(in_dim, len(spec.tasks), c.head)

    def embed_items(self, items: torch.Tensor) -> torch.Tensor:
        """Item representations: int64 (N,) -> float (N, D_item)."""
        parts = [self.item_id(items)]
        for part in (self.vector, self.vq, self.rq):
            if part is not None:
                parts.append(part(items))
        return torch.cat(parts, dim=-1)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        mask = batch.history_mask  # (B, n)
        row = pack(mask)  # only filled history slots are computed: (P,) rows
        items = batch.history[mask]  # (P,) packed history items, row by row, most recent first
        # Each distinct item of the batch is embedded (and projected) once, then gathered per use.
        unique, (target_at, history_at) = distinct(batch.item, items)
        full = self.embed_items(unique)  # (U, D)
        sequence = full if self.sequence_project is None else self.sequence_project(full)  # (U, d or D)
        query, history = gather_rows(sequence, target_at), gather_rows(sequence, history_at)  # (B, .), (P, .)
        target = query if self.sequence_project is None else gather_rows(full, target_at)  # e(t): (B, D)
        if self.target_project is not None:  # the target's column in the head: (B, t) or (B, D)
            target = self.target_project(target)
        parts = [target, self.interest(query, history, row)]
        matched = None  # the code-matching sequences: the head's input columns after these parts
        if self.code_matching is not None:
            codes = self.rq_codes  # (n_items, L)
            matched = self.code_matching.pooled_blocks(query, history, row, gather_rows(codes, batch.item),
                                                       gather_rows(codes, items),
                                                       start=sum(p.shape[1] for p in parts))  # L blocks of d
        parts.append(self.user_id(batch.user))
        if self.user_side is not None:
            parts.append(self.user_side(required(batch.user_features, "user_features")))
        if self.category is not None:
            parts.append(self.category(required(batch.category, "category")))
        # Most (example, level) sequences are empty: the head multiplies the filled ones only.
        return self.head(torch.cat(parts, dim=-1), matched)


def required_codes(codes: np.ndarray | None, name: str) -> np.ndarray:
    """``codes``, checked present (``_check_tables`` has said why they must be)."""
    if codes is None:
        raise ConfigError(f"the item tables hold no {name} codes; build them with quantize_dir=...")
    return codes


def _check_tables(c: QARMConfig, tables: ItemTables) -> None:
    if c.vector != "none" and c.vector not in tables.vectors:
        raise ConfigError(f"vector={c.vector!r} but the item tables hold {sorted(tables.vectors)} "
                          "(build them with align_dir=...)")
    if c.use_vq and tables.vq is None:
        raise ConfigError("use_vq needs VQ codes; build the item tables with quantize_dir=...")
    if (c.use_rq or c.use_code_matching) and tables.rq is None:
        raise ConfigError("use_rq and use_code_matching need RQ codes; build the item tables with quantize_dir=...")
    if c.vq_k is not None and c.use_vq and c.vq_k > tables.vq_k:
        raise ConfigError(f"vq_k={c.vq_k} but the quantize folder stores K={tables.vq_k} codes per item")


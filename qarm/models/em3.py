"""EM3 (Deng et al., 2024, *End-to-end training of Multimodal Model and ranking Model*): the item's content
is encoded *inside* the ranking model and trained by the ranking loss, instead of being a frozen vector.

Three parts, each simplified to fit 2 CPU cores (docs/em3.md says what differs from the paper):

* **modality tokens**: the item text's token states from all-MiniLM-L6-v2, plus one token per modality
  vector of the dataset. Only the top ``lora_layers`` transformer layers run during training, with LoRA
  adapters on their query / value projections (base weights frozen); the embeddings and the layers below
  are frozen too, so their output is computed once per distinct text and cached
  (:func:`qarm.encode.frozen.build_text_states`, exact: the same numbers as the full forward);
* **Fusion-Q-Former**: ``n_queries`` trainable queries self-attend and cross-attend to the item's
  modality tokens (padding masked); the mean of the query outputs, projected, is the item's content
  embedding;
* **ranking**: the content embedding beside (``use_id``) or instead of the item ID embedding, DIN
  attention over the history and an MMoE head, as in the baseline; plus the Content-ID-Contrastive loss
  (in-batch symmetric InfoNCE between the content and ID embeddings of the batch's warm items), returned
  by :meth:`EM3Ranker.auxiliary_loss` and added to the BCE loss by the trainer.

Content is computed per *distinct* item of a batch (targets and the first ``content_history_length``
history slots); later history slots carry their ID embedding and a zero content part.

Shapes (B examples, n history slots, P filled slots, U distinct items with content, R distinct texts
among them, L tokens, W = 384 text width, d = qformer_dim, M modalities, D = id_dim, T tasks)::

    cached frozen states     (R, L, W)            embeddings + lower layers, once per text, not trained
    top layers + LoRA        (R, L, W)            trained through the adapters only
    modality tokens          (U, L + M, d)        text tokens projected, + one token per modality vector
    Fusion-Q-Former          (U, n_queries, d)    -> mean -> linear -> content c(i)   (U, D)
    item representation      e(i) = [id(i) | c(i)]                                   (B, 2D) / (P, 2D)
    interest                 DIN(e(target), e(history))                              (B, 2D)
    input                    [target | interest | user id | user side | category]
    logits                   MMoE(input)                                             (B, T)
    CIC                      InfoNCE(c(warm items), id(warm items)) / temperature    scalar
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qarm.encode.cache import digest_texts
from qarm.encode.frozen import FrozenTextStates, backbone_of, build_text_states, frozen_digest, transformer_layers
from qarm.encode.lora import apply_lora
from qarm.encode.text import load_text_model
from qarm.errors import ConfigError
from qarm.features.batch import RankingBatch
from qarm.features.examples import FeatureSpec
from qarm.features.tables import OOV, ItemTables
from qarm.models.layers import (
    CategoricalEmbeddings,
    IdEmbedding,
    MMoE,
    MMoEConfig,
    TargetAttention,
    embed_unique,
    embedding_table,
    pack,
    required,
)
from qarm.quantize._common import check_bool, check_float, check_int, check_option

# LoRA targets by short name -> the linear layer inside a BERT layer (MiniLM is a BERT).
LORA_TARGETS = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                "attention_output": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
STATES_DTYPES = ("float32", "float16")


@dataclass
class EM3Config:
    """EM3's ranking model. Defaults are sized for MicroLens-50k on 2 CPU cores (docs/em3.md: budget)."""

    id_dim: int = 32  # item / user ID embeddings and the content embedding: the baseline's size
    use_id: bool = True  # content beside the item ID embedding; False: content instead of it
    text_model: str | None = None  # a local sentence-transformers folder; None: the packaged all-MiniLM-L6-v2
    max_seq_length: int = 32  # tokens per title: MicroLens titles ~27 tokens; attention cost grows with length
    lora_layers: int = 1  # top text layers that run in training (with LoRA); the rest are cached once
    lora_rank: int = 8  # the usual LoRA rank; 2 x 8 x 384 parameters per adapted projection
    lora_alpha: float = 16.0  # update scale alpha / rank = 2, the common setting
    lora_dropout: float = 0.0  # dropout on the adapters' input
    text_dropout: float = 0.0  # dropout inside the adapted text layers (BERT's 0.1 costs ~15% of a CPU step)
    lora_targets: tuple[str, ...] = ("query", "value")  # LoRA paper's choice; add "ffn_in", "ffn_out" for the FFN
    states_dtype: Literal["float32", "float16"] = "float32"  # cached frozen states: exact, or half the memory
    modalities: tuple[str, ...] | None = None  # tables.modalities used as tokens; None: all of them
    qformer_dim: int = 64  # Q-Former width: the text tokens are projected from 384 to this
    qformer_layers: int = 2  # self-attention + cross-attention + FFN blocks
    qformer_heads: int = 4
    n_queries: int = 4  # learned queries: the content summary's length before the mean
    qformer_dropout: float = 0.0  # small model, many examples
    content_history_length: int = 10  # history slots with content (the latest); later slots: ID only
    cic_weight: float = 0.1  # weight of the Content-ID-Contrastive loss added to the BCE loss (0: off)
    cic_temperature: float = 0.1  # InfoNCE temperature on cosine similarities
    side_dim: int = 8  # each user side feature and the category
    attention_hidden: tuple[int, ...] = (64, 32)  # DIN's activation unit, as in the baseline
    head: MMoEConfig = field(default_factory=MMoEConfig)
    encode_batch_size: int = 512  # items per chunk when content is encoded without gradients (evaluation)

    def __post_init__(self) -> None:
        name = "EM3Config"
        for param in ("id_dim", "max_seq_length", "lora_layers", "lora_rank", "qformer_dim", "qformer_layers",
                      "qformer_heads", "n_queries", "side_dim", "encode_batch_size"):
            check_int(name, param, getattr(self, param), 1)
        check_int(name, "content_history_length", self.content_history_length, 0)
        check_bool(name, "use_id", self.use_id)
        check_float(name, "lora_alpha", self.lora_alpha, 0.0)
        check_float(name, "lora_dropout", self.lora_dropout, 0.0, 0.99)
        check_float(name, "text_dropout", self.text_dropout, 0.0, 0.99)
        check_float(name, "qformer_dropout", self.qformer_dropout, 0.0, 0.99)
        check_float(name, "cic_weight", self.cic_weight, 0.0)
        check_float(name, "cic_temperature", self.cic_temperature, 0.0)
        if not self.cic_temperature > 0:
            raise ConfigError(f"The 'cic_temperature' parameter of {name} must be > 0. Got {self.cic_temperature!r} "
                              "instead.")
        check_option(name, "states_dtype", self.states_dtype, STATES_DTYPES)
        if self.text_model is not None and not isinstance(self.text_model, str):
            raise ConfigError(f"The 'text_model' parameter of {name} must be a folder path (str) or None. "
                              f"Got {self.text_model!r} instead.")
        for target in self.lora_targets:
            check_option(name, "lora_targets", target, tuple(LORA_TARGETS))
        if not self.lora_targets:
            raise ConfigError(f"The 'lora_targets' parameter of {name} must name at least one of "
                              f"{list(LORA_TARGETS)}. Got () instead.")
        if self.qformer_dim % self.qformer_heads:
            raise ConfigError(f"The 'qformer_heads' parameter of {name} must divide qformer_dim="
                              f"{self.qformer_dim}. Got {self.qformer_heads!r} instead.")
        if self.cic_weight > 0 and not self.use_id:
            raise ConfigError(f"The 'cic_weight' parameter of {name} must be 0 when use_id=False (the "
                              f"Content-ID-Contrastive loss needs ID embeddings). Got {self.cic_weight!r} instead.")
        for size in self.attention_hidden:
            check_int(name, "attention_hidden", size, 1)


# -- modality tokens: cached frozen layers, then the top layers with LoRA ---------------------------------

_STATES_MEMO: dict[tuple[Any, ...], FrozenTextStates] = {}  # the last states built: seeds / ablations reuse them


class LoRATextTop(nn.Module):
    """The text model cut in two: everything below the top ``lora_layers`` layers is frozen and its output
    cached per distinct text (not part of the module's state); the top layers are copies of the
    pre-trained ones, frozen, with LoRA adapters on ``lora_targets``.

    ``forward(text_rows)`` -> ``(hidden (R, L, W), mask (R, L) bool)`` for distinct-text rows (numpy int).
    """

    def __init__(self, texts: list[str], c: EM3Config) -> None:
        super().__init__()
        model = load_text_model(c.text_model, max_seq_length=c.max_seq_length)
        layers = transformer_layers(model)
        if c.lora_layers > len(layers):
            raise ConfigError(f"The 'lora_layers' parameter of EM3Config must be an int in [1, {len(layers)}] "
                              f"(the text model's layers). Got {c.lora_layers!r} instead.")
        n_frozen = len(layers) - c.lora_layers
        self.states = _frozen_states(model, texts, n_frozen, c)
        self.layers = copy.deepcopy(layers[n_frozen:]).requires_grad_(False)
        for module in self.layers.modules():  # hidden and attention-probability dropout of the copies
            if isinstance(module, nn.Dropout):
                module.p = c.text_dropout
        for layer in self.layers:
            apply_lora(layer, [LORA_TARGETS[t] for t in c.lora_targets], rank=c.lora_rank, alpha=c.lora_alpha,
                       dropout=c.lora_dropout)
        text_config: Any = backbone_of(model).config  # a transformers config
        self.text_config = text_config  # how the layers expect their attention mask
        self.width = int(text_config.hidden_size)

    def forward(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = self.states.padded(rows)
        extended = _attention_mask(self.text_config, hidden, mask)
        for layer in self.layers:
            out = layer(hidden, extended)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden, mask.bool()


def _frozen_states(model: Any, texts: list[str], n_frozen: int, c: EM3Config) -> FrozenTextStates:
    key = (n_frozen, c.max_seq_length, c.states_dtype, frozen_digest(model, n_frozen), digest_texts(texts))
    if key not in _STATES_MEMO:
        _STATES_MEMO.clear()  # one entry: the states are large (MicroLens: ~0.7 GB in float32)
        _STATES_MEMO[key] = build_text_states(model, texts, n_frozen, dtype=c.states_dtype, pooled=False,
                                              progress=False)
    return _STATES_MEMO[key]


def _attention_mask(config: Any, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    """The attention mask a transformers layer expects, made as the backbone's own forward makes it."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers < 4.56: additive (B, 1, 1, L) float masks
        return (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)


# -- Fusion-Q-Former ---------------------------------------------------------------------------------------


class QFormerBlock(nn.Module):
    """Pre-norm block: queries self-attend, cross-attend to the modality tokens, then an FFN.

    ``forward(queries (U, Q, d), tokens (U, S, d), padding (U, S) bool, True = padding) -> (U, Q, d)``.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_tokens, self.norm_ffn = (nn.LayerNorm(dim) for _ in range(4))
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.norm_self(queries)
        queries = queries + self.self_attention(x, x, x, need_weights=False)[0]
        kv = self.norm_tokens(tokens)
        queries = queries + self.cross_attention(self.norm_cross(queries), kv, kv, key_padding_mask=padding,
                                                 need_weights=False)[0]
        return queries + self.ffn(self.norm_ffn(queries))


class FusionQFormer(nn.Module):
    """``n_queries`` learned queries attend to an item's modality tokens; their mean, projected, is the
    item's content embedding. ``forward(tokens (U, S, d), padding (U, S) bool) -> (U, out_dim)``."""

    def __init__(self, dim: int, out_dim: int, n_queries: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, tokens, padding)
        return self.out(self.norm(queries).mean(dim=1))


class ItemContent(nn.Module):
    """Item ids -> content embeddings: text tokens (:class:`LoRATextTop`) and modality vectors, projected
    to ``qformer_dim`` and tagged with a per-modality type embedding, through the :class:`FusionQFormer`.

    ``forward(items int64 (U,)) -> (U, id_dim)``; computes each distinct text of ``items`` once.
    """

    text_rows: torch.Tensor  # buffer (n_items,) int64, registered in __init__

    def __init__(self, tables: ItemTables, c: EM3Config) -> None:
        super().__init__()
        if tables.texts is None:
            raise ConfigError("EM3 encodes item text: build the item tables with texts=..., e.g. "
                              "ItemTables.build(source, texts=qarm.encode.item_texts(dataset))")
        names = sorted(tables.modalities) if c.modalities is None else list(c.modalities)
        missing = [m for m in names if m not in tables.modalities]
        if missing:
            raise ConfigError(f"EM3 modalities {missing} are not in the item tables (they hold "
                              f"{sorted(tables.modalities)}; build them with modalities=dataset.item_vectors)")
        self.text = LoRATextTop(tables.texts, c)
        self.register_buffer("text_rows", torch.from_numpy(self.text.states.text_rows), persistent=False)
        self.text_project = nn.Linear(self.text.width, c.qformer_dim)
        self.modality_names = names
        self.modality_project = nn.ModuleList()
        for i, name in enumerate(names):
            # Standardised per dimension (VGGish-like vectors sit far from 0), then a learned projection.
            values = torch.from_numpy(tables.modalities[name])
            standard = (values - values.mean(dim=0)) / values.std(dim=0).clamp(min=1e-6)
            self.register_buffer(f"modality_{i}", standard.contiguous(), persistent=False)
            self.modality_project.append(nn.Linear(values.shape[1], c.qformer_dim))
        self.type_embedding = nn.Parameter(torch.randn(1 + len(names), c.qformer_dim) * 0.02)
        self.qformer = FusionQFormer(c.qformer_dim, c.id_dim, c.n_queries, c.qformer_layers, c.qformer_heads,
                                     c.qformer_dropout)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        rows, inverse = torch.unique(self.text_rows[items], return_inverse=True)
        hidden, mask = self.text(rows.numpy())  # (R, L, W), (R, L)
        tokens = [self.text_project(hidden)[inverse] + self.type_embedding[0]]  # (U, L, d)
        padding = [~mask[inverse]]
        for i, project in enumerate(self.modality_project):
            vectors = getattr(self, f"modality_{i}")[items]
            tokens.append((project(vectors) + self.type_embedding[1 + i]).unsqueeze(1))  # (U, 1, d)
            padding.append(torch.zeros_like(padding[0][:, :1]))
        return self.qformer(torch.cat(tokens, dim=1), torch.cat(padding, dim=1))


def cic_loss(content: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Content-ID-Contrastive loss: symmetric in-batch InfoNCE between the rows of ``content`` and of
    ``ids`` (``(N, D)`` each, row i of both is item i), on cosine similarities divided by ``temperature``."""
    logits = F.normalize(content, dim=-1) @ F.normalize(ids, dim=-1).t() / temperature  # (N, N)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


# -- the ranking model --------------------------------------------------------------------------------------


class EM3Ranker(nn.Module):
    """EM3's ranking model. ``forward(batch) -> logits (B, T)``; :meth:`auxiliary_loss` after a training
    forward is ``cic_weight`` times the CIC loss of that batch.

    Parameters
    ----------
    spec : FeatureSpec
    tables : ItemTables with ``texts`` (and ``modalities`` when used)
    config : EM3Config
    """

    def __init__(self, spec: FeatureSpec, tables: ItemTables, config: EM3Config | None = None) -> None:
        super().__init__()
        self.config = c = config or EM3Config()
        self.tasks = spec.tasks
        self.content = ItemContent(tables, c)
        self.item_id = IdEmbedding(tables.id_index, c.id_dim) if c.use_id else None
        item_dim = c.id_dim * (2 if c.use_id else 1)
        self.interest = TargetAttention(item_dim, c.attention_hidden)
        self.user_id = embedding_table(spec.n_users, c.id_dim)
        self.user_side = CategoricalEmbeddings([s for _, s in spec.user_features], c.side_dim) \
            if spec.user_features else None
        self.category = embedding_table(spec.n_categories, c.side_dim) if spec.n_categories else None
        in_dim = 2 * item_dim + c.id_dim + (self.user_side.out_features if self.user_side is not None else 0) \
            + (c.side_dim if self.category is not None else 0)
        self.head = MMoE(in_dim, len(spec.tasks), c.head)
        self.n_items = tables.n_items
        self._cic: torch.Tensor | None = None
        self._table: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None  # evaluation cache

    def auxiliary_loss(self) -> torch.Tensor | None:
        """``cic_weight * CIC`` of the last training forward; None in evaluation, or with < 2 warm items."""
        return None if self._cic is None else self.config.cic_weight * self._cic

    def content_of(self, items: torch.Tensor) -> torch.Tensor:
        """Content embeddings of distinct items ``(U,) -> (U, D)``. Without gradients in eval mode, each
        item is encoded once per version of the weights and kept (evaluation visits items many times)."""
        if self.training or torch.is_grad_enabled():
            return self.content(items)
        version = tuple(p._version for p in self.content.parameters())  # any in-place update changes it
        if self._table is None or self._table[0] != version:
            self._table = (version, torch.zeros(self.n_items, self.config.id_dim),
                           torch.zeros(self.n_items, dtype=torch.bool))
        _, table, filled = self._table
        missing = items[~filled[items]]
        for chunk in missing.split(self.config.encode_batch_size) if len(missing) else ():
            table[chunk] = self.content(chunk)
            filled[chunk] = True
        return table[items]

    def train(self, mode: bool = True) -> EM3Ranker:
        if mode:
            self._table = None  # weights are about to change: free the evaluation cache
        self._cic = None
        return super().train(mode)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        c = self.config
        mask = batch.history_mask  # (B, n)
        row = pack(mask)  # (P,) the row of each filled slot
        items = batch.history[mask]  # (P,) packed history, most recent first within a row
        live = mask.nonzero()[:, 1] < c.content_history_length  # (P,) slots that get content
        needed = torch.cat([batch.item, items[live]])
        unique, inverse = torch.unique(needed, return_inverse=True)
        content = self.content_of(unique)  # (U, D)
        b = len(batch)
        target = content[inverse[:b]]  # (B, D)
        history = content.new_zeros(len(items), c.id_dim).index_copy(0, live.nonzero()[:, 0], content[inverse[b:]])
        self._cic = None
        if self.item_id is not None:
            id_target, id_history = embed_unique(self.item_id, batch.item, items)
            target, history = torch.cat([id_target, target], dim=-1), torch.cat([id_history, history], dim=-1)
            if self.training and c.cic_weight > 0 and torch.is_grad_enabled():
                warm = self.item_id.index[unique] != OOV
                if int(warm.sum()) >= 2:
                    self._cic = cic_loss(content[warm], self.item_id(unique[warm]), c.cic_temperature)
        parts = [target, self.interest(target, history, row), self.user_id(batch.user)]
        if self.user_side is not None:
            parts.append(self.user_side(required(batch.user_features, "user_features")))
        if self.category is not None:
            parts.append(self.category(required(batch.category, "category")))
        return self.head(torch.cat(parts, dim=-1))


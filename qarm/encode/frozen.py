"""Exact caching of the frozen part of the text model.

Alignment trains only the top ``trainable_layers`` transformer layers of the text model (plus the
head); the embeddings and the layers below stay frozen and run in eval mode (no dropout). What they
output for an item is therefore a fixed function of its text: :func:`build_text_states` computes it
once per distinct text, during the pass that embeds every item anyway, and training steps and the
final encoding then only run the trainable top layers, pooling and the head
(:meth:`qarm.encode.content.ContentEncoder.encode_states`).

What is stored (:class:`FrozenTextStates`)
-----------------------------------------
* ``trainable_layers >= 1``: the hidden states after the last frozen layer, **ragged**: only each
  text's real tokens (``[CLS] ... [SEP]``, at most ``max_seq_length``), concatenated into one
  ``(total_tokens, hidden)`` tensor with row ``offsets``; a batch is re-padded to its own longest text
  and gets its attention mask back from the lengths. MicroLens-50k: 19,133 distinct titles, 529,658
  tokens at ``max_seq_length = 64`` (28 a title on average, against 64 if padded), 814 MB in float32 (the
  default: exact), 407 MB in float16.
* ``trainable_layers = 0``: only the sentence embeddings (``(n_texts, hidden)``, 29 MB for MicroLens);
  training then runs nothing of the text model, only the head.

Exactness: the split forward (embeddings -> frozen layers | cached | top layers -> pooling ->
normalisation) computes what the sentence-transformers forward computes; in float32 the two agree to
float rounding (~1e-6, tested); float16 storage rounds every hidden state to ~3 significant digits.

The cache is kept in memory for one alignment run; it is never written to disk. It records the digest
of the frozen weights, the texts and ``max_seq_length``; :meth:`FrozenTextStates.check` refuses it
for another model, other texts or another split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import nn

from qarm.encode.cache import digest_module, digest_texts
from qarm.encode.text import max_seq_length, text_dimension, tokenize
from qarm.errors import ConfigError, QarmError
from qarm.progress import progress_bar

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

StatesDtype = Literal["float32", "float16"]
STATES_DTYPES = ("float32", "float16")
_LAYER_PATHS = ("encoder.layer", "layers", "transformer.layer", "encoder.layers")


def backbone_of(model: SentenceTransformer) -> nn.Module:
    """The transformers model inside a sentence-transformers model's first module."""
    backbone = getattr(model[0], "auto_model", None) or getattr(model[0], "model", None)
    if backbone is None:
        raise ConfigError(f"{type(model[0]).__name__} holds no transformers model (auto_model)")
    return backbone


def transformer_layers(model: SentenceTransformer) -> nn.ModuleList:
    """The stacked transformer layers of a sentence-transformers text model (BERT-style and relatives)."""
    backbone = backbone_of(model)
    for path in _LAYER_PATHS:
        obj: Any = backbone
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigError(f"cannot find the transformer layers of {type(backbone).__name__}; use "
                      "trainable_layers='all' or 0")


def _check_splittable(model: SentenceTransformer) -> None:
    backbone = backbone_of(model)
    if getattr(backbone, "embeddings", None) is None or getattr(backbone.config, "is_decoder", False):
        raise ConfigError(f"the frozen-state cache needs a BERT-like encoder (embeddings + layers); "
                          f"{type(backbone).__name__} is not one: use frozen_cache='off'")


def frozen_digest(model: SentenceTransformer, n_frozen: int) -> str:
    """Digest of what the cached states depend on: the embeddings and the lowest ``n_frozen`` layers
    (every transformer weight when ``n_frozen`` is the number of layers: the states are then the output)."""
    layers = transformer_layers(model)
    if n_frozen >= len(layers):
        return digest_module(model)
    holder = nn.ModuleList([cast(nn.Module, backbone_of(model).embeddings), *layers[:n_frozen]])
    return digest_module(holder)


def _attention_mask(backbone: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    """The mask the layers expect, made the way the backbone's own forward makes it."""
    model: Any = backbone  # a transformers model; its attributes are typed as plain Module ones here
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers < 4.56: additive (B, 1, 1, L) float masks
        return model.get_extended_attention_mask(mask, mask.shape, dtype=hidden.dtype)
    return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)


def run_layers(model: SentenceTransformer, hidden: torch.Tensor, mask: torch.Tensor, start: int,
               stop: int | None = None) -> torch.Tensor:
    """Hidden states after transformer layers ``[start, stop)`` applied to ``hidden`` ``(B, L, d)``."""
    backbone = backbone_of(model)
    layers = transformer_layers(model)
    stop = len(layers) if stop is None else stop
    if start >= stop:
        return hidden
    extended = _attention_mask(backbone, hidden, mask)
    for layer in layers[start:stop]:
        out = layer(hidden, extended)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def run_prefix(model: SentenceTransformer, features: dict[str, Any], n_frozen: int) -> torch.Tensor:
    """Hidden states ``(B, L, d)`` after the embeddings and the lowest ``n_frozen`` layers."""
    backbone = backbone_of(model)
    device = next(model.parameters()).device
    inputs = {k: features[k].to(device) for k in ("input_ids", "token_type_ids") if k in features}
    embeddings = cast(nn.Module, backbone.embeddings)
    hidden = embeddings(**inputs)
    return run_layers(model, hidden, features["attention_mask"].to(device), 0, n_frozen)


def pool(model: SentenceTransformer, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's modules after the transformer (pooling, normalisation) on last hidden states."""
    features: dict[str, Any] = {"token_embeddings": hidden, "attention_mask": mask}
    for module in list(model)[1:]:
        features = module(features)
    return features["sentence_embedding"]


@dataclass
class FrozenTextStates:
    """What the frozen part of the text model outputs for a set of texts (module docstring).

    Attributes
    ----------
    n_frozen : transformer layers applied (the embeddings always are); equal to ``n_layers`` when the
        whole text model is frozen, and then ``tokens`` is empty and ``pooled`` is what the head gets.
    n_layers : layers of the text model.
    text_rows : ``(n_items,)`` int64, the row of each item's text among the distinct texts.
    lengths : ``(n_texts,)`` int64 tokens per distinct text (after truncation).
    offsets : ``(n_texts + 1,)`` int64, text ``r`` is ``tokens[offsets[r]:offsets[r + 1]]``.
    tokens : ``(total_tokens, hidden)`` float32 / float16, the hidden states after ``n_frozen`` layers.
    pooled : ``(n_texts, dim)`` float32 sentence embeddings of the whole model as it was when the states
        were built (the pre-trained text embeddings), or None.
    model_digest : digest of the whole text model when ``pooled`` was computed.
    frozen_digest, texts_digest, max_seq_length : what the states depend on (:meth:`check`).
    """

    n_frozen: int
    n_layers: int
    text_rows: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    tokens: torch.Tensor
    pooled: torch.Tensor | None
    model_digest: str | None
    frozen_digest: str
    texts_digest: str
    max_seq_length: int

    @property
    def whole_model_frozen(self) -> bool:
        return self.n_frozen >= self.n_layers

    @property
    def n_items(self) -> int:
        return len(self.text_rows)

    @property
    def nbytes(self) -> int:
        pooled = 0 if self.pooled is None else self.pooled.numel() * self.pooled.element_size()
        return int(self.tokens.numel() * self.tokens.element_size() + pooled + self.offsets.nbytes
                   + self.lengths.nbytes + self.text_rows.nbytes)

    def describe(self) -> dict[str, Any]:
        return {"n_frozen": self.n_frozen, "n_layers": self.n_layers, "items": self.n_items,
                "texts": len(self.lengths), "tokens": int(self.offsets[-1]), "dtype": str(self.tokens.dtype),
                "megabytes": round(self.nbytes / 2**20, 1)}

    def check(self, model: SentenceTransformer, n_frozen: int, texts: Sequence[str] | None = None) -> None:
        """Raise unless these states are what ``model`` computes for ``texts`` below layer ``n_frozen``."""
        problems = []
        if n_frozen != self.n_frozen:
            problems.append(f"they stop after layer {self.n_frozen}, this run freezes {n_frozen}")
        elif max_seq_length(model) != self.max_seq_length:
            problems.append(f"max_seq_length {self.max_seq_length} != {model.max_seq_length}")
        elif texts is not None and digest_texts(texts) != self.texts_digest:
            problems.append("the item texts differ")
        elif frozen_digest(model, n_frozen) != self.frozen_digest:
            problems.append("the frozen weights differ")
        if problems:
            raise QarmError(f"the cached frozen text states do not fit this run: {problems[0]}")

    def padded(self, rows: np.ndarray, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden (B, L, d) float32, attention_mask (B, L) int64)`` of distinct-text ``rows``, padded to
        their longest text (pad positions are zero and masked)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
        index = torch.from_numpy((self.offsets[rows][:, None] + np.arange(width)[None, :])[mask.numpy()])
        hidden = torch.zeros((len(rows), width, self.tokens.shape[1]), dtype=torch.float32)
        hidden[mask] = self.tokens[index].float()
        return hidden.to(device), mask.long().to(device)


def build_text_states(
    model: SentenceTransformer,
    texts: Sequence[str],
    n_frozen: int,
    *,
    dtype: StatesDtype = "float32",
    pooled: bool | np.ndarray = True,
    batch_size: int = 128,
    progress: bool = True,
) -> FrozenTextStates:
    """Run the frozen part of ``model`` once over every distinct text of ``texts`` and keep its output.

    Parameters
    ----------
    model : the sentence-transformers text model (BERT-like: embeddings + layers).
    texts : one text per item.
    n_frozen : layers that stay frozen (``n_layers - trainable_layers``); ``n_layers``: all of them.
    dtype : storage of the token states ("float32": exact; "float16": half the memory).
    pooled : True also runs the top layers in the same pass and keeps the sentence embeddings
        (``FrozenTextStates.pooled``: the pre-trained text embeddings, one full pass for both); an
        ``(n_items, dim)`` array provides them instead (e.g. from the vector cache), so only the frozen
        layers run; False keeps none (nothing beyond the frozen layers runs).
    batch_size, progress : texts per forward (longest first: little padding) and a progress bar.
    """
    if dtype not in STATES_DTYPES:
        raise ConfigError(f"The 'dtype' parameter of build_text_states must be one of {list(STATES_DTYPES)}. "
                          f"Got {dtype!r} instead.")
    _check_splittable(model)
    n_layers = len(transformer_layers(model))
    if isinstance(n_frozen, bool) or not isinstance(n_frozen, int) or not 0 <= n_frozen <= n_layers:
        raise ConfigError(f"n_frozen must be an int in [0, {n_layers}], got {n_frozen!r}")
    whole = n_frozen == n_layers
    storage = torch.float32 if dtype == "float32" else torch.float16
    distinct, inverse = np.unique(np.asarray(list(texts), dtype=object).astype(str), return_inverse=True)
    n_texts = len(distinct)
    order = np.argsort([-len(t) for t in distinct], kind="stable")
    given = None if isinstance(pooled, bool) else np.asarray(pooled, dtype=np.float32)
    need_pooled = given is None and (pooled is True or whole)
    if given is not None:  # the item-ordered embeddings, back to distinct-text rows
        first = np.zeros(n_texts, dtype=np.int64)
        first[inverse.reshape(-1)[::-1]] = np.arange(len(inverse))[::-1]
        given = given[first]
    config: Any = backbone_of(model).config  # a transformers config
    hidden_size = int(config.hidden_size)
    run = not whole or need_pooled
    # Tokenise first (cheap): the lengths size the ragged tensor, which is then filled in place.
    batches = [order[s:s + batch_size] for s in range(0, n_texts, batch_size)] if run else []
    features = [tokenize(model, [str(distinct[r]) for r in rows]) for rows in batches]
    lengths = np.zeros(n_texts, dtype=np.int64)
    for rows, f in zip(batches, features):
        lengths[rows] = f["attention_mask"].sum(dim=1).numpy()
    offsets = np.zeros(n_texts + 1, dtype=np.int64)
    if not whole:
        np.cumsum(lengths, out=offsets[1:])
    tokens = torch.empty((int(offsets[-1]), hidden_size), dtype=storage)
    pooled_t: torch.Tensor | None = None
    if need_pooled:
        pooled_t = torch.empty((n_texts, text_dimension(model)), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), progress_bar(n_texts if run else 0, "encoding texts (frozen states)",
                                           progress and run) as advance:
            for rows, f in zip(batches, features):
                mask = f["attention_mask"].to(next(model.parameters()).device)
                hidden = run_prefix(model, f, n_frozen)
                if need_pooled:
                    assert pooled_t is not None  # made above when need_pooled
                    top = run_layers(model, hidden, mask, n_frozen)
                    pooled_t[torch.from_numpy(rows)] = pool(model, top, mask).float().cpu()
                if not whole:
                    flat = hidden.cpu()[mask.bool().cpu()]  # real tokens, row after row
                    index = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
                    tokens[torch.from_numpy(index)] = flat.to(storage)
                advance(len(rows))
    finally:
        model.train(was_training)
    if given is not None:
        pooled_t = torch.from_numpy(np.ascontiguousarray(given))
    return FrozenTextStates(
        n_frozen=n_frozen, n_layers=n_layers, text_rows=inverse.reshape(-1).astype(np.int64), lengths=lengths,
        offsets=offsets, tokens=tokens, pooled=pooled_t,
        model_digest=digest_module(model) if pooled_t is not None else None,
        frozen_digest=frozen_digest(model, n_frozen), texts_digest=digest_texts(texts),
        max_seq_length=max_seq_length(model),
    )


def embed_from_states(model: SentenceTransformer, states: FrozenTextStates, rows: np.ndarray) -> torch.Tensor:
    """Sentence embeddings ``(len(rows), dim)`` of distinct-text ``rows``: the top layers (in the model's
    current mode, with gradients where parameters train), pooling and normalisation on the cached states.
    With the whole text model frozen, the cached sentence embeddings themselves."""
    rows = np.asarray(rows, dtype=np.int64)
    if states.whole_model_frozen:
        if states.pooled is None:
            raise QarmError("these frozen states keep no sentence embeddings")
        return states.pooled[torch.from_numpy(rows)]
    device = next(model.parameters()).device
    hidden, mask = states.padded(rows, device)
    top = run_layers(model, hidden, mask, states.n_frozen)
    return pool(model, top, mask)

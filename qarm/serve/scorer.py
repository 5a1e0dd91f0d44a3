"""A loaded bundle, ready to score requests and to take new items: the library behind ``qarm serve``.

:class:`Scorer` turns ``(user, candidates)`` into the same :class:`~qarm.features.RankingBatch` that
training and evaluation build (:func:`~qarm.features.batch.assemble_batch`) and runs the bundle's model
on it. What a request needs that a batch does not hold comes from the bundle's tables:

* a user's **history** is the latest ``n`` positives of the bundle's log (every split) followed by the
  live positives the store returns for that user, most recent first; with ``as_of`` (a request's
  ``context.time``) only events strictly before it count, which is exactly the offline history of an
  example at that time (histories take events with smaller time *and* seq, and seq is chronological);
* an **unknown user** is an empty history, the missing code of every side feature, and a zero user
  embedding (a row appended to the trained table; untrained users' rows start near zero too);
* a **new item** (:meth:`Scorer.encode_items` then :meth:`Scorer.with_items`) gets its aligned vector
  from the bundle's encoder, RQ codes from the frozen codebooks and VQ codes from the catalogue index;
  it has no ID embedding of its own (out of vocabulary, like a cold-start item) and the missing
  category code unless its category is one the bundle knows.

A Scorer is immutable once built: adding items returns a new one (the model rebuilt on the grown
tables, the same weights), so a request that started on the old one finishes on it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qarm.errors import DataError, QarmError
from qarm.features.batch import assemble_batch
from qarm.features.history import PAD
from qarm.features.tables import OOV, ItemTables
from qarm.models import build_model
from qarm.serve.bundle import ENCODER_DIR, RQ_FILE, VQ_FILE, Bundle


class UnknownItems(QarmError, KeyError):
    """Candidate or event ids that are neither catalogue items nor added items."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:20]) + (" ..." if len(self.ids) > 20 else "")
        super().__init__(f"unknown item ids ({len(self.ids)}): {shown}")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class NewItem:
    """An item added after the bundle was made: its aligned vector and codes (what the store keeps).

    ``ordinal`` is its position in the store's list of added items; its dense id in a scorer is
    ``n_catalogue + ordinal``, the same in every process that reads the same store.
    """

    ordinal: int
    source_id: str
    vector: np.ndarray  # float32 (d,), the aligned vector
    vq: np.ndarray  # int64 (K,)
    rq: np.ndarray  # int64 (L,)
    category: str | None = None


class Codebooks:
    """The bundle's content encoder and frozen codebooks, shared by every Scorer of one bundle (the VQ
    catalogue grows as items are added; a lock keeps faiss's search and add apart)."""

    def __init__(self, bundle: Bundle, text_model: Any = None) -> None:
        from qarm.quantize.rq import ResidualKMeans
        from qarm.quantize.vq import TopKCodes

        self.bundle_path = bundle.path
        self.rq = ResidualKMeans.load(bundle.path / RQ_FILE)
        self.vq = TopKCodes.load(bundle.path / VQ_FILE)
        self._text_model = text_model
        self._encoder: Any = None
        self._lock = threading.Lock()
        self.n_added = 0

    def encoder(self) -> Any:
        with self._lock:
            if self._encoder is None:
                from qarm.encode.content import load_encoder

                self._encoder = load_encoder(self.bundle_path / ENCODER_DIR, text_model=shared_text_model(
                    self._text_model))
            return self._encoder

    def encode(self, texts: list[str], vectors: dict[str, np.ndarray]) -> np.ndarray:
        """Aligned vectors ``(n, d)`` float32 of raw content (the encoder's parts: text and modalities)."""
        from qarm.encode.content import ItemInputs

        encoder = self.encoder()
        needed = [p for p in encoder.parts_ if p != "text"]
        missing = [p for p in needed if p not in vectors]
        if missing:
            raise DataError(f"this bundle's encoder reads the modalities {needed}; the request lacks {missing}",
                            column="vectors")
        for name in needed:
            dim = encoder.input_dims_[name]
            if vectors[name].ndim != 2 or vectors[name].shape[1] != dim:
                raise DataError(f"vectors.{name} must have {dim} values per item, got shape {vectors[name].shape}",
                                column=f"vectors.{name}")
        with torch.no_grad():
            out = encoder.encode(ItemInputs(list(texts), {m: vectors[m] for m in needed}))
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def codes(self, aligned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """VQ ``(n, K)`` and RQ ``(n, L)`` codes of new items' aligned vectors."""
        with self._lock:
            vq = self.vq.transform(aligned)
        return vq, self.rq.transform(aligned)

    def join_catalogue(self, items: Sequence[NewItem], n_catalogue: int) -> None:
        """Add new items to the VQ catalogue (idempotent: items already joined are skipped)."""
        with self._lock:
            fresh = [it for it in items if it.ordinal >= self.n_added]
            if not fresh:
                return
            fresh.sort(key=lambda it: it.ordinal)
            expected = list(range(self.n_added, self.n_added + len(fresh)))
            if [it.ordinal for it in fresh] != expected:
                raise DataError(f"new items must join the catalogue in order: expected ordinals {expected[:5]}..., got "
                                f"{[it.ordinal for it in fresh][:5]}...")
            self.vq.add_items(np.stack([it.vector for it in fresh]),
                              np.asarray([n_catalogue + it.ordinal for it in fresh], dtype=np.int64))
            self.n_added += len(fresh)


_TEXT_MODEL: dict[str, Any] = {}


def shared_text_model(model: Any = None) -> Any:
    """One SentenceTransformer per process, reused by every bundle's encoder (None: loaded on first use)."""
    if model is not None:
        return model
    if "default" not in _TEXT_MODEL:
        from qarm.encode.text import load_text_model

        _TEXT_MODEL["default"] = load_text_model()
    return _TEXT_MODEL["default"]


class Scorer:
    """Scores candidates for a user with a bundle's model; see the module docstring.

    Parameters
    ----------
    bundle : Bundle
    added : sequence of NewItem, items added after the bundle (ordinals 0..len-1)
    codebooks : Codebooks or None (built from the bundle)
    device : where the ranking model runs (the CPU by default; new items' content encoder stays on the CPU)
    """

    def __init__(self, bundle: Bundle, added: Sequence[NewItem] = (), *, codebooks: Codebooks | None = None,
                 text_model: Any = None, device: torch.device | str = "cpu") -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        self.tasks = bundle.tasks
        self.version = bundle.version
        self.codes_version = bundle.codes_version
        self.spec = bundle.spec()
        self.history_length = self.spec.history_length
        self.n_catalogue = self.spec.n_items
        self.unknown_user = self.spec.n_users  # the appended zero row
        a = bundle.arrays
        self._history_items, self._history_time = a["history_items"], a["history_time"]
        self._history_offsets = a["history_offsets"]
        sizes = [size for _, size in self.spec.user_features]
        codes = a.get("user_feature_codes")
        self.user_feature_codes = None if codes is None else np.vstack(
            [codes, np.asarray([[s - 1 for s in sizes]], dtype=np.int64)])  # unknown user: missing codes
        self.category_values: list[str] = list(bundle.manifest.get("category_values") or [])
        self._category_code = {v: i for i, v in enumerate(self.category_values)}
        self.user_index = {str(s): i for i, s in enumerate(bundle.user_source_ids)}
        self.item_index = {str(s): i for i, s in enumerate(bundle.item_source_ids)}
        self.added = sorted(added, key=lambda it: it.ordinal)
        if [it.ordinal for it in self.added] != list(range(len(self.added))):
            raise DataError("added items must have ordinals 0..n-1")
        for it in self.added:
            if it.source_id in self.item_index:
                raise DataError(f"added item {it.source_id!r} is a catalogue item of bundle {self.version}")
            self.item_index[it.source_id] = self.n_catalogue + it.ordinal
        self.codebooks = codebooks or Codebooks(bundle, text_model)
        self.codebooks.join_catalogue(self.added, self.n_catalogue)
        learned = list(bundle.added_source_ids)
        stored = [it.source_id for it in self.added[:len(learned)]]
        if stored != learned:
            raise DataError(f"bundle {self.version} learned ID rows for the live store's first {len(learned)} added "
                            f"items, but the store's items differ ({len(stored)} there, first difference at ordinal "
                            f"{next((i for i, (a, b) in enumerate(zip(stored, learned)) if a != b), len(stored))}): "
                            "serve it with the store it learned from")
        self.tables, self.item_category = self._tables()
        self.model = self._build(self.tables)
        self.vector_name = _vector_name(self.model)
        calibration = bundle.manifest.get("calibration")  # a calibrated run: scale * logit + bias per task
        self.logit_scale = torch.tensor(calibration["scale"] if calibration else [1.0] * len(bundle.tasks),
                                        dtype=torch.float32, device=self.device)
        self.logit_bias = torch.tensor(calibration["bias"] if calibration else [0.0] * len(bundle.tasks),
                                       dtype=torch.float32, device=self.device)

    # -- building ---------------------------------------------------------------------------------

    def _tables(self) -> tuple[ItemTables, np.ndarray | None]:
        base = self.bundle.item_tables()
        category = self.bundle.arrays.get("item_category")
        if not self.added:
            return replace(base, catalogue_size=self.n_catalogue), category
        n = len(self.added)
        vectors = dict(base.vectors)
        for name, value in base.vectors.items():
            extra = np.stack([it.vector for it in self.added]) if name == "aligned" else np.zeros(
                (n, value.shape[1]), np.float32)
            vectors[name] = np.vstack([value, extra.astype(np.float32)])
        # Added items get OOV, unless the bundle learned ID rows for them (a `qarm learn` version).
        added_rows = np.full(n, OOV, dtype=np.int64)
        learned = self.bundle.arrays.get("added_id_index", np.zeros(0, dtype=np.int64))[:n]
        added_rows[:len(learned)] = learned
        tables = replace(
            base,
            id_index=np.concatenate([base.id_index, added_rows]),
            vq=None if base.vq is None else np.vstack([base.vq, np.stack([it.vq for it in self.added])]),
            rq=None if base.rq is None else np.vstack([base.rq, np.stack([it.rq for it in self.added])]),
            vectors=vectors, catalogue_size=self.n_catalogue)
        if category is not None:
            missing = self.spec.n_categories - 1
            extra_codes = np.asarray([self._category_code.get(it.category, missing) if it.category is not None
                                      else missing for it in self.added], dtype=np.int64)
            category = np.concatenate([category, extra_codes])
        return tables, category

    def _build(self, tables: ItemTables) -> nn.Module:
        spec = replace(self.spec, n_users=self.spec.n_users + 1, n_items=tables.n_items)
        model = build_model(str(self.bundle.manifest["model"]), spec, tables, self.bundle.manifest["model_config"])
        state = dict(self.bundle.weights)
        user = state["user_id.weight"]
        state["user_id.weight"] = torch.cat([user, torch.zeros(1, user.shape[1], dtype=user.dtype)])
        model.load_state_dict(state)
        return model.to(self.device).eval()

    def with_items(self, items: Sequence[NewItem]) -> Scorer:
        """A new Scorer that also knows ``items`` (ordinals continuing this one's); this one is unchanged."""
        known = {it.ordinal for it in self.added}
        merged = self.added + [it for it in items if it.ordinal not in known]
        if len(merged) == len(self.added):
            return self
        scorer = Scorer.__new__(Scorer)
        scorer.__dict__.update(self.__dict__)
        scorer.item_index = dict(self.item_index)
        scorer.added = sorted(merged, key=lambda it: it.ordinal)
        if [it.ordinal for it in scorer.added] != list(range(len(scorer.added))):
            raise DataError(f"added items must continue the ordinals 0..{len(self.added) - 1}")
        for it in scorer.added[len(self.added):]:
            if it.source_id in self.item_index:
                raise DataError(f"added item {it.source_id!r} is already known to bundle {self.version}")
            scorer.item_index[it.source_id] = self.n_catalogue + it.ordinal
        self.codebooks.join_catalogue(scorer.added, self.n_catalogue)
        scorer.tables, scorer.item_category = scorer._tables()
        scorer.model = scorer._build(scorer.tables)
        return scorer

    # -- requests ---------------------------------------------------------------------------------

    @property
    def n_added(self) -> int:
        return len(self.added)

    def dense_items(self, source_ids: Sequence[str]) -> np.ndarray:
        """Dense ids of item source ids; :class:`UnknownItems` names those it does not know."""
        index = self.item_index
        unknown = [s for s in source_ids if s not in index]
        if unknown:
            raise UnknownItems(list(dict.fromkeys(unknown)))
        return np.fromiter((index[s] for s in source_ids), dtype=np.int64, count=len(source_ids))

    def history(self, user_id: str, live: Sequence[tuple[str, int]] = (), as_of: int | None = None) -> np.ndarray:
        """The user's latest ``n`` positives, most recent first, ``(n,)`` int64 with -1 in empty slots.

        ``live``: the store's positives of this user after the bundle's log, chronological, as
        ``(item source_id, time)``; items this scorer does not know are skipped. ``as_of``: only events
        with ``time < as_of``."""
        n = self.history_length
        user = self.user_index.get(user_id)
        if user is None:
            base = np.zeros(0, dtype=np.int64)
        else:
            lo, hi = int(self._history_offsets[user]), int(self._history_offsets[user + 1])
            base = self._history_items[lo:hi]
            if as_of is not None:
                base = base[self._history_time[lo:hi] < as_of]
        index = self.item_index
        recent = [index[item] for item, t in live if item in index and (as_of is None or t < as_of)]
        items = np.concatenate([base[-n:], np.asarray(recent[-n:], dtype=np.int64)])[-n:][::-1]
        out = np.full(n, PAD, dtype=np.int64)
        out[:len(items)] = items
        return out

    def score(self, user_id: str, candidates: Sequence[str], *, live: Sequence[tuple[str, int]] = (),
              as_of: int | None = None) -> np.ndarray:
        """Probabilities ``(len(candidates), T)`` float64, one column per task, in candidate order."""
        items = self.dense_items(candidates)
        user = self.user_index.get(user_id, self.unknown_user)
        history = self.history(user_id, live, as_of)
        c = len(items)
        batch = assemble_batch(np.full(c, user, dtype=np.int64), items, np.repeat(history[None, :], c, axis=0),
                               user_feature_codes=self.user_feature_codes, item_category=self.item_category)
        with torch.no_grad():
            logits = self.model(batch.to(self.device)) * self.logit_scale + self.logit_bias
            return torch.sigmoid(logits).double().cpu().numpy()

    def encode_items(self, texts: list[str], vectors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
        """Aligned vectors, VQ codes and RQ codes of new items' content (nothing is stored)."""
        if self.vector_name not in (None, "aligned"):
            raise DataError(f"bundle {self.version}'s model reads the {self.vector_name!r} vector, which the bundle "
                            "cannot make for new items (it carries the aligned encoder); serve a QARM bundle")
        aligned = self.codebooks.encode(texts, vectors)
        vq, rq = self.codebooks.codes(aligned)
        return aligned, vq, rq

    def describe(self) -> dict[str, Any]:
        return {"model_version": self.version, "codes_version": self.codes_version, "model": self.bundle.manifest["model"],
                "tasks": list(self.tasks), "catalogue_items": self.n_catalogue, "added_items": self.n_added,
                "users": self.spec.n_users, "history_length": self.history_length, "path": str(self.bundle.path),
                "device": str(self.device)}


def _vector_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if getattr(model, "vector", None) is None or config is None:
        return None
    return str(getattr(config, "vector", None))


def load_scorer(folder: str | Path, added: Sequence[NewItem] = (), *, text_model: Any = None,
                device: torch.device | str = "cpu") -> Scorer:
    """A Scorer of the bundle in ``folder`` (see :func:`qarm.serve.bundle.load_bundle`)."""
    from qarm.serve.bundle import load_bundle

    return Scorer(load_bundle(folder), added, text_model=text_model, device=device)

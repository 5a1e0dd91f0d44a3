"""VQ codes: an item's code is the ids of its top-K most similar catalogue items (QARM, Sec. VQ code).

The "codebook" is the catalogue itself: the aligned vectors of every catalogue item. An item's VQ code
is the list of the ``k`` catalogue items whose vectors have the largest inner product with its vector
(cosine when ``normalize=True``), most similar first. For a catalogue item the item itself is always its
own nearest neighbour and says nothing; ``exclude_self=True`` (the default) drops it, so a catalogue
item's code is its ``k`` nearest *other* items. A new item (not in the catalogue) simply gets its ``k``
nearest catalogue items: nothing is refit, the codebook stays frozen.

Search is exact (faiss ``IndexFlatIP``) up to ``exact_threshold`` catalogue items and approximate above
(HNSW by default, IVF on request): exact search over the whole catalogue costs ``n^2 * dim``
multiply-adds, about 10 s for 50,000 items of 64 dims on two cores but hours for a million.
:meth:`TopKCodes.recall_against_exact` measures what the approximation loses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from qarm.errors import DataError, QarmError
from qarm.progress import progress_bar
from qarm.quantize import faiss_ops
from qarm.quantize._common import (
    as_item_ids,
    check_bool,
    check_int,
    check_option,
    content_hash,
)
from qarm.quantize._safetensors import read_safetensors, write_safetensors
from qarm.quantize.rq import NotFittedError

FORMAT = "qarm.vq/1"
INDEX_OPTIONS = ("auto", "exact", "hnsw", "ivf")


class TopKCodes:
    """Top-K nearest catalogue items as a code (VQ).

    Parameters
    ----------
    k : int, default 25
        Code width: neighbours per item.
    exclude_self : bool, default True
        When ``transform`` is given the items' ids, drop each item from its own neighbour list.
    index : {"auto", "exact", "hnsw", "ivf"}, default "auto"
        ``auto``: exact up to ``exact_threshold`` catalogue items, IVF above (at 1M x 64-d it built and
        searched in about 3 min on 2 cores with recall@25 1.0, against 6 min and 0.996 for HNSW: RESULTS.md).
    exact_threshold : int, default 50_000
        Largest catalogue searched exactly under ``index="auto"``.
    normalize : bool, default True
        L2-normalise vectors so that inner product is cosine similarity.
    hnsw_m : int, default 32
        HNSW links per node (memory: about ``2 * hnsw_m * 4`` bytes per item on top of the vectors).
    hnsw_ef_construction : int, default 80
        HNSW candidate list at build time (build time grows with it).
    hnsw_ef_search : int, default 64
        HNSW candidate list at query time; raised to ``k + 1`` if smaller. The recall knob.
    ivf_nlist : int or None, default None
        IVF lists; ``None``: ``4 * sqrt(n_catalogue)``.
    ivf_nprobe : int, default 32
        IVF lists scanned per query. The recall knob of IVF.
    random_state : int, default 0
        Seed of the IVF coarse k-means and of the recall sample.
    verbose : bool, default False
        Show a progress bar while searching.

    Attributes
    ----------
    item_ids_ : int64 array of shape (n_catalogue,)
    vectors_ : float32 array of shape (n_catalogue, n_features_in_)
        The catalogue vectors as searched (normalised when ``normalize``).
    index_ : faiss.Index
    index_kind_ : {"exact", "hnsw", "ivf"}
        The index actually built.
    n_features_in_ : int
    version_ : str
        ``"vq-<16 hex>"``: sha256 of the catalogue ids and vectors, the settings that change codes and,
        for approximate indexes, the index itself.
    """

    def __init__(
        self,
        k: int = 25,
        *,
        exclude_self: bool = True,
        index: str = "auto",
        exact_threshold: int = 50_000,
        normalize: bool = True,
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 80,
        hnsw_ef_search: int = 64,
        ivf_nlist: int | None = None,
        ivf_nprobe: int = 32,
        random_state: int = 0,
        verbose: bool = False,
    ) -> None:
        self.k = k
        self.exclude_self = exclude_self
        self.index = index
        self.exact_threshold = exact_threshold
        self.normalize = normalize
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self.hnsw_ef_search = hnsw_ef_search
        self.ivf_nlist = ivf_nlist
        self.ivf_nprobe = ivf_nprobe
        self.random_state = random_state
        self.verbose = verbose

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters (JSON-ready)."""
        return {name: getattr(self, name) for name in (
            "k", "exclude_self", "index", "exact_threshold", "normalize", "hnsw_m", "hnsw_ef_construction",
            "hnsw_ef_search", "ivf_nlist", "ivf_nprobe", "random_state", "verbose")}

    def _validate_params(self) -> None:
        name = type(self).__name__
        check_int(name, "k", self.k, 1)
        check_bool(name, "exclude_self", self.exclude_self)
        check_option(name, "index", self.index, INDEX_OPTIONS)
        check_int(name, "exact_threshold", self.exact_threshold, 0)
        check_bool(name, "normalize", self.normalize)
        check_int(name, "hnsw_m", self.hnsw_m, 2)
        check_int(name, "hnsw_ef_construction", self.hnsw_ef_construction, 1)
        check_int(name, "hnsw_ef_search", self.hnsw_ef_search, 1)
        check_int(name, "ivf_nlist", self.ivf_nlist, 1, none_ok=True)
        check_int(name, "ivf_nprobe", self.ivf_nprobe, 1)
        check_int(name, "random_state", self.random_state, 0)
        check_bool(name, "verbose", self.verbose)

    def _index_options(self) -> faiss_ops.IndexOptions:
        return faiss_ops.IndexOptions(
            hnsw_m=int(self.hnsw_m),
            hnsw_ef_construction=int(self.hnsw_ef_construction),
            hnsw_ef_search=max(int(self.hnsw_ef_search), int(self.k) + 1),
            ivf_nlist=self.ivf_nlist,
            ivf_nprobe=int(self.ivf_nprobe),
            seed=int(self.random_state),
        )

    # ------------------------------------------------------------------ fitting
    def fit(self, catalogue_vectors: np.ndarray, item_ids: Any = None) -> TopKCodes:
        """Index the catalogue.

        Parameters
        ----------
        catalogue_vectors : array of shape (n_catalogue, dim)
        item_ids : int array of shape (n_catalogue,), unique; default ``arange(n_catalogue)``
            The ids codes are made of.

        Returns
        -------
        self
        """
        self._validate_params()
        x = self._preprocess(catalogue_vectors, dim=None)
        ids = as_item_ids(item_ids, len(x))
        need = int(self.k) + (1 if self.exclude_self else 0)
        if len(x) < need:
            raise DataError(f"{type(self).__name__} with k={self.k}" + (" and exclude_self" if self.exclude_self
                            else "") + f" needs a catalogue of at least {need} items; got {len(x)}")
        kind = self.index
        if kind == "auto":
            kind = "exact" if len(x) <= self.exact_threshold else "ivf"
        self.index_kind_ = kind
        self.item_ids_ = ids
        self.vectors_ = x
        self.n_features_in_ = int(x.shape[1])
        self.index_ = faiss_ops.build_index(x, kind, self._index_options())
        self.version_ = self._compute_version()
        return self

    def fit_transform(self, catalogue_vectors: np.ndarray, item_ids: Any = None) -> np.ndarray:
        """Fit on the catalogue and return the catalogue's own codes, ``(n_catalogue, k)`` int64."""
        self.fit(catalogue_vectors, item_ids)
        return self.transform(self.vectors_, self.item_ids_, _preprocessed=True)

    def _preprocess(self, vectors: np.ndarray, dim: int | None) -> np.ndarray:
        x = faiss_ops.as_float32(vectors, dim=dim)
        return faiss_ops.l2_normalize(x) if self.normalize else x

    # ------------------------------------------------------------------ codes
    @overload
    def transform(
        self, vectors: np.ndarray, item_ids: Any = None, *, return_scores: Literal[False] = False,
        _preprocessed: bool = False,
    ) -> np.ndarray: ...

    @overload
    def transform(
        self, vectors: np.ndarray, item_ids: Any = None, *, return_scores: Literal[True], _preprocessed: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    @overload
    def transform(
        self, vectors: np.ndarray, item_ids: Any = None, *, return_scores: bool, _preprocessed: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...

    def transform(
        self,
        vectors: np.ndarray,
        item_ids: Any = None,
        *,
        return_scores: bool = False,
        _preprocessed: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """VQ codes of ``vectors``: the ids of their ``k`` most similar catalogue items.

        Parameters
        ----------
        vectors : array of shape (n, dim)
        item_ids : int array of shape (n,) or None
            The items' own ids. With ``exclude_self``, an item whose id is in the catalogue is dropped
            from its own list; ids not in the catalogue (new items) drop nothing. ``None``: treat every
            vector as a new item. With an approximate index, a catalogue item whose search did not
            find the item itself (the search went astray) is searched again exactly.
        return_scores : bool
            Also return the similarities.

        Returns
        -------
        codes : int64 array of shape (n, k)
            Catalogue item ids, most similar first.
        scores : float32 array of shape (n, k)
            Only with ``return_scores``: inner products (cosine when normalised).
        """
        self._fitted()
        x = vectors if _preprocessed else self._preprocess(vectors, dim=self.n_features_in_)
        ids = None if item_ids is None else as_item_ids(item_ids, len(x), unique=False)
        codes, scores, _ = self._search(x, ids)
        return (codes, scores) if return_scores else codes

    def _search(self, x: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
        """Codes, scores and the number of rows searched again exactly (see below)."""
        k = int(self.k)
        drop_self = bool(self.exclude_self) and ids is not None
        width = k + 1 if drop_self else k
        faiss_ops.set_search_params(self.index_, self._index_options())
        with progress_bar(len(x), f"VQ top-{k} search ({self.index_kind_})", bool(self.verbose)) as advance:
            scores, labels = faiss_ops.search(self.index_, x, width, progress=advance)
        n_researched = 0
        if drop_self and self.index_kind_ != "exact":
            # A catalogue item is its own nearest neighbour. When the approximate search did not even
            # find the item itself, it ended in the wrong region of the graph (or the wrong IVF lists);
            # its neighbours are then mostly wrong, so such rows -- rare -- are searched again exactly.
            assert ids is not None  # drop_self implies ids
            found = self.item_ids_[np.maximum(labels, 0)] == ids[:, None]
            astray = np.flatnonzero(np.isin(ids, self.item_ids_) & ~(found & (labels >= 0)).any(axis=1))
            if len(astray):
                exact = faiss_ops.build_index(self.vectors_, "exact")
                scores[astray], labels[astray] = faiss_ops.search(exact, x[astray], width)
                n_researched = int(len(astray))
        if drop_self:
            assert ids is not None  # drop_self implies ids
            scores, labels = _drop_self(scores, labels, self.item_ids_, ids)
        if (labels < 0).any():
            bad = np.flatnonzero((labels < 0).any(axis=1))
            raise QarmError(f"the {self.index_kind_} index returned fewer than {k} neighbours for "
                            f"{len(bad)} vectors (first rows: {bad[:5].tolist()}); raise hnsw_ef_search / "
                            f"ivf_nprobe or use index='exact'")
        return self.item_ids_[labels], scores, n_researched

    def add_items(self, vectors: np.ndarray, item_ids: Any) -> TopKCodes:
        """Add items to the searched catalogue (a server's new uploads), without refitting anything:
        later :meth:`transform` calls may name them. ``version_`` stays the fitted codebook's (what the
        codes of the fitted catalogue were made with); the additions are the caller's live state."""
        self._fitted()
        x = self._preprocess(vectors, dim=self.n_features_in_)
        ids = as_item_ids(item_ids, len(x))
        clash = np.intersect1d(ids, self.item_ids_)
        if len(clash):
            raise DataError("items already in the VQ catalogue", ids=clash)
        self.index_.add(x)
        self.item_ids_ = np.concatenate([self.item_ids_, ids])
        self.vectors_ = np.concatenate([self.vectors_, x])
        return self

    def recall_against_exact(self, sample_size: int = 10_000, random_state: int | None = None) -> dict[str, Any]:
        """Overlap of the index's codes with exact top-k codes on a random sample of catalogue items.

        ``recall@k`` is the mean over sampled items of ``|approx ∩ exact| / k``, self excluded as in
        :meth:`transform`. For an exact index it is 1 by construction and nothing is searched.

        Returns
        -------
        dict with ``recall_at_k``, ``k``, ``sample_size``, ``index``, ``exact`` and, when searched,
        ``min_item_recall`` (the worst sampled item), ``share_below_half`` (sampled items with recall
        < 0.5: an approximate search that ended in the wrong region), ``share_researched`` (sampled
        items whose search missed the item itself and was redone exactly, see :meth:`transform`) and
        ``seconds_exact`` / ``seconds_index``.
        """
        self._fitted()
        check_int("recall_against_exact", "sample_size", sample_size, 1)
        k = int(self.k)
        if self.index_kind_ == "exact":
            return {"recall_at_k": 1.0, "k": k, "sample_size": 0, "index": "exact", "exact": True}
        rng = np.random.default_rng(self.random_state if random_state is None else random_state)
        n = len(self.vectors_)
        rows = np.sort(rng.choice(n, size=min(int(sample_size), n), replace=False))
        queries, ids = self.vectors_[rows], self.item_ids_[rows]
        start = time.perf_counter()
        approx, _, n_researched = self._search(queries, ids)
        seconds_index = time.perf_counter() - start
        start = time.perf_counter()
        exact_index = faiss_ops.build_index(self.vectors_, "exact")
        drop_self = bool(self.exclude_self)
        scores, labels = faiss_ops.search(exact_index, queries, k + 1 if drop_self else k)
        if drop_self:
            scores, labels = _drop_self(scores, labels, self.item_ids_, ids)
        exact = self.item_ids_[labels]
        seconds_exact = time.perf_counter() - start
        per_item = _row_overlap(approx, exact) / k
        return {
            "recall_at_k": float(per_item.mean()),
            "min_item_recall": float(per_item.min()),
            "share_below_half": float((per_item < 0.5).mean()),  # items whose search went astray
            "share_researched": n_researched / len(rows),  # rows whose own id was missed: redone exactly
            "k": k,
            "sample_size": int(len(rows)),
            "index": self.index_kind_,
            "exact": False,
            "seconds_index": seconds_index,
            "seconds_exact": seconds_exact,
        }

    # ------------------------------------------------------------------ state
    def _fitted(self) -> TopKCodes:
        if not hasattr(self, "index_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit() or load() first")
        return self

    def _code_settings(self) -> dict[str, Any]:
        """What, beside the catalogue, decides the codes a vector gets."""
        settings: dict[str, Any] = {"format": FORMAT, "k": int(self.k), "exclude_self": bool(self.exclude_self),
                                    "normalize": bool(self.normalize), "index": self.index_kind_}
        opts = self._index_options()
        if self.index_kind_ == "hnsw":
            settings["hnsw_ef_search"] = opts.hnsw_ef_search
        elif self.index_kind_ == "ivf":
            settings["ivf_nprobe"] = opts.ivf_nprobe
        return settings

    def _compute_version(self, index_bytes: np.ndarray | None = None) -> str:
        arrays = [self.item_ids_, self.vectors_]
        if self.index_kind_ != "exact":  # an approximate index's graph / lists change its answers
            arrays.append(faiss_ops.serialize_index(self.index_) if index_bytes is None else index_bytes)
        return content_hash("vq", self._code_settings(), arrays)

    def save(self, path: str | Path) -> Path:
        """Write the catalogue (ids, vectors) and, for approximate kinds, the faiss index to one
        safetensors file, atomically. The index is stored in faiss's own format, so loading does not
        rebuild it (an HNSW build is not deterministic across thread counts)."""
        self._fitted()
        tensors = {"item_ids": self.item_ids_, "vectors": self.vectors_}
        if self.index_kind_ != "exact":
            tensors["index"] = faiss_ops.serialize_index(self.index_)
        metadata = {
            "format": FORMAT,
            "version": self.version_,
            "params": json.dumps(self.get_params()),
            "state": json.dumps({"index_kind": self.index_kind_, "n_features_in": self.n_features_in_}),
        }
        return write_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> TopKCodes:
        """Read a VQ codebook written by :meth:`save`; its content hash must match its recorded version."""
        tensors, metadata = read_safetensors(path, expected_format=FORMAT)
        try:
            params = json.loads(metadata["params"])
            state = json.loads(metadata["state"])
            ids, vectors = tensors["item_ids"], tensors["vectors"]
        except (KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a complete {FORMAT} file ({exc})") from exc
        vq = cls(**params)
        vq.index_kind_ = state["index_kind"]
        vq.item_ids_ = np.ascontiguousarray(ids, dtype=np.int64)
        vq.vectors_ = np.ascontiguousarray(vectors, dtype=np.float32)
        vq.n_features_in_ = int(state["n_features_in"])
        if vq.index_kind_ == "exact":
            vq.index_ = faiss_ops.build_index(vq.vectors_, "exact")
            index_bytes = None
        else:
            if "index" not in tensors:
                raise DataError(f"{path}: the {vq.index_kind_} index is missing")
            index_bytes = tensors["index"]
            vq.index_ = faiss_ops.deserialize_index(index_bytes)
        vq.version_ = vq._compute_version(index_bytes)
        if vq.version_ != metadata.get("version"):
            raise DataError(f"{path}: content hash {vq.version_} does not match the recorded version "
                            f"{metadata.get('version')}; the file is corrupt or was edited")
        return vq


def _drop_self(
    scores: np.ndarray, labels: np.ndarray, catalogue_ids: np.ndarray, query_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """From ``k + 1`` results per row keep ``k``: drop the query's own id where it was found, else the last."""
    found_ids = catalogue_ids[np.maximum(labels, 0)]  # -1 labels (nothing found) are masked next
    is_self = (found_ids == query_ids[:, None]) & (labels >= 0)
    first_self = is_self & (np.cumsum(is_self, axis=1) == 1)
    no_self = ~first_self.any(axis=1)
    drop = first_self
    drop[no_self, -1] = True
    keep = ~drop
    n, width = labels.shape
    return scores[keep].reshape(n, width - 1), labels[keep].reshape(n, width - 1)


def _row_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|set(a[i]) ∩ set(b[i])|`` for every row (rows hold distinct values)."""
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    return (both[:, 1:] == both[:, :-1]).sum(axis=1)


"""RQ codes: residual k-means (QARM, Algorithm 1 and Eq. 4-5).

Level 1 clusters the vectors; every later level clusters what the previous levels left unexplained::

    r_0 = x                                   (x L2-normalised when normalize=True)
    C_l = kmeans(r_{l-1}, K_l)                one faiss k-means per level
    c_l = argmin_j || r_{l-1} - C_l[j] ||     nearest centroid (Eq. 4)
    r_l = r_{l-1} - C_l[c_l]                  residual for the next level (Eq. 5)

The RQ code of an item is ``(c_1, ..., c_L)``; it reconstructs to ``sum_l C_l[c_l]``. Once fitted, the
codebooks are frozen: :meth:`ResidualKMeans.transform` gives codes to any vector (a new upload) without
refitting anything, and :attr:`ResidualKMeans.version_` (a content hash of the codebooks) names the
codes they make, so that a code store can refuse to mix codes of two codebooks.

Training cost is controlled at two places: ``train_sample`` fits on a random subset of the vectors
(the others are only assigned by ``transform``), and ``max_points_per_centroid`` subsamples the
residuals each level's k-means trains on (faiss's own rule, 256 per centroid: 65,536 points for a
256-entry codebook). ``max_points_per_centroid=None`` trains every level on every residual, the paper's
algorithm to the letter, at about ``n / 65,536`` times the k-means cost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qarm.errors import ConfigError, DataError, QarmError
from qarm.progress import progress_bar
from qarm.quantize import faiss_ops
from qarm.quantize._common import (
    bad_param,
    check_bool,
    check_int,
    content_hash,
    is_int,
)
from qarm.quantize._safetensors import read_safetensors, write_safetensors

FORMAT = "qarm.rq/1"


class NotFittedError(QarmError, AttributeError):
    """A quantizer was used before ``fit`` (or ``load``)."""


class ResidualKMeans:
    """Residual k-means quantizer: ``levels`` codebooks, one nearest-centroid code per level.

    Parameters
    ----------
    levels : int, default 6
        Code length L (the paper uses 6 levels).
    codebook_size : int or list of int, default 256
        Centroids per level: one int for every level, or one entry per level (e.g. ``[512, 256, 256]``).
    normalize : bool, default True
        L2-normalise vectors before quantizing (aligned vectors are compared by cosine). Codebooks,
        reconstructions and errors then live on the normalised vectors.
    train_sample : int or None, default None
        Fit on a random sample of this many vectors; ``None`` fits on all of them.
    max_points_per_centroid : int or None, default 256
        Each level's k-means trains on at most ``codebook_size * max_points_per_centroid`` residuals,
        drawn at random; ``None`` trains on all residuals.
    niter : int, default 20
        Lloyd iterations per level.
    random_state : int, default 0
        Seed of the samples and of each level's k-means initialisation.
    verbose : bool, default False
        Show a progress bar per level on stderr.

    Attributes
    ----------
    codebooks_ : list of float32 arrays, ``codebooks_[l]`` of shape (codebook_sizes_[l], n_features_in_)
    codebook_sizes_ : list of int
    n_features_in_ : int
        Vector width seen by ``fit``.
    n_train_ : int
        Vectors the residual chain was fitted on.
    train_mse_ : list of float
        Mean squared L2 norm of the training residuals after each level (on the fit vectors).
    version_ : str
        ``"rq-<16 hex>"``, sha256 of the codebooks and of the settings that change codes.

    Examples
    --------
    >>> rq = ResidualKMeans(levels=6, codebook_size=256).fit(vectors)   # doctest: +SKIP
    >>> codes = rq.transform(new_vectors)                               # (n, 6) int64
    """

    def __init__(
        self,
        levels: int = 6,
        codebook_size: int | Sequence[int] = 256,
        *,
        normalize: bool = True,
        train_sample: int | None = None,
        max_points_per_centroid: int | None = 256,
        niter: int = 20,
        random_state: int = 0,
        verbose: bool = False,
    ) -> None:
        self.levels = levels
        self.codebook_size = codebook_size
        self.normalize = normalize
        self.train_sample = train_sample
        self.max_points_per_centroid = max_points_per_centroid
        self.niter = niter
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ parameters
    def get_params(self) -> dict[str, Any]:
        """The constructor parameters (JSON-ready)."""
        size = self.codebook_size
        return {
            "levels": self.levels,
            "codebook_size": list(size) if isinstance(size, (list, tuple)) else size,
            "normalize": self.normalize,
            "train_sample": self.train_sample,
            "max_points_per_centroid": self.max_points_per_centroid,
            "niter": self.niter,
            "random_state": self.random_state,
            "verbose": self.verbose,
        }

    def _validate_params(self) -> list[int]:
        """Check every parameter; return the resolved per-level codebook sizes."""
        name = type(self).__name__
        check_int(name, "levels", self.levels, 1)
        size = self.codebook_size
        if is_int(size):
            if size < 1:  # type: ignore[operator]
                raise bad_param(name, "codebook_size", "an int >= 1 or a list of ints >= 1", size)
            sizes = [int(size)] * int(self.levels)  # type: ignore[arg-type]
        elif isinstance(size, (list, tuple)) and size and all(is_int(s) and s >= 1 for s in size):
            if len(size) != self.levels:
                raise ConfigError(
                    f"The 'codebook_size' parameter of {name} must have one entry per level "
                    f"(levels={self.levels}). Got {len(size)} entries instead."
                )
            sizes = [int(s) for s in size]
        else:
            raise bad_param(name, "codebook_size", "an int >= 1 or a list of ints >= 1", size)
        check_bool(name, "normalize", self.normalize)
        check_int(name, "train_sample", self.train_sample, 1, none_ok=True)
        check_int(name, "max_points_per_centroid", self.max_points_per_centroid, 1, none_ok=True)
        check_int(name, "niter", self.niter, 1)
        check_int(name, "random_state", self.random_state, 0)
        check_bool(name, "verbose", self.verbose)
        return sizes

    # ------------------------------------------------------------------ fitting
    def fit(self, vectors: np.ndarray) -> ResidualKMeans:
        """Learn one codebook per level from ``vectors`` of shape (n, dim). Returns ``self``."""
        self._fit(vectors)
        return self

    def fit_transform(self, vectors: np.ndarray) -> np.ndarray:
        """``fit(vectors).transform(vectors)``, reusing the fit's assignments when it used every vector."""
        codes = self._fit(vectors)
        if codes is not None:
            return codes
        return self.transform(vectors)

    def _fit(self, vectors: np.ndarray) -> np.ndarray | None:
        sizes = self._validate_params()
        x = self.preprocess(vectors, _fitting=True)
        n = len(x)
        root = np.random.SeedSequence(int(self.random_state))
        sample_rng, *level_seeds = (np.random.default_rng(s) for s in root.spawn(len(sizes) + 1))
        rows = None
        if self.train_sample is not None and self.train_sample < n:
            rows = np.sort(sample_rng.choice(n, size=int(self.train_sample), replace=False))
        self._check_enough_points(n if rows is None else len(rows), sizes)

        if rows is not None:
            residual = x[rows]
        else:  # preprocess copied when normalising; otherwise x is the caller's array: do not overwrite it
            residual = x if self.normalize else x.copy()
        codes = np.empty((len(residual), len(sizes)), dtype=np.int64)
        codebooks: list[np.ndarray] = []
        train_mse: list[float] = []
        with progress_bar(len(sizes) * len(residual), "RQ fit (k-means + assign)", bool(self.verbose)) as advance:
            for level, (k, rng) in enumerate(zip(sizes, level_seeds)):
                train = residual
                cap = self.max_points_per_centroid
                if cap is not None and len(residual) > k * cap:
                    pick = np.sort(rng.choice(len(residual), size=k * int(cap), replace=False))
                    train = residual[pick]
                centroids = self._train_level(train, k, seed=int(rng.integers(2**31 - 1)))
                labels = self._assign(residual, centroids, advance)
                residual -= centroids[labels]
                codes[:, level] = labels
                codebooks.append(centroids)
                train_mse.append(float(np.einsum("ij,ij->", residual, residual, dtype=np.float64) / len(residual)))

        self.codebook_sizes_ = sizes
        self.codebooks_ = codebooks
        self.n_features_in_ = int(x.shape[1])
        self.n_train_ = int(len(residual))
        self.train_mse_ = train_mse
        self.version_ = self._compute_version()
        return codes if rows is None else None

    @classmethod
    def from_codebooks(cls, codebooks: Sequence[np.ndarray], *, normalize: bool = False) -> ResidualKMeans:
        """A fitted quantizer from given codebooks (e.g. trained elsewhere, or set by hand in a test).

        Parameters
        ----------
        codebooks : sequence of float arrays, ``codebooks[l]`` of shape (K_l, dim)
        normalize : bool
            Whether vectors are L2-normalised before quantizing.
        """
        books = [faiss_ops.as_float32(cb, f"codebook {level}") for level, cb in enumerate(codebooks)]
        if not books:
            raise DataError("from_codebooks needs at least one codebook")
        dims = {cb.shape[1] for cb in books}
        if len(dims) != 1:
            raise DataError(f"codebooks must all have the same width, got {[cb.shape for cb in books]}")
        rq = cls(levels=len(books), codebook_size=[len(cb) for cb in books], normalize=normalize)
        rq.codebook_sizes_ = rq._validate_params()
        rq.codebooks_ = books
        rq.n_features_in_ = dims.pop()
        rq.n_train_ = 0
        rq.train_mse_ = []
        rq.version_ = rq._compute_version()
        return rq

    def _check_enough_points(self, n_train: int, sizes: list[int]) -> None:
        """The data-dependent check: every level's k-means needs at least as many points as centroids."""
        for level, k in enumerate(sizes, start=1):
            if n_train < k:
                raise DataError(
                    f"{type(self).__name__} needs at least {k} training vectors for a codebook of {k} "
                    f"at level {level}; got {n_train}. Use a smaller codebook (--set rq.codebook_size=N, or "
                    "rq.codebook_size=auto) or more vectors."
                )

    # Two seams: the k-means of one level and the nearest-centroid assignment. The benchmark swaps in
    # scikit-learn here to compare on exactly the same samples and residual chain.
    def _train_level(self, points: np.ndarray, k: int, seed: int) -> np.ndarray:
        """Centroids ``(k, dim)`` of one level from its training residuals ``(m, dim)``."""
        return faiss_ops.kmeans(points, k, niter=int(self.niter), seed=seed, max_points_per_centroid=None)

    def _assign(self, residual: np.ndarray, centroids: np.ndarray, advance: Any = None) -> np.ndarray:
        """Nearest centroid (L2) of every row of ``residual``: int64 ``(n,)``."""
        return faiss_ops.nearest_centroid(residual, centroids, progress=advance)[0]

    # ------------------------------------------------------------------ using the codebooks
    def preprocess(self, vectors: np.ndarray, *, _fitting: bool = False) -> np.ndarray:
        """``vectors`` as the codebooks see them: float32, and L2-normalised when ``normalize``.

        Reconstruction errors are measured against this, not against the raw vectors.
        """
        dim = None if _fitting else self._fitted().n_features_in_
        x = faiss_ops.as_float32(vectors, dim=dim)
        return faiss_ops.l2_normalize(x) if self.normalize else x

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """RQ codes of ``vectors`` (n, dim) with the frozen codebooks: int64 array (n, levels)."""
        self._fitted()
        residual = self.preprocess(vectors)
        if not self.normalize:
            residual = residual.copy()  # preprocess returned the caller's array: do not overwrite it
        codes = np.empty((len(residual), len(self.codebooks_)), dtype=np.int64)
        with progress_bar(codes.size, "RQ assign", bool(self.verbose)) as advance:
            for level, centroids in enumerate(self.codebooks_):
                codes[:, level] = self._assign(residual, centroids, advance)
                residual -= centroids[codes[:, level]]
        return codes

    def reconstruct(self, codes: np.ndarray, levels: int | None = None) -> np.ndarray:
        """``sum_l codebooks_[l][codes[:, l]]`` over the first ``levels`` levels (all by default).

        Parameters
        ----------
        codes : int array of shape (n, L)
        levels : int or None

        Returns
        -------
        float32 array of shape (n, n_features_in_), in the preprocessed (normalised) space.
        """
        self._fitted()
        codes = self._check_codes(codes)
        use = len(self.codebooks_) if levels is None else int(levels)
        if not 1 <= use <= len(self.codebooks_):
            raise bad_param("reconstruct", "levels", f"an int in [1, {len(self.codebooks_)}]", levels)
        out = np.zeros((len(codes), self.n_features_in_), dtype=np.float32)
        for level in range(use):
            out += self.codebooks_[level][codes[:, level]]
        return out

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != len(self.codebooks_):
            raise DataError(f"codes must be (n, {len(self.codebooks_)}), got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise DataError(f"codes must be integers, got dtype {codes.dtype}")
        sizes = np.asarray(self.codebook_sizes_)
        bad = ((codes < 0) | (codes >= sizes)).any(axis=1)
        if bad.any():
            raise DataError(f"codes out of range for codebook sizes {self.codebook_sizes_}",
                            ids=np.flatnonzero(bad))
        return codes.astype(np.int64, copy=False)

    def _fitted(self) -> ResidualKMeans:
        if not hasattr(self, "codebooks_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit() or load() first")
        return self

    def _code_settings(self) -> dict[str, Any]:
        """What, beside the codebooks, decides the codes a vector gets."""
        return {"format": FORMAT, "normalize": bool(self.normalize), "codebook_sizes": self.codebook_sizes_}

    def _compute_version(self) -> str:
        return content_hash("rq", self._code_settings(), self.codebooks_)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the codebooks and settings to one safetensors file, atomically (no pickle)."""
        self._fitted()
        tensors = {f"codebook_{level}": cb for level, cb in enumerate(self.codebooks_)}
        metadata = {
            "format": FORMAT,
            "version": self.version_,
            "params": json.dumps(self.get_params()),
            "state": json.dumps({"n_features_in": self.n_features_in_, "n_train": self.n_train_,
                                 "train_mse": self.train_mse_, "codebook_sizes": self.codebook_sizes_}),
        }
        return write_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> ResidualKMeans:
        """Read a quantizer written by :meth:`save`; its content hash must match its recorded version."""
        tensors, metadata = read_safetensors(path, expected_format=FORMAT)
        try:
            params = json.loads(metadata["params"])
            state = json.loads(metadata["state"])
            codebooks = [tensors[f"codebook_{level}"] for level in range(len(state["codebook_sizes"]))]
        except (KeyError, ValueError) as exc:
            raise DataError(f"{path}: not a complete {FORMAT} file ({exc})") from exc
        rq = cls(**params)
        rq.codebook_sizes_ = [int(s) for s in state["codebook_sizes"]]
        rq.codebooks_ = [np.ascontiguousarray(cb, dtype=np.float32) for cb in codebooks]
        rq.n_features_in_ = int(state["n_features_in"])
        rq.n_train_ = int(state["n_train"])
        rq.train_mse_ = [float(v) for v in state["train_mse"]]
        rq.version_ = rq._compute_version()
        if rq.version_ != metadata.get("version"):
            raise DataError(f"{path}: content hash {rq.version_} does not match the recorded version "
                            f"{metadata.get('version')}; the file is corrupt or was edited")
        return rq

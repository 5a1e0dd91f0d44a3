"""The one door to faiss: every faiss call of qarm goes through this module.

Why one module (TorchEasyRec ``modules/sid/kmeans_quantize.py``): faiss wants float32 C-contiguous
input, dies with an opaque C++ error when asked for more centroids than points, prints its own
warnings to stderr, and has thread settings that are global to the process. Here each of those is
handled once:

* :func:`as_float32` checks the shape and finiteness and returns a float32 C-contiguous array;
* :func:`kmeans` checks ``n >= k`` (a :class:`~qarm.errors.DataError` naming both) before faiss runs,
  and turns faiss's "please provide at least 39*k training points" message into a Python warning;
* :func:`nearest_centroid` and :func:`search` work in chunks, so memory stays bounded and a progress
  callback can be told how far they are;
* :func:`build_index` builds an exact (``IndexFlatIP``) or approximate (HNSW, IVF) inner-product
  index from declared options and rejects unknown ones;
* :func:`set_num_threads` sets faiss's OpenMP threads (``QARM_NUM_THREADS`` is read once at import).

OpenMP wait policy. faiss's OpenMP runtime (libgomp) by default spins for a long while at every
barrier. On a machine shared with other work a descheduled thread then makes its partners spin in
vain: on 2 busy cores a 50k x 256 k-means took 5-7 s with 2 threads against 0.8 s with 1. Unless the
user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``, this module imports faiss with
``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep; 0.8 s with 2 threads on the same busy machine) and
then removes the variable again, so OpenMP runtimes loaded later (torch's) keep their defaults. The
policy is read when libgomp loads: if faiss or scikit-learn (which ships the same libgomp) was imported
earlier, the runtime keeps the policy it started with.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal, cast

import numpy as np

from qarm.errors import ConfigError, DataError  # imports only the standard library (no OpenMP runtime)


def _import_faiss_with_passive_waits() -> ModuleType:
    """Import faiss with ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a wait policy (see above)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        import faiss

        return faiss
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import faiss
    finally:
        del os.environ["OMP_WAIT_POLICY"]
    return faiss


if TYPE_CHECKING:
    import faiss  # the type checker reads faiss's own stubs; at run time the module comes from the import below
else:
    faiss = _import_faiss_with_passive_waits()

# faiss's k-means quality rule of thumb: fewer points per centroid than this gives poor centroids.
MIN_POINTS_PER_CENTROID = 39
# Rows per block in chunked assignment / search: 64k x 64-d float32 is 16 MiB of queries.
DEFAULT_CHUNK = 65_536

IndexKind = Literal["exact", "hnsw", "ivf"]
INDEX_KINDS: tuple[str, ...] = ("exact", "hnsw", "ivf")
Progress = Callable[[int], None]


class SmallTrainingSetWarning(UserWarning):
    """k-means got fewer than 39 training points per centroid (faiss's rule of thumb)."""


def set_num_threads(n: int | None) -> int:
    """Set the OpenMP threads faiss uses; ``None`` keeps the current setting. Returns the setting.

    faiss defaults to one thread per core. On a machine shared with other work (or with torch in the
    same process) an explicit number avoids oversubscription.
    """
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"The 'threads' parameter must be an int >= 1 or None. Got {n!r} instead.")
        faiss.omp_set_num_threads(n)
    return int(faiss.omp_get_max_threads())


def num_threads() -> int:
    """The number of OpenMP threads faiss uses now."""
    return int(faiss.omp_get_max_threads())


def as_float32(x: np.ndarray, name: str = "vectors", *, dim: int | None = None) -> np.ndarray:
    """Return ``x`` as a float32, C-contiguous ``(n, dim)`` array, checked.

    Raises
    ------
    DataError
        ``x`` is not 2-D, has the wrong width, no rows, or non-finite values.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise DataError(f"{name} must be a 2-D array (n, dim), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise DataError(f"{name} must be (n, {dim}), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{name} must have at least one row and one column, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise DataError(f"{name} has non-finite values (NaN or inf)", ids=np.flatnonzero(~finite))
    return arr


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, a new array); all-zero rows stay zero."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def auto_codebook_size(n_points: int, largest: int = 256) -> int:
    """The largest power of two <= ``largest`` with at least 39 points per centroid (faiss's rule of
    thumb), at least 2: what a catalogue of ``n_points`` items supports."""
    size = 2
    while size * 2 <= largest and size * 2 * MIN_POINTS_PER_CENTROID <= n_points:
        size *= 2
    return size


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
    verbose: bool = False,
) -> np.ndarray:
    """Lloyd's k-means (faiss), L2 distance. Returns the ``(k, dim)`` float32 centroids.

    Parameters
    ----------
    x : array of shape (n, dim)
        Training points; ``n >= k``.
    k : int
        Number of centroids.
    niter : int
        Lloyd iterations.
    seed : int
        Seed of faiss's random initialisation (k distinct points drawn at random).
    max_points_per_centroid : int or None
        faiss subsamples to ``k * max_points_per_centroid`` points when ``n`` is larger; ``None`` uses
        every point (callers that sample themselves pass ``None``).
    verbose : bool
        Let faiss print its per-iteration objective.

    Raises
    ------
    DataError
        ``n < k``: faiss would otherwise abort with an opaque C++ error.

    Warns
    -----
    SmallTrainingSetWarning
        ``n < 39 * k``; the centroids are still computed.
    """
    x = as_float32(x, "k-means training points")
    n, dim = x.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"The 'k' parameter of kmeans must be an int >= 1. Got {k!r} instead.")
    if n < k:
        raise DataError(f"k-means with k={k} centroids needs at least {k} training points, got {n}")
    if n < MIN_POINTS_PER_CENTROID * k:
        warnings.warn(
            f"k-means of {n} points into {k} centroids: fewer than {MIN_POINTS_PER_CENTROID} points per "
            f"centroid (faiss's rule of thumb); centroids may be poor. Use a smaller codebook: "
            f"--set rq.codebook_size={auto_codebook_size(n)} (qarm quantize; quantize.rq.codebook_size in qarm run), "
            "or rq.codebook_size=auto",
            SmallTrainingSetWarning,
            stacklevel=2,
        )
    cap = max(int(math.ceil(n / k)) + 1, 1) if max_points_per_centroid is None else int(max_points_per_centroid)
    km = faiss.Kmeans(
        dim,
        int(k),
        niter=int(niter),
        seed=int(seed) % (2**31),
        max_points_per_centroid=cap,
        min_points_per_centroid=1,  # the warning above replaces faiss's stderr message
        verbose=bool(verbose),
    )
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(int(k), dim)


def nearest_centroid(
    x: np.ndarray,
    centroids: np.ndarray,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest centroid (L2) of every row, in chunks of ``chunk_size`` rows.

    Parameters
    ----------
    x : array of shape (n, dim)
    centroids : array of shape (k, dim)
    progress : callable or None
        Called with the number of rows done after each chunk.

    Returns
    -------
    labels : int64 array of shape (n,)
    sq_dist : float32 array of shape (n,)
        Squared L2 distance to that centroid.
    """
    centroids = as_float32(centroids, "centroids")
    x = as_float32(x, dim=centroids.shape[1])
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), chunk_size):
        stop = min(start + chunk_size, len(x))
        d, i = index.search(x[start:stop], 1)
        labels[start:stop] = i[:, 0]
        dist[start:stop] = d[:, 0]
        if progress is not None:
            progress(stop - start)
    return labels, dist


@dataclass(frozen=True)
class IndexOptions:
    """Options of an inner-product index (see :func:`build_index`).

    ``hnsw_m`` links per node, ``hnsw_ef_construction`` / ``hnsw_ef_search`` the candidate list sizes
    at build / query time; ``ivf_nlist`` inverted lists (``None``: ``4 * sqrt(n)``), ``ivf_nprobe``
    lists scanned per query.
    """

    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    ivf_nlist: int | None = None
    ivf_nprobe: int = 32
    seed: int = 0


def build_index(
    vectors: np.ndarray,
    kind: str,
    options: IndexOptions | None = None,
) -> faiss.Index:
    """An inner-product index over ``vectors`` (row ``i`` gets faiss label ``i``).

    Parameters
    ----------
    vectors : array of shape (n, dim)
    kind : {"exact", "hnsw", "ivf"}
        ``exact``: ``IndexFlatIP`` (brute force). ``hnsw``: ``IndexHNSWFlat`` with
        ``METRIC_INNER_PRODUCT``. ``ivf``: ``IndexIVFFlat`` on an ``IndexFlatIP`` coarse quantiser.
    options : IndexOptions
    """
    options = options or IndexOptions()
    if kind not in INDEX_KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; available: {list(INDEX_KINDS)}")
    x = as_float32(vectors, "catalogue vectors")
    n, dim = x.shape
    index: faiss.Index
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, int(options.hnsw_m), faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = int(options.hnsw_ef_construction)
        hnsw.hnsw.efSearch = int(options.hnsw_ef_search)
        index = hnsw
    else:
        nlist = options.ivf_nlist or max(1, int(4 * math.sqrt(n)))
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = int(options.seed)
        ivf.cp.min_points_per_centroid = 1  # small catalogues: no stderr warning from faiss
        ivf.cp.max_points_per_centroid = 64  # coarse k-means on <= 64 * nlist points, not the catalogue
        ivf.train(x)
        ivf.nprobe = min(int(options.ivf_nprobe), nlist)
        index = ivf
    index.add(x)
    return index


def set_search_params(index: faiss.Index, options: IndexOptions) -> None:
    """Apply the query-time options (efSearch / nprobe) to an index built or loaded earlier."""
    hnsw = getattr(index, "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = int(options.hnsw_ef_search)
    if hasattr(index, "nprobe"):
        ivf = cast("faiss.IndexIVF", index)  # the IVF family is what has nprobe (and nlist)
        ivf.nprobe = min(int(options.ivf_nprobe), int(ivf.nlist))


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search in chunks. Returns ``(scores, labels)``, both ``(n, k)``.

    ``labels`` are faiss labels (row numbers of the indexed vectors), ``-1`` where the index found
    fewer than ``k`` results.
    """
    queries = as_float32(queries, "query vectors", dim=index.d)
    if k > index.ntotal:
        raise DataError(f"cannot return {k} neighbours from an index of {index.ntotal} vectors")
    scores = np.empty((len(queries), k), dtype=np.float32)
    labels = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        s, i = index.search(queries[start:stop], k)
        scores[start:stop] = s
        labels[start:stop] = i
        if progress is not None:
            progress(stop - start)
    return scores, labels


def serialize_index(index: faiss.Index) -> np.ndarray:
    """faiss's own binary format of ``index`` as a uint8 array (no pickle)."""
    return np.asarray(faiss.serialize_index(index), dtype=np.uint8)


def deserialize_index(data: np.ndarray) -> faiss.Index:
    """The inverse of :func:`serialize_index`."""
    return faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))


_env_threads = os.environ.get("QARM_NUM_THREADS")
if _env_threads:
    try:
        set_num_threads(int(_env_threads))
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"QARM_NUM_THREADS must be an int >= 1, got {_env_threads!r}") from exc

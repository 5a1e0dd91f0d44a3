"""The quantize stage as library functions: one per command.

* :func:`quantize_items` (``qarm quantize``, and the ``quantize`` stage of ``qarm run``): fit VQ and RQ
  codebooks on the catalogue's aligned vectors, code every item, measure code quality, and write a
  quantize folder atomically;
* :func:`assign_new_items` (the path of a new upload): codes for new vectors from the frozen codebooks
  of a quantize folder, optionally added to a code store;
* :func:`inspect_codes` (``qarm codes inspect``): the quality report of a quantize folder, with the
  versions of its files and of its code store checked against each other;
* :func:`publish_codes`: copy a folder's codes into another code store (e.g. Redis).

A quantize folder::

    quantize.json              config, codebook versions, counts, timings, machine, qarm version
    rq_codebooks.safetensors   ResidualKMeans codebooks (+ settings, version)
    vq_codebook.safetensors    TopKCodes catalogue ids + vectors (+ HNSW/IVF index), version
    codes.parquet              item_id, vq_0..vq_{K-1}, rq_0..rq_{L-1}
    codes.sqlite               the embedded code store: names "vq" and "rq", version = codes_version
    quality.json, quality.md   code quality (see qarm.quantize.quality)

``codes_version`` combines the two codebook versions: codes in a store are only ever of one pair of
codebooks.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qarm import __version__, provenance
from qarm.config import to_dict
from qarm.data.io import atomic_directory, atomic_write_bytes, write_json
from qarm.errors import ConfigError, DataError
from qarm.quantize import faiss_ops
from qarm.quantize._common import as_item_ids, check_int, content_hash
from qarm.quantize._safetensors import read_metadata
from qarm.quantize.quality import render_markdown, rq_quality, vq_quality
from qarm.quantize.rq import ResidualKMeans
from qarm.quantize.store import CodeStore, SQLiteCodeStore, open_store
from qarm.quantize.vq import TopKCodes

META_FILE = "quantize.json"
RQ_FILE = "rq_codebooks.safetensors"
VQ_FILE = "vq_codebook.safetensors"
CODES_FILE = "codes.parquet"
STORE_FILE = "codes.sqlite"
QUALITY_JSON = "quality.json"
QUALITY_MD = "quality.md"
FOLDER_FORMAT = "qarm.quantize/1"

Log = Callable[[str], None]


@dataclass
class RQConfig:
    """Residual k-means codes (see :class:`~qarm.quantize.rq.ResidualKMeans`)."""

    levels: int = 6  # the paper's code length
    codebook_size: int | list[int] | str = 256  # per level; 256 fits a byte and gives 256^6 possible codes;
    # "auto": the largest power of two <= 256 with 39 items per centroid (faiss_ops.auto_codebook_size)
    normalize: bool = True  # aligned vectors are compared by cosine
    train_sample: int | None = None  # None: the residual chain is fitted on every item
    max_points_per_centroid: int | None = 256  # faiss's k-means subsample: 65,536 points per 256 centroids
    niter: int = 20  # Lloyd iterations per level; the objective is flat well before
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.codebook_size, str) and self.codebook_size != "auto":
            raise ConfigError(f"The 'codebook_size' parameter of RQConfig must be an int >= 1, a list of ints or "
                              f"'auto'. Got {self.codebook_size!r} instead.")
        self.build()._validate_params()  # fail at config time, with the estimator's message

    def build(self, verbose: bool = False, n_items: int | None = None) -> ResidualKMeans:
        """The estimator; ``codebook_size="auto"`` resolves on ``n_items`` (256 when it is not known)."""
        size: int | list[int] = 256 if n_items is None else faiss_ops.auto_codebook_size(n_items)
        if not isinstance(self.codebook_size, str):
            size = self.codebook_size
        return ResidualKMeans(levels=self.levels, codebook_size=size, normalize=self.normalize,
                              train_sample=self.train_sample, max_points_per_centroid=self.max_points_per_centroid,
                              niter=self.niter, random_state=self.seed, verbose=verbose)


@dataclass
class VQConfig:
    """Top-K neighbour codes (see :class:`~qarm.quantize.vq.TopKCodes`)."""

    k: int = 25  # the paper's VQ code width
    exclude_self: bool = True  # an item is not its own neighbour
    index: Literal["auto", "exact", "hnsw", "ivf"] = "auto"
    exact_threshold: int = 50_000  # exact search costs n^2 * dim: ~10 s at 50k x 64-d on 2 cores
    normalize: bool = True  # cosine similarity
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64  # recall@25 0.998 at 50k clustered 64-d items; 128: 0.9997, +50% time
    ivf_nlist: int | None = None  # None: 4 * sqrt(n)
    ivf_nprobe: int = 32
    recall_sample: int = 10_000  # catalogue items whose approximate codes are checked against exact
    seed: int = 0

    def __post_init__(self) -> None:
        self.build()._validate_params()
        check_int("VQConfig", "recall_sample", self.recall_sample, 1)

    def build(self, verbose: bool = False) -> TopKCodes:
        return TopKCodes(k=self.k, exclude_self=self.exclude_self, index=self.index,
                         exact_threshold=self.exact_threshold, normalize=self.normalize, hnsw_m=self.hnsw_m,
                         hnsw_ef_construction=self.hnsw_ef_construction, hnsw_ef_search=self.hnsw_ef_search,
                         ivf_nlist=self.ivf_nlist, ivf_nprobe=self.ivf_nprobe, random_state=self.seed,
                         verbose=verbose)


@dataclass
class QuantizeConfig:
    """The quantize stage: VQ and RQ codes of the catalogue, their quality, and a code store."""

    vq: VQConfig = field(default_factory=VQConfig)
    rq: RQConfig = field(default_factory=RQConfig)
    threads: int | None = None  # faiss OpenMP threads; None: faiss's default (one per core)
    write_store: bool = True  # also fill codes.sqlite (the embedded code store) in the folder

    def __post_init__(self) -> None:
        check_int("QuantizeConfig", "threads", self.threads, 1, none_ok=True)


@dataclass
class AssignedCodes:
    """Codes of new items from frozen codebooks.

    Attributes
    ----------
    version : str
        The folder's ``codes_version``.
    item_ids : int64 array of shape (n,) or None
    codes : dict ``"vq"`` -> (n, K) int64, ``"rq"`` -> (n, L) int64
    """

    version: str
    item_ids: np.ndarray | None
    codes: dict[str, np.ndarray]


def codes_version(rq_version: str, vq_version: str) -> str:
    """The version of a VQ + RQ code set: a hash of its two codebook versions."""
    return content_hash("codes", {"rq": rq_version, "vq": vq_version}, [])


def quantize_items(
    vectors: np.ndarray,
    item_ids: Any,
    out_dir: str | Path,
    config: QuantizeConfig | None = None,
    *,
    categories: Any = None,
    overwrite: bool = False,
    log: Log | None = None,
    progress: bool = False,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit VQ and RQ codebooks on the catalogue and write a quantize folder (atomically).

    ``inputs`` (recorded in ``quantize.json``): what the vectors were made from, e.g.
    ``{"catalogue": dataset.catalogue_digest(), "align_dir": ..., "made_from": {"dataset": ..., "vectors":
    ...}}``; ``made_from`` (digests, :mod:`qarm.provenance`) goes into the folder's ``provenance`` block, whose
    run id ``codes.parquet`` carries too. Consumers refuse codes of another catalogue or dataset
    (:meth:`qarm.features.ItemTables.build`).

    Parameters
    ----------
    vectors : float array of shape (n_items, dim)
        Aligned item vectors; row ``i`` belongs to ``item_ids[i]``.
    item_ids : int array of shape (n_items,), unique, or None for ``arange(n_items)``
    out_dir : path
        The quantize folder; replaced only once complete.
    config : QuantizeConfig
    categories : array-like of shape (n_items,) or None
        Item categories, for the purity / agreement parts of the quality report.
    overwrite : bool
        Replace an existing ``out_dir``.
    log : callable or None
        Receives one line per step (with its time).
    progress : bool
        Show progress bars on stderr.

    Returns
    -------
    dict: the summary written to ``quantize.json`` (versions, counts, seconds, recall, key quality numbers).
    """
    config = config or QuantizeConfig()
    if not isinstance(config, QuantizeConfig):
        raise ConfigError(f"config must be a QuantizeConfig, got {type(config).__name__}")
    say = log or (lambda msg: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    faiss_ops.set_num_threads(config.threads)
    x = faiss_ops.as_float32(vectors)
    ids = as_item_ids(item_ids, len(x))
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    rq = config.rq.build(verbose=progress, n_items=len(x))
    rq_codes = rq.fit_transform(x)
    seconds["rq_fit_assign"] = time.perf_counter() - start
    say(f"quantize: RQ {rq.levels} levels x {rq.codebook_sizes_} on {len(x):,} x {x.shape[1]} "
        f"in {seconds['rq_fit_assign']:.1f} s ({rq.version_})")

    start = time.perf_counter()
    vq = config.vq.build(verbose=progress)
    vq_codes = vq.fit_transform(x, ids)
    seconds["vq_fit_search"] = time.perf_counter() - start
    say(f"quantize: VQ top-{vq.k} ({vq.index_kind_}) in {seconds['vq_fit_search']:.1f} s ({vq.version_})")

    start = time.perf_counter()
    recall = vq.recall_against_exact(config.vq.recall_sample, random_state=config.vq.seed)
    seconds["vq_recall"] = time.perf_counter() - start
    if not recall["exact"]:
        say(f"quantize: VQ recall@{vq.k} vs exact {recall['recall_at_k']:.4f} on {recall['sample_size']:,} items")

    start = time.perf_counter()
    cats = None if categories is None else np.asarray(categories, dtype=object)
    quality = {
        "rq": rq_quality(rq_codes, rq.codebooks_, rq.preprocess(x), categories=cats),
        "vq": vq_quality(vq_codes, vq.item_ids_, item_ids=ids, categories=cats, recall=recall),
    }
    for entry in quality["rq"]["levels"]:
        entry["train_points_per_centroid"] = rq.n_train_ / entry["codebook_size"]
    seconds["quality"] = time.perf_counter() - start

    version = codes_version(rq.version_, vq.version_)
    run_id = provenance.new_run_id()
    summary: dict[str, Any] = {
        "format": FOLDER_FORMAT,
        "qarm_version": __version__,
        "codes_version": version,
        "rq_version": rq.version_,
        "vq_version": vq.version_,
        "config": to_dict(config),
        "n_items": int(len(x)),
        "dim": int(x.shape[1]),
        "rq": {"levels": rq.levels, "codebook_sizes": rq.codebook_sizes_, "train_mse": rq.train_mse_},
        "vq": {"k": vq.k, "index": vq.index_kind_, "recall": recall},
        "full_code_collision_rate": quality["rq"]["full_code"]["collision_rate"],
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "faiss_threads": faiss_ops.num_threads()},
        "seconds": seconds,
        "inputs": {k: v for k, v in (inputs or {}).items() if k != "made_from"},
        provenance.BLOCK: provenance.Provenance(run_id, version, dict((inputs or {}).get("made_from") or {})).to_json(),
    }

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        rq.save(tmp / RQ_FILE)
        vq.save(tmp / VQ_FILE)
        _write_codes_parquet(tmp / CODES_FILE, ids, vq_codes, rq_codes, version, run_id)
        if config.write_store:
            store = SQLiteCodeStore(tmp / STORE_FILE)
            try:
                store.put(version, ids, {"vq": vq_codes, "rq": rq_codes})
            finally:
                store.close()
        write_json(tmp / QUALITY_JSON, quality)
        atomic_write_bytes(tmp / QUALITY_MD, ("# Code quality\n\n" + render_markdown(quality)).encode())
        seconds["write"] = time.perf_counter() - t0
        write_json(tmp / META_FILE, summary)

    atomic_directory(out_dir, write)
    say(f"quantize: wrote {out_dir} in {seconds['write']:.1f} s (codes version {version})")
    return summary


def quantize_dataset(
    dataset_dir: str | Path,
    out_dir: str | Path,
    config: QuantizeConfig | None = None,
    *,
    vectors: str | None = None,
    overwrite: bool = False,
    log: Log | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`quantize_items` on a dataset folder: its items' vector column ``vectors`` (the only one
    when ``None``), its ``item_id`` column, and its ``category`` column when present."""
    from qarm.data.io import load_dataset

    dataset = load_dataset(dataset_dir, validate=False)
    available = sorted(dataset.item_vectors)
    if not available:
        raise DataError(f"{dataset_dir}: items.parquet has no vector column to quantize (run encode / align first)")
    if vectors is None:
        if len(available) > 1:
            raise ConfigError(f"{dataset_dir}: several vector columns {available}; choose one")
        vectors = available[0]
    if vectors not in dataset.item_vectors:
        raise ConfigError(f"{dataset_dir}: unknown vector column {vectors!r}; available: {available}")
    items = dataset.items
    categories = items["category"].to_numpy(dtype=object) if "category" in items.columns else None
    return quantize_items(dataset.item_vectors[vectors], items["item_id"].to_numpy(), out_dir, config,
                          categories=categories, overwrite=overwrite, log=log, progress=progress,
                          inputs={"catalogue": dataset.catalogue_digest(), "dataset_dir": str(Path(dataset_dir).resolve()),
                                  "vectors": vectors,
                                  "made_from": provenance.made_from(dataset=provenance.of_dataset(dataset.meta.provenance))})


def assign_new_items(
    out_dir: str | Path,
    vectors: np.ndarray,
    item_ids: Any = None,
    *,
    store: CodeStore | str | Path | None = None,
) -> AssignedCodes:
    """VQ and RQ codes for new vectors from the frozen codebooks of a quantize folder; nothing is refit.

    Parameters
    ----------
    out_dir : path
        A folder written by :func:`quantize_items`.
    vectors : float array of shape (n, dim)
    item_ids : int array of shape (n,) or None
        The new items' ids; needed to add them to a store. An id that is a catalogue item is excluded
        from its own VQ code (as in the catalogue's codes).
    store : CodeStore, path, URL or None
        Add the codes to this store under the folder's ``codes_version`` (a store holding another
        version raises :class:`~qarm.quantize.store.CodeVersionError`).

    Returns
    -------
    AssignedCodes
    """
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    rq = ResidualKMeans.load(out_dir / RQ_FILE)
    vq = TopKCodes.load(out_dir / VQ_FILE)
    version = codes_version(rq.version_, vq.version_)
    if version != meta.get("codes_version"):
        raise DataError(f"{out_dir}: codebooks make codes version {version}, but {META_FILE} records "
                        f"{meta.get('codes_version')}; the folder was modified")
    x = faiss_ops.as_float32(vectors, dim=rq.n_features_in_)
    ids = None if item_ids is None else as_item_ids(item_ids, len(x))
    codes = {"vq": vq.transform(x, ids), "rq": rq.transform(x)}
    if store is not None:
        if ids is None:
            raise DataError("item_ids are needed to add codes to a store")
        opened = open_store(store)
        try:
            opened.put(version, ids, codes)
        finally:
            if opened is not store:
                opened.close()
    return AssignedCodes(version=version, item_ids=ids, codes=codes)


def inspect_codes(out_dir: str | Path, *, store: CodeStore | str | Path | None = None) -> dict[str, Any]:
    """The quality report of a quantize folder, with its versions checked.

    Parameters
    ----------
    out_dir : path
    store : CodeStore, path, URL or None
        The store to check; default the folder's own ``codes.sqlite`` when present.

    Returns
    -------
    dict with ``codes_version``, ``files`` (each file's recorded version and whether it matches),
    ``store`` (its backend, location, version, item count and ``matches``), ``quality`` (the RQ and VQ
    reports), ``summary`` (counts, timings and recall from ``quantize.json``) and ``markdown``.
    """
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    version = meta["codes_version"]
    rq_meta, vq_meta = read_metadata(out_dir / RQ_FILE), read_metadata(out_dir / VQ_FILE)
    files = {
        RQ_FILE: {"version": rq_meta.get("version"), "matches": rq_meta.get("version") == meta.get("rq_version")},
        VQ_FILE: {"version": vq_meta.get("version"), "matches": vq_meta.get("version") == meta.get("vq_version")},
    }
    codes_path = out_dir / CODES_FILE
    parquet_version = parquet_run = None
    if codes_path.exists():
        schema_meta = pq.read_schema(codes_path).metadata or {}
        parquet_version = schema_meta.get(b"qarm.codes_version", b"").decode() or None
        parquet_run = schema_meta.get(provenance.RUN_ID_KEY.encode(), b"").decode() or None
    made = provenance.read(out_dir / META_FILE)
    same_run = parquet_run is None or made is None or parquet_run == made.run_id  # an older qarm: no run ids
    files[CODES_FILE] = {"version": parquet_version, "matches": parquet_version == version and same_run,
                         **({"run_id": parquet_run} if parquet_run else {})}
    try:
        quality = json.loads((out_dir / QUALITY_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{out_dir / QUALITY_JSON}: cannot read the quality report ({exc})") from exc

    store_info: dict[str, Any] | None = None
    target = store if store is not None else (out_dir / STORE_FILE if (out_dir / STORE_FILE).exists() else None)
    if target is not None:
        opened = open_store(target)
        try:
            store_info = {**opened.info(), "matches": opened.version() == version}
        finally:
            if opened is not target:
                opened.close()

    report = {
        "folder": str(out_dir),
        "codes_version": version,
        "run_id": None if made is None else made.run_id,
        "files": files,
        "store": store_info,
        "quality": quality,
        "summary": {k: meta.get(k) for k in ("n_items", "dim", "rq", "vq", "seconds", "machine")},
    }
    report["markdown"] = render_inspect_markdown(report)
    return report


def inspect_problems(report: dict[str, Any]) -> list[str]:
    """What an :func:`inspect_codes` report found wrong, one sentence each (empty: the folder is whole)."""
    folder = report["folder"]
    recorded = f"version {report['codes_version']}" + (f", run {report['run_id'][:12]}" if report.get("run_id") else "")
    problems = [f"{folder}/{name} does not match {META_FILE} (the file: version {entry['version']}"
                + (f", run {entry['run_id'][:12]}" if entry.get("run_id") else "") + f"; {META_FILE}: {recorded}): "
                f"quantize again into it (qarm quantize ... --out {folder} --overwrite)"
                for name, entry in report["files"].items() if not entry["matches"]]
    store = report.get("store")
    if store and not store["matches"]:
        problems.append(f"the store {store['location']} holds codes version {store['version']}, the folder "
                        f"{report['codes_version']}: publish the folder (qarm codes publish {folder} --to "
                        f"{store['location']} --replace)")
    return problems


def render_inspect_markdown(report: dict[str, Any]) -> str:
    """Markdown of an :func:`inspect_codes` report."""
    lines = [f"# Codes in {report['folder']}", "", f"codes version `{report['codes_version']}`", "",
             "| file | version | matches |", "|---|---|---|"]
    for name, entry in report["files"].items():
        lines.append(f"| {name} | `{entry['version']}` | {'yes' if entry['matches'] else '**NO**'} |")
    st = report.get("store")
    if st:
        lines += ["", f"Code store ({st['backend']}, {st['location']}): {st['items']:,} items, version "
                      f"`{st['version']}`" + ("" if st["matches"] else " -- **does not match the codebooks**")]
    lines += ["", render_markdown(report["quality"])]
    return "\n".join(lines)


def publish_codes(out_dir: str | Path, store: CodeStore | str | Path, *, replace: bool = False) -> dict[str, Any]:
    """Copy the codes of a quantize folder into ``store`` (e.g. ``redis://host:6379/0``).

    ``replace=True`` swaps a store holding another version to this folder's version.
    Returns the store's :meth:`~qarm.quantize.store.CodeStore.info`.
    """
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    ids, codes = read_codes(out_dir)
    opened = open_store(store)
    try:
        opened.put(meta["codes_version"], ids, codes, replace=replace)
        return opened.info()
    finally:
        if opened is not store:
            opened.close()


def read_codes(out_dir: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(item_ids, {"vq": (n, K), "rq": (n, L)})`` from a folder's ``codes.parquet``, int64."""
    path = Path(out_dir) / CODES_FILE
    if not path.exists():
        raise DataError(f"{path}: missing; is {out_dir} a quantize folder?")
    try:  # page checksums: a flipped byte is an error, never different codes
        table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read the codes ({exc}); quantize again (qarm quantize --overwrite)") from exc
    recorded = (table.schema.metadata or {}).get(b"qarm.codes_version", b"").decode() or None
    meta_path = Path(out_dir) / META_FILE
    if recorded is not None and meta_path.exists():
        expected = _read_meta(Path(out_dir)).get("codes_version")
        if expected is not None and recorded != expected:
            raise DataError(f"{path} holds codes of version {recorded}, but {meta_path} records {expected}: the folder "
                            "mixes two quantize runs; quantize again into it (qarm quantize --overwrite)")
    file_run = (table.schema.metadata or {}).get(provenance.RUN_ID_KEY.encode(), b"").decode() or None
    provenance.check_run_id(path, file_run, meta_path, provenance.read(meta_path),
                            f"quantize again into it (qarm quantize ... --out {out_dir} --overwrite)")
    names = table.column_names
    ids = table.column("item_id").to_numpy().astype(np.int64)
    codes = {}
    for prefix in ("vq", "rq"):
        cols = sorted((c for c in names if c.startswith(prefix + "_")), key=lambda c: int(c.split("_")[1]))
        codes[prefix] = np.stack([table.column(c).to_numpy() for c in cols], axis=1).astype(np.int64)
    return ids, codes


def check_quantize_folder(out_dir: str | Path, dataset: provenance.Provenance | None, dataset_label: str, *,
                          fix: str = "pass the --codes folder quantized from this dataset's vectors, or quantize "
                                     "them (qarm quantize)") -> provenance.Provenance | None:
    """The quantize folder's provenance, after checking that it was made from the dataset whose provenance is
    ``dataset`` (else :class:`~qarm.provenance.ProvenanceMismatch`, ending with ``fix``). ``codes.parquet``'s
    run id is checked where it is read (:func:`read_codes`)."""
    out_dir = Path(out_dir)
    made = provenance.read(out_dir / META_FILE)
    provenance.check_made_from(out_dir, made, "dataset", dataset_label, dataset, fix)
    return made


def _write_codes_parquet(path: Path, ids: np.ndarray, vq_codes: np.ndarray, rq_codes: np.ndarray,
                         version: str, run_id: str) -> None:
    rq_type = pa.int16() if max(rq_codes.max(initial=0), 0) < 2**15 else pa.int32()
    columns = {"item_id": pa.array(ids, type=pa.int64())}
    columns |= {f"vq_{j}": pa.array(vq_codes[:, j], type=pa.int64()) for j in range(vq_codes.shape[1])}
    columns |= {f"rq_{j}": pa.array(rq_codes[:, j]).cast(rq_type) for j in range(rq_codes.shape[1])}
    table = pa.table(columns).replace_schema_metadata({"qarm.codes_version": version, provenance.RUN_ID_KEY: run_id})
    pq.write_table(table, path, compression="zstd", write_page_checksum=True)


def _read_meta(out_dir: Path) -> dict[str, Any]:
    path = out_dir / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing; is {out_dir} a quantize folder written by qarm quantize?") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if meta.get("format") != FOLDER_FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r} is not {FOLDER_FORMAT!r}")
    return meta

"""Serving bundles: a trained ranking run frozen into one versioned, hash-checked folder.

:func:`export_bundle` (``qarm export RUN_DIR --to MODELS_DIR``) copies what a server needs and nothing
it does not (no interaction log, no optimiser state) into ``MODELS_DIR/versions/<version>/``, marks it
ready and makes it current by swapping one pointer file atomically; :func:`load_bundle` reads one back,
every file checked against the SHA-256 recorded in its manifest *before* it is parsed::

    MODELS_DIR/
      CURRENT                      the current version's name (replaced atomically: os.replace)
      versions/<version>/
        bundle.json                manifest: format, version, model name + config, tasks, sizes,
                                   codes / codebook versions, the run it came from, file hashes
        weights.safetensors        the model's learned weights (state_dict)
        tables.safetensors         per-item tables (ID vocabulary, VQ / RQ codes, frozen vectors, category
                                   codes), per-user side-feature codes, the log's positives (histories)
        ids.parquet                kind ("item" / "user"), dense id, source_id
        rq_codebooks.safetensors   the frozen RQ codebooks (qarm.quantize.rq)
        vq_codebook.safetensors    the VQ catalogue: item ids, aligned vectors, faiss index (faiss's own
                                   serialisation, for approximate kinds)
        encoder/                   the aligned content encoder (qarm.encode.content.save_encoder)
        READY                      written last: a version without it is never loaded

A version's name sorts by export time (``v<UTC time>-<content hash>``); ``keep`` bounds how many are
kept (the current one is never deleted). Everything is JSON, Parquet or safetensors: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load as load_numpy_bytes
from safetensors.numpy import save as save_numpy
from safetensors.torch import load as load_torch_bytes
from safetensors.torch import save as save_torch

from qarm import __version__, provenance
from qarm.data import schema as S
from qarm.data.io import atomic_write_bytes, load_dataset, write_json
from qarm.errors import ConfigError, DataError, QarmError
from qarm.features.examples import ExampleSource, FeatureSpec
from qarm.features.tables import ItemTables
from qarm.models import recorded_model_config, recorded_ranking_config
from qarm.paths import temporary
from qarm.train.continual import VOCABULARY_FILE

BUNDLE_FORMAT = "qarm.bundle/1"
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
MANIFEST_FILE = "bundle.json"
READY_FILE = "READY"
WEIGHTS_FILE = "weights.safetensors"
TABLES_FILE = "tables.safetensors"
IDS_FILE = "ids.parquet"
RQ_FILE = "rq_codebooks.safetensors"
VQ_FILE = "vq_codebook.safetensors"
ENCODER_DIR = "encoder"
OPTIMIZER_FILE = "optimizer.safetensors"  # a `qarm learn` version's Adam moments, for the next update (optional)
ADDED_KIND = "added"  # ids.parquet rows of the live store's added items a `qarm learn` version learned (id: ordinal)
SERVABLE_MODELS = ("qarm", "baseline", "id_only")  # the models whose batch is (user, item, history, side)
DEFAULT_ROW = "+ VQ & RQ"

Log = Callable[[str], None]


class BundleError(QarmError):
    """A bundle that cannot be served: incomplete, corrupt, or of another codebook version."""


@dataclass(frozen=True)
class RunFolders:
    """Where a trained ranking run and its inputs live."""

    run_dir: Path  # the ranking run (report.json, train/best.safetensors)
    dataset_dir: Path
    quantize_dir: Path | None
    align_dir: Path | None
    row: str | None  # the ablation row it was trained for, when found through one


def find_run(path: str | Path, *, row: str | None = None, seed: int | None = None) -> RunFolders:
    """The ranking run to export from ``path``: a ``qarm run`` folder (``data/ align/ quantize/ rank/``; the
    run of ablation ``row``, default QARM's ``+ VQ & RQ``, first seed unless ``seed``) or one ranking run
    folder inside such a folder (``<out>/rank/runs/<key>/seed<s>``)."""
    path = Path(path)
    if (path / "report.json").exists() and (path / "train").is_dir():  # one ranking run
        inputs = json.loads((path / "report.json").read_text(encoding="utf-8")).get("inputs")
        if inputs:  # a run that names its inputs (a warm start: qarm.train.continual)
            quantize, align = (None if inputs.get(k) is None else _optional(Path(inputs[k]))
                               for k in ("quantize_dir", "align_dir"))
            return RunFolders(path, Path(inputs["dataset_dir"]), quantize, align, None)
        out = path.parents[3] if len(path.parents) > 3 else path.parent
        return RunFolders(path, run_data_dir(out), _optional(out / "quantize"), _optional(out / "align"), None)
    ablation = path / "rank" / "ablation.json"
    if not ablation.exists():
        raise DataError(f"{path}: neither a `qarm run` folder (no rank/ablation.json) nor a ranking run "
                        "(no report.json + train/)")
    variants = json.loads(ablation.read_text(encoding="utf-8"))["variants"]
    if row is None:
        row = DEFAULT_ROW if DEFAULT_ROW in variants else next(
            (name for name, v in variants.items() if v["model"] == "qarm"), None)
        if row is None:
            raise DataError(f"{ablation}: no QARM row to export; name one with --row (rows: {sorted(variants)})")
    if row not in variants:
        raise ConfigError(f"{ablation}: no row {row!r}; rows: {sorted(variants)}")
    seeds = variants[row]["seeds"]
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise ConfigError(f"{ablation}: row {row!r} was trained with seeds {seeds}, not {seed}")
    run = path / "rank" / "runs" / variants[row]["run_key"] / f"seed{seed}"
    return RunFolders(run, run_data_dir(path), _optional(path / "quantize"), _optional(path / "align"), row)


RUN_INPUTS_FILE = "inputs.json"  # in a `qarm run` folder started from a prepared folder (qarm run --data)


def run_data_dir(out: Path) -> Path:
    """The dataset folder of a ``qarm run`` folder: ``<out>/data``, or the prepared folder it was started
    from (``inputs.json``, written by ``qarm run --data``)."""
    inputs = out / RUN_INPUTS_FILE
    if inputs.exists():
        try:
            return Path(json.loads(inputs.read_text(encoding="utf-8"))["data"])
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{inputs}: cannot read the run's inputs ({exc})") from exc
    return out / "data"


def _optional(folder: Path) -> Path | None:
    return folder if folder.exists() else None


# ------------------------------------------------------------------------------------------------ export

def export_bundle(run_dir: str | Path, models_dir: str | Path, *, row: str | None = None, seed: int | None = None,
                  keep: int = 3, version: str | None = None, make_current: bool = True,
                  log: Log | None = None) -> dict[str, Any]:
    """Write a serving bundle of a trained ranking run; return its manifest.

    Parameters
    ----------
    run_dir : path
        A ``qarm run`` folder or a ranking run inside one (see :func:`find_run`).
    models_dir : path
        The bundles' folder; the new version goes to ``versions/<version>/``.
    row, seed : which ablation row and seed to export from a ``qarm run`` folder.
    keep : int
        Versions kept after this one is written (oldest removed first; the current one never).
    version : str or None
        The version's name; None: ``v<UTC time>-<hash of weights and tables>``.
    make_current : bool
        Swap ``CURRENT`` to the new version (atomically).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"keep must be an int >= 1, got {keep!r}")
    say = log or (lambda line: None)
    folders = find_run(run_dir, row=row, seed=seed)
    report = json.loads((folders.run_dir / "report.json").read_text(encoding="utf-8"))
    ranking = recorded_ranking_config(report["config"], report.get("qarm_version"))  # complete for this qarm
    model_name = ranking["model"]
    if model_name not in SERVABLE_MODELS:
        raise ConfigError(f"{folders.run_dir}: model {model_name!r} cannot be served yet; servable: "
                          f"{list(SERVABLE_MODELS)}")
    weights_path = folders.run_dir / "train" / "best.safetensors"
    if not weights_path.exists():
        raise DataError(f"{folders.run_dir}: no train/best.safetensors (the run did not finish)")
    if folders.quantize_dir is None:
        raise DataError(f"{folders.run_dir}: no quantize folder beside it; new items need the RQ / VQ codebooks")
    if folders.align_dir is None or not (folders.align_dir / "encoder").is_dir():
        raise DataError(f"{folders.run_dir}: no align/encoder beside it; new items need the aligned encoder")

    start = time.perf_counter()
    dataset = load_dataset(folders.dataset_dir)
    upstream = check_run_inputs(folders, report, provenance.of_dataset(dataset.meta.provenance))
    source = ExampleSource(dataset, history_length=int(ranking["history_length"]))
    tables = ItemTables.build(source, quantize_dir=folders.quantize_dir, align_dir=folders.align_dir)
    vocabulary = folders.run_dir / "train" / VOCABULARY_FILE
    if vocabulary.exists():  # a warm-started run's grown ID vocabulary (qarm.train.continual)
        tables = dataclasses.replace(tables, id_index=load_numpy_bytes(vocabulary.read_bytes())["id_index"])
    if tables.digest() != report["tables"]["digest"]:
        raise DataError(f"{folders.run_dir} was trained on other item tables (digest {report['tables']['digest']}) "
                        f"than {folders.quantize_dir} and {folders.align_dir} make now ({tables.digest()})")
    weights = _read_weights(weights_path)
    arrays = _tables_arrays(tables, source)
    weights_bytes, tables_bytes = save_torch(weights), save_numpy(arrays)
    content = hashlib.sha256(weights_bytes + tables_bytes).hexdigest()[:12]
    version = version or version_name(weights_bytes + tables_bytes)
    _check_version_name(version)
    quantize_meta = json.loads((folders.quantize_dir / "quantize.json").read_text(encoding="utf-8"))
    category_values = _category_values(dataset)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "qarm_version": __version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "model": model_name,
        "model_config": ranking["model_config"],
        "ranking_config": ranking,
        # a calibrated run (RankingConfig.calibration): the service applies scale * logit + bias per task
        "calibration": _calibration(report, list(source.tasks)),
        "tasks": list(source.tasks),
        "spec": _spec_dict(source.spec),
        "history_length": source.history_length,
        "codes_version": tables.codes_version,
        "rq_version": quantize_meta.get("rq_version"),
        "vq_version": quantize_meta.get("vq_version"),
        "rq_sizes": list(tables.rq_sizes),
        "category_values": category_values,
        "user_feature_columns": [name for name, _ in source.spec.user_features],
        "dataset": {"name": dataset.meta.name, "n_items": dataset.n_items, "n_users": dataset.n_users,
                    "positives": source.history.n_positives},
        "source": {"run_dir": str(folders.run_dir), "row": folders.row, "seed": report.get("seed"),
                   "tables_digest": tables.digest(), "metrics": _overall(report)},
        "files": {},
        provenance.BLOCK: provenance.Provenance(provenance.new_run_id(), f"bundle-{content}",
                                                provenance.made_from(**upstream)).to_json(),
    }
    quantize_dir, align_dir = folders.quantize_dir, folders.align_dir

    def write_files(tmp: Path) -> None:
        (tmp / WEIGHTS_FILE).write_bytes(weights_bytes)
        (tmp / TABLES_FILE).write_bytes(tables_bytes)
        _ids_frame(dataset).to_parquet(tmp / IDS_FILE, index=False, write_page_checksum=True)
        shutil.copyfile(quantize_dir / "rq_codebooks.safetensors", tmp / RQ_FILE)
        shutil.copyfile(quantize_dir / "vq_codebook.safetensors", tmp / VQ_FILE)
        shutil.copytree(align_dir / "encoder", tmp / ENCODER_DIR)

    final, removed = commit_version(models_dir, manifest, write_files, keep=keep, make_current=make_current)
    say(f"export: {model_name} -> {final} in {time.perf_counter() - start:.1f} s"
        + (f" (current; removed {removed})" if removed else " (current)" if make_current else ""))
    return manifest


def _calibration(report: dict[str, Any], tasks: list[str]) -> dict[str, Any] | None:
    """The run's fitted calibration (method, per-task scale and bias), checked against its tasks; or None."""
    fitted = report.get("calibration")
    if not fitted or fitted.get("skipped"):
        return None
    if fitted.get("tasks") != tasks or len(fitted["scale"]) != len(tasks) or len(fitted["bias"]) != len(tasks):
        raise DataError(f"the run's calibration covers tasks {fitted.get('tasks')}, the model predicts {tasks}")
    return {"method": fitted["method"], "scale": [float(v) for v in fitted["scale"]],
            "bias": [float(v) for v in fitted["bias"]], "tasks": tasks}


def version_name(content: bytes) -> str:
    """``v<UTC time>-<12 hex digits of the content's SHA-256>``: names sort by export time."""
    return f"v{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{hashlib.sha256(content).hexdigest()[:12]}"


def commit_version(models_dir: str | Path, manifest: dict[str, Any], write_files: Callable[[Path], None], *,
                   keep: int = 3, make_current: bool = True) -> tuple[Path, list[str]]:
    """Write a bundle version atomically: ``write_files(tmp)`` fills a temporary folder beside
    ``versions/<manifest["version"]>``, the manifest (its ``files`` hashes filled in here) and ``READY`` go
    in last, one rename makes the version appear whole, then ``CURRENT`` is swapped (``make_current``) and
    old versions pruned beyond ``keep``. Anything raised before the rename leaves no trace; a version is
    never overwritten. Returns the version's folder and the pruned versions."""
    version = str(manifest["version"])
    _check_version_name(version)
    models_dir = Path(models_dir)
    final = models_dir / VERSIONS_DIR / version
    if final.exists():
        raise DataError(f"{final} already exists; versions are never overwritten")
    tmp = temporary(final)
    tmp.mkdir(parents=True)
    try:
        write_files(tmp)
        manifest["files"] = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / MANIFEST_FILE, manifest)
        (tmp / READY_FILE).write_text(_sha256(tmp / MANIFEST_FILE) + "\n", encoding="utf-8")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        set_current(models_dir, version)
    return final, prune_versions(models_dir, keep, protect=(version,))


RETRAIN = ("its inputs were replaced after it was trained: train it again on these folders (qarm run OUT --fresh, "
           "or qarm train ... --fresh) before exporting it")


def check_run_inputs(folders: RunFolders, report: dict[str, Any], dataset: provenance.Provenance | None
                     ) -> dict[str, provenance.Provenance | None]:
    """Refuse a ranking run whose report records other dataset / codes / vectors digests than the folders
    beside it hold now (:class:`~qarm.provenance.ProvenanceMismatch`). Returns the provenance of each input
    (``dataset``, ``codes``, ``vectors``, ``model``: the run itself), for the bundle's record."""
    made = provenance.Provenance.from_json(report.get(provenance.BLOCK))
    upstream: dict[str, provenance.Provenance | None] = {
        "dataset": dataset,
        "codes": None if folders.quantize_dir is None else provenance.read(folders.quantize_dir / "quantize.json"),
        "vectors": None if folders.align_dir is None else provenance.read(folders.align_dir / "align_report.json"),
    }
    given = {"dataset": folders.dataset_dir, "codes": folders.quantize_dir, "vectors": folders.align_dir}
    for kind, record in upstream.items():
        provenance.check_made_from(folders.run_dir, made, kind, f"{given[kind]}", record, RETRAIN)
    return upstream | {"model": made}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_torch_bytes(path.read_bytes())
    if any(k.startswith("model/") for k in state):
        state = {k[6:]: v for k, v in state.items() if k.startswith("model/")}
    return {k: v.contiguous() for k, v in state.items()}


def _tables_arrays(tables: ItemTables, source: ExampleSource) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"id_index": tables.id_index}
    if tables.vq is not None:
        arrays["vq"] = tables.vq
    if tables.rq is not None:
        arrays["rq"] = tables.rq
    for name, value in tables.vectors.items():
        arrays[f"vectors/{name}"] = value
    if source.item_category is not None:
        arrays["item_category"] = source.item_category
    if source.user_feature_codes is not None:
        arrays["user_feature_codes"] = source.user_feature_codes
    # The log's positives, every split, in (user, seq) order: what a user's history is made of at serving.
    history = source.history
    arrays["history_items"] = history.items
    arrays["history_time"] = history.time
    arrays["history_offsets"] = np.searchsorted(history.users, np.arange(source.spec.n_users + 1)).astype(np.int64)
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def _spec_dict(spec: FeatureSpec) -> dict[str, Any]:
    return {"n_users": spec.n_users, "n_items": spec.n_items, "tasks": list(spec.tasks),
            "user_features": [[n, s] for n, s in spec.user_features], "n_categories": spec.n_categories,
            "history_length": spec.history_length}


def _category_values(dataset: Any) -> list[str] | None:
    if S.CATEGORY not in dataset.items.columns:
        return None
    _, uniques = pd.factorize(dataset.items[S.CATEGORY], sort=True)
    return [str(u) for u in uniques]


def _ids_frame(dataset: Any) -> pd.DataFrame:
    items = dataset.items[[S.ITEM_ID, S.SOURCE_ID]].assign(kind="item")
    users = dataset.users[[S.USER_ID, S.SOURCE_ID]].rename(columns={S.USER_ID: S.ITEM_ID}).assign(kind="user")
    frame = pd.concat([items, users], ignore_index=True).rename(columns={S.ITEM_ID: "id"})
    frame[S.SOURCE_ID] = frame[S.SOURCE_ID].astype(str)
    return frame[["kind", "id", S.SOURCE_ID]]


def _overall(report: dict[str, Any]) -> dict[str, Any]:
    return {task: {k: segments.get("overall", {}).get(k) for k in ("auc", "gauc", "logloss")}
            for task, segments in report.get("metrics", {}).items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_version_name(version: str) -> None:
    if not version or version.startswith(".") or "/" in version or "\\" in version or len(version) > 128:
        raise ConfigError(f"bad version name {version!r}: letters, digits, '.', '-', '_' only, not starting with '.'")


# ------------------------------------------------------------------------------------------------ pointer

def current_version(models_dir: str | Path) -> str | None:
    """The version ``CURRENT`` names, or None when no bundle was made current yet."""
    path = Path(models_dir) / CURRENT_FILE
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def set_current(models_dir: str | Path, version: str) -> None:
    """Make ``version`` (a ready bundle) current: one atomic rename of the pointer file."""
    models_dir = Path(models_dir)
    folder = models_dir / VERSIONS_DIR / version
    if not (folder / READY_FILE).exists():
        raise BundleError(f"{folder}: not a ready bundle (no {READY_FILE}); it cannot be made current")
    atomic_write_bytes(models_dir / CURRENT_FILE, (version + "\n").encode("utf-8"))


def list_versions(models_dir: str | Path) -> list[str]:
    """Ready versions, oldest first."""
    root = Path(models_dir) / VERSIONS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / READY_FILE).exists())


def prune_versions(models_dir: str | Path, keep: int, protect: tuple[str, ...] = ()) -> list[str]:
    """Remove the oldest ready versions beyond ``keep`` (never the current one, nor those in ``protect``);
    return their names."""
    current = current_version(models_dir)
    kept = {current, *protect} - {None}
    versions = [v for v in list_versions(models_dir) if v not in kept]
    excess = len(versions) + len(kept) - keep
    removed = versions[:max(excess, 0)]
    for name in removed:
        shutil.rmtree(Path(models_dir) / VERSIONS_DIR / name, ignore_errors=True)
    return removed


# ------------------------------------------------------------------------------------------------ load

@dataclass
class Bundle:
    """A loaded bundle: the manifest and the checked bytes of its files, parsed."""

    path: Path
    manifest: dict[str, Any]
    weights: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray]
    item_source_ids: np.ndarray  # object (n_items,): dense item id -> source_id
    user_source_ids: np.ndarray  # object (n_users,)
    # object (m,): the live store's added items (ordinals 0..m-1) this bundle learned ID rows for
    # (``arrays["added_id_index"]``; a ``qarm learn`` version), empty for an exported run
    added_source_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=object))
    optimizer_bytes: bytes | None = None  # the hash-checked optimizer.safetensors of a `qarm learn` version

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def codes_version(self) -> str | None:
        value = self.manifest.get("codes_version")
        return None if value is None else str(value)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.manifest["tasks"])

    def spec(self) -> FeatureSpec:
        s = self.manifest["spec"]
        return FeatureSpec(n_users=int(s["n_users"]), n_items=int(s["n_items"]), tasks=tuple(s["tasks"]),
                           user_features=tuple((str(n), int(k)) for n, k in s["user_features"]),
                           n_categories=int(s["n_categories"]), history_length=int(s["history_length"]))

    def item_tables(self) -> ItemTables:
        a = self.arrays
        vectors = {k.split("/", 1)[1]: v for k, v in a.items() if k.startswith("vectors/")}
        return ItemTables(id_index=a["id_index"], vq=a.get("vq"), rq=a.get("rq"),
                          rq_sizes=tuple(int(s) for s in self.manifest["rq_sizes"]), vectors=vectors,
                          codes_version=self.codes_version)


def load_bundle(folder: str | Path) -> Bundle:
    """Read a bundle folder; every file is checked against its manifest's SHA-256 before it is parsed.

    Raises
    ------
    BundleError
        Not ready, another format, a file missing, changed or unlisted.
    """
    folder = Path(folder)
    if not (folder / READY_FILE).exists():
        raise BundleError(f"{folder}: not a ready bundle (no {READY_FILE})")
    manifest_bytes = _read(folder / MANIFEST_FILE)
    if (folder / READY_FILE).read_text(encoding="utf-8").strip() != hashlib.sha256(manifest_bytes).hexdigest():
        raise BundleError(f"{folder / MANIFEST_FILE}: its hash does not match {READY_FILE}; the bundle was modified")
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as exc:
        raise BundleError(f"{folder / MANIFEST_FILE}: not JSON ({exc})") from exc
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder}: format {manifest.get('format')!r} is not {BUNDLE_FORMAT!r}")
    files: dict[str, str] = manifest.get("files") or {}
    for name in (WEIGHTS_FILE, TABLES_FILE, IDS_FILE, RQ_FILE, VQ_FILE):
        if name not in files:
            raise BundleError(f"{folder}: the manifest lists no {name}")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST_FILE, READY_FILE}
    unlisted = sorted(present - set(files))
    if unlisted:
        raise BundleError(f"{folder}: files the manifest does not list: {unlisted[:5]}; the bundle was modified")
    contents: dict[str, bytes] = {}
    for name, digest in files.items():
        data = _read(folder / name)
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"{folder / name}: SHA-256 differs from the manifest's; the file is corrupt or was "
                              "replaced")
        contents[name] = data
    try:
        weights = load_torch_bytes(contents[WEIGHTS_FILE])
        arrays = dict(load_numpy_bytes(contents[TABLES_FILE]))
        ids = pd.read_parquet(io.BytesIO(contents[IDS_FILE]))
    except Exception as exc:  # a hash-checked file that still does not parse: a bundle of another build
        raise BundleError(f"{folder}: cannot parse its files ({type(exc).__name__}: {exc})") from exc
    # the model settings as today's qarm reads them (a default that changed since the bundle was written
    # keeps the value it had then)
    version = manifest.get("qarm_version")
    manifest["model_config"] = recorded_model_config(str(manifest["model"]), manifest["model_config"], version)
    if isinstance(manifest.get("ranking_config"), dict):
        manifest["ranking_config"] = recorded_ranking_config(manifest["ranking_config"], version)
    spec = manifest["spec"]
    items = ids[ids["kind"] == "item"].sort_values("id")
    users = ids[ids["kind"] == "user"].sort_values("id")
    if len(items) != spec["n_items"] or len(users) != spec["n_users"]:
        raise BundleError(f"{folder / IDS_FILE}: {len(items)} items and {len(users)} users, the manifest says "
                          f"{spec['n_items']} and {spec['n_users']}")
    added = ids[ids["kind"] == ADDED_KIND].sort_values("id")
    if len(added) != len(arrays.get("added_id_index", ())):
        raise BundleError(f"{folder / IDS_FILE}: {len(added)} added items, {TABLES_FILE} has ID rows for "
                          f"{len(arrays.get('added_id_index', ()))}")
    return Bundle(folder, manifest, weights, arrays, items[S.SOURCE_ID].astype(str).to_numpy(dtype=object),
                  users[S.SOURCE_ID].astype(str).to_numpy(dtype=object),
                  added[S.SOURCE_ID].astype(str).to_numpy(dtype=object), contents.get(OPTIMIZER_FILE))


def load_current(models_dir: str | Path) -> Bundle:
    """The bundle ``CURRENT`` names."""
    version = current_version(models_dir)
    if version is None:
        raise BundleError(f"{models_dir}: no current bundle ({CURRENT_FILE} missing); run qarm export first")
    return load_bundle(Path(models_dir) / VERSIONS_DIR / version)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or exc})") from exc

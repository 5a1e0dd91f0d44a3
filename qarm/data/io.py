"""Reading and writing dataset folders (Parquet + ``meta.json``), atomically.

Modality vectors are stored inside ``items.parquet`` as ``fixed_size_list<float32>[dim]`` columns, so a
dataset is one self-describing set of files; in memory they are ``(n_items, dim)`` float32 arrays
(:attr:`Dataset.item_vectors`), converted without a Python loop.

Writes go to a temporary sibling folder that is renamed into place only when every file is complete:
a failure (bad data, a full disk, a killed process) leaves the previous folder, or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qarm import provenance
from qarm.data import schema as S
from qarm.data.schema import Dataset, DatasetMeta
from qarm.data.validate import validate_dataset
from qarm.errors import DataError
from qarm.paths import temporary

DATA_FILES = (S.ITEMS_FILE, S.INTERACTIONS_FILE, S.USERS_FILE)  # each carries the prepare's run id


def save_dataset(dataset: Dataset, out_dir: str | Path, *, overwrite: bool = False,
                 made_from: dict[str, str] | None = None) -> Path:
    """Validate ``dataset`` and write it to ``out_dir`` atomically. Returns the folder. ``meta.provenance``
    records a new run id, the content digest and ``made_from`` (e.g. the source files' fingerprint)."""
    out_dir = Path(out_dir)
    validate_dataset(dataset)
    if out_dir.exists() and not overwrite:
        raise DataError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    dataset.meta.counts = dataset.compute_counts()
    run_id = provenance.new_run_id()
    digest = provenance.content_digest(
        "dataset", {"items": dataset.items, "interactions": dataset.interactions, "users": dataset.users},
        dataset.item_vectors)

    def write(tmp: Path) -> None:
        _write_table(_items_table(dataset), tmp / S.ITEMS_FILE, run_id)
        _write_table(pa.Table.from_pandas(dataset.interactions, preserve_index=False), tmp / S.INTERACTIONS_FILE,
                     run_id)
        _write_table(pa.Table.from_pandas(dataset.users, preserve_index=False), tmp / S.USERS_FILE, run_id)
        if dataset.ground_truth:
            (tmp / S.GROUND_TRUTH_DIR).mkdir()
            for name, table in dataset.ground_truth.items():
                _write_table(pa.Table.from_pandas(table, preserve_index=False),
                             tmp / S.GROUND_TRUTH_DIR / f"{name}.parquet", run_id)
        dataset.meta.provenance = provenance.Provenance(run_id, digest, dict(made_from or {})).to_json()
        write_json(tmp / S.META_FILE, dataset.meta.to_json())

    atomic_directory(out_dir, write)
    return out_dir


def load_dataset(path: str | Path, *, validate: bool = True, ground_truth: bool = False) -> Dataset:
    """Read a dataset folder written by :func:`save_dataset`."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a dataset folder (it does not exist or is not a directory)")
    meta_path = path / S.META_FILE
    try:
        meta_json = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{meta_path}: missing; is {path} a prepared dataset folder?") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: cannot read meta.json ({exc})") from exc
    version = meta_json.get("schema_version")
    if version != S.SCHEMA_VERSION:
        raise DataError(
            f"{meta_path}: schema_version {version!r} is not supported (this qarm reads {S.SCHEMA_VERSION})"
        )
    meta = DatasetMeta.from_json(meta_json)
    tables = {name: _read_table(path / name) for name in DATA_FILES}
    made = provenance.Provenance.from_json(meta.provenance)
    for name, table in tables.items():  # every file of the folder comes from the prepare that wrote meta.json
        run_id = (table.schema.metadata or {}).get(provenance.RUN_ID_KEY.encode())
        provenance.check_run_id(path / name, run_id.decode("utf-8", "replace") if run_id else None, meta_path, made,
                                f"prepare it again (qarm data prepare ... --out {path} --overwrite)")
    items, vectors = _split_vectors(tables[S.ITEMS_FILE], path / S.ITEMS_FILE)
    dataset = Dataset(
        items=items,
        interactions=tables[S.INTERACTIONS_FILE].to_pandas(),
        users=tables[S.USERS_FILE].to_pandas(),
        meta=meta,
        item_vectors=vectors,
    )
    gt_dir = path / S.GROUND_TRUTH_DIR
    if ground_truth and gt_dir.is_dir():
        dataset.ground_truth = {p.stem: _read_table(p).to_pandas() for p in sorted(gt_dir.glob("*.parquet"))}
    if validate:
        try:
            validate_dataset(dataset)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc
    return dataset


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON through a temporary name (numpy values become plain ones)."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_directory(out_dir: Path, write: Any) -> None:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``out_dir``; on any error remove ``tmp_dir``.

    An existing ``out_dir`` is replaced only after the new one is complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(out_dir)
    tmp.mkdir()
    try:
        write(tmp)
        if out_dir.exists():
            old = temporary(out_dir, "old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary name in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _items_table(dataset: Dataset) -> pa.Table:
    table = pa.Table.from_pandas(dataset.items, preserve_index=False)
    for name, vectors in dataset.item_vectors.items():
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
        table = table.append_column(name, pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
    return table


def _split_vectors(table: pa.Table, file: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    vectors: dict[str, np.ndarray] = {}
    scalar_names = []
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_fixed_size_list(column.type):
            dim = column.type.list_size
            chunks = column.combine_chunks()
            if chunks.null_count:
                raise DataError("null modality vectors", file=str(file), column=name,
                                ids=np.flatnonzero(chunks.is_null().to_numpy(zero_copy_only=False)))
            flat = chunks.flatten().to_numpy(zero_copy_only=False)
            vectors[name] = np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)
        elif pa.types.is_list(column.type) and pa.types.is_floating(column.type.value_type):
            raise DataError(
                "variable-length float lists are not modality vectors; store fixed_size_list<float32>",
                file=str(file), column=name,
            )
        else:
            scalar_names.append(name)
    return table.select(scalar_names).to_pandas(), vectors


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise DataError(f"{path}: missing file")
    try:
        return pq.read_table(path, page_checksum_verification=True)  # a flipped byte is an error, not data
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read Parquet ({exc})") from exc


def _write_table(table: pa.Table, path: Path, run_id: str | None = None) -> None:
    pq.write_table(provenance.with_run_id(table, run_id), path, compression="zstd", write_page_checksum=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

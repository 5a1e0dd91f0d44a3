"""Provenance: what every stage folder was made from, and one run id shared by all of its files.

Each stage writes a ``provenance`` block into its JSON manifest::

    {"run_id": "<uuid hex>", "digest": "<kind>-<16 hex>", "made_from": {"dataset": "dataset-...", ...}}

* ``digest`` names what the folder holds, by content: ``dataset-`` (``qarm data prepare``: its items,
  interactions, users and item vectors), ``vectors-`` (``qarm align``: the pre-trained and aligned vectors),
  ``codes-`` (``qarm quantize``: its codes version, a hash of both codebooks), ``model-`` (a ranking run:
  ``train/best.safetensors``). Re-running a stage on the same input gives the same digest.
* ``made_from`` holds the digests of the folders it read (``dataset``, ``vectors``, ``codes``, ``model``).
* ``run_id`` is also written into the metadata of the Parquet and safetensors files the stage writes
  (key ``qarm.run_id``), so a file copied in from another run is told apart from the folder's own.

Consumers call :func:`check_made_from` (the folder they read was made from the dataset / vectors / codes
they were given) and :func:`check_run_id` (a file belongs to its folder's run). A mismatch raises
:class:`ProvenanceMismatch`, naming both digests (short form) and the flag or command that fixes it.

Folders written by an older qarm have no ``provenance`` block or no ``qarm.run_id`` in their files: they
are accepted without these checks (the item-count and catalogue checks still apply); re-running the stage
adds the block.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qarm.errors import DataError

RUN_ID_KEY = "qarm.run_id"  # the key in Parquet schema metadata and safetensors metadata
BLOCK = "provenance"  # the key of the block in a stage's JSON manifest
SHORT = 12  # hex digits shown in messages
_CHUNK = 1 << 20


class ProvenanceMismatch(DataError):
    """A folder or file was made from another run's artifact than the one given with it."""


@dataclass(frozen=True)
class Provenance:
    """One stage folder's record: its run id, the digest of what it holds, the digests it was made from."""

    run_id: str
    digest: str
    made_from: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "digest": self.digest, "made_from": dict(self.made_from)}

    @classmethod
    def from_json(cls, data: Any) -> Provenance | None:
        """None for a manifest without a (well-formed) block: a folder of an older qarm."""
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
            return None
        made_from = data.get("made_from")
        if not isinstance(made_from, dict):
            made_from = {}
        return cls(data["run_id"], str(data.get("digest") or ""),
                   {str(k): str(v) for k, v in made_from.items() if v is not None})


def of_dataset(meta_provenance: Any) -> Provenance | None:
    """A dataset's provenance from its ``meta.provenance`` (None: written by an older qarm)."""
    return Provenance.from_json(meta_provenance)


def made_from(**upstream: Provenance | None) -> dict[str, str]:
    """``made_from`` of a new record: kind -> the digest of each upstream record that has one."""
    return {kind: made.digest for kind, made in upstream.items() if made is not None and made.digest}


def new_run_id() -> str:
    """A fresh run id (32 hex digits)."""
    return uuid.uuid4().hex


def short(digest: str | None) -> str:
    """``dataset-3f2a9c01b2d4`` for ``dataset-3f2a9c01b2d4e5f6``; ``none`` for None."""
    if not digest:
        return "none"
    kind, _, value = digest.rpartition("-")
    return f"{kind}-{value[:SHORT]}" if kind else value[:SHORT]


def file_digest(kind: str, paths: Iterable[Path]) -> str:
    """``<kind>-<16 hex>``: SHA-256 over the names and bytes of ``paths`` (read in 1 MiB chunks)."""
    h = hashlib.sha256(kind.encode() + b"\0")
    for path in paths:
        h.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return f"{kind}-{h.hexdigest()[:16]}"


def content_digest(kind: str, frames: dict[str, Any] | None = None, arrays: dict[str, Any] | None = None) -> str:
    """``<kind>-<16 hex>``: SHA-256 over the content of DataFrames (column names, dtypes, a hash per row) and
    arrays (dtype, shape, bytes), independent of the files' metadata: a stage re-run on the same input that
    writes the same content has the same digest (its run id differs)."""
    import numpy as np
    import pandas as pd

    h = hashlib.sha256(kind.encode() + b"\0")
    for name, frame in (frames or {}).items():
        h.update(f"{name}:{list(map(str, frame.columns))}:{[str(t) for t in frame.dtypes]};".encode())
        try:
            rows = pd.util.hash_pandas_object(frame, index=False)
        except TypeError:  # unhashable cells (lists): hash their text
            rows = pd.util.hash_pandas_object(frame.astype(str), index=False)
        h.update(np.ascontiguousarray(rows.to_numpy()).tobytes())
    for name, value in sorted((arrays or {}).items()):
        value = np.ascontiguousarray(value)
        h.update(f"{name}:{value.dtype}:{value.shape};".encode())
        h.update(value.tobytes())
    return f"{kind}-{h.hexdigest()[:16]}"


def source_fingerprint(source: str | Path) -> str | None:
    """``source-<16 hex>`` of a dataset's original files (a file or a folder): their relative names, sizes and
    the SHA-256 of their first and last MiB (bounded cost on multi-GB sources). None when ``source`` is not
    a readable file or folder (generated data)."""
    root = Path(source)
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.is_file() else []
        if not files:
            return None
        h = hashlib.sha256(b"source\0")
        for path in files:
            size = path.stat().st_size
            h.update(f"{path.relative_to(root) if root.is_dir() else path.name}:{size};".encode())
            with open(path, "rb") as f:
                h.update(f.read(_CHUNK))
                if size > 2 * _CHUNK:
                    f.seek(size - _CHUNK)
                    h.update(f.read(_CHUNK))
    except OSError:
        return None
    return f"source-{h.hexdigest()[:16]}"


MANIFESTS = {"dataset": "meta.json", "vectors": "align_report.json", "codes": "quantize.json"}  # kind -> file


def made_from_folders(**folders: str | Path | None) -> dict[str, str]:
    """``made_from`` of a folder made from the stage folders given by kind (``dataset=``, ``vectors=``,
    ``codes=``; None: not used), read from their manifests (:data:`MANIFESTS`)."""
    return made_from(**{kind: read(Path(folder) / MANIFESTS[kind]) for kind, folder in folders.items()
                        if folder is not None})


def read(manifest: Path) -> Provenance | None:
    """The provenance block of a stage's JSON manifest; None when the file or the block is absent."""
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest}: cannot read it ({exc})") from exc
    return Provenance.from_json(data.get(BLOCK)) if isinstance(data, dict) else None


def check_folder(manifest: Path, files: Iterable[Path], fix: str) -> Provenance | None:
    """The provenance of the folder of ``manifest``, after checking that each of ``files`` (Parquet or
    safetensors; absent ones are skipped) carries the folder's run id."""
    made = read(manifest)
    if made is not None:
        for path in files:
            if path.is_file():
                check_run_id(path, run_id_of(path), manifest, made, fix)
    return made


def check_made_from(folder: Path, made: Provenance | None, kind: str, given: str | Path, upstream: Provenance | None,
                    fix: str) -> None:
    """Refuse ``folder`` when it records being made from a ``kind`` other than ``given`` (whose own record is
    ``upstream``). Either record missing (an older qarm): no check."""
    if made is None or upstream is None:
        return
    recorded = made.made_from.get(kind)
    if recorded is None or not upstream.digest or recorded == upstream.digest:
        return
    raise ProvenanceMismatch(f"{folder} was made from {short(recorded)}, but {given} is {short(upstream.digest)}: "
                             f"they belong to different runs; {fix}")


def check_run_id(file: Path, file_run_id: str | None, manifest: Path, made: Provenance | None, fix: str) -> None:
    """Refuse a file whose run id is not its folder's (a file copied in from another run, or a folder left
    half replaced). A file or manifest without a run id (an older qarm): no check."""
    if made is None or file_run_id is None or file_run_id == made.run_id:
        return
    raise ProvenanceMismatch(f"{file} belongs to run {file_run_id[:SHORT]}, but {manifest} records run "
                             f"{made.run_id[:SHORT]}: the folder mixes two runs; {fix}")


def parquet_run_id(path: Path) -> str | None:
    """The ``qarm.run_id`` in a Parquet file's schema metadata (footer only), or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read Parquet ({exc})") from exc
    value = metadata.get(RUN_ID_KEY.encode())
    return value.decode("utf-8", errors="replace") if value else None


def safetensors_run_id(path: Path) -> str | None:
    """The ``qarm.run_id`` in a safetensors file's metadata (header only), or None."""
    from qarm.quantize._safetensors import read_metadata

    return read_metadata(path).get(RUN_ID_KEY)


def run_id_of(path: Path) -> str | None:
    """The run id in a Parquet (``.parquet``) or safetensors file's metadata, or None."""
    return parquet_run_id(path) if path.suffix == ".parquet" else safetensors_run_id(path)


def with_run_id(table: Any, run_id: str | None) -> Any:
    """A pyarrow Table whose schema metadata also carries ``run_id`` (unchanged when None)."""
    if run_id is None:
        return table
    metadata = dict(table.schema.metadata or {})
    metadata[RUN_ID_KEY.encode()] = run_id.encode()
    return table.replace_schema_metadata(metadata)

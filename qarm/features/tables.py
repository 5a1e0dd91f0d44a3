"""Per-item lookup tables a ranking model holds: ID vocabulary, VQ codes, RQ codes, frozen vectors.

Row ``i`` of every table belongs to item ``i`` (ids are dense, see :mod:`qarm.data.schema`):

* ``id_index`` ``(n_items,)``: the item's row in the ID embedding table. Row 0 is the out-of-vocabulary
  bucket shared by every item that is never a training target: cold-start items (held out on
  purpose) and items without training rows. Such an item has no trained ID embedding of its own but
  keeps its codes and vector, which is the point of QARM's codes for cold start.
* ``vq`` ``(n_items, K)``: VQ codes, the ids of the item's K most similar catalogue items, most
  similar first (:class:`~qarm.quantize.vq.TopKCodes`).
* ``rq`` ``(n_items, L)``: RQ codes, one code per level, level ``l`` in ``0..rq_sizes[l]-1``.
* ``vectors`` name -> ``(n_items, D)`` float32: frozen item vectors (``"pretrained"``, ``"aligned"``),
  the cascading baseline's input.
* ``texts`` (optional) ``n_items`` strings and ``modalities`` name -> ``(n_items, D)`` float32: the raw
  content of each item (its text, :func:`qarm.encode.text.item_texts`, and the dataset's modality
  vectors), for models that encode content end to end (EM3). Models that do not use them ignore them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qarm.errors import DataError
from qarm.features.examples import ExampleSource
from qarm.quantize.api import META_FILE as QUANTIZE_META
from qarm.quantize.api import check_quantize_folder, read_codes

OOV = 0  # the ID-vocabulary row of out-of-vocabulary items


@dataclass
class ItemTables:
    """Item-side lookups, numpy; a model copies what it uses into buffers.

    Attributes
    ----------
    id_index : int64 array (n_items,)
        ID-vocabulary rows: :data:`OOV` (0) or ``1..n_vocab``.
    vq : int64 array (n_items, K) or None
        VQ codes (catalogue item ids, -1 where fewer than K neighbours exist).
    rq : int64 array (n_items, L) or None
        RQ codes.
    rq_sizes : tuple of int
        Codebook size of each RQ level.
    vectors : dict name -> float32 array (n_items, D)
    codes_version : str or None
        The quantize folder's ``codes_version``.
    texts : list of n_items str, or None
        Each item's text (end-to-end content models).
    modalities : dict name -> float32 array (n_items, D)
        The dataset's modality vectors (``Dataset.item_vectors``: image, audio, ...), raw.
    catalogue_size : int or None
        Items ``0..catalogue_size-1`` are the VQ catalogue; None: all of them (see :attr:`n_catalogue`).
    """

    id_index: np.ndarray
    vq: np.ndarray | None = None
    rq: np.ndarray | None = None
    rq_sizes: tuple[int, ...] = ()
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    codes_version: str | None = None
    texts: list[str] | None = None
    modalities: dict[str, np.ndarray] = field(default_factory=dict)
    catalogue_size: int | None = None

    @property
    def n_items(self) -> int:
        return len(self.id_index)

    @property
    def n_catalogue(self) -> int:
        """VQ codes name items ``0..n_catalogue-1`` (the catalogue the VQ codebook was fit on): ``n_items``
        unless a server appended items after it (``catalogue_size``), which codes never name."""
        return self.n_items if self.catalogue_size is None else self.catalogue_size

    @property
    def n_vocab(self) -> int:
        """Items with their own ID embedding (the table has ``n_vocab + 1`` rows, OOV included)."""
        return int(self.id_index.max(initial=0))

    @property
    def vq_k(self) -> int:
        return 0 if self.vq is None else int(self.vq.shape[1])

    @property
    def rq_levels(self) -> int:
        return 0 if self.rq is None else int(self.rq.shape[1])

    @classmethod
    def build(cls, source: ExampleSource, *, quantize_dir: str | Path | None = None,
              align_dir: str | Path | None = None, vectors: dict[str, np.ndarray] | None = None,
              texts: Sequence[str] | None = None, modalities: dict[str, np.ndarray] | None = None) -> ItemTables:
        """Tables for the items of ``source``.

        Parameters
        ----------
        source : ExampleSource
            Its training rows define the ID vocabulary; its cold-start items are out of vocabulary.
        quantize_dir : path or None
            A quantize folder (``qarm quantize``): VQ and RQ codes of every item.
        align_dir : path or None
            An alignment folder (``qarm align``): ``pretrained`` and ``aligned`` vectors.
        vectors : dict name -> (n_items, D) array, or None
            Further frozen vectors (override those of ``align_dir`` with the same name).
        texts : sequence of n_items str, or None
            Item texts for end-to-end content models (EM3), e.g. ``item_texts(dataset)``.
        modalities : dict name -> (n_items, D) array, or None
            Raw modality vectors for end-to-end content models, e.g. ``dataset.item_vectors``.
        """
        n = source.spec.n_items
        vocab = source.training_items()
        vocab = vocab[~source.item_cold[vocab]]
        id_index = np.full(n, OOV, dtype=np.int64)
        id_index[vocab] = np.arange(1, len(vocab) + 1)
        tables = cls(id_index=id_index)
        if quantize_dir is not None:
            _check_catalogue(Path(quantize_dir) / QUANTIZE_META, ("inputs", "catalogue"), source, "--codes")
            check_quantize_folder(quantize_dir, source.provenance, source.origin)
            tables.vq, tables.rq, tables.rq_sizes, tables.codes_version = _read_codes(Path(quantize_dir), n)
        if align_dir is not None:
            from qarm.align.contrastive import read_alignment  # the align stage's torch/encoder imports
            from qarm.align.stage import check_align_folder

            _check_catalogue(Path(align_dir) / "align_report.json", ("dataset", "catalogue"), source, "--vectors")
            check_align_folder(align_dir, source.provenance, source.origin)
            aligned, _ = read_alignment(align_dir)
            tables.vectors.update(aligned)
        tables.vectors.update(vectors or {})
        for name, value in tables.vectors.items():
            if value.ndim != 2 or value.shape[0] != n:
                raise DataError(f"vectors {name!r} must be (n_items={n}, dim), got {value.shape}")
            tables.vectors[name] = np.ascontiguousarray(value, dtype=np.float32)
        if texts is not None:
            tables.texts = [str(t) for t in texts]
            if len(tables.texts) != n:
                raise DataError(f"texts must hold one text per item (n_items={n}), got {len(tables.texts)}")
        for name, value in (modalities or {}).items():
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.ndim != 2 or value.shape[0] != n:
                raise DataError(f"modality {name!r} must be (n_items={n}, dim), got {value.shape}")
            tables.modalities[name] = value
        return tables

    def describe(self) -> dict[str, object]:
        return {"n_items": self.n_items, "n_vocab": self.n_vocab, "vq_k": self.vq_k, "rq_sizes": list(self.rq_sizes),
                "vectors": {k: int(v.shape[1]) for k, v in self.vectors.items()}, "codes_version": self.codes_version,
                "texts": None if self.texts is None else len(self.texts),
                "modalities": {k: int(v.shape[1]) for k, v in self.modalities.items()}, "digest": self.digest()}

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the vocabulary, the codes and the frozen vectors: two runs that read
        other codes or vectors (a re-quantised or re-aligned catalogue) never pass for each other. Texts
        and modality vectors are the dataset's own content and are left out (tables with and without
        them, built for different models of one ablation, have one digest)."""
        h = hashlib.sha256()
        arrays = {"id_index": self.id_index, "vq": self.vq, "rq": self.rq,
                  **{f"vectors/{k}": v for k, v in sorted(self.vectors.items())}}
        for name, value in arrays.items():
            if value is not None:
                value = np.ascontiguousarray(value)
                h.update(f"{name}:{value.dtype}:{value.shape};".encode())
                h.update(value.data)
        h.update(json.dumps(list(self.rq_sizes)).encode())
        return h.hexdigest()[:16]


def _check_catalogue(report: Path, keys: tuple[str, str], source: ExampleSource, flag: str) -> None:
    """Refuse a folder made for another item catalogue (its report records the catalogue digest; folders
    written before the digest was recorded are accepted on their item count, as before)."""
    if not report.exists():
        return
    try:
        recorded = (json.loads(report.read_text(encoding="utf-8")).get(keys[0]) or {}).get(keys[1])
    except (OSError, ValueError) as exc:
        raise DataError(f"{report}: cannot read it ({exc})") from exc
    if recorded is not None and recorded != source.catalogue:
        raise DataError(f"{report.parent} was made for item catalogue {recorded}, the dataset is {source.catalogue}: codes "
                        f"and vectors of one catalogue mean nothing to another; pass the {flag} folder made from this "
                        "dataset (or make one: qarm align / qarm quantize)")


def _read_codes(folder: Path, n_items: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], str | None]:
    ids, codes = read_codes(folder)
    if len(ids) and (ids.min() < 0 or ids.max() >= n_items):
        raise DataError(f"{folder}: codes for item ids outside the dataset's 0..{n_items - 1}",
                        ids=ids[(ids < 0) | (ids >= n_items)])
    have = np.zeros(n_items, dtype=bool)
    have[ids] = True
    if not have.all():
        raise DataError(f"{folder}: no codes for some of the dataset's items (quantize the whole catalogue)",
                        ids=np.flatnonzero(~have))
    vq = np.full((n_items, codes["vq"].shape[1]), -1, dtype=np.int64)
    rq = np.zeros((n_items, codes["rq"].shape[1]), dtype=np.int64)
    vq[ids], rq[ids] = codes["vq"], codes["rq"]
    if (vq >= n_items).any():
        raise DataError(f"{folder}: VQ codes name items outside the dataset", ids=np.unique(vq[vq >= n_items]))
    sizes = [int(rq[:, level].max(initial=0)) + 1 for level in range(rq.shape[1])]
    version = None
    meta_path = folder / QUANTIZE_META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        recorded = (meta.get("rq") or {}).get("codebook_sizes")
        if recorded and len(recorded) == len(sizes):
            sizes = [max(int(r), s) for r, s in zip(recorded, sizes)]
        version = meta.get("codes_version")
    if (rq < 0).any():
        raise DataError(f"{folder}: negative RQ codes", ids=np.flatnonzero((rq < 0).any(axis=1)))
    return vq, rq, tuple(sizes), version

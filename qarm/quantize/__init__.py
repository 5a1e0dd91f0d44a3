"""Quantitative codes: VQ and RQ semantic IDs, their quality, new-item codes, and a code store.

QARM's answer to representation unlearning: aligned item vectors become discrete code ids that a
ranking model gives learnable embeddings.

* :class:`ResidualKMeans` (``rq.py``): RQ codes, one faiss k-means per level on the residuals;
* :class:`TopKCodes` (``vq.py``): VQ codes, the ids of an item's top-K most similar catalogue items;
* ``quality.py``: utilisation, entropy, reconstruction error, collisions, category purity, recall;
* ``store.py``: :class:`CodeStore` with an embedded SQLite backend and a Redis backend;
* ``api.py``: one function per command (:func:`quantize_items`, :func:`assign_new_items`,
  :func:`inspect_codes`, :func:`publish_codes`);
* ``faiss_ops.py``: the only module that calls faiss.
"""

from qarm.quantize.api import (
    AssignedCodes,
    QuantizeConfig,
    RQConfig,
    VQConfig,
    assign_new_items,
    codes_version,
    inspect_codes,
    publish_codes,
    quantize_dataset,
    quantize_items,
    read_codes,
)
from qarm.quantize.quality import render_markdown, rq_quality, vq_quality
from qarm.quantize.rq import NotFittedError, ResidualKMeans
from qarm.quantize.store import CodeStore, CodeVersionError, RedisCodeStore, SQLiteCodeStore, open_store
from qarm.quantize.vq import TopKCodes

__all__ = [
    "AssignedCodes",
    "CodeStore",
    "CodeVersionError",
    "NotFittedError",
    "QuantizeConfig",
    "RQConfig",
    "RedisCodeStore",
    "ResidualKMeans",
    "SQLiteCodeStore",
    "TopKCodes",
    "VQConfig",
    "assign_new_items",
    "codes_version",
    "inspect_codes",
    "open_store",
    "publish_codes",
    "quantize_dataset",
    "quantize_items",
    "read_codes",
    "render_markdown",
    "rq_quality",
    "vq_quality",
]

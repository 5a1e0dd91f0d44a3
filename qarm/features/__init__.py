"""Ranking features (the paper's section 2.4): histories without look-ahead, the batch, item tables.

* ``history.py``: :class:`HistoryIndex`, each example's latest ``n`` past positives, vectorised;
* ``batch.py``: :class:`RankingBatch`, the one typed batch of training, evaluation and serving;
* ``examples.py``: :class:`ExampleSource`, a prepared dataset as numpy arrays, cut into batches;
* ``tables.py``: :class:`ItemTables`, per-item ID vocabulary, VQ / RQ codes and frozen vectors.
"""

from qarm.features.batch import RankingBatch
from qarm.features.examples import ExampleSource, FeatureSpec
from qarm.features.history import PAD, HistoryIndex
from qarm.features.tables import OOV, ItemTables

__all__ = ["OOV", "PAD", "ExampleSource", "FeatureSpec", "HistoryIndex", "ItemTables", "RankingBatch"]

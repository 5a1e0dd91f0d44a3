"""Training ranking models.

* ``trainer.py``: :func:`train` (Adam, early stopping on validation, resumable safetensors checkpoints,
  DDP-ready) and :func:`predict` (scores of a split, the input of :mod:`qarm.evaluate.metrics`);
* ``stage.py``: :func:`train_ranking`, one ranking run end to end (features, tables, model, training,
  evaluation, report): one row of an ablation table.
"""

from qarm.train.stage import RankingConfig, train_ranking
from qarm.train.trainer import (
                                TrainConfig,
                                TrainHistory,
                                TrainResult,
                                load_weights,
                                loss_fn,
                                predict,
                                train,
                                validation_metrics,
)

__all__ = ["RankingConfig", "TrainConfig", "TrainHistory", "TrainResult", "load_weights", "loss_fn", "predict",
           "train", "train_ranking", "validation_metrics"]

"""Ranking models, each readable top to bottom in one file on the shared parts of ``layers.py``.

* ``layers.py``: MLP, DIN target attention, MMoE, ID / VQ / RQ / frozen-vector embeddings, code matching;
* ``baseline.py``: :class:`BaselineRanker`, IDs + DIN + frozen pre-trained vector + MMoE (and ID-only);
* ``qarm.py``: :class:`QARMRanker`, the baseline plus aligned vector, VQ and RQ codes, code matching.

:data:`MODELS` names the models; :func:`build_model` builds one from a name, the dataset's
:class:`~qarm.features.FeatureSpec`, the :class:`~qarm.features.ItemTables` and a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from qarm.config import from_dict, to_dict
from qarm.errors import ConfigError
from qarm.features.examples import FeatureSpec
from qarm.features.tables import ItemTables
from qarm.models.baseline import BaselineConfig, BaselineRanker
from qarm.models.em3 import EM3Config, EM3Ranker
from qarm.models.fgcnn import FGCNNConfig, FGCNNRanker
from qarm.models.layers import MMoEConfig
from qarm.models.qarm import QARMConfig, QARMRanker


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its class, its config class, and config values the name fixes."""

    model: type[nn.Module]
    config: type
    fixed: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


MODELS: dict[str, ModelEntry] = {
    "id_only": ModelEntry(BaselineRanker, BaselineConfig, {"use_frozen_vector": False},
                          "item / user IDs + DIN attention over the history + MMoE"),
    "baseline": ModelEntry(BaselineRanker, BaselineConfig, {"use_frozen_vector": True},
                           "id_only + the frozen pre-trained item vector (the cascading baseline)"),
    "qarm": ModelEntry(QARMRanker, QARMConfig, {},
                       "baseline + aligned vector, VQ codes, RQ codes, code-matching sequences (switches)"),
    "em3": ModelEntry(EM3Ranker, EM3Config, {},
                      "EM3: item text (cached MiniLM + top layers with LoRA) and modality vectors fused by a "
                      "Q-Former, trained end to end beside IDs + DIN + MMoE, content-ID contrastive loss"),
    "fgcnn": ModelEntry(FGCNNRanker, FGCNNConfig, {},
                        "FGCNN: CNN-generated features + IPNN over user / item / side / mean-history ID fields"),
}


# Defaults that changed, oldest first: (the first qarm version with the new defaults, the model, the settings'
# values before). A run's config lists only the settings that differ from its writer's defaults, so reading an
# artifact back (a run report, a checkpoint, a bundle), a setting it does not name takes the value its writer's
# qarm had: see :func:`recorded_model_config`.
DEFAULT_CHANGES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    # 32-d sequences and target: training 1.3x and prediction 1.5x faster at the same test GAUC (RESULTS.md)
    ("0.2.0", "qarm", {"sequence_dim": None, "target_dim": None}),
)


def recorded_model_config(name: str, recorded: dict[str, Any], qarm_version: str | None) -> dict[str, Any]:
    """The model settings an artifact written by qarm ``qarm_version`` recorded, as a config dict for today's
    qarm: each setting whose default changed since, and that the artifact does not name, gets the value it had
    then. ``qarm_version`` None (unknown) counts as older than every change; a complete record (every setting
    named) is returned as it is."""
    filled = dict(recorded)
    for since, model, before in DEFAULT_CHANGES:  # the oldest change after the writer's version decides
        if model == name and _version_before(qarm_version, since):
            for key, value in before.items():
                filled.setdefault(key, value)
    return filled


def recorded_ranking_config(ranking: dict[str, Any], qarm_version: str | None) -> dict[str, Any]:
    """A recorded ranking config (``RankingConfig`` as a dict: ``model``, ``model_config``, ...) with its model
    settings completed by :func:`recorded_model_config`."""
    return {**ranking, "model_config": recorded_model_config(str(ranking["model"]), ranking.get("model_config") or {},
                                                            qarm_version)}


def _version_before(version: str | None, than: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split("."))

    return version is None or parts(version) < parts(than)


def model_config(name: str, config: Any = None) -> Any:
    """The typed config of model ``name`` from a dict (unknown keys rejected), a config, or None."""
    entry = _entry(name)
    if config is None or isinstance(config, dict):
        data = dict(config or {})
        for key, value in entry.fixed.items():
            if key in data and data[key] != value:
                raise ConfigError(f"model {name!r} fixes {key}={value!r}; got {data[key]!r} (use another model)")
            data[key] = value
        return from_dict(entry.config, data, where=f"model {name}")
    if not isinstance(config, entry.config):
        raise ConfigError(f"model {name!r} takes a {entry.config.__name__}, got {type(config).__name__}")
    for key, value in entry.fixed.items():
        if getattr(config, key) != value:
            raise ConfigError(f"model {name!r} fixes {key}={value!r}; got {getattr(config, key)!r}")
    return config


def build_model(name: str, spec: FeatureSpec, tables: ItemTables, config: Any = None, *, seed: int = 0) -> nn.Module:
    """Build model ``name`` with initial weights drawn from ``seed`` (the global RNG is left as it was).

    Parameters
    ----------
    name : one of :data:`MODELS`
    spec : FeatureSpec, e.g. ``ExampleSource.spec``
    tables : ItemTables
    config : dict, the model's config dataclass, or None (defaults)
    seed : int

    Returns
    -------
    nn.Module with ``forward(batch: RankingBatch) -> logits (B, T)``, and attributes ``config``,
    ``tasks`` and ``model_name``.
    """
    entry = _entry(name)
    typed = model_config(name, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.model(spec, tables, typed)
    cast(Any, model).model_name = name  # a plain attribute (nn.Module types attributes as tensors / modules)
    return model


def describe_model(model: nn.Module) -> dict[str, Any]:
    """Name, config and parameter count of a built model (JSON-ready)."""
    return {"name": getattr(model, "model_name", type(model).__name__), "class": type(model).__name__,
            "config": to_dict(getattr(model, "config", None)) if getattr(model, "config", None) else None,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    return MODELS[name]


__all__ = ["DEFAULT_CHANGES", "MODELS", "BaselineConfig", "BaselineRanker", "MMoEConfig", "ModelEntry", "QARMConfig",
           "QARMRanker", "build_model", "describe_model", "model_config", "recorded_model_config",
           "recorded_ranking_config"]

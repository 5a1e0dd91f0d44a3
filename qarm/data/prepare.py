"""``qarm data prepare``: load a source with its loader, split it, sample negatives, validate, save."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qarm import provenance
from qarm.config import to_dict
from qarm.data.io import save_dataset
from qarm.data.loaders import load
from qarm.data.negatives import NegativeConfig, add_sampled_negatives
from qarm.data.schema import Dataset
from qarm.data.splits import SplitConfig, split_dataset
from qarm.data.validate import validate_dataset


@dataclass
class PrepareConfig:
    split: SplitConfig = field(default_factory=SplitConfig)
    negatives: NegativeConfig = field(default_factory=NegativeConfig)


def prepare_dataset(dataset: Dataset, config: PrepareConfig | None = None) -> Dataset:
    """Split (with the cold-start hold-out and long-tail groups), then add sampled negatives."""
    config = config or PrepareConfig()
    dataset = split_dataset(dataset, config.split)
    dataset = add_sampled_negatives(dataset, config.negatives)
    dataset.meta.config = {**dataset.meta.config, "prepare": to_dict(config)}
    if dataset.meta.seed is None:  # generated data keeps its generator seed; real data records the split seed
        dataset.meta.seed = config.split.seed
    dataset.meta.counts = dataset.compute_counts()
    return validate_dataset(dataset)


def prepare(
    name: str,
    out: str | Path,
    *,
    source: str | Path | None = None,
    loader_options: dict[str, Any] | None = None,
    config: PrepareConfig | None = None,
    overwrite: bool = False,
) -> tuple[Path, Dataset, dict[str, float]]:
    """Load ``name`` from ``source``, prepare it and write it to ``out``. Returns the folder, the dataset
    and the seconds each step took."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dataset = load(name, source, loader_options)
    timings["load"] = time.perf_counter() - start
    start = time.perf_counter()
    dataset = prepare_dataset(dataset, config)
    timings["split_and_negatives"] = time.perf_counter() - start
    dataset.meta.config = {**dataset.meta.config, "loader_options": dict(loader_options or {})}
    start = time.perf_counter()
    fingerprint = provenance.source_fingerprint(dataset.meta.source) if dataset.meta.source else None
    path = save_dataset(dataset, out, overwrite=overwrite, made_from={"source": fingerprint} if fingerprint else None)
    timings["save"] = time.perf_counter() - start
    return path, dataset, timings

"""The ranking stage as one library function: data + codes + vectors -> a trained model and its report.

:func:`train_ranking` builds the examples (:class:`~qarm.features.ExampleSource`), the item tables
(:class:`~qarm.features.ItemTables`), the model (:func:`~qarm.models.build_model`), trains it
(:func:`~qarm.train.trainer.train`), scores the evaluation split and measures it
(:func:`~qarm.evaluate.metrics.evaluate_predictions`). One call is one row of an ablation table; a
caller running many rows passes one ``source`` to all of them so the Parquet files are read once.

Out folder::

    train/                checkpoint.safetensors, state.json, best.safetensors (resume)
    predictions.parquet   the evaluation split's scores (user_id, item_id, label_*, score_*, ...)
    report.json           config, seed, versions, model, data, history, speed, metrics
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qarm import __version__, provenance
from qarm.config import from_dict, to_dict
from qarm.data.io import write_json
from qarm.distributed import is_main_process, rank, world_size
from qarm.errors import ConfigError
from qarm.evaluate.metrics import OVERALL, evaluate_predictions
from qarm.evaluate.report import worse_than_constant
from qarm.features.examples import ExampleSource
from qarm.features.tables import ItemTables
from qarm.models import build_model, describe_model, model_config
from qarm.quantize._common import check_option
from qarm.train.calibration import METHODS, calibrate
from qarm.train.trainer import BEST_FILE, TrainConfig, device_of, predict_logits, predictions_frame, train

REPORT_FILE = "report.json"
PREDICTIONS_FILE = "predictions.parquet"
TRAIN_DIR = "train"


@dataclass
class RankingConfig:
    """One ranking run: which model with which switches, how long the history, how to train."""

    model: str = "qarm"  # see qarm.models.MODELS
    model_config: dict[str, Any] = field(default_factory=dict)  # the model's own config (switches, sizes)
    history_length: int = 50  # the paper's user-side sequence length
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_split: str = "test"  # the split the report measures (validation drives early stopping)
    calibration: str = "none"
    """Post-hoc calibration of the trained model's probabilities (:mod:`qarm.train.calibration`), fitted on
    the validation split after training: ``"temperature"`` or ``"platt"``; ``"none"`` keeps the raw outputs.
    A monotone map per task: AUC and GAUC are unchanged, the log loss of an over-confident model falls. The
    report keeps the uncalibrated log loss beside the calibrated metrics; an exported bundle serves the
    calibrated probabilities."""

    def __post_init__(self) -> None:
        model_config(self.model, self.model_config)  # unknown model or keys fail here, with the message
        if self.eval_split not in ("valid", "test"):
            raise ConfigError(f"The 'eval_split' parameter of RankingConfig must be 'valid' or 'test'. "
                              f"Got {self.eval_split!r} instead.")
        check_option("RankingConfig", "calibration", self.calibration, ("none", *METHODS))
        if self.calibration != "none" and self.eval_split == "valid":
            raise ConfigError("RankingConfig: calibration is fitted on the valid split, so the report cannot "
                              "measure eval_split='valid' with it (the fit would see the rows it is scored on).")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RankingConfig:
        return from_dict(cls, data, where="ranking")


CONTENT_MODELS = ("em3",)  # models that encode item content themselves: their tables carry texts and modalities


def build_tables(source: ExampleSource, dataset_dir: str | Path | None, model: str | Sequence[str], *,
                 quantize_dir: str | Path | None = None, align_dir: str | Path | None = None) -> ItemTables:
    """The item tables the model(s) need: codes and frozen vectors, and for content models (EM3) the items'
    texts and modality vectors, read from ``dataset_dir``."""
    models = [model] if isinstance(model, str) else list(model)
    texts = modalities = None
    if any(m in CONTENT_MODELS for m in models):
        if dataset_dir is None:
            raise ConfigError(f"{[m for m in models if m in CONTENT_MODELS]} read item texts: give the dataset folder")
        from qarm.data.io import load_dataset
        from qarm.encode.text import item_texts

        dataset = load_dataset(dataset_dir)
        texts, modalities = item_texts(dataset), dict(dataset.item_vectors)
    return ItemTables.build(source, quantize_dir=quantize_dir, align_dir=align_dir, texts=texts, modalities=modalities)


def run_provenance(run_id: str, out_dir: Path, source: ExampleSource, quantize_dir: str | Path | None,
                   align_dir: str | Path | None, **more: provenance.Provenance | None) -> provenance.Provenance:
    """A ranking run's record (:mod:`qarm.provenance`): its best weights' digest, and the dataset, codes and
    vectors (and ``more``, e.g. the last model of a warm start) it was trained from."""
    best = out_dir / TRAIN_DIR / BEST_FILE
    return provenance.Provenance(run_id, provenance.file_digest("model", [best]) if best.is_file() else "",
                                 {**provenance.made_from(dataset=source.provenance, **more),
                                  **provenance.made_from_folders(codes=quantize_dir, vectors=align_dir)})


def run_flags(report: dict[str, Any]) -> list[str]:
    """What makes a run's numbers suspect, as short sentences: a task whose validation GAUC stayed below
    0.5 at every validation (the model learnt the labels backwards: a leaky split or sampler), and a task
    whose overall log loss on the evaluated split is worse than always predicting its base rate."""
    flags = []
    skipped = (report.get("calibration") or {}).get("skipped")
    if skipped:
        flags.append(f"calibration not applied (the predictions are the raw ones): {skipped}")
    evals = report.get("history", {}).get("evals") or []
    for task, segments in report["metrics"].items():
        values = [e["valid"][task]["gauc"] for e in evals if task in e.get("valid", {})]
        values = [v for v in values if v is not None and v == v]
        if values and max(values) < 0.5:
            flags.append(f"{task}: validation GAUC below 0.5 at every validation (best {100 * max(values):.2f})")
        if worse_than_constant(segments.get(OVERALL)):
            flags.append(f"{task}: {report.get('eval_split', 'test')} log loss "
                         f"{segments[OVERALL]['logloss']:.4f} worse than the constant base rate's "
                         f"{segments[OVERALL]['constant_logloss']:.4f}")
    return flags


def train_ranking(dataset_dir: str | Path | None, out_dir: str | Path, config: RankingConfig | None = None, *,
                  quantize_dir: str | Path | None = None, align_dir: str | Path | None = None,
                  source: ExampleSource | None = None, tables: ItemTables | None = None, resume: bool = True,
                  progress: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one ranking model; write ``out_dir`` and return its report.

    Parameters
    ----------
    dataset_dir : path or None
        A prepared dataset folder; may be None when ``source`` is given.
    out_dir : path
    config : RankingConfig
    quantize_dir, align_dir : paths or None
        Codes (``qarm quantize``) and frozen vectors (``qarm align``) for the item tables.
    source, tables : optional, already built (shared across the runs of an ablation)
    resume : bool
        Continue an interrupted run from ``out_dir/train``.
    progress, log : progress bar and one line per validation

    Returns
    -------
    dict, also written to ``report.json``: ``metrics`` is :func:`evaluate_predictions`'s report on
    ``eval_split``; ``examples_per_second`` the training speed (all ranks together).

    Inside a process group (torchrun, ``qarm train --nproc N``) every rank trains its share of each batch
    (:mod:`qarm.train.trainer`); rank 0 alone evaluates and writes, the other ranks return
    ``{"rank": r, "history": ...}`` once training ends.
    """
    config = config or RankingConfig()
    main = is_main_process()
    say = log if log is not None and main else (lambda line: None)
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if source is None:
        if dataset_dir is None:
            raise ConfigError("train_ranking needs a dataset_dir or a source")
        source = ExampleSource.from_folder(dataset_dir, history_length=config.history_length)
    elif source.history_length != config.history_length:
        raise ConfigError(f"the source was built with history_length={source.history_length}, the config asks "
                          f"for {config.history_length}")
    if tables is None:
        tables = build_tables(source, dataset_dir, config.model, quantize_dir=quantize_dir, align_dir=align_dir)
    seconds["features"] = time.perf_counter() - start

    model = build_model(config.model, source.spec, tables, config.model_config, seed=config.train.seed)
    say(f"ranking: {config.model} ({describe_model(model)['parameters']:,} parameters) on "
        f"{len(source.rows('train')):,} training rows")
    start = time.perf_counter()
    result = train(model, source, config.train, out_dir / TRAIN_DIR, resume=resume, progress=progress, log=log)
    seconds["train"] = time.perf_counter() - start
    if not main:
        return {"rank": rank(), "history": result.history.to_dict()}

    start = time.perf_counter()
    groups = (source.meta.prepared.get("split") or {}).get("longtail_groups") or []
    n_groups = len(groups) or int(source.item_longtail.max(initial=0))
    rows = source.rows(config.eval_split)
    logits = predict_logits(result.model, source, rows, batch_size=config.train.eval_batch_size,
                            precision=config.train.precision)  # one forward pass, calibrated or not
    calibration: dict[str, Any] | None = None
    if config.calibration != "none":
        raw_metrics = evaluate_predictions(predictions_frame(source, rows, logits), list(source.tasks),
                                           n_longtail_groups=n_groups)
        uncalibrated = {t: {k: raw_metrics[t][OVERALL][k] for k in ("gauc", "logloss")} for t in source.tasks}
        try:
            calibrated = calibrate(result.model, source, "valid", config.calibration,
                                   batch_size=config.train.eval_batch_size)
        except ConfigError as exc:  # e.g. logits that rank valid rows worse than chance: keep the raw outputs
            calibration = {"method": config.calibration, "fitted_on": "valid", "skipped": str(exc),
                           "uncalibrated": uncalibrated}
        else:
            logits = logits * calibrated.scale + calibrated.bias  # what the Calibrated module's forward computes
            calibration = {"method": calibrated.method, "fitted_on": "valid", "scale": calibrated.scale.tolist(),
                           "bias": calibrated.bias.tolist(), "tasks": list(source.tasks),
                           "uncalibrated": uncalibrated}
    frame = predictions_frame(source, rows, logits)
    metrics = evaluate_predictions(frame, list(source.tasks), n_longtail_groups=n_groups)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = provenance.new_run_id()
    pq.write_table(provenance.with_run_id(pa.Table.from_pandas(frame, preserve_index=False), run_id),
                   out_dir / PREDICTIONS_FILE, write_page_checksum=True)
    seconds["evaluate"] = time.perf_counter() - start

    report = {
        "qarm_version": __version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": to_dict(config),
        "seed": config.train.seed,
        "model": describe_model(result.model),
        "data": source.describe(),
        "tables": tables.describe(),
        "eval_split": config.eval_split,
        "metrics": metrics,
        "history": result.history.to_dict(),
        "calibration": calibration,
        "examples_per_second": result.examples_per_second,
        "world_size": world_size(),
        "device": str(device_of(result.model)),
        "seconds": seconds,
        provenance.BLOCK: run_provenance(run_id, out_dir, source, quantize_dir, align_dir).to_json(),
    }
    flags = run_flags(report)
    report["flags"] = flags
    for flag in flags:
        say(f"ranking: WARNING {config.model}: {flag}")
    write_json(out_dir / REPORT_FILE, report)
    overall = {t: round(metrics[t]["overall"]["gauc"], 4) for t in source.tasks}
    say(f"ranking: {config.model} {config.eval_split} GAUC {overall}, {result.examples_per_second:,.0f} examples/s")
    return report

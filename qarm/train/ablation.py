"""The paper's ablations in one call: every variant x every seed, trained on one split, one table each.

QARM's tables, reproduced on any prepared dataset with its codes and vectors:

* **table1** (the paper's Table 1, with an ID-only row first): ``ID-only`` (IDs + DIN + MMoE),
  ``Baseline`` (+ the frozen pre-trained vector, the cascading baseline), ``+ aligned vector`` (the
  aligned vector in its place), ``+ VQ`` and ``+ RQ`` (each on top of the aligned vector; RQ brings
  the code-matching sequences that its codes define) and ``+ VQ & RQ`` (QARM);
* **k** (Table 7): QARM with the first K of the stored VQ codes, K in ``ks``;
* **d** (Table 8): QARM with code embeddings of size d, d in ``code_dims``;
* **leaderboard** (issue 6): the three systems side by side: DIN (the ID-only model), Baseline, FGCNN,
  EM3 and the QARM rows, each with its own training budget where it needs one (EM3:
  ``train_overrides``), so the table's training times say what each system costs;
* **groups** (Table 5): no extra training: QARM's gain over the Baseline and over ID-only per long-tail
  group L1..L6 and on cold-start items, read from the table1 runs.

Every (variant, seed) is one :func:`~qarm.train.stage.train_ranking` run in
``out/runs/<variant key>/seed<s>/``; variants with the same model config (``K`` = all stored codes is
``+ VQ & RQ``) share their runs. A finished run (its ``report.json`` written with the same config, on
the same examples and item tables: a re-aligned or re-quantised catalogue retrains) is read back
instead of retrained, so an interrupted ablation resumes where it stopped. ``workers > 1``
trains that many runs at once in separate processes (one torch thread each), which on a small CPU
machine is faster than one run on all cores.

Out folder::

    runs/<key>/seed<s>/   each run (see qarm.train.stage)
    ablation.json         config, machine, data, every variant's per-seed and aggregated metrics, times
    ablation.md           the tables
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from qarm import __version__, provenance
from qarm.config import from_dict, to_dict
from qarm.data.io import atomic_write_bytes, write_json
from qarm.errors import CheckpointMismatch, ConfigError
from qarm.evaluate.metrics import COLD_START, OVERALL, WARM
from qarm.evaluate.report import aggregate_seeds, render_markdown
from qarm.features.examples import ExampleSource
from qarm.train.stage import REPORT_FILE, RankingConfig, build_tables, run_flags, train_ranking
from qarm.train.trainer import TrainConfig

STUDIES = ("table1", "k", "d", "groups", "leaderboard")
ABLATION_FILE = "ablation"
Log = Callable[[str], None]

# Table 1's rows: name -> (model, switches). QARM's switches on top of the aligned vector.
_ALIGNED_ONLY = {"vector": "aligned", "use_vq": False, "use_rq": False, "use_code_matching": False}
TABLE1: dict[str, tuple[str, dict[str, Any]]] = {
    "ID-only": ("id_only", {}),
    "Baseline": ("baseline", {}),
    "+ aligned vector": ("qarm", _ALIGNED_ONLY),
    "+ VQ": ("qarm", {**_ALIGNED_ONLY, "use_vq": True}),
    "+ RQ": ("qarm", {**_ALIGNED_ONLY, "use_rq": True, "use_code_matching": True}),
    "+ VQ & RQ": ("qarm", {"vector": "aligned", "use_vq": True, "use_rq": True, "use_code_matching": True}),
}
QARM_ROW = "+ VQ & RQ"
# The leaderboard's rows: name -> Table 1 row it shares runs with, or the model of its own.
LEADERBOARD: dict[str, str] = {
    "DIN (ID-only)": "ID-only", "Baseline": "Baseline", "FGCNN": "fgcnn", "EM3": "em3",
    "QARM + aligned vector": "+ aligned vector", "QARM + VQ": "+ VQ", "QARM + RQ": "+ RQ",
    "QARM VQ & RQ": QARM_ROW,
}


def _default_overrides() -> dict[str, dict[str, Any]]:
    # EM3 runs a transformer layer per distinct item in every step: ~400 examples/s on one thread with content
    # for the targets only (content_history_length 0, the leaderboard's default; ~50 min an epoch of
    # MicroLens-50k), ~40 with 10 history items of content (docs/em3.md). It trains on a time budget (15
    # minutes unless the config says more), larger batches, validation every 300 steps.
    return {"em3": {"batch_size": 512, "max_seconds": 900.0, "eval_every": 300}}


@dataclass
class AblationConfig:
    """Which studies, which seeds, and the one training recipe every variant shares."""

    studies: tuple[str, ...] = ("table1", "k", "d", "groups")
    rows: tuple[str, ...] | None = None  # Table 1 rows to train (None: all); e.g. ID-only, Baseline, + VQ & RQ
    leaderboard_rows: tuple[str, ...] | None = None  # leaderboard rows to train (None: all); e.g. without EM3
    seeds: tuple[int, ...] = (0, 1, 2)  # mean +- std over these
    ks: tuple[int, ...] = (5, 10, 15, 20, 25)  # Table 7: VQ codes used (<= the K stored)
    code_dims: tuple[int, ...] = (16, 32, 64)  # Table 8: code embedding size
    history_length: int = 50  # the paper's n latest positives
    model: dict[str, Any] = field(default_factory=dict)  # shared model settings (id_dim, head...), every variant
    models: dict[str, dict[str, Any]] = field(default_factory=lambda: {"em3": {"content_history_length": 0}})
    # ^ per-model settings of the leaderboard's other systems (fgcnn, em3); EM3 gives content to the targets
    #   only by default (its history uses IDs), the cheapest setting that still trains its text layer end to end
    train_overrides: dict[str, dict[str, Any]] = field(default_factory=_default_overrides)  # per model: TrainConfig keys
    train: TrainConfig = field(default_factory=TrainConfig)  # the seed inside is replaced by each of `seeds`
    eval_split: str = "test"
    workers: int = 1  # runs trained at once, each in its own process with one torch thread

    def __post_init__(self) -> None:
        self.studies, self.seeds = tuple(self.studies), tuple(self.seeds)
        self.ks, self.code_dims = tuple(self.ks), tuple(self.code_dims)
        unknown = [s for s in self.studies if s not in STUDIES]
        if unknown or not self.studies:
            raise ConfigError(f"The 'studies' parameter of AblationConfig must name some of {list(STUDIES)}. "
                              f"Got {list(self.studies)!r} instead.")
        for name in ("seeds", "ks", "code_dims"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or isinstance(v, bool) for v in values):
                raise ConfigError(f"The '{name}' parameter of AblationConfig must be a non-empty list of ints. "
                                  f"Got {list(values)!r} instead.")
        if self.rows is not None:
            self.rows = tuple(self.rows)
            bad = [r for r in self.rows if r not in TABLE1]
            if bad or not self.rows:
                raise ConfigError(f"The 'rows' parameter of AblationConfig must name some of {list(TABLE1)}. "
                                  f"Got {list(self.rows)!r} instead.")
        if self.leaderboard_rows is not None:
            self.leaderboard_rows = tuple(self.leaderboard_rows)
            bad = [r for r in self.leaderboard_rows if r not in LEADERBOARD]
            if bad or not self.leaderboard_rows:
                raise ConfigError(f"The 'leaderboard_rows' parameter of AblationConfig must name some of "
                                  f"{list(LEADERBOARD)}. Got {list(self.leaderboard_rows)!r} instead.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"The 'seeds' parameter of AblationConfig has repeats: {list(self.seeds)}")
        if any(k < 1 for k in self.ks) or any(d < 1 for d in self.code_dims):
            raise ConfigError("The 'ks' and 'code_dims' parameters of AblationConfig must be >= 1.")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"The 'workers' parameter of AblationConfig must be an int >= 1. "
                              f"Got {self.workers!r} instead.")
        if self.eval_split not in ("valid", "test"):
            raise ConfigError(f"The 'eval_split' parameter of AblationConfig must be 'valid' or 'test'. "
                              f"Got {self.eval_split!r} instead.")
        for name, model_config in self.variants(vq_k_stored=max(self.ks)).values():
            RankingConfig(model=name, model_config=model_config)  # unknown model keys fail now, not mid-run
            self.train_config(name, 0)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AblationConfig:
        return from_dict(cls, data, where="ablation")

    def variants(self, vq_k_stored: int) -> dict[str, tuple[str, dict[str, Any]]]:
        """``{row name: (model, model config)}`` of every trained row, Table 1's first."""
        rows: dict[str, tuple[str, dict[str, Any]]] = {}
        qarm = TABLE1[QARM_ROW][1]
        if "table1" in self.studies or "groups" in self.studies:
            wanted = self.rows if self.rows is not None else \
                (tuple(TABLE1) if "table1" in self.studies else ("ID-only", "Baseline", QARM_ROW))
            rows.update({k: TABLE1[k] for k in TABLE1 if k in wanted})
        if "k" in self.studies:
            for k in self.ks:
                if k > vq_k_stored:
                    raise ConfigError(f"ks asks for K={k} VQ codes but the codes store K={vq_k_stored} per item")
                rows[f"K={k}"] = ("qarm", {**qarm, "vq_k": None if k == vq_k_stored else k})
        if "d" in self.studies:
            for d in self.code_dims:
                rows[f"d={d}"] = ("qarm", {**qarm, "code_dim": d})
        # Shared settings (sizes, head) under every row's switches; a row's own switch wins.
        out = {name: (model, _drop_defaults(model, {**self._shared(model), **switches}))
               for name, (model, switches) in rows.items()}
        if "leaderboard" in self.studies:
            for name, ref in LEADERBOARD.items():
                if self.leaderboard_rows is not None and name not in self.leaderboard_rows:
                    continue
                if ref in TABLE1:
                    model, switches = TABLE1[ref]
                    out[name] = (model, _drop_defaults(model, {**self._shared(model), **switches}))
                else:
                    out[name] = (ref, _drop_defaults(ref, dict(self.models.get(ref, {}))))
        return out

    def train_config(self, model: str, seed: int) -> TrainConfig:
        """The shared training recipe with ``model``'s overrides and ``seed``."""
        data = {**to_dict(self.train), **self.train_overrides.get(model, {}), "seed": seed}
        return from_dict(TrainConfig, data, where=f"ablation.train_overrides.{model}")

    def _shared(self, model: str) -> dict[str, Any]:
        if model == "qarm":
            return dict(self.model)
        # The baseline's config has no code switches; pass only what it knows.
        return {k: v for k, v in self.model.items() if k in _BASELINE_KEYS}


_BASELINE_KEYS = ("id_dim", "vector_dim", "side_dim", "attention_hidden", "head")


def _drop_defaults(model: str, config: dict[str, Any]) -> dict[str, Any]:
    """The config without entries equal to the model's defaults: equal variants get equal keys."""
    from qarm.models import model_config

    defaults = to_dict(model_config(model, {}))
    return {k: v for k, v in config.items() if k not in defaults or _plain(defaults[k]) != _plain(v)}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(to_dict(value) if hasattr(value, "__dataclass_fields__") else value))


def run_key(model: str, model_config: dict[str, Any]) -> str:
    """A short folder name for one variant: readable model name + hash of its config."""
    digest = hashlib.sha256(json.dumps({"model": model, "config": _plain(model_config)},
                                       sort_keys=True).encode()).hexdigest()[:10]
    return f"{model}-{digest}"


def run_ablation(dataset_dir: str | Path, out_dir: str | Path, config: AblationConfig | None = None, *,
                 quantize_dir: str | Path | None = None, align_dir: str | Path | None = None,
                 progress: bool = False, log: Log | None = None, report_name: str = ABLATION_FILE,
                 fresh: bool = False) -> dict[str, Any]:
    """Train every variant with every seed, aggregate, and write ``ablation.json`` / ``ablation.md``
    (``<report_name>.json`` / ``.md``).

    Parameters
    ----------
    dataset_dir : a prepared dataset folder
    out_dir : path
    config : AblationConfig
    quantize_dir, align_dir : the codes and the frozen vectors (``pretrained``, ``aligned``) of the items;
        Table 1's rows past ID-only need ``align_dir``, those with codes ``quantize_dir``.
    progress, log : per-run progress bar (single worker only) and one line per finished run
    fresh : retrain every run from scratch (finished runs and checkpoints in ``out_dir`` are ignored)

    Returns
    -------
    The ablation report (also in ``ablation.json``).
    """
    config = config or AblationConfig()
    say = log or (lambda line: None)
    out = Path(out_dir)
    start = time.perf_counter()
    source = ExampleSource.from_folder(dataset_dir, history_length=config.history_length)
    models = {m for m, _ in config.variants(vq_k_stored=max(config.ks)).values()}
    tables = build_tables(source, dataset_dir, sorted(models), quantize_dir=quantize_dir, align_dir=align_dir)
    variants = config.variants(vq_k_stored=tables.vq_k or max(config.ks))
    jobs: dict[tuple[str, int], dict[str, Any]] = {}  # (run key, seed) -> job
    for model, model_config in variants.values():
        key = run_key(model, model_config)
        for seed in config.seeds:
            train = config.train_config(model, seed)
            ranking = RankingConfig(model=model, model_config=model_config, history_length=config.history_length,
                                    train=train, eval_split=config.eval_split)
            jobs[(key, seed)] = {"config": ranking, "dir": run_dir(out, key, seed)}
    say(f"ablation: {len(variants)} variants, {len({k for k, _ in jobs})} distinct models x {len(config.seeds)} "
        f"seeds = {len(jobs)} runs, {config.workers} at a time")

    reports: dict[tuple[str, int], dict[str, Any]] = {}
    todo = []
    inputs = {"data": source.describe(), "tables": tables.digest()}
    for job_id, job in jobs.items():
        done = None if fresh else _finished(job["dir"], job["config"], inputs)
        if done is not None:
            reports[job_id] = done
        else:
            todo.append(job_id)
    if len(todo) < len(jobs):
        say(f"ablation: {len(jobs) - len(todo)} runs already finished, read back")
    if config.workers == 1 or len(todo) <= 1:
        for job_id in todo:
            job = jobs[job_id]

            def fit(resume: bool, job: dict[str, Any] = job) -> dict[str, Any]:
                return train_ranking(None, job["dir"], job["config"], source=source, tables=tables, resume=resume,
                                     quantize_dir=quantize_dir, align_dir=align_dir, progress=progress, log=None)

            reports[job_id] = _train_job(fit, fresh, say)
            say(_run_line(job_id, reports[job_id]))
    else:
        del source, tables  # each worker reads its own (a few seconds), the parent holds nothing big
        with _terminate_on_sigterm(), ProcessPoolExecutor(max_workers=config.workers,
                                                          mp_context=get_context("spawn")) as pool:
            try:
                futures = {pool.submit(_train_in_worker, str(dataset_dir),
                                       None if quantize_dir is None else str(quantize_dir),
                                       None if align_dir is None else str(align_dir), to_dict(jobs[job_id]["config"]),
                                       str(jobs[job_id]["dir"]), fresh): job_id for job_id in todo}
                for future in as_completed(futures):
                    job_id = futures[future]
                    reports[job_id] = future.result()
                    say(_run_line(job_id, reports[job_id]))
            except BaseException:
                # A failed run, Ctrl-C or SIGTERM: stop every worker now. Left alone they would go on training
                # into the run folders as orphans, beside the next call's workers.
                for process in list((pool._processes or {}).values()):  # no public API for the pool's processes
                    process.terminate()
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    result = _assemble(config, variants, reports, time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    result[provenance.BLOCK] = provenance.Provenance(provenance.new_run_id(), "", provenance.made_from_folders(
        dataset=dataset_dir, codes=quantize_dir, vectors=align_dir)).to_json()
    write_json(out / f"{report_name}.json", result)
    atomic_write_bytes(out / f"{report_name}.md", render_ablation(result).encode("utf-8"))
    return result


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) in the main thread while the block runs, so that the pool's workers
    are stopped by the ``except`` above instead of outliving their parent (the default SIGTERM kills the
    parent alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_dir(out: Path, key: str, seed: int) -> Path:
    """Where an ablation or leaderboard in ``out`` keeps the run ``key`` (a variant's ``run_key``) of ``seed``."""
    return Path(out) / "runs" / key / f"seed{seed}"


def _train_job(fit: Callable[[bool], dict[str, Any]], fresh: bool, say: Log) -> dict[str, Any]:
    """``fit(resume)``, resuming an interrupted run; a checkpoint of another run (other inputs: the
    catalogue was re-aligned or re-quantised) is replaced by a fresh start."""
    if fresh:
        return fit(False)
    try:
        return fit(True)
    except CheckpointMismatch as exc:
        say(f"  {exc}: starting that run over")
        return fit(False)


def _train_in_worker(dataset_dir: str, quantize_dir: str | None, align_dir: str | None, ranking: dict[str, Any],
                     run_dir: str, fresh: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    config = RankingConfig.from_dict(ranking)
    return _train_job(lambda resume: train_ranking(dataset_dir, run_dir, config, quantize_dir=quantize_dir,
                                                   align_dir=align_dir, resume=resume), fresh, print)


def _finished(run_dir: Path, config: RankingConfig, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The run's report when it was made with this config on these inputs (the same examples and the
    same item tables: codes, vectors, vocabulary); None when it must be trained (again)."""
    path = run_dir / REPORT_FILE
    if not path.exists():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    same = _plain(report.get("config")) == _plain(to_dict(config)) and _same_model(report, config) and \
        report.get("data") == inputs["data"] and (report.get("tables") or {}).get("digest") == inputs["tables"]
    return report if same else None


def _same_model(report: dict[str, Any], config: RankingConfig) -> bool:
    """Whether the report's model was built with the settings ``config`` resolves to now. A run's config
    lists only what differs from the defaults, so a changed default would otherwise read back runs of the
    old model; a setting the report does not list had its writer's default (``qarm.models.DEFAULT_CHANGES``),
    or, added to the model later, counts as today's default."""
    from qarm.models import model_config, recorded_model_config

    built = (report.get("model") or {}).get("config")
    if built is None:
        return True  # reports without the resolved settings: the run's config alone decides
    built = recorded_model_config(config.model, built, report.get("qarm_version"))
    wanted = _plain(to_dict(model_config(config.model, config.model_config)))
    return all(_plain(built.get(key, value)) == value for key, value in wanted.items())


def _run_line(job_id: tuple[str, int], report: dict[str, Any]) -> str:
    gauc = {t: round(100 * m[OVERALL]["gauc"], 2) for t, m in report["metrics"].items()}
    return (f"  {job_id[0]} seed {job_id[1]}: GAUC {gauc}, {_train_seconds(report):.0f} s training, "
            f"{report['examples_per_second']:,.0f} examples/s")


def _assemble(config: AblationConfig, variants: dict[str, tuple[str, dict[str, Any]]],
              reports: dict[tuple[str, int], dict[str, Any]], seconds: float) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    first: dict[str, Any] | None = None
    for name, (model, model_config) in variants.items():
        key = run_key(model, model_config)
        runs = [reports[(key, seed)] for seed in config.seeds]
        first = first or runs[0]
        train_s = [_train_seconds(r) for r in runs]
        rows[name] = {
            "model": model, "model_config": model_config, "run_key": key, "seeds": list(config.seeds),
            "metrics": aggregate_seeds([r["metrics"] for r in runs]),
            "per_seed": {str(seed): r["metrics"] for seed, r in zip(config.seeds, runs)},
            "parameters": runs[0]["model"]["parameters"],
            "train_seconds": float(np.mean(train_s)), "train_seconds_std": _std(train_s),
            "examples_per_second": float(np.median([r["examples_per_second"] for r in runs])),
            "epochs_trained": float(np.mean([_epochs(r) for r in runs])),
            "flags": {str(seed): run_flags(r) for seed, r in zip(config.seeds, runs) if run_flags(r)},
        }
    assert first is not None
    return {
        "qarm_version": __version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "config": to_dict(config),
        "data": first["data"], "tables": first["tables"], "eval_split": config.eval_split,
        "tasks": list(first["metrics"]), "variants": rows, "seconds": round(seconds, 1),
    }


def _train_seconds(report: dict[str, Any]) -> float:
    """Training time of a run: the optimiser steps' time summed over every resumption (validations and
    checkpoints excluded), the same clock as its examples/s."""
    return float(report["history"]["train_seconds"])


def _epochs(report: dict[str, Any]) -> float:
    """Passes over the training rows the run made (examples seen / training rows)."""
    return report["history"]["examples"] / max(1, int(report["data"].get("train_rows", 0)))


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def render_ablation(result: dict[str, Any]) -> str:
    """The ablation's Markdown: one section per study, GAUC (and AUC / UAUC / logloss for Table 1)."""
    variants = result["variants"]
    seeds = result["config"]["seeds"]
    data = result["data"]
    title = "Leaderboard" if result["config"]["studies"] == ["leaderboard"] else "Ablations"
    lines = [f"# {title} on {data.get('dataset', '?')}", "",
             f"{data.get('train_rows', '?'):,} training rows, tasks {result['tasks']}, evaluated on the "
             f"{result['eval_split']} split; seeds {seeds} (mean ± std, sample std); machine "
             f"{result['machine']['platform']}, {result['machine']['cpus']} CPUs; this call took "
             f"{result['seconds']:.0f} s (runs read back from an earlier call are not timed again).",
             ""]
    studies = result["config"]["studies"]
    if "leaderboard" in studies:
        board = {n: v for n, v in variants.items() if n in LEADERBOARD}
        lines += ["## Leaderboard: DIN, Baseline, FGCNN, EM3, QARM", "",
                  "Same split, negatives, history and metrics for every row; training budgets as configured "
                  f"(overrides: {json.dumps(result['config'].get('train_overrides', {}))}).", ""]
        lines += _cost_table(board)
        for task in result["tasks"]:
            for metric in ("gauc", "auc", "uauc", "logloss"):
                lines.append(render_markdown({n: v["metrics"] for n, v in board.items()}, task, metric))
    table1 = {n: v for n, v in variants.items() if n in TABLE1}
    if "table1" in studies:
        lines += ["## Table 1: from IDs to QARM", ""]
        lines += _cost_table(table1)
        for task in result["tasks"]:
            for metric in ("gauc", "auc", "uauc", "logloss"):
                lines.append(render_markdown({n: v["metrics"] for n, v in table1.items()}, task, metric))
    for study, prefix, title in (("k", "K=", "Table 7: number of VQ codes K"),
                                 ("d", "d=", "Table 8: code embedding size d")):
        rows = {n: v for n, v in variants.items() if n.startswith(prefix)}
        if study in studies and rows:
            lines += [f"## {title}", ""] + _cost_table(rows)
            for task in result["tasks"]:
                lines.append(render_markdown({n: v["metrics"] for n, v in rows.items()}, task, "gauc"))
    if "groups" in studies and QARM_ROW in variants:
        lines += ["## Table 5: QARM's gain per long-tail group and on cold-start items", "",
                  "GAUC points of `+ VQ & RQ` over each reference (difference of the seed means; ± the two "
                  "seed stds added in quadrature). L1 holds the rarest items (equal training-event mass "
                  "per group).", ""]
        for task in result["tasks"]:
            lines += gain_table(variants, task, QARM_ROW, [r for r in ("ID-only", "Baseline") if r in variants])
    return "\n".join(lines) + "\n"


def _cost_table(rows: dict[str, Any]) -> list[str]:
    lines = ["| variant | model | parameters | training s (mean ± std; optimiser steps only) | examples/s | epochs "
             "| flags |", "|---|---|---:|---:|---:|---:|---|"]
    notes = []
    for name, v in rows.items():
        std = v["train_seconds_std"]
        flags = v.get("flags") or {}
        lines.append(f"| {name} | {v['model']} {json.dumps(v['model_config'])} | {v['parameters']:,} | "
                     f"{v['train_seconds']:.0f}" + ("" if math.isnan(std) else f" ± {std:.0f}") +
                     f" | {v['examples_per_second']:,.0f} | {v['epochs_trained']:.2f} | "
                     + (f"(!) {len(flags)} of {len(v['seeds'])} seeds" if flags else "") + " |")
        notes += [f"- {name}, seed {seed}: " + "; ".join(items) for seed, items in flags.items()]
    if notes:
        lines += ["", "Flags (the runs' numbers are suspect):", *notes]
    return lines + [""]


def gain_table(variants: dict[str, Any], task: str, row: str, references: list[str]) -> list[str]:
    """Markdown rows: GAUC gain of ``row`` over each reference per segment (overall, cold-start, L1..)."""
    mine = variants[row]["metrics"][task]
    segments = [s for s in mine if s in (OVERALL, WARM, COLD_START) or s.startswith("L")]
    header = "| " + task + ": gain of " + row + " over | " + " | ".join(
        {OVERALL: "overall", WARM: "warm", COLD_START: "cold-start"}.get(s, s) for s in segments) + " |"
    lines = [header, "|---" + "|---:" * len(segments) + "|"]
    for ref in references:
        theirs = variants[ref]["metrics"][task]
        cells = []
        for s in segments:
            a, b = mine[s].get("gauc", float("nan")), theirs.get(s, {}).get("gauc", float("nan"))
            sa, sb = mine[s].get("gauc_std", float("nan")), theirs.get(s, {}).get("gauc_std", float("nan"))
            if a is None or b is None or math.isnan(a) or math.isnan(b):
                cells.append("-")
                continue
            text = f"{100 * (a - b):+.2f}"
            if sa is not None and sb is not None and not (math.isnan(sa) or math.isnan(sb)):
                text += f" ± {100 * math.hypot(sa, sb):.2f}"
            cells.append(text)
        lines.append(f"| {ref} | " + " | ".join(cells) + " |")
    return lines + [""]

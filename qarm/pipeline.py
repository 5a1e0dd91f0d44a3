"""``qarm run``: the whole pipeline on one dataset, stage by stage, with a stage cache.

Stages run in the order the data flows: prepare -> describe -> align -> quantize -> rank (train the
ranking models and evaluate them: ID-only, the Baseline with the frozen pre-trained vector, and QARM
with VQ and RQ codes by default; any of the ablation rows on request) -> report. Each finished stage
records a key, the hash of its own config and of the keys of the stages it reads, in
``<out>/stages.json``; a re-run whose key is unchanged skips the stage, and a changed config re-runs
that stage and everything after it.

Run folder::

    data/        the prepared dataset          (qarm data prepare)
    align/       aligned item vectors, pairs   (qarm align)
    quantize/    VQ / RQ codebooks and codes   (qarm quantize)
    rank/        ranking runs and their tables (qarm ablate)
    stages.json  the stage cache
    report.json, report.md
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qarm import __version__, provenance
from qarm.align.contrastive import AlignConfig
from qarm.align.stage import AlignStageConfig, align_dataset, made_from_align, read_aligned_vectors
from qarm.align.user2item import User2ItemConfig
from qarm.config import from_dict, to_dict
from qarm.data import schema as S
from qarm.data.describe import render_markdown
from qarm.data.io import atomic_write_bytes, load_dataset, write_json
from qarm.data.prepare import PrepareConfig, prepare
from qarm.errors import DataError
from qarm.evaluate.leakage import describe_with_probe
from qarm.quantize.api import QuantizeConfig, RQConfig, quantize_items
from qarm.serve.bundle import CURRENT_FILE, DEFAULT_ROW, RUN_INPUTS_FILE, current_version, export_bundle
from qarm.train.ablation import ABLATION_FILE, AblationConfig, render_ablation, run_ablation
from qarm.train.trainer import TrainConfig

STAGES_FILE = "stages.json"
STAGES = ("prepare", "describe", "align", "quantize", "rank", "report")
Log = Callable[[str], None]


def _default_align() -> AlignStageConfig:
    # The embedded default is a 5k-item catalogue with short titles: three User2Item epochs and 1,000
    # head-only contrastive steps are enough there, and keep `qarm run` within its time budget.
    return AlignStageConfig(user2item=User2ItemConfig(epochs=3), train=AlignConfig(max_steps=1000, eval_every=100),
                            tsne_sample=1000)


def _default_quantize() -> QuantizeConfig:
    # 5k items cannot fill 256 centroids per level (faiss wants >= 39 points per centroid): 64 per level.
    return QuantizeConfig(rq=RQConfig(codebook_size=64))


def _default_rank() -> AblationConfig:
    # `qarm run` trains what the paper compares first: ID-only, the cascading Baseline and QARM (VQ & RQ),
    # one seed, and reads the per-group gains off them; `qarm ablate` runs every row with 3 seeds.
    return AblationConfig(studies=("table1", "groups"), rows=("ID-only", "Baseline", "+ VQ & RQ"), seeds=(0,),
                          train=TrainConfig(epochs=3))


@dataclass
class RunConfig:
    dataset: str = "synthetic"  # the embedded default needs no download
    source: str | None = None
    loader_options: dict[str, Any] = field(default_factory=dict)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    align: AlignStageConfig = field(default_factory=_default_align)
    quantize: QuantizeConfig = field(default_factory=_default_quantize)
    rank: AblationConfig = field(default_factory=_default_rank)
    data: str | None = None  # an already prepared dataset folder: the prepare stage is skipped (qarm run --data)


class _Stages:
    """The stage cache: which stages ran, were cached or are not built, and how long each took."""

    def __init__(self, out: Path, fresh: bool, log: Log) -> None:
        self.out, self.log = out, log
        self.cache = {} if fresh else _read_cache(out)
        self.state: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.keys: dict[str, str] = {}

    def run(self, name: str, config: Any, after: tuple[str, ...], done: Path, fn: Callable[[], Any]) -> None:
        key = _key({"config": to_dict(config), "after": [self.keys[a] for a in after], "version": __version__})
        self.keys[name] = key
        if self.cache.get(name) == key and done.exists():
            self.log(f"{name}: cached ({done.parent if done.is_file() else done})")
            self.state[name] = "cached"
            return
        self.log(f"{name}: running ...")
        start = time.perf_counter()
        fn()
        self.seconds[name] = time.perf_counter() - start
        self.log(f"{name}: done in {self.seconds[name]:.1f} s")
        self.cache[name] = key
        atomic_write_bytes(self.out / STAGES_FILE, json.dumps(self.cache, indent=2).encode())
        self.state[name] = "ran"

    def given(self, name: str, identity: dict[str, Any]) -> None:
        """A stage whose output the user gave (``qarm run --data``): its identity keys the later stages."""
        self.keys[name] = _key({"given": identity, "version": __version__})
        self.state[name] = "given"
        self.log(f"{name}: given ({identity.get('data')})")


def run_pipeline(config: RunConfig, out: str | Path, *, fresh: bool = False, log: Log = print) -> dict[str, Any]:
    """Run every built stage for ``config`` into ``out``; return the report (also written to
    ``report.json`` and ``report.md``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out, fresh, log)
    data_dir, align_dir, quantize_dir = out / "data", out / "align", out / "quantize"

    if config.data is not None:  # a prepared folder: read, never written
        data_dir = Path(config.data)
        meta_path = data_dir / S.META_FILE
        if not meta_path.is_file():
            raise DataError(f"--data {data_dir}: not a prepared dataset folder (no {S.META_FILE}); make one with "
                            "qarm data prepare")
        stages.given("prepare", {"data": str(data_dir.resolve()),
                                 "meta": hashlib.sha256(meta_path.read_bytes()).hexdigest()})
        write_json(out / RUN_INPUTS_FILE, {"data": str(data_dir.resolve())})  # export finds the dataset here
    else:
        (out / RUN_INPUTS_FILE).unlink(missing_ok=True)
        stages.run("prepare", {"dataset": config.dataset, "source": config.source, "loader": config.loader_options,
                               "prepare": config.prepare}, (), data_dir / S.META_FILE,
                   lambda: prepare(config.dataset, data_dir, source=config.source,
                                   loader_options=config.loader_options, config=config.prepare, overwrite=True))

    start = time.perf_counter()
    dataset = load_dataset(data_dir)
    stats = describe_with_probe(dataset)
    for warning in stats.get("leakage_probe", {}).get("warnings", []):
        log(f"WARNING {warning}")
    stages.seconds["describe"] = time.perf_counter() - start
    stages.state["describe"] = "ran"
    log(f"describe: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions")

    stages.run("align", config.align, ("prepare",), align_dir / "align_report.json",
               lambda: align_dataset(data_dir, align_dir, config.align, resume=False, log=log))

    def run_quantize() -> None:
        vectors, _ = read_aligned_vectors(align_dir)
        categories = dataset.items[S.CATEGORY].to_numpy(dtype=object) if S.CATEGORY in dataset.items else None
        quantize_items(vectors, dataset.items[S.ITEM_ID].to_numpy(), quantize_dir, config.quantize,
                       categories=categories, overwrite=True, log=log,
                       inputs={"catalogue": dataset.catalogue_digest(), "align_dir": str(align_dir.resolve()),
                               "made_from": made_from_align(align_dir, dataset, data_dir)})

    stages.run("quantize", config.quantize, ("align",), quantize_dir / "quantize.json", run_quantize)

    rank_dir = out / "rank"
    stages.run("rank", config.rank, ("quantize",), rank_dir / f"{ABLATION_FILE}.json",
               lambda: run_ablation(data_dir, rank_dir, config.rank, quantize_dir=quantize_dir, align_dir=align_dir,
                                    progress=config.rank.workers == 1, log=log, fresh=fresh))

    # The QARM model as a serving bundle (`qarm serve <out>/models`); a new version each time rank re-runs.
    models_dir = out / "models"
    ranking = json.loads((rank_dir / f"{ABLATION_FILE}.json").read_text())
    if DEFAULT_ROW in ranking["variants"]:
        stages.run("export", {"row": DEFAULT_ROW, "keep": 3}, ("rank",), models_dir / CURRENT_FILE,
                   lambda: export_bundle(out, models_dir, row=DEFAULT_ROW, keep=3, log=log))
    else:  # rank.rows without QARM's row: nothing of the default to serve (the ranking itself is kept)
        stages.state["export"] = "skipped"
        log(f"export: skipped (rank.rows has no '{DEFAULT_ROW}' row; `qarm export {out} --to {models_dir} --row "
            f"ROW` exports one of {list(ranking['variants'])})")

    start = time.perf_counter()
    align_report = json.loads((align_dir / "align_report.json").read_text())
    quantize_quality = json.loads((quantize_dir / "quality.json").read_text())
    stages.state["report"] = "ran"
    report = {
        "qarm_version": __version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": to_dict(config),
        "stages": stages.state,
        "seconds": {k: round(v, 2) for k, v in stages.seconds.items()},
        "data": stats,
        "align": {k: align_report[k] for k in ("user2item", "pairs", "evaluation", "seconds")},
        "codes": quantize_quality,
        "ranking": ranking,
        "serving": {"models_dir": str(models_dir), "version": current_version(models_dir)},
        provenance.BLOCK: provenance.Provenance(provenance.new_run_id(), "", provenance.made_from_folders(
            dataset=data_dir, vectors=align_dir, codes=quantize_dir)).to_json(),
    }
    report["seconds"]["report"] = round(time.perf_counter() - start, 2)
    write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", render_report(report, out).encode())
    return report


def render_report(report: dict[str, Any], out: Path) -> str:
    md = ["# qarm run report", "", f"qarm {report['qarm_version']}, dataset `{report['config']['dataset']}`", "",
          "## Stages", ""]
    md += [f"- {name}: {state}" + (f" ({report['seconds'][name]:.1f} s)" if name in report["seconds"] else "")
           for name, state in report["stages"].items()]
    md += ["", render_markdown(report["data"]), "## Alignment", "",
           (out / "align" / "align_report.md").read_text().split("\n", 2)[2], "## Codes", "",
           (out / "quantize" / "quality.md").read_text(), "## Ranking", "",
           render_ablation(report["ranking"]).split("\n", 2)[2].replace("\n## ", "\n### ")]
    serving = report.get("serving") or {}
    if serving.get("version"):
        md += ["## Serving", "", f"QARM ({DEFAULT_ROW}) exported as bundle `{serving['version']}` to "
               f"`{serving['models_dir']}`; serve it with `qarm serve {serving['models_dir']}` (docs/serving.md).", ""]
    return "\n".join(md)


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from partial options: what ``data`` leaves out keeps the run's own defaults (for
    example ``align.train.max_steps=50`` changes one number of the run's align config, not all).

    The run's shortened align budget and 64-centroid RQ levels fit the embedded 5k-item synthetic
    default; any other dataset starts from the stages' library defaults (AlignStageConfig(),
    QuantizeConfig(): the settings measured on MicroLens-50k). Naming ``rank.studies`` without
    ``rank.rows`` trains every row of those studies (the run's three Table 1 rows are its default only)."""
    base = RunConfig()
    if data.get("dataset", base.dataset) != "synthetic":
        base.align, base.quantize = AlignStageConfig(), QuantizeConfig()
    rank = data.get("rank") or {}
    if "studies" in rank and "rows" not in rank:
        base.rank.rows = None  # the run's three rows are its default only: asking for studies means all rows
    return from_dict(RunConfig, _merge(to_dict(base), data), where="run config")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _key(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_cache(out: Path) -> dict[str, str]:
    path = out / STAGES_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache only costs a re-run
    return data if isinstance(data, dict) else {}

"""``qarm run``: the whole pipeline on one dataset, stage by stage, with a stage cache.

Stages run in the order the data flows. Each finished stage records the config that made it in
``<out>/stages.json``; a re-run with the same config skips it. Stages that are not built yet are
listed as such in the report rather than silently skipped.
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

from qarm import __version__
from qarm.config import from_dict, to_dict
from qarm.data.describe import describe_dataset, render_markdown
from qarm.data.io import atomic_write_bytes, load_dataset, write_json
from qarm.data.prepare import PrepareConfig, prepare

STAGES_FILE = "stages.json"
# The stages of QARM end to end; the ones without a runner here are announced as not built yet.
PLANNED_STAGES = ("prepare", "describe", "align", "quantize", "train", "evaluate", "report")


@dataclass
class RunConfig:
    dataset: str = "synthetic"  # the embedded default needs no download
    source: str | None = None
    loader_options: dict[str, Any] = field(default_factory=dict)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


def run_pipeline(
    config: RunConfig, out: str | Path, *, fresh: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every built stage for ``config`` into ``out``; return the report (also written to
    ``report.json`` and ``report.md``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = {} if fresh else _read_cache(out)
    data_dir = out / "data"
    timings: dict[str, float] = {}
    stages: dict[str, str] = {}

    prepare_key = _key({"dataset": config.dataset, "source": config.source, "loader": config.loader_options,
                        "prepare": to_dict(config.prepare), "version": __version__})
    if cache.get("prepare") == prepare_key and (data_dir / "meta.json").exists():
        log(f"prepare: cached ({data_dir})")
        stages["prepare"] = "cached"
    else:
        log(f"prepare: loading {config.dataset!r}, splitting, sampling negatives ...")
        start = time.perf_counter()
        _, _, step_times = prepare(config.dataset, data_dir, source=config.source,
                                   loader_options=config.loader_options, config=config.prepare, overwrite=True)
        timings["prepare"] = time.perf_counter() - start
        log("prepare: done in {:.1f} s ({})".format(
            timings["prepare"], ", ".join(f"{k} {v:.1f} s" for k, v in step_times.items())))
        cache["prepare"] = prepare_key
        _write_cache(out, cache)
        stages["prepare"] = "ran"

    start = time.perf_counter()
    dataset = load_dataset(data_dir)
    stats = describe_dataset(dataset)
    timings["describe"] = time.perf_counter() - start
    stages["describe"] = "ran"
    log(f"describe: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions")

    not_built = [s for s in PLANNED_STAGES if s not in stages]
    for stage in not_built:
        stages[stage] = "not built yet"
    log("not built yet: " + ", ".join(not_built))

    report = {
        "qarm_version": __version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "config": to_dict(config),
        "stages": stages,
        "seconds": timings,
        "data": stats,
    }
    write_json(out / "report.json", report)
    md = ["# qarm run report", "", f"qarm {__version__}, dataset `{config.dataset}`", "", "## Stages", ""]
    md += [f"- {name}: {state}" + (f" ({timings[name]:.1f} s)" if name in timings else "")
           for name, state in stages.items()]
    md += ["", render_markdown(stats)]
    atomic_write_bytes(out / "report.md", "\n".join(md).encode())
    return report


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    return from_dict(RunConfig, data, where="run config")


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


def _write_cache(out: Path, cache: dict[str, str]) -> None:
    atomic_write_bytes(out / STAGES_FILE, json.dumps(cache, indent=2).encode())

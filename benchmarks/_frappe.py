"""The Frappe protocol both FGCNN peer benchmarks share (``peer_fgcnn_frappe.py``, ``peer_fgcnn_fuxictr.py``).

* **Data.** Frappe's NFM release (``../shared/data/frappe_nfm_partial``) has no train part: the validation
  file is split 80/20 (``--split-seed``) into ``train`` and ``holdout``; ``test`` is the test file. Field
  codes come from the training 80% (code 0: a value unseen there), one integer matrix for every model.
* **Arguments.** :func:`parser` holds the options of both scripts (seeds, epochs, batch size, embedding
  size, split seed, output folder) and the hidden ones of a worker process.
* **Runs.** :func:`run_workers` runs each (model, seed) in a fresh process on one torch thread, seeds
  outermost (interleaved, so load changes on the shared machine hit every model).
* **Measured.** :class:`PeakRSS`: resident memory above the value at the start, sampled every 5 ms;
  :func:`machine`: platform, CPU count, versions and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FOLDER = "frappe_nfm_partial"
# The FGCNN configuration every implementation runs (qarm's FGCNNConfig names).
SETTINGS = {"channels": (14, 16, 18),
            "kernel_heights": (7, 7, 7),
            "pooling": (2, 2, 2),
            "new_features": (3, 3, 3),
            "hidden": (256, 128)}


# -- data ----------------------------------------------------------------------------------------


def frappe_folder() -> Path | None:
    from qarm.data.shared import find_shared_data

    root = find_shared_data()
    path = None if root is None else root / FOLDER
    return path if path is not None and path.is_dir() else None


def load(split_seed: int) -> dict[str, np.ndarray]:
    """Field codes and labels: ``train`` / ``holdout`` (80/20 of the validation file) and ``test``."""
    from qarm.data.loaders.frappe import FIELDS, PARTS, check_field_ranges, read_libfm

    folder = frappe_folder()
    assert folder is not None, "frappe_folder() is None: check it before loading"
    parts = {part: read_libfm(folder / name) for part, name in PARTS.items()}
    for part, (_, feats) in parts.items():
        check_field_ranges(feats, file=str(folder / PARTS[part]))
    labels, feats = parts["validation"]
    order = np.random.default_rng(split_seed).permutation(len(labels))
    cut = round(0.8 * len(labels))
    raw = {"train": feats[order[:cut]], "holdout": feats[order[cut:]], "test": parts["test"][1]}
    y = {"train": labels[order[:cut]], "holdout": labels[order[cut:]], "test": parts["test"][0]}
    data: dict[str, np.ndarray] = {}
    sizes = []
    for f in range(len(FIELDS)):
        vocab = np.unique(raw["train"][:, f])  # codes 1..V from the training rows; 0: unseen there
        sizes.append(len(vocab) + 1)
        for split, values in raw.items():
            pos = np.searchsorted(vocab, values[:, f]).clip(max=len(vocab) - 1)
            codes = np.where(vocab[pos] == values[:, f], pos + 1, 0)
            data.setdefault(split, np.zeros((len(values), len(FIELDS)), dtype=np.int64))[:, f] = codes
    for split in raw:
        data[f"y_{split}"] = (y[split] == 1).astype(np.float32)
    data["sizes"] = np.array(sizes, dtype=np.int64)
    return data


def data_info(data: dict[str, np.ndarray]) -> dict:
    return {"folder": str(frappe_folder()), "train": len(data["train"]), "holdout": len(data["holdout"]),
            "test": len(data["test"]), "fields": len(data["sizes"]), "field_sizes": [int(s) for s in data["sizes"]],
            "positive_rate_train": float(data["y_train"].mean())}


# -- arguments and worker processes --------------------------------------------------------------


def parser(doc: str, models: Sequence[str]) -> argparse.ArgumentParser:
    """The options of both scripts; ``--worker``, ``--seed`` and ``--result`` are a worker process's."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--dim", type=int, default=16, help="embedding size of every field (all models)")
    p.add_argument("--split-seed", type=int, default=0, help="the 80/20 split of the validation file")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", choices=models, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p


def common_args(args: argparse.Namespace) -> list[str]:
    """The shared options, as a worker's command line gets them."""
    return ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--dim", str(args.dim),
            "--split-seed", str(args.split_seed)]


def run_workers(script: str, models: Sequence[str], seeds: Sequence[int], worker_args: list[str],
                line: Callable[[dict], str]) -> list[dict]:
    """Each (model, seed) in a fresh ``python script --worker model --seed s`` process on one thread.

    ``worker_args``: the rest of the worker's command line; ``line(run)``: what to print after each run.
    """
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name in models:
                result = Path(tmp) / f"{name}-{seed}.json"
                cmd = [sys.executable, script, "--worker", name, "--seed", str(seed), "--result", str(result),
                       *worker_args]
                subprocess.run(cmd, check=True, env=env)
                run = json.loads(result.read_text())
                run["load_average_after"] = list(os.getloadavg())
                runs.append(run)
                print(f"{name:14s} seed {seed}: {line(run)}  (load {run['load_average_after'][0]:.2f})", flush=True)
    return runs


def medians(runs: list[dict], models: Sequence[str], metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    return {m: {k: statistics.median(r[k] for r in runs if r["model"] == m) for k in metrics} for m in models}


# -- measuring -----------------------------------------------------------------------------------


class PeakRSS:
    """The process's peak resident memory above its value at the start, sampled every 5 ms."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def machine(packages: Sequence[str]) -> dict:
    """Platform, CPUs, Python, torch, the given packages' versions and the load average now."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            **versions, "torch_threads": 1, "load_average": list(os.getloadavg())}


def load_text(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)

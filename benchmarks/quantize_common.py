"""Shared by the quantize benchmarks: the synthetic vectors and the machine line."""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import psutil

from qarm.quantize import faiss_ops

GIB = 1024**3


def gaussian_mixture(
    n: int, dim: int, items_per_component: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded Gaussian mixture: ``n // items_per_component`` centres ~ N(0, I_dim), each item a centre
    plus N(0, noise^2 I_dim). Returns ``(vectors (n, dim) float32, component (n,) int64)``.

    Drawn in blocks so that 1M x 64 never holds a float64 copy of the whole matrix.
    """
    rng = np.random.default_rng(seed)
    n_components = max(1, n // items_per_component)
    centres = rng.standard_normal((n_components, dim)).astype(np.float32)
    component = rng.integers(0, n_components, n)
    x = np.empty((n, dim), dtype=np.float32)
    block = 1 << 17
    for start in range(0, n, block):
        stop = min(start + block, n)
        x[start:stop] = centres[component[start:stop]]
        x[start:stop] += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
    return x, component


def machine_line() -> str:
    return (f"machine: {platform.platform()}, python {platform.python_version()}, {os.cpu_count()} CPUs "
            f"(faiss threads {faiss_ops.num_threads()}), {psutil.virtual_memory().total / GIB:.1f} GiB RAM, "
            f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start

"""What every benchmark prints about the machine it ran on (imported as ``from _machine import ...``: the
scripts run from ``benchmarks/``)."""

from __future__ import annotations

import os


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, ``"0.42 0.61 0.70"``; ``"?"`` where the OS has none."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"

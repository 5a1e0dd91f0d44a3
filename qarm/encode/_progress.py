"""The progress bar of this package's batched loops: :func:`qarm.progress.progress_bar`."""

from __future__ import annotations

from qarm.progress import Advance, progress_bar

__all__ = ["Advance", "progress_bar"]

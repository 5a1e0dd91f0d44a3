"""Dataset loaders. Importing this package registers every built-in loader."""
# ruff: noqa: I001  (registration order: the registry first, then the loaders that register themselves)

from qarm.data.loaders.registry import LOADERS, LoaderSpec, get_loader, load, register

# Registration happens on import; keep this list in sync with the modules in this folder.
from qarm.data.loaders import microlens, movielens, lastfm, frappe, amazon, generic  # noqa: E402,F401
from qarm.data import synthetic  # noqa: E402,F401

__all__ = ["LOADERS", "LoaderSpec", "get_loader", "load", "register"]

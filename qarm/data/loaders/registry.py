"""The loader registry: dataset names -> functions that read original files into a :class:`Dataset`.

A loader is a function ``load(source: Path, config) -> Dataset`` with a typed config dataclass, registered
with :func:`register`. It parses the source's own format and calls :func:`qarm.data.build.assemble`;
splits and negatives are added later by :func:`qarm.data.prepare.prepare_dataset`, the same for all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from qarm.config import from_dict
from qarm.data.schema import Dataset
from qarm.data.shared import find_shared_data, shared_dataset_path
from qarm.errors import ConfigError, DataError


@dataclass(frozen=True)
class LoaderSpec:
    name: str
    load: Callable[[Path | None, Any], Dataset]
    config_cls: type
    description: str
    shared_folder: str | None = None  # folder name under ../shared/data, for the default --source
    needs_source: bool = True


LOADERS: dict[str, LoaderSpec] = {}

# A loader's own signature: ``(source: Path, config)``, or ``(source: Path | None, config)`` with needs_source=False.
LoaderFn = TypeVar("LoaderFn", bound=Callable[[Path, Any], Dataset])


def register(
    name: str, *, config: type, description: str, shared_folder: str | None = None, needs_source: bool = True
) -> Callable[[LoaderFn], LoaderFn]:
    def wrap(fn: LoaderFn) -> LoaderFn:
        if name in LOADERS:
            raise RuntimeError(f"loader {name!r} registered twice")
        # resolve_source gives None only to loaders registered with needs_source=False, which accept it
        load_fn = cast(Callable[[Path | None, Any], Dataset], fn)
        LOADERS[name] = LoaderSpec(name, load_fn, config, description, shared_folder, needs_source)
        return fn

    return wrap


def get_loader(name: str) -> LoaderSpec:
    if name not in LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; available: {sorted(LOADERS)}")
    return LOADERS[name]


def resolve_source(spec: LoaderSpec, source: str | Path | None) -> Path | None:
    """The explicit ``source``, else the dataset's folder under ``../shared/data``."""
    if not spec.needs_source:
        return Path(source) if source else None
    if source is not None:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path}: source not found for dataset {spec.name!r}")
        return path
    if spec.shared_folder:
        shared = shared_dataset_path(spec.shared_folder)
        if shared is not None:
            return shared
        root = find_shared_data()
        where = f"{root}/{spec.shared_folder}" if root else f"../shared/data/{spec.shared_folder}"
        raise DataError(f"no --source given for dataset {spec.name!r} and {where} does not exist")
    raise DataError(f"dataset {spec.name!r} needs --source PATH")


def load(name: str, source: str | Path | None = None, options: dict[str, Any] | None = None) -> Dataset:
    """Read dataset ``name`` from ``source`` with loader ``options`` (validated against its config)."""
    spec = get_loader(name)
    config: Any = from_dict(spec.config_cls, options or {}, where=f"{name} loader options")
    return spec.load(resolve_source(spec, source), config)

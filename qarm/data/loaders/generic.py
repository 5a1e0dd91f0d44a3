"""Bring your own data: a YAML mapping says which file and column plays which role.

``--source`` is the mapping file (or a folder holding ``mapping.yaml``, or the file named by the
``mapping`` option); data paths inside it are relative to the mapping's folder. The schema, with an
example, is documented in ``docs/generic_loader.md``; in short::

    name: my-shop
    interactions: {path: events.csv, user: uid, item: sku, time: ts, labels: {click: clicked},
                   signals: {rating: stars}, derive: {like: "rating >= 4"}, context: [device]}
    items: {path: items.parquet, id: sku, text: [title], category: cat, created_at: created,
            features: [brand], vectors: {image_clip: {path: clip.npy}}}
    users: {path: users.csv, id: uid, features: [age]}
    positive_only: false

Files are read with pandas by extension (``.csv``, ``.tsv``, ``.parquet``, ``.jsonl`` / ``.json`` as
JSON lines). Every mistake raises :class:`ConfigError` (the mapping itself) or :class:`DataError` (the
data) naming the file and the column.
"""

from __future__ import annotations

import io
import operator
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from qarm.config import from_dict, load_yaml, to_dict
from qarm.data import schema as S
from qarm.data.build import assemble
from qarm.data.loaders.categories import CategoryRule, map_categories
from qarm.data.loaders.files import read_csv, read_npy
from qarm.data.loaders.registry import register
from qarm.data.schema import Dataset, DatasetMeta
from qarm.errors import ConfigError, DataError

DEFAULT_MAPPING = "mapping.yaml"
YAML_SUFFIXES = (".yaml", ".yml")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".json")
DEFAULT_LABEL = "click"  # the label of positive-only data mapped without labels

# "<signal> <op> <number>": the only derive rules, parsed with a regular expression (never evaluated).
RULE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(>=|>|==)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
OPERATORS = {">=": operator.ge, ">": operator.gt, "==": operator.eq}

# Output column names a mapping may not use for its own columns.
RESERVED_INTERACTIONS = {S.USER_ID, S.ITEM_ID, S.TIME, S.SEQ, S.SPLIT, S.COLD_ITEM, S.SAMPLED_NEGATIVE,
                         S.LONGTAIL_GROUP}
RESERVED_ITEMS = {S.ITEM_ID, S.SOURCE_ID, S.CATEGORY, S.CREATED_AT}
RESERVED_USERS = {S.USER_ID, S.SOURCE_ID}


@dataclass
class InteractionsSection:
    path: str  # the events file, relative to the mapping's folder
    user: str  # source column of the user ids
    item: str  # source column of the item ids
    time: str | None = None  # numbers (seconds since the epoch) or date/times; absent: file order
    labels: dict[str, str] = field(default_factory=dict)  # label name -> 0/1 or boolean source column
    signals: dict[str, str] = field(default_factory=dict)  # signal name -> numeric source column
    derive: dict[str, str] = field(default_factory=dict)  # label name -> "<signal> >= <number>" (>, == too)
    context: list[str] = field(default_factory=list)  # per-event categorical source columns, kept as named


@dataclass
class VectorSource:
    """One modality: a ``.npy`` aligned with the items file rows, or an items column holding lists."""

    path: str | None = None
    column: str | None = None


@dataclass
class ItemsSection:
    path: str
    id: str
    text: list[str] = field(default_factory=list)
    category: str | None = None
    category_separator: str | None = None  # multi-valued cells ("Comedy|Drama"): the first value is the category
    category_path_separator: str | None = None  # hierarchical paths ("Electronics > Audio"): between the levels
    category_level: int | None = None  # keep the first N levels of a path; absent: the full path
    created_at: str | None = None  # numbers (seconds since the epoch) or date/times
    features: list[str] = field(default_factory=list)  # categorical side information, kept as named
    vectors: dict[str, VectorSource] = field(default_factory=dict)


@dataclass
class UsersSection:
    path: str
    id: str
    features: list[str] = field(default_factory=list)


@dataclass
class GenericMapping:
    """The top level of a mapping file."""

    name: str
    interactions: InteractionsSection
    items: ItemsSection | None = None  # absent: the items are the ids seen in the interactions
    users: UsersSection | None = None  # absent: the users are the ids seen in the interactions
    positive_only: bool = False  # every event is a positive; negatives are sampled at prepare time


@dataclass
class GenericConfig:
    mapping: str | None = None  # the mapping file inside a --source folder (default: mapping.yaml)
    category_level: int | None = None  # overrides items.category_level (--set category_level=2)


Rule = tuple[str, str, float]  # signal, operator, threshold


@register(
    "generic",
    config=GenericConfig,
    description="your own CSV / TSV / Parquet / JSON-lines files, described by a YAML mapping "
                "(see docs/generic_loader.md)",
)
def load_generic(source: Path, config: GenericConfig) -> Dataset:
    mapping_path = find_mapping(source, config)
    mapping = from_dict(GenericMapping, load_yaml(mapping_path), where=f"{mapping_path}: mapping")
    if config.category_level is not None:
        if mapping.items is None or mapping.items.category is None:
            raise ConfigError(f"--set category_level={config.category_level}: {mapping_path} maps no items.category")
        CategoryRule(level=config.category_level).check(f"--set category_level={config.category_level}")
        mapping.items.category_level = config.category_level
    rules = check_mapping(mapping, mapping_path)
    folder = mapping_path.parent
    spec = mapping.interactions

    events_path = data_file(folder, spec.path, "interactions.path", mapping_path)
    events = read_table(events_path, roles={
        spec.user: "interactions.user",
        spec.item: "interactions.item",
        **({spec.time: "interactions.time"} if spec.time else {}),
        **{column: f"interactions.labels.{name}" for name, column in spec.labels.items()},
        **{column: f"interactions.signals.{name}" for name, column in spec.signals.items()},
        **{column: "interactions.context" for column in spec.context},
    }, id_columns=[spec.user, spec.item])
    f = str(events_path)
    inter = pd.DataFrame({S.USER_ID: ids(events, spec.user, f), S.ITEM_ID: ids(events, spec.item, f)})
    inter[S.TIME] = seconds(events, spec.time, f) if spec.time else np.arange(len(events), dtype=np.int64)
    for name, column in spec.labels.items():
        inter[name] = binary(events, column, f)
    for name, column in spec.signals.items():
        inter[name] = numbers(events, column, f)
    for name, (signal, op, threshold) in rules.items():
        inter[name] = OPERATORS[op](inter[signal], threshold).astype(np.int8)  # a missing signal gives 0
    label_columns = [*spec.labels, *rules]
    if not label_columns:
        inter[DEFAULT_LABEL] = np.ones(len(inter), dtype=np.int8)
        label_columns = [DEFAULT_LABEL]
    for column in spec.context:
        inter[column] = events[column].to_numpy()

    items, item_vectors, items_file = read_items(mapping.items, folder, mapping_path, inter[S.ITEM_ID], f)
    check_known(inter[S.ITEM_ID], items[S.SOURCE_ID], file=f, column=spec.item, target=items_file)
    users, users_file = None, f
    if mapping.users is not None:
        users, users_file = read_users(mapping.users, folder, mapping_path)
        check_known(inter[S.USER_ID], users[S.SOURCE_ID], file=f, column=spec.user, target=users_file)

    meta = DatasetMeta(
        name=mapping.name,
        source=str(mapping_path),
        loader="generic",
        config={"mapping": to_dict(mapping)},
        time_unit="seconds" if spec.time else "order",
        text_columns=list(mapping.items.text) if mapping.items else [],
        label_columns=label_columns,
        signal_columns=list(spec.signals),
        context_columns=list(spec.context),
        user_feature_columns=list(mapping.users.features) if mapping.users else [],
        item_feature_columns=list(mapping.items.features) if mapping.items else [],
        positive_only=mapping.positive_only,
        notes=[note] if mapping.items and (note := category_rule(mapping.items).describe()) else [],
    )
    return assemble(items=items, interactions=inter, meta=meta, users=users, item_vectors=item_vectors,
                    item_key=S.ITEM_ID, user_key=S.USER_ID, items_file=items_file, interactions_file=f,
                    users_file=users_file)


# --- the mapping ---------------------------------------------------------------------------------------


def find_mapping(source: Path, config: GenericConfig) -> Path:
    """The mapping file: ``source`` itself, or ``source/<config.mapping or mapping.yaml>``."""
    if source.is_dir():
        path = source / (config.mapping or DEFAULT_MAPPING)
        if not path.is_file():
            raise ConfigError(f"{path}: mapping file not found; pass the YAML file as the source, or name it "
                              f"with the 'mapping' option")
        return path
    if config.mapping is not None:
        raise ConfigError(f"the 'mapping' option names a file inside a source folder, but the source {source} "
                          f"is a file; pass either the folder with 'mapping', or the YAML file alone")
    if source.suffix.lower() not in YAML_SUFFIXES:
        raise ConfigError(f"{source}: expected a YAML mapping file ({' / '.join(YAML_SUFFIXES)}) or a folder "
                          f"holding {DEFAULT_MAPPING}")
    return source


def check_mapping(mapping: GenericMapping, path: Path) -> dict[str, Rule]:
    """Raise :class:`ConfigError` for an inconsistent mapping; return the parsed derive rules."""
    if not mapping.name.strip():
        raise ConfigError(f"{path}: name: must not be empty")
    spec = mapping.interactions
    rules = {name: parse_rule(rule, spec.signals, f"{path}: interactions.derive.{name}")
             for name, rule in spec.derive.items()}
    if not spec.labels and not rules and not mapping.positive_only:
        raise ConfigError(f"{path}: interactions: no labels; map one (labels: {{click: <column>}}), derive one "
                          f"from a signal, or set positive_only: true (every event is then a positive 'click')")
    check_names([*spec.labels, *rules, *spec.signals, *spec.context], RESERVED_INTERACTIONS,
                f"{path}: interactions")
    if mapping.items is not None:
        items = mapping.items
        check_names([*items.text, *items.features, *items.vectors], RESERVED_ITEMS, f"{path}: items")
        category_rule(items).check(f"{path}: items")
        if items.category is None and (items.category_separator or items.category_path_separator
                                       or items.category_level is not None):
            raise ConfigError(f"{path}: items: category_separator / category_path_separator / category_level "
                              "need a category column (items.category)")
        for name, vector in items.vectors.items():
            if (vector.path is None) == (vector.column is None):
                raise ConfigError(f"{path}: items.vectors.{name}: give exactly one of 'path' (a .npy file) "
                                  f"or 'column' (an items column holding lists)")
    if mapping.users is not None:
        check_names(list(mapping.users.features), RESERVED_USERS, f"{path}: users")
    return rules


def parse_rule(rule: str, signals: dict[str, str], where: str) -> Rule:
    """``"rating >= 4"`` -> ``("rating", ">=", 4.0)``; the signal must be mapped under ``signals``."""
    match = RULE.match(rule)
    if match is None:
        raise ConfigError(f"{where}: cannot parse the rule {rule!r}; expected '<signal> <op> <number>' "
                          f"with <op> one of {list(OPERATORS)}, e.g. 'rating >= 4'")
    signal, op, number = match.groups()
    if signal not in signals:
        raise ConfigError(f"{where}: the rule {rule!r} uses {signal!r}, which is not a signal; "
                          f"mapped signals: {sorted(signals)}")
    return signal, op, float(number)


def check_names(names: list[str], reserved: set[str], where: str) -> None:
    """Output column names must be unique and not the contract's own."""
    seen: set[str] = set()
    for name in names:
        if name in reserved:
            raise ConfigError(f"{where}: {name!r} is a reserved column name ({sorted(reserved)}); rename it")
        if name in seen:
            raise ConfigError(f"{where}: the column name {name!r} is used twice")
        seen.add(name)


# --- reading ---------------------------------------------------------------------------------------------


def data_file(folder: Path, relative: str, key: str, mapping_path: Path) -> Path:
    path = folder / relative
    if not path.is_file():
        raise DataError(f"{path}: file not found (named by {key} in {mapping_path})")
    return path


def read_table(path: Path, *, roles: dict[str, str], id_columns: list[str]) -> pd.DataFrame:
    """Read a table by extension and check that the mapped columns exist.

    ``roles`` maps each source column the mapping names to its key (for the error message); the
    ``id_columns`` of text files are read as strings so that ids such as ``007`` keep their zeros.
    """
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        table = read_csv(path, sep="," if suffix == ".csv" else "\t", dtype=dict.fromkeys(id_columns, str))
    elif suffix == ".parquet":
        try:
            table = pd.read_parquet(path)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DataError(f"{path}: cannot read the Parquet file ({exc})") from exc
    elif suffix in (".jsonl", ".json"):
        table = read_json_table(path, roles)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {list(TABLE_SUFFIXES)}")
    if len(table) == 0:
        raise DataError(f"{path}: the file has no rows")
    for column, key in roles.items():
        if column not in table.columns:
            columns = [str(c) for c in table.columns]
            shown = columns[:20] + ([f"... {len(columns) - 20} more"] if len(columns) > 20 else [])
            raise DataError(f"missing column (mapped by {key}); the file has {len(columns)} columns: {shown}",
                            file=str(path), column=column)
    return table


JSON_LAYOUTS = ("JSON lines (one object per line)", "a JSON array of objects",
                "one object keyed by id whose values are objects",
                "for interactions, one object user id -> ordered list of item ids")


def read_json_table(path: Path, roles: dict[str, str]) -> pd.DataFrame:
    """A table from the JSON layouts people keep data in (:data:`JSON_LAYOUTS`); anything else is one short
    error saying which layout was found. ``roles`` names the id column an object's keys fill (the column
    mapped by ``items.id`` / ``users.id``, or ``interactions.user`` and ``interactions.item``)."""
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # several values: JSON lines, or broken
    if whole is None:
        try:
            return pd.read_json(io.StringIO(text), lines=True, dtype=False)
        except ValueError as exc:
            raise DataError(f"{path}: cannot parse the file as JSON lines, one object per line "
                            f"({' '.join(str(exc).split())[:200]}); qarm also reads {'; '.join(JSON_LAYOUTS[1:])}") from exc
    by_key = {key: column for column, key in roles.items()}
    id_column = next((by_key[k] for k in ("items.id", "users.id") if k in by_key), None)
    if isinstance(whole, list) and all(isinstance(row, dict) for row in whole):
        return pd.DataFrame(whole)
    if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
        if id_column is None:
            raise DataError(f"{path}: one JSON object keyed by id holds a table of items or users, not interactions; "
                            "give interactions as JSON lines, an array of objects or user -> list of items")
        return pd.DataFrame([{**value, id_column: key} for key, value in whole.items()])
    if isinstance(whole, dict) and whole and all(isinstance(v, list) for v in whole.values()):
        user, item = by_key.get("interactions.user"), by_key.get("interactions.item")
        if user is None or item is None:
            raise DataError(f"{path}: one JSON object of lists (user -> items) holds interactions; it is mapped as "
                            f"{sorted(set(roles.values()))[:3]}")
        extra = sorted(k for k in roles.values() if k not in ("interactions.user", "interactions.item"))
        if extra:
            raise DataError(f"{path}: the layout user -> list of items has no {extra[0]} column (only the order of "
                            "each user's items); remove it from the mapping or use JSON lines with that field")
        rows = [(u, i) for u, items in whole.items() for i in items]
        if any(isinstance(i, (dict, list)) for _, i in rows):
            raise DataError(f"{path}: user -> list of items must list item ids (strings or numbers)")
        return pd.DataFrame(rows, columns=[user, item])
    found = (f"an array of {type(whole[0]).__name__}" if isinstance(whole, list) and whole else
             f"one JSON {type(whole).__name__}" + (" of mixed values" if isinstance(whole, dict) and whole else ""))
    raise DataError(f"{path}: found {found}; qarm reads {'; '.join(JSON_LAYOUTS)}")


def read_items(
    spec: ItemsSection | None, folder: Path, mapping_path: Path, event_items: pd.Series, events_file: str
) -> tuple[pd.DataFrame, dict[str, np.ndarray], str]:
    """The items table (``source_id`` + mapped columns), its vectors, and the file to name in errors."""
    if spec is None:
        return pd.DataFrame({S.SOURCE_ID: pd.unique(event_items)}), {}, events_file
    path = data_file(folder, spec.path, "items.path", mapping_path)
    f = str(path)
    table = read_table(path, roles={
        spec.id: "items.id",
        **{column: "items.text" for column in spec.text},
        **({spec.category: "items.category"} if spec.category else {}),
        **({spec.created_at: "items.created_at"} if spec.created_at else {}),
        **{column: "items.features" for column in spec.features},
        **{v.column: f"items.vectors.{name}.column" for name, v in spec.vectors.items() if v.column},
    }, id_columns=[spec.id])
    items = pd.DataFrame({S.SOURCE_ID: ids(table, spec.id, f)})
    duplicated = items[S.SOURCE_ID].duplicated(keep=False)
    if duplicated.any():
        raise DataError("duplicate item ids", file=f, column=spec.id, ids=items.loc[duplicated, S.SOURCE_ID].unique())
    for column in spec.text:
        items[column] = table[column].fillna("").astype(str)
    if spec.category:
        items[S.CATEGORY] = map_categories(table[spec.category], category_rule(spec),
                                           f"{f}: column '{spec.category}'").to_numpy()
    if spec.created_at:
        items[S.CREATED_AT] = seconds(table, spec.created_at, f)
    for column in spec.features:
        items[column] = table[column].to_numpy()
    vectors = {}
    for name, source in spec.vectors.items():
        if source.path is not None:
            npy = data_file(folder, source.path, f"items.vectors.{name}.path", mapping_path)
            vectors[name] = npy_vectors(npy, name, len(table), f)
        else:
            assert source.column is not None  # check_mapping: exactly one of path and column
            vectors[name] = column_vectors(table, source.column, name, f)
    return items, vectors, f


def category_rule(spec: ItemsSection) -> CategoryRule:
    """How the items' category cells become one category each (qarm.data.loaders.categories)."""
    return CategoryRule(spec.category_separator, spec.category_path_separator, spec.category_level)


def read_users(spec: UsersSection, folder: Path, mapping_path: Path) -> tuple[pd.DataFrame, str]:
    path = data_file(folder, spec.path, "users.path", mapping_path)
    f = str(path)
    table = read_table(path, roles={spec.id: "users.id", **{c: "users.features" for c in spec.features}},
                       id_columns=[spec.id])
    users = pd.DataFrame({S.SOURCE_ID: ids(table, spec.id, f)})
    duplicated = users[S.SOURCE_ID].duplicated(keep=False)
    if duplicated.any():
        raise DataError("duplicate user ids", file=f, column=spec.id, ids=users.loc[duplicated, S.SOURCE_ID].unique())
    for column in spec.features:
        users[column] = table[column].to_numpy()
    return users, f


# --- columns ---------------------------------------------------------------------------------------------


def missing_rows(values: pd.Series, file: str, column: str, what: str) -> None:
    missing = values.isna().to_numpy()
    if missing.any():
        raise DataError(f"missing {what} (0-based rows)", file=file, column=column, ids=np.flatnonzero(missing))


def ids(table: pd.DataFrame, column: str, file: str) -> pd.Series:
    """Ids as strings; whole floats (``7.0``, from a numeric column with gaps) become ``"7"``."""
    values = table[column]
    missing_rows(values, file, column, "ids")
    if pd.api.types.is_float_dtype(values.dtype) and (values == values.round()).all():
        values = values.astype(np.int64)
    return values.astype(str).reset_index(drop=True)


def binary(table: pd.DataFrame, column: str, file: str) -> np.ndarray:
    """A 0/1 (or boolean) label column as int8."""
    values = table[column]
    missing_rows(values, file, column, "label values")
    if pd.api.types.is_bool_dtype(values.dtype):
        return values.to_numpy(dtype=np.int8)
    numeric = pd.to_numeric(values, errors="coerce")
    bad = ~numeric.isin([0, 1]).to_numpy()
    if bad.any():
        raise DataError("a label must be 0/1 or true/false; other values", file=file, column=column,
                        ids=values[bad].unique())
    return numeric.to_numpy().astype(np.int8)


def numbers(table: pd.DataFrame, column: str, file: str) -> np.ndarray:
    """A numeric signal as float64; empty cells stay NaN."""
    values = table[column]
    numeric = pd.to_numeric(values, errors="coerce")
    bad = (numeric.isna() & values.notna()).to_numpy()
    if bad.any():
        raise DataError("a signal must be numeric; other values", file=file, column=column, ids=values[bad].unique())
    return numeric.to_numpy(dtype=np.float64)


def seconds(table: pd.DataFrame, column: str, file: str) -> np.ndarray:
    """Times as int64 seconds since the epoch: numbers are taken as seconds, date/times are parsed
    (without a zone they are read as UTC)."""
    values = table[column]
    missing_rows(values, file, column, "time values")
    if pd.api.types.is_bool_dtype(values.dtype):
        raise DataError("expected numbers or date/times, got booleans", file=file, column=column)
    if not pd.api.types.is_datetime64_any_dtype(values.dtype):
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().all():
            number = numeric.to_numpy(dtype=np.float64)
            bad = ~(np.abs(number) <= S.MAX_TIME)  # NaN, inf and 1e30 alike: no int64 would hold them honestly
            if bad.any():
                raise DataError(f"times must be finite numbers of seconds within +-{S.MAX_TIME:.0e}; other values",
                                file=file, column=column, ids=values[bad].unique())
            return np.floor(number).astype(np.int64)
    with warnings.catch_warnings():  # pandas warns when it falls back to parsing each value on its own
        warnings.simplefilter("ignore", UserWarning)
        parsed = pd.to_datetime(values, utc=True, errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        raise DataError("cannot parse as numbers (seconds) or date/times; use one format for the whole column, "
                        "e.g. ISO 8601 '2024-05-01 12:30:00'", file=file, column=column, ids=values[bad].unique())
    return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def npy_vectors(path: Path, name: str, n_rows: int, items_file: str) -> np.ndarray:
    vectors = read_npy(path)
    if len(vectors) != n_rows:
        raise DataError(f"{path}: vectors {name!r} have {len(vectors)} rows, but {items_file} has {n_rows} "
                        f"(row i must belong to the item in row i)")
    check_finite(vectors, name, file=str(path))
    return vectors


def column_vectors(table: pd.DataFrame, column: str, name: str, file: str) -> np.ndarray:
    """An items column holding one list of numbers per row (Parquet list column, JSON array)."""
    cells = table[column].to_numpy()
    not_lists = np.flatnonzero([not isinstance(cell, (list, np.ndarray)) for cell in cells])
    if not_lists.size:
        raise DataError("expected a list of numbers in every row (0-based rows)", file=file, column=column,
                        ids=not_lists)
    lengths = np.array([len(cell) for cell in cells])
    if (lengths != lengths[0]).any() or lengths[0] == 0:
        raise DataError(f"vectors must all have one non-zero length; lengths found: {sorted(set(lengths.tolist()))}",
                        file=file, column=column)
    try:
        vectors = np.stack(cells).astype(np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"vector values must be numbers ({exc})", file=file, column=column) from exc
    check_finite(vectors, name, file=file, column=column)
    return vectors


def check_finite(vectors: np.ndarray, name: str, *, file: str, column: str | None = None) -> None:
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise DataError(f"vectors {name!r}: NaN or infinite values (0-based rows)", file=file, column=column,
                        ids=np.flatnonzero(~finite))


def check_known(values: pd.Series, known: pd.Series, *, file: str, column: str, target: str) -> None:
    unknown = ~values.isin(known).to_numpy()
    if unknown.any():
        raise DataError(f"ids not found in {target}", file=file, column=column, ids=values[unknown].unique())

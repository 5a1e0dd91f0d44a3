"""MovieLens ratings: ``ml-latest-small`` and ``ml100k``, optionally enriched with ML-1M side information.

Files of ``ml-latest-small`` (GroupLens release, UTF-8 CSV with a header):

* ``ratings.csv`` = ``userId,movieId,rating,timestamp``: one explicit rating (0.5-5 in half stars) per
  user and movie; ``timestamp`` is unix seconds.
* ``movies.csv`` = ``movieId,title,genres``: the catalogue; ``title`` ends with the year in parentheses
  (``Toy Story (1995)``), ``genres`` is ``|``-separated or ``(no genres listed)``.
* ``tags.csv`` = ``userId,movieId,tag,timestamp``: free-text tags users gave to movies.

Files of ``ml100k`` (MovieLens 100K, no header):

* ``u.data`` = ``user<TAB>item<TAB>rating<TAB>timestamp``, ratings 1-5, unix seconds.
* ``u.item`` = ``id|title|release date|video release date|IMDb URL|<19 genre flags>``, latin-1.
* ``u.genre`` = ``name|index``: the names of the genre flags, in flag order.
* ``u.user`` = ``id|age|gender|occupation|zip``: user side features.

Both become: items = every movie of the catalogue (movies nobody rated included) with the text columns
``title``, ``genres`` (readable, ``"Adventure, Animation, Children"``) and ``tags`` (the distinct user
tags, ``", "``-joined; always empty for ml100k), ``year`` (nullable int, from the title, else the release
date) and ``category`` (the first genre, ``'unknown'`` without one). Interactions = the ratings, with
``time`` in unix seconds, the ``rating`` kept as a signal, and the labels ``click = 1`` for every rating
(a rating means the user watched it; the data is positive-only and negatives are sampled later) and
``like = rating >= like_threshold`` (4 by default). Ratings of a movie missing from the catalogue are
dropped with a note in ``meta.notes`` (``drop_unknown_movies``; the shared copy of ml-latest-small ends with
one such row, ``999,999999,5.0,...``), or raise with ``drop_unknown_movies=False``.

Enrichment: ``movies_extrainfos.dat`` of the ML-1M side information (``::``-separated, UTF-8:
``id::title::year::MPAA::release date::genres::director::writers::actors::plot::poster URL``) adds the
text columns ``plot``, ``director`` and ``actors`` (empty strings for unmatched movies). Movies are
matched by normalised title and year (:func:`normalise_title`, :func:`title_variants`): the OMDb title
of the extra-info file and, when ``movies.dat`` is beside it (``id::title::genres``, latin-1), the
MovieLens-style title of the same ML-1M movie, whose year follows MovieLens; failing those, a part of an
ML-1M title split at ``:`` or `` - `` (``Star Wars (1977)`` -> ``Star Wars: Episode IV - A New Hope``). An
exact year is tried first, then years up to ``enrich_year_tolerance`` away (sources disagree by a year
around release).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qarm.config import to_dict
from qarm.data import schema as S
from qarm.data.build import assemble
from qarm.data.loaders.files import read_csv, read_lines, source_file
from qarm.data.loaders.registry import register
from qarm.data.schema import Dataset, DatasetMeta
from qarm.errors import DataError

# ml-latest-small
RATINGS_FILE = "ratings.csv"
MOVIES_FILE = "movies.csv"
TAGS_FILE = "tags.csv"
NO_GENRES = "(no genres listed)"
# ml100k
ML100K_RATINGS_FILE = "u.data"
ML100K_ITEMS_FILE = "u.item"
ML100K_GENRES_FILE = "u.genre"
ML100K_USERS_FILE = "u.user"
ML100K_UNKNOWN_GENRE = "unknown"
# ML-1M side information
ENRICH_FOLDER = "ml1m_sideinfo"
EXTRA_INFO_FILE = "movies_extrainfos.dat"
ML1M_MOVIES_FILE = "movies.dat"
EXTRA_INFO_FIELDS = ("id", "title", "year", "mpaa", "release_date", "genres", "director", "writers", "actors",
                     "plot", "poster_url")
ENRICH_COLUMNS = ("plot", "director", "actors")
MISSING_EXTRA = "N/A"  # how the extra-info file marks an unknown field

UNKNOWN_CATEGORY = "unknown"


@dataclass
class MovieLensConfig:
    like_threshold: float = 4.0  # like = rating >= like_threshold
    drop_unknown_movies: bool = True  # drop ratings of movies missing from the catalogue (noted in meta.notes)
    enrich: bool = True  # add plot / director / actors from the ML-1M side information
    enrich_source: str | None = None  # its folder; None = ml1m_sideinfo beside the source (skipped if absent)
    enrich_year_tolerance: int = 1  # years a match may differ by when no exact-year match exists


@register(
    "ml-latest-small",
    config=MovieLensConfig,
    shared_folder="ml-latest-small",
    description="MovieLens latest-small ratings, titles, genres, tags (+ ML-1M plots); 610 users, 9,742 movies",
)
def load_ml_latest_small(source: Path, config: MovieLensConfig) -> Dataset:
    ratings_path = source_file(source, RATINGS_FILE)
    movies_path = source_file(source, MOVIES_FILE)
    tags_path = source_file(source, TAGS_FILE)

    movies = read_csv(movies_path, required=["movieId", "title", "genres"], dtype=str, keep_default_na=False)
    genre_lists = [[g for g in text.split("|") if g and g != NO_GENRES] for text in movies["genres"]]
    titles = movies["title"].str.strip()
    items = _movie_table(movies["movieId"].str.strip(), titles, genre_lists, [title_year(t) for t in titles])
    items["tags"] = _movie_tags(tags_path, items["source_id"])

    ratings = read_csv(ratings_path, required=["userId", "movieId", "rating", "timestamp"], dtype=str,
                       keep_default_na=False)
    interactions = _rating_interactions(ratings, ratings_path, user="userId", item="movieId", first_line=2,
                                        config=config)
    return _finish("ml-latest-small", source, config, items, interactions, users=None, user_features=[],
                   items_file=movies_path, interactions_file=ratings_path)


@register(
    "ml100k",
    config=MovieLensConfig,
    shared_folder="ml100k",
    description="MovieLens 100K ratings, titles, genres, user side features (+ ML-1M plots); 943 users, 1,682 movies",
)
def load_ml100k(source: Path, config: MovieLensConfig) -> Dataset:
    ratings_path = source_file(source, ML100K_RATINGS_FILE)
    items_path = source_file(source, ML100K_ITEMS_FILE)
    genres_path = source_file(source, ML100K_GENRES_FILE)
    users_path = source_file(source, ML100K_USERS_FILE)

    items = _ml100k_items(items_path, _ml100k_genre_names(genres_path))
    users = _ml100k_users(users_path)
    ratings = read_csv(ratings_path, sep="\t", header=None, names=["user", "item", "rating", "timestamp"],
                       dtype=str, keep_default_na=False)
    short = ratings.eq("").any(axis=1).to_numpy()  # missing trailing fields read as ""
    if short.any():
        line = int(np.flatnonzero(short)[0]) + 1
        raise DataError(f"{ratings_path}: line {line}: expected 4 non-empty tab-separated fields "
                        f"(user item rating timestamp), got {ratings.iloc[line - 1].tolist()}")
    interactions = _rating_interactions(ratings, ratings_path, user="user", item="item", first_line=1,
                                        config=config)
    return _finish("ml100k", source, config, items, interactions, users=users,
                   user_features=["age", "gender", "occupation", "zip"], items_file=items_path,
                   interactions_file=ratings_path, users_file=users_path)


# --- titles -------------------------------------------------------------------------------------------

_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})(?:\s*[-\u2013]\s*\d{4})?\)\s*$")  # "(1995)" or "(2006–2007)"
_PAREN_SUFFIX = re.compile(r"^(.*\S)\s*\(([^()]*)\)$")  # "Seven (Se7en)" -> "Seven", "Se7en"
_AKA_PREFIX = re.compile(r"^(a\.k\.a\.|aka)\s+", re.IGNORECASE)
_TRAILING_ARTICLE = re.compile(r"^(.*),\s*(the|a|an|les|le|la|l'|il|el|los|las|der|die|das)$")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_TITLE_PARTS = re.compile(r":| - ")


def title_year(title: str) -> int | None:
    """The year in parentheses at the end of a MovieLens title (the first year of a range), or None."""
    match = _YEAR_SUFFIX.search(title)
    return int(match.group(1)) if match else None


def normalise_title(title: str) -> str:
    """Matching key of a title: ASCII lower case, a trailing article moved to the front
    (``"American President, The"`` -> ``"the american president"``), ``&`` as ``and``, no punctuation."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().lower().strip()
    article = _TRAILING_ARTICLE.match(text)
    if article:
        text = f"{article.group(2)} {article.group(1)}"
    return " ".join(_NOT_ALNUM.sub(" ", text.replace("&", " and ")).split())


def title_variants(title: str) -> list[str]:
    """Normalised names of a MovieLens title without its year: the main title first, then each alternative
    title in trailing parentheses (``"City of Lost Children, The (Cité des enfants perdus, La) (1995)"`` ->
    ``["the city of lost children", "la cite des enfants perdus"]``), ``a.k.a.`` dropped."""
    rest = _YEAR_SUFFIX.sub("", title.strip())
    alternatives: list[str] = []
    while (match := _PAREN_SUFFIX.match(rest)) is not None:
        rest, alternative = match.group(1), match.group(2)
        alternatives.insert(0, alternative)
    names = [normalise_title(_AKA_PREFIX.sub("", name.strip())) for name in [rest, *alternatives]]
    return list(dict.fromkeys(name for name in names if name))


# --- parsing ------------------------------------------------------------------------------------------

def _movie_table(ids: pd.Series, titles: pd.Series, genre_lists: list[list[str]],
                 years: list[int | None]) -> pd.DataFrame:
    return pd.DataFrame({
        "source_id": ids.to_numpy(),
        "title": titles.to_numpy(),
        "genres": [", ".join(genres) for genres in genre_lists],
        "year": pd.array(years, dtype="Int64"),
        "category": [genres[0] if genres else UNKNOWN_CATEGORY for genres in genre_lists],
    })


def _movie_tags(tags_path: Path, movie_ids: pd.Series) -> np.ndarray:
    """The distinct tags of each movie (case-insensitive, first spelling and file order kept), ", "-joined."""
    tags = read_csv(tags_path, required=["movieId", "tag"], dtype=str, keep_default_na=False)
    table = pd.DataFrame({"movie": tags["movieId"].str.strip(), "tag": tags["tag"].str.strip()})
    unknown = ~table["movie"].isin(movie_ids)
    if unknown.any():
        raise DataError(f"movie ids not found in {MOVIES_FILE}", file=str(tags_path), column="movieId",
                        ids=table.loc[unknown, "movie"].unique())
    table = table[table["tag"] != ""]
    table = table[~table.assign(key=table["tag"].str.lower()).duplicated(["movie", "key"])]
    joined = table.groupby("movie", sort=False)["tag"].agg(", ".join)
    return movie_ids.map(joined).fillna("").to_numpy()


def _numbers(table: pd.DataFrame, column: str, path: Path, *, first_line: int, integer: bool) -> np.ndarray:
    """``table[column]`` (read as text) as int64 / float64; bad values raise naming their line numbers."""
    values = pd.to_numeric(table[column].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if integer:
        bad |= np.isfinite(values) & (values != np.round(values))
    if bad.any():
        kind = "an integer" if integer else "a number"
        raise DataError(f"not {kind} (line numbers)", file=str(path), column=column,
                        ids=np.flatnonzero(bad) + first_line)
    return values.astype(np.int64) if integer else values


def _rating_interactions(table: pd.DataFrame, path: Path, *, user: str, item: str, first_line: int,
                         config: MovieLensConfig) -> pd.DataFrame:
    """Interactions from a ratings table read as text, with columns ``user``, ``item``, ``rating``,
    ``timestamp`` (``first_line`` = the file line of the first row, for error messages)."""
    rating = _numbers(table, "rating", path, first_line=first_line, integer=False)
    return pd.DataFrame({
        "user": table[user].str.strip().to_numpy(),
        "item": table[item].str.strip().to_numpy(),
        "time": _numbers(table, "timestamp", path, first_line=first_line, integer=True),
        "rating": rating.astype(np.float32),
        "click": np.ones(len(rating), dtype=np.int8),
        "like": (rating >= config.like_threshold).astype(np.int8),
    })


def _split_fields(path: Path, line_no: int, line: str, sep: str, n: int, layout: str) -> list[str]:
    fields = line.split(sep)
    if len(fields) != n:
        raise DataError(f"{path}: line {line_no}: expected {n} {sep!r}-separated fields ({layout}), "
                        f"got {len(fields)}: {line[:80]!r}")
    return fields


def _ml100k_genre_names(path: Path) -> list[str]:
    """Genre names in flag order (``u.genre`` lists ``name|index``)."""
    named = {}
    for line_no, line in enumerate(read_lines(path), start=1):
        name, index = _split_fields(path, line_no, line, "|", 2, "name|index")
        if not index.strip().isdigit():
            raise DataError(f"{path}: line {line_no}: the genre index {index!r} is not a number")
        named[int(index)] = name.strip()
    if sorted(named) != list(range(len(named))):
        raise DataError(f"{path}: genre indices must be 0..{len(named) - 1}, got {sorted(named)}")
    return [named[i] for i in range(len(named))]


def _ml100k_items(path: Path, genre_names: list[str]) -> pd.DataFrame:
    layout = f"id|title|release date|video release date|IMDb URL|{len(genre_names)} genre flags"
    ids, titles, genre_lists, years = [], [], [], []
    for line_no, line in enumerate(read_lines(path, encoding="latin-1"), start=1):
        fields = _split_fields(path, line_no, line, "|", 5 + len(genre_names), layout)
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataError(f"{path}: line {line_no}: genre flags must be 0 or 1, got {flags}")
        title, release_date = fields[1].strip(), fields[2].strip()
        ids.append(fields[0].strip())
        titles.append(title)
        genre_lists.append([name for name, flag in zip(genre_names, flags, strict=True)
                            if flag == "1" and name != ML100K_UNKNOWN_GENRE])
        release_year = release_date[-4:]  # "01-Jan-1995"
        years.append(title_year(title) or (int(release_year) if release_year.isdigit() else None))
    items = _movie_table(pd.Series(ids), pd.Series(titles), genre_lists, years)
    items["tags"] = ""  # MovieLens 100K has no tags
    return items


def _ml100k_users(path: Path) -> pd.DataFrame:
    rows = [_split_fields(path, line_no, line, "|", 5, "id|age|gender|occupation|zip")
            for line_no, line in enumerate(read_lines(path), start=1)]
    table = pd.DataFrame(rows, columns=["source_id", "age", "gender", "occupation", "zip"]).apply(
        lambda column: column.str.strip())
    table["age"] = _numbers(table, "age", path, first_line=1, integer=True)
    return table


# --- ML-1M enrichment ---------------------------------------------------------------------------------

def _enrich(items: pd.DataFrame, source: Path, config: MovieLensConfig) -> tuple[list[str], str, dict[str, Any]]:
    """Add ``plot``, ``director``, ``actors`` to ``items`` from the ML-1M side information.

    Returns the added text columns, a note for ``meta.notes`` and a record for ``meta.config``.
    """
    folder = Path(config.enrich_source) if config.enrich_source else source.parent / ENRICH_FOLDER
    if not folder.is_dir():
        if config.enrich_source:
            raise DataError(f"{folder}: enrich_source folder not found (expected ML-1M side information)")
        return [], f"ml1m enrichment skipped: {folder} not found", {"enrich_file": None, "enrich_matched": 0}
    extra_path = source_file(folder, EXTRA_INFO_FILE)
    extra = [_split_fields(extra_path, line_no, line, "::", len(EXTRA_INFO_FIELDS), "::".join(EXTRA_INFO_FIELDS))
             for line_no, line in enumerate(read_lines(extra_path), start=1)]
    tiers = _ml1m_title_index(extra, folder / ML1M_MOVIES_FILE)
    offsets = [0] + [sign * d for d in range(1, config.enrich_year_tolerance + 1) for sign in (-1, 1)]
    matches = [_match(title_variants(title), year, tiers, offsets)
               for title, year in zip(items["title"], items["year"], strict=True)]
    for column in ENRICH_COLUMNS:
        field_index = EXTRA_INFO_FIELDS.index(column)
        items[column] = [_extra_text(extra[row][field_index]) if row is not None else "" for row in matches]
    matched = sum(row is not None for row in matches)
    note = f"ml1m enrichment: {matched:,} of {len(items):,} movies matched by title and year ({extra_path})"
    return list(ENRICH_COLUMNS), note, {"enrich_file": str(extra_path), "enrich_matched": matched}


TitleIndex = dict[tuple[str, int], int]  # (normalised title, year) -> row of the extra-info file


def _ml1m_title_index(extra: list[list[str]], movies_path: Path) -> tuple[TitleIndex, TitleIndex]:
    """Two match tiers over the ML-1M movies: their whole titles (the extra-info title, plus the
    MovieLens-style variants of ``movies.dat`` when present), then the parts of those titles split at ``:``
    and `` - `` (so that ``Star Wars (1977)`` finds ``Star Wars: Episode IV - A New Hope``)."""
    titles: list[tuple[int, str, int]] = []  # (row of the extra-info file, title, year)
    for row, fields in enumerate(extra):
        year_text = fields[2].strip()
        if year_text.isdigit():
            titles.append((row, fields[1], int(year_text)))
    if movies_path.is_file():
        row_of_id = {fields[0].strip(): row for row, fields in enumerate(extra)}
        for line_no, line in enumerate(read_lines(movies_path, encoding="latin-1"), start=1):
            movie_id, title, _ = _split_fields(movies_path, line_no, line, "::", 3, "id::title::genres")
            year = title_year(title)
            if movie_id.strip() in row_of_id and year is not None:
                titles.append((row_of_id[movie_id.strip()], title, year))
    whole: TitleIndex = {}
    parts: TitleIndex = {}
    for row, title, year in titles:
        for name in title_variants(title):
            whole.setdefault((name, year), row)
        for part in _TITLE_PARTS.split(_YEAR_SUFFIX.sub("", title)):
            if name := normalise_title(part):
                parts.setdefault((name, year), row)
    return whole, parts


def _match(names: list[str], year: Any, tiers: tuple[TitleIndex, ...], offsets: list[int]) -> int | None:
    """The row of the first hit, trying the years in ``offsets`` order (exact first), then the tiers in
    order, then the movie's names in order; None without a year or a hit."""
    if pd.isna(year):
        return None
    for offset in offsets:
        for index in tiers:
            for name in names:
                row = index.get((name, int(year) + offset))
                if row is not None:
                    return row
    return None


def _extra_text(value: str) -> str:
    value = value.strip()
    return "" if value == MISSING_EXTRA else value


# --- assembly -----------------------------------------------------------------------------------------

def _finish(name: str, source: Path, config: MovieLensConfig, items: pd.DataFrame, interactions: pd.DataFrame, *,
            users: pd.DataFrame | None, user_features: list[str], items_file: Path, interactions_file: Path,
            users_file: Path | str = S.USERS_FILE) -> Dataset:
    text_columns = ["title", "genres", "tags"]
    notes: list[str] = []
    record: dict[str, Any] = {"like": f"rating >= {config.like_threshold:g}", "click": "1 for every rating"}
    if config.enrich:
        added, note, enrichment = _enrich(items, source, config)
        text_columns += added
        notes.append(note)
        record.update(enrichment)
    items = items[["source_id", *text_columns, "year", "category"]]
    meta = DatasetMeta(
        name=name,
        source=str(source),
        loader=name,
        config={**to_dict(config), **record},
        time_unit="seconds",
        text_columns=text_columns,
        label_columns=["click", "like"],
        signal_columns=["rating"],
        user_feature_columns=user_features,
        positive_only=True,
        notes=notes,
    )
    return assemble(items=items, interactions=interactions, users=users, meta=meta, items_file=str(items_file),
                    interactions_file=str(interactions_file), users_file=str(users_file),
                    drop_unknown_items=config.drop_unknown_movies)

"""Last.fm-2k (HetRec 2011) with precomputed multimodal artist features (positives only).

Files (tab-separated with a header unless stated):

* ``lfm2k.inter`` = ``userID itemID rating x_label``: the (user, artist) pairs kept by the multimodal
  release, with 0-based ids; ``itemID`` i is row i of every ``.npy`` file. ``rating`` is always 1 and
  ``x_label`` is the release's own split marker (0/1/2); neither is used.
* ``lfm2k_og_ids.inter``: the same rows with the original HetRec ``userID`` and artist ids.
* ``user_artists.dat`` = ``userID artistID weight``: the listen count of every HetRec (user, artist) pair.
* ``artists.dat`` = ``id name url pictureURL``: artist names.
* ``lfm2k_text.tsv`` = ``artistID text``: the artist's distinct user tags, comma-joined.
* ``vggish.npy`` (n_artists, 128) and ``whisper.npy`` (n_artists, 512): audio embeddings;
  ``all-MiniLM-L6-v2.npy`` (n_artists, 384): an embedding of the tag text.

Items = the artists in ``itemID`` order, so that row i of the items table is row i of each ``.npy``:
``source_id`` = the original artist id, text ``name`` and ``tags`` (``", "``-joined, empty when the
artist has none), vectors ``vggish``, ``whisper`` and (``include_text_vectors``) ``text_minilm``.

Interactions = the pairs, with the signal ``listen_count`` (``weight`` of ``user_artists.dat``) and two
labels: ``click = 1`` (every pair is a positive; negatives are sampled later) and

    heavy_listen = listen_count >= q-quantile of the listen counts of the same user over their artists
                   in this data (q = heavy_listen_quantile, 0.5 = the median; linear interpolation)

so with the median each user's upper half of artists, ties included, is a heavy listen (about half of
all pairs). There are no timestamps: ``time`` is each pair's position in a random order within its user
(``seed``), so order-based splits are random splits. The users are those with at least one pair in
``lfm2k.inter`` (1,858 of HetRec's 1,892).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qarm.config import to_dict
from qarm.data.build import assemble
from qarm.data.loaders.files import read_csv, read_npy, source_file
from qarm.data.loaders.registry import register
from qarm.data.schema import Dataset, DatasetMeta
from qarm.errors import DataError

INTER_FILE = "lfm2k.inter"
ORIGINAL_IDS_FILE = "lfm2k_og_ids.inter"
LISTENS_FILE = "user_artists.dat"
ARTISTS_FILE = "artists.dat"
TEXT_FILE = "lfm2k_text.tsv"
AUDIO_VECTOR_FILES = {"vggish": "vggish.npy", "whisper": "whisper.npy"}
TEXT_VECTOR_FILE = "all-MiniLM-L6-v2.npy"
TEXT_VECTOR_NAME = "text_minilm"


@dataclass
class LastFmConfig:
    heavy_listen_quantile: float = 0.5  # heavy_listen = listen_count >= this per-user quantile
    include_text_vectors: bool = True  # add the precomputed all-MiniLM-L6-v2 tag vectors as text_minilm
    seed: int = 0  # seed of the random order within each user (there are no timestamps)

    def __post_init__(self) -> None:
        if not 0.0 <= self.heavy_listen_quantile <= 1.0:
            raise ValueError(f"heavy_listen_quantile must be in [0, 1], got {self.heavy_listen_quantile}")


@register(
    "lastfm2k",
    config=LastFmConfig,
    shared_folder="lastfm2k_mm",
    description="Last.fm-2k artists with tags + VGGish / Whisper audio vectors, listen counts (1,425 artists)",
)
def load_lastfm(source: Path, config: LastFmConfig) -> Dataset:
    inter_path = source_file(source, INTER_FILE)
    original_path = source_file(source, ORIGINAL_IDS_FILE)
    listens_path = source_file(source, LISTENS_FILE)
    artists_path = source_file(source, ARTISTS_FILE)
    text_path = source_file(source, TEXT_FILE)

    pairs = _read_pairs(inter_path, original_path)
    items = _artists(pairs, artists_path, text_path)
    vector_files = dict(AUDIO_VECTOR_FILES)
    if config.include_text_vectors:
        vector_files[TEXT_VECTOR_NAME] = TEXT_VECTOR_FILE
    vectors = {name: _read_vectors(source_file(source, file), name, len(items)) for name, file in vector_files.items()}

    listens = _ints(listens_path, ["userID", "artistID", "weight"])
    listens = listens.rename(columns={"userID": "user", "artistID": "artist", "weight": "listen_count"})
    repeated = listens.duplicated(["user", "artist"], keep=False).to_numpy()
    if repeated.any():
        raise DataError("repeated (userID, artistID) pairs", file=str(listens_path), column="artistID",
                        ids=list(zip(listens.loc[repeated, "user"], listens.loc[repeated, "artist"], strict=True)))
    interactions = pairs[["user", "artist"]].merge(listens, on=["user", "artist"], how="left")
    missing = interactions["listen_count"].isna().to_numpy()
    if missing.any():
        raise DataError(f"(user, artist) pairs of {original_path} have no listen count", file=str(listens_path),
                        column="weight", ids=list(zip(interactions.loc[missing, "user"],
                                                      interactions.loc[missing, "artist"], strict=True)))
    counts = interactions["listen_count"].astype(np.int64)
    threshold = counts.groupby(interactions["user"]).transform("quantile", config.heavy_listen_quantile)
    interactions = pd.DataFrame({
        "user": interactions["user"].to_numpy(),
        "item": interactions["artist"].to_numpy(),
        "time": _random_order(interactions["user"], config.seed),
        "listen_count": counts.to_numpy(),
        "click": np.ones(len(counts), dtype=np.int8),
        "heavy_listen": (counts >= threshold).to_numpy().astype(np.int8),
    })

    heavy = f"listen_count >= the user's {config.heavy_listen_quantile:g}-quantile of their listen counts here"
    meta = DatasetMeta(
        name="lastfm2k",
        source=str(source),
        loader="lastfm2k",
        config={**to_dict(config), "heavy_listen": heavy, "click": "1 for every (user, artist) pair"},
        time_unit="order",
        text_columns=["name", "tags"],
        label_columns=["click", "heavy_listen"],
        signal_columns=["listen_count"],
        positive_only=True,
        notes=[f"no timestamps: time is a random order within each user (seed {config.seed}), not chronology",
               f"users are those with at least one pair in {INTER_FILE} ({interactions['user'].nunique():,}; "
               "HetRec lists 1,892)"],
    )
    return assemble(items=items, interactions=interactions, meta=meta, item_vectors=vectors,
                    items_file=str(original_path), interactions_file=str(original_path))


def _random_order(users: pd.Series, seed: int) -> np.ndarray:
    """Each row's position (0-based) in a seeded random order of its user's rows."""
    keys = pd.Series(np.random.default_rng(seed).permutation(len(users)), index=users.index)
    return keys.groupby(users).rank(method="first").to_numpy(dtype=np.int64) - 1


def _ints(path: Path, columns: list[str]) -> pd.DataFrame:
    """The integer ``columns`` of a tab-separated file with a header."""
    return read_csv(path, sep="\t", required=columns, usecols=lambda c: c in columns,
                    dtype=dict.fromkeys(columns, "int64"))[columns]


def _read_pairs(inter_path: Path, original_path: Path) -> pd.DataFrame:
    """The pairs with both ids of each artist: ``user`` / ``artist`` (original), ``item`` (0-based)."""
    dense = _ints(inter_path, ["userID", "itemID"])
    original = _ints(original_path, ["userID", "itemID"])
    if len(dense) != len(original):
        raise DataError(f"{original_path}: {len(original)} rows, but {inter_path} has {len(dense)}; "
                        "the two files must list the same pairs in the same order")
    pairs = pd.DataFrame({"user": original["userID"], "artist": original["itemID"], "item": dense["itemID"]})
    for one, other in (("item", "artist"), ("artist", "item")):
        ambiguous = pairs.groupby(one)[other].nunique()
        if (ambiguous > 1).any():
            raise DataError(f"an id maps to several ids of the other file ({inter_path.name} vs {original_path.name})",
                            file=str(original_path), column="itemID", ids=ambiguous.index[ambiguous > 1])
    n_items = pairs["item"].nunique()
    if pairs["item"].min() != 0 or pairs["item"].max() != n_items - 1:
        raise DataError(f"itemID must be dense 0..{n_items - 1} (the .npy rows)", file=str(inter_path),
                        column="itemID", ids=[pairs["item"].min(), pairs["item"].max()])
    return pairs


def _artists(pairs: pd.DataFrame, artists_path: Path, text_path: Path) -> pd.DataFrame:
    """One row per artist, row i = ``itemID`` i: ``source_id``, ``name``, ``tags``."""
    artist_ids = pairs.drop_duplicates("item").sort_values("item")["artist"].to_numpy()
    artists = read_csv(artists_path, sep="\t", required=["id", "name"], usecols=["id", "name"], quoting=3,
                       dtype={"id": "int64", "name": str}, keep_default_na=False)
    names = artists.set_index("id")["name"].reindex(artist_ids)
    if names.isna().any():
        raise DataError(f"artist ids of {INTER_FILE} missing here", file=str(artists_path), column="id",
                        ids=names.index[names.isna()])
    text = read_csv(text_path, sep="\t", required=["artistID", "text"], quoting=3,
                    dtype={"artistID": "int64", "text": str}, keep_default_na=False)
    tags = text.set_index("artistID")["text"].reindex(artist_ids).fillna("")
    return pd.DataFrame({
        "source_id": artist_ids,
        "name": names.str.strip().to_numpy(),
        "tags": [", ".join(tag.strip() for tag in value.split(",") if tag.strip()) for value in tags],
    })


def _read_vectors(path: Path, name: str, n_items: int) -> np.ndarray:
    vectors = read_npy(path)
    if vectors.shape[0] != n_items:
        raise DataError(f"{path}: {vectors.shape[0]} rows for {n_items} artists (row i must be itemID i of "
                        f"{INTER_FILE})")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise DataError("non-finite values (NaN or inf) in rows", file=str(path), column=name,
                        ids=np.flatnonzero(~finite))
    return vectors

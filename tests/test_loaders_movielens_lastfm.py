"""MovieLens (ml-latest-small, ml100k) and Last.fm-2k loaders: real-data counts and content (skipped when
../shared/data is absent), then bad inputs built from tiny files in tmp_path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_folder

from qarm.data.loaders import load
from qarm.data.loaders.movielens import normalise_title, title_variants, title_year
from qarm.data.schema import Dataset
from qarm.errors import ConfigError, DataError

# --- real data ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml_small(shared_data: Path) -> Dataset:
    return load("ml-latest-small", shared_folder(shared_data, "ml-latest-small"))


@pytest.fixture(scope="module")
def ml100k(shared_data: Path) -> Dataset:
    return load("ml100k", shared_folder(shared_data, "ml100k"))


@pytest.fixture(scope="module")
def lastfm(shared_data: Path) -> Dataset:
    return load("lastfm2k", shared_folder(shared_data, "lastfm2k_mm"))


def _movie(dataset: Dataset, title: str):
    rows = dataset.items[dataset.items["title"] == title]
    assert len(rows) == 1, f"{title!r} appears {len(rows)} times"
    return rows.iloc[0]


def _enriched(dataset: Dataset) -> bool:
    return "director" in dataset.meta.text_columns


def _check_ratings(dataset: Dataset) -> None:
    inter = dataset.interactions
    assert dataset.meta.time_unit == "seconds"
    assert dataset.meta.positive_only
    assert dataset.meta.label_columns == ["click", "like"]
    assert dataset.meta.signal_columns == ["rating"]
    assert inter["click"].dtype == np.int8 and inter["like"].dtype == np.int8
    assert (inter["click"] == 1).all()
    assert 0.3 < inter["like"].mean() < 0.7
    np.testing.assert_array_equal(inter["like"], (inter["rating"] >= 4).astype(np.int8))
    assert inter["time"].min() > 700_000_000  # unix seconds (1992 onwards)
    expected = ["title", "genres", "tags", "plot", "director", "actors"]
    assert dataset.meta.text_columns == (expected if _enriched(dataset) else expected[:3])


@pytest.mark.shared_data
def test_ml_latest_small_matches_the_data_card(ml_small: Dataset) -> None:
    assert ml_small.meta.counts == {"users": 610, "items": 9742, "interactions": 100_836}
    _check_ratings(ml_small)
    # Movies nobody rated stay in the catalogue.
    assert ml_small.interactions["item_id"].nunique() < ml_small.n_items
    # The shared ratings.csv ends with one rating of a movie outside movies.csv; it is dropped, with a note.
    assert any("dropped 1 interactions" in note for note in ml_small.meta.notes)


@pytest.mark.shared_data
def test_ml_latest_small_text_of_toy_story(ml_small: Dataset) -> None:
    toy = _movie(ml_small, "Toy Story (1995)")
    assert toy["genres"] == "Adventure, Animation, Children, Comedy, Fantasy"
    assert toy["category"] == "Adventure"
    assert toy["year"] == 1995
    assert "pixar" in toy["tags"]
    if not _enriched(ml_small):
        pytest.skip("ml1m_sideinfo is absent: no enrichment to check")
    assert toy["director"] == "John Lasseter"
    assert "Tom Hanks" in toy["actors"] and "Woody" in toy["plot"]
    matched = ml_small.meta.config["enrich_matched"]
    assert 2500 < matched < 3500
    assert any(f"{matched:,} of 9,742 movies matched" in note for note in ml_small.meta.notes)
    # Articles and alternative titles: "City of Lost Children, The (Cité des enfants perdus, La) (1995)".
    city = ml_small.items[ml_small.items["title"].str.startswith("City of Lost Children, The")].iloc[0]
    assert "Jeunet" in city["director"]


@pytest.mark.shared_data
def test_ml100k_matches_the_data_card(ml100k: Dataset) -> None:
    assert ml100k.meta.counts == {"users": 943, "items": 1682, "interactions": 100_000}
    _check_ratings(ml100k)
    assert (ml100k.items["tags"] == "").all()
    assert ml100k.meta.user_feature_columns == ["age", "gender", "occupation", "zip"]
    user = ml100k.users.iloc[0]
    assert (user["source_id"], user["age"], user["gender"], user["occupation"], user["zip"]) == (
        "1", 24, "M", "technician", "85711")
    toy = _movie(ml100k, "Toy Story (1995)")
    assert toy["genres"] == "Animation, Children's, Comedy"
    assert toy["category"] == "Animation"
    if _enriched(ml100k):
        assert toy["director"] == "John Lasseter"
        assert _movie(ml100k, "Star Wars (1977)")["director"] == "George Lucas"  # via "Star Wars: Episode IV - ..."
        assert ml100k.meta.config["enrich_matched"] > 1600


@pytest.mark.shared_data
def test_lastfm_items_vectors_and_labels(lastfm: Dataset, shared_data: Path) -> None:
    assert lastfm.n_items == 1425 and lastfm.n_interactions == 56_345
    assert lastfm.n_users == 1858  # users with at least one pair left in lfm2k.inter (HetRec has 1,892)
    shapes = {name: vectors.shape for name, vectors in lastfm.item_vectors.items()}
    assert shapes == {"vggish": (1425, 128), "whisper": (1425, 512), "text_minilm": (1425, 384)}
    for vectors in lastfm.item_vectors.values():
        assert vectors.dtype == np.float32 and np.isfinite(vectors).all()
        assert (np.linalg.norm(vectors, axis=1) > 0).all()
    # Row 0 is itemID 0 of lfm2k.inter, i.e. artist 80 of lfm2k_og_ids.inter's first row.
    assert lastfm.items["source_id"].iloc[0] == "80"
    assert lastfm.items["name"].str.len().min() > 0
    inter = lastfm.interactions
    assert (inter["click"] == 1).all()
    assert 0.4 < inter["heavy_listen"].mean() < 0.6
    assert inter["listen_count"].min() >= 1
    assert lastfm.meta.time_unit == "order" and any("random order" in n for n in lastfm.meta.notes)
    # time is a permutation of 0..n-1 within each user.
    sizes = inter.groupby("user_id")["time"].agg(["min", "max", "nunique", "size"])
    assert (sizes["min"] == 0).all() and (sizes["max"] == sizes["size"] - 1).all()
    assert (sizes["nunique"] == sizes["size"]).all()
    again = load("lastfm2k", shared_folder(shared_data, "lastfm2k_mm"), {"seed": 1, "include_text_vectors": False})
    assert set(again.item_vectors) == {"vggish", "whisper"}
    assert not np.array_equal(again.interactions["item_id"], inter["item_id"])  # another order, same pairs
    assert again.interactions["listen_count"].sum() == inter["listen_count"].sum()


# --- titles -------------------------------------------------------------------------------------------


def test_title_normalisation() -> None:
    assert normalise_title("American President, The") == normalise_title("The American President")
    assert normalise_title("Misérables, Les") == "les miserables"
    assert normalise_title("Up Close & Personal") == normalise_title("Up Close and Personal")
    assert title_variants("City of Lost Children, The (Cité des enfants perdus, La) (1995)") == [
        "the city of lost children", "la cite des enfants perdus"]
    assert title_variants("Seven (a.k.a. Se7en) (1995)") == ["seven", "se7en"]
    assert title_year("Toy Story (1995)") == 1995
    assert title_year("Death Note: Desu nôto (2006–2007)") == 2006
    assert title_year("Babylon 5") is None


# --- bad inputs (tiny files) --------------------------------------------------------------------------

MOVIES_CSV = "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,Heat (1995),(no genres listed)\n"
RATINGS_CSV = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.0,964982704\n2,1,5.0,964982705\n"
TAGS_CSV = "userId,movieId,tag,timestamp\n1,1,pixar,1\n2,1,Pixar,2\n2,1,fun,3\n"


def _ml_small(folder: Path, *, ratings: str | bytes = RATINGS_CSV, movies: str = MOVIES_CSV) -> Path:
    folder.mkdir()
    for name, text in (("ratings.csv", ratings), ("movies.csv", movies), ("tags.csv", TAGS_CSV)):
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return folder


def _ml100k(folder: Path, *, ratings: str) -> Path:
    folder.mkdir()
    flags = "|".join(["0", "0", "0", "1"])
    (folder / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\nAnimation|3\n\n")
    (folder / "u.item").write_bytes(f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n".encode("latin-1"))
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (folder / "u.data").write_text(ratings)
    return folder


def _bad(path: Path, *parts: str) -> str:
    """A regex matching ``path`` followed by ``parts`` (plain text) in a DataError message."""
    return re.escape(str(path)) + ".*" + ".*".join(re.escape(part) for part in parts)


def test_ml_small_tiny_source_loads(tmp_path: Path) -> None:
    data = load("ml-latest-small", _ml_small(tmp_path / "ml"))
    assert data.meta.counts == {"users": 2, "items": 2, "interactions": 3}
    assert data.items["tags"].tolist() == ["pixar, fun", ""]  # distinct ignoring case, first spelling kept
    assert data.items["category"].tolist() == ["Adventure", "unknown"]
    assert data.items["genres"].tolist() == ["Adventure, Animation", ""]
    assert data.interactions["like"].tolist() == [1, 0, 1]
    assert any("enrichment skipped" in note for note in data.meta.notes)  # no ml1m_sideinfo beside it


def test_enrichment_matches_articles_alternative_titles_and_a_year_apart(tmp_path: Path) -> None:
    side = tmp_path / "ml1m_sideinfo"
    side.mkdir()
    fields = ["{id}", "{title}", "{year}", "PG", "1995", "Drama", "{director}", "W", "A, B", "{plot}", "url"]
    line = "::".join(fields)
    (side / "movies_extrainfos.dat").write_text("\r\n".join([
        line.format(id=7, title="The City of Lost Children", year=1995, director="Jeunet", plot="Dreams."),
        line.format(id=8, title="Heat", year=1996, director="Mann", plot="N/A"),
    ]) + "\r\n", encoding="utf-8")
    movies = "movieId,title,genres\n1,\"City of Lost Children, The (Cité des enfants perdus, La) (1995)\",Drama\n" \
             "2,Heat (1995),Action\n3,Other (1995),Drama\n"
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,3.0,2\n"
    data = load("ml-latest-small", _ml_small(tmp_path / "ml", ratings=ratings, movies=movies))
    assert data.items["director"].tolist() == ["Jeunet", "Mann", ""]
    assert data.items["plot"].tolist() == ["Dreams.", "", ""]  # N/A is no text
    assert data.meta.config["enrich_matched"] == 2
    exact = load("ml-latest-small", tmp_path / "ml", {"enrich_year_tolerance": 0})
    assert exact.items["director"].tolist() == ["Jeunet", "", ""]


def test_ratings_without_rating_column(tmp_path: Path) -> None:
    folder = _ml_small(tmp_path / "ml", ratings="userId,movieId,timestamp\n1,1,964982703\n")
    with pytest.raises(DataError, match=_bad(folder / "ratings.csv", "column 'rating'", "missing column")):
        load("ml-latest-small", folder)


def test_ratings_of_an_unknown_movie(tmp_path: Path) -> None:
    folder = _ml_small(tmp_path / "ml", ratings=RATINGS_CSV + "3,99,5.0,964982706\n")
    with pytest.raises(DataError, match=_bad(folder / "ratings.csv", "item ids not found", "['99']")):
        load("ml-latest-small", folder, {"drop_unknown_movies": False})
    kept = load("ml-latest-small", folder)  # the default drops the rating and says so
    assert kept.n_interactions == 3 and kept.n_users == 2
    assert any("dropped 1 interactions" in note for note in kept.meta.notes)


def test_empty_ratings_file(tmp_path: Path) -> None:
    folder = _ml_small(tmp_path / "ml", ratings="")
    with pytest.raises(DataError, match=_bad(folder / "ratings.csv", "the file is empty")):
        load("ml-latest-small", folder)


def test_binary_garbage_ratings_file(tmp_path: Path) -> None:
    folder = _ml_small(tmp_path / "ml", ratings=np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match=_bad(folder / "ratings.csv", "cannot parse")):
        load("ml-latest-small", folder)


def test_non_numeric_rating(tmp_path: Path) -> None:
    folder = _ml_small(tmp_path / "ml", ratings=RATINGS_CSV.replace("3.0", "three"))
    with pytest.raises(DataError, match=_bad(folder / "ratings.csv", "column 'rating'", "not a number", "[3]")):
        load("ml-latest-small", folder)


def test_missing_tags_file(tmp_path: Path) -> None:
    folder = _ml_small(tmp_path / "ml")
    (folder / "tags.csv").unlink()
    with pytest.raises(DataError, match=_bad(folder / "tags.csv", "missing file")):
        load("ml-latest-small", folder)


def test_missing_explicit_enrich_source(tmp_path: Path) -> None:
    folder = _ml_small(tmp_path / "ml")
    with pytest.raises(DataError, match=_bad(tmp_path / "nowhere", "enrich_source folder not found")):
        load("ml-latest-small", folder, {"enrich_source": str(tmp_path / "nowhere")})


def test_ml100k_tiny_source_and_short_line(tmp_path: Path) -> None:
    good = load("ml100k", _ml100k(tmp_path / "ok", ratings="1\t1\t4\t881250949\n2\t1\t2\t881250950\n"))
    assert good.meta.counts == {"users": 2, "items": 1, "interactions": 2}
    assert good.items["genres"].tolist() == ["Animation"]
    folder = _ml100k(tmp_path / "bad", ratings="1\t1\t4\t881250949\n2\t1\t2\n")
    with pytest.raises(DataError, match=_bad(folder / "u.data", "line 2: expected 4 non-empty tab-separated fields")):
        load("ml100k", folder)


def _lastfm(folder: Path, *, rows: dict[str, int] | None = None, nan_in: str | None = None) -> Path:
    """3 artists (original ids 10, 20, 30 = itemID 0, 1, 2) and 2 users (original 2, 3)."""
    folder.mkdir()
    pairs = [(2, 10, 0), (2, 20, 1), (2, 30, 2), (3, 20, 1)]
    users = {2: 0, 3: 1}
    header = "userID\titemID\trating\tx_label\n"
    (folder / "lfm2k.inter").write_text(header + "".join(f"{users[u]}\t{i}\t1\t0\n" for u, _, i in pairs))
    (folder / "lfm2k_og_ids.inter").write_text(header + "".join(f"{u}\t{a}\t1\t0\n" for u, a, _ in pairs))
    (folder / "user_artists.dat").write_text("userID\tartistID\tweight\r\n2\t10\t1\r\n2\t20\t5\r\n2\t30\t10\r\n"
                                             "3\t20\t7\r\n3\t99\t1\r\n")
    (folder / "artists.dat").write_text("id\tname\turl\tpictureURL\n10\tA\tu\tp\n20\t\"B\" side\tu\tp\n30\tC\tu\tp\n")
    (folder / "lfm2k_text.tsv").write_text("artistID\ttext\n10\trock,indie\n20\tpop\n")
    dims = {"vggish.npy": 4, "whisper.npy": 5, "all-MiniLM-L6-v2.npy": 6}
    for name, dim in dims.items():
        vectors = np.ones(((rows or {}).get(name, 3), dim))
        if name == nan_in:
            vectors[1, 0] = np.nan
        np.save(folder / name, vectors)
    return folder


def test_lastfm_tiny_source(tmp_path: Path) -> None:
    data = load("lastfm2k", _lastfm(tmp_path / "fm"))
    assert data.items[["source_id", "name", "tags"]].values.tolist() == [
        ["10", "A", "rock, indie"], ["20", '"B" side', "pop"], ["30", "C", ""]]
    inter = data.interactions.sort_values(["user_id", "item_id"])
    assert inter["listen_count"].tolist() == [1, 5, 10, 7]
    # User 2 listened 1, 5, 10 times: the median is 5, so the 5 and 10 pairs are heavy listens.
    assert inter["heavy_listen"].tolist() == [0, 1, 1, 1]
    assert {name: v.shape for name, v in data.item_vectors.items()} == {
        "vggish": (3, 4), "whisper": (3, 5), "text_minilm": (3, 6)}


def test_lastfm_vectors_with_wrong_row_count(tmp_path: Path) -> None:
    folder = _lastfm(tmp_path / "fm", rows={"vggish.npy": 4})
    with pytest.raises(DataError, match=_bad(folder / "vggish.npy", "4 rows for 3 artists")):
        load("lastfm2k", folder)


def test_lastfm_nan_in_vectors(tmp_path: Path) -> None:
    folder = _lastfm(tmp_path / "fm", nan_in="whisper.npy")
    with pytest.raises(DataError, match=_bad(folder / "whisper.npy", "column 'whisper'", "non-finite", "[1]")):
        load("lastfm2k", folder)


def test_lastfm_pair_without_listen_count(tmp_path: Path) -> None:
    folder = _lastfm(tmp_path / "fm")
    listens = folder / "user_artists.dat"
    listens.write_text(listens.read_text().replace("3\t20\t7\n", ""))
    with pytest.raises(DataError, match=_bad(listens, "column 'weight'", "no listen count", "(3, 20)")):
        load("lastfm2k", folder)


def test_lastfm_missing_npy_and_bad_quantile(tmp_path: Path) -> None:
    folder = _lastfm(tmp_path / "fm")
    (folder / "all-MiniLM-L6-v2.npy").unlink()
    with pytest.raises(DataError, match=_bad(folder / "all-MiniLM-L6-v2.npy", "missing file")):
        load("lastfm2k", folder)
    assert "text_minilm" not in load("lastfm2k", folder, {"include_text_vectors": False}).item_vectors
    with pytest.raises(ConfigError, match="heavy_listen_quantile"):
        load("lastfm2k", folder, {"heavy_listen_quantile": 2.0})

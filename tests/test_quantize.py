"""RQ / VQ codes, code quality, and the quantize stage functions, on small generated data."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from qarm.config import from_dict
from qarm.errors import ConfigError, DataError
from qarm.quantize import (
    NotFittedError,
    QuantizeConfig,
    ResidualKMeans,
    RQConfig,
    SQLiteCodeStore,
    TopKCodes,
    VQConfig,
    assign_new_items,
    faiss_ops,
    inspect_codes,
    quantize_items,
    read_codes,
    rq_quality,
    vq_quality,
)
from qarm.quantize._safetensors import read_safetensors, write_safetensors
from qarm.quantize.quality import category_purity, collision_rate, entropy_bits


def clustered(n: int, dim: int, n_clusters: int, seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture: ``(vectors (n, dim) float32, cluster labels (n,))``."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    return (centers[labels] + noise * rng.standard_normal((n, dim))).astype(np.float32), labels


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(3000, 16, 40)


# ---------------------------------------------------------------------------------------------- RQ
def test_rq_codes_reconstruct_to_sum_of_chosen_centroids(data):
    x, _ = data
    rq = ResidualKMeans(levels=3, codebook_size=[32, 16, 16]).fit(x)
    codes = rq.transform(x)
    assert codes.shape == (3000, 3) and codes.dtype == np.int64
    assert [cb.shape for cb in rq.codebooks_] == [(32, 16), (16, 16), (16, 16)]
    expected = sum(rq.codebooks_[level][codes[:, level]] for level in range(3))
    np.testing.assert_allclose(rq.reconstruct(codes), expected, rtol=0, atol=1e-6)
    # each level explains more: the error after L levels is below the error after 1
    xn = rq.preprocess(x)
    err = [np.mean(np.sum((xn - rq.reconstruct(codes, levels=l)) ** 2, axis=1)) for l in (1, 2, 3)]  # noqa: E741
    assert err[0] > err[1] > err[2]
    np.testing.assert_allclose(err[2], rq.train_mse_[2], rtol=1e-4)
    # fit_transform reuses the fit's assignments and agrees with transform
    np.testing.assert_array_equal(ResidualKMeans(levels=3, codebook_size=[32, 16, 16]).fit_transform(x), codes)


def test_rq_hand_worked_two_levels_from_kmeans():
    """1-d points near -1, 1, 99, 101 (50 each): level 1 must find 0 and 100, level 2 -1 and +1.

    The 50 points of a group are spread symmetrically by +-0.01 (so the means are exact) rather than
    repeated: with exact duplicates faiss's random initialisation can draw two equal points, and the
    empty cluster it then splits sits at the residuals' mean, exactly 0, where a split cannot move it.
    """
    jitter = np.linspace(-0.01, 0.01, 50)
    x = (np.array([-1.0, 1.0, 99.0, 101.0])[:, None] + jitter).reshape(-1, 1).astype(np.float32)
    rq = ResidualKMeans(levels=2, codebook_size=2, normalize=False, niter=10).fit(x)
    np.testing.assert_allclose(np.sort(rq.codebooks_[0][:, 0]), [0.0, 100.0], atol=1e-4)
    np.testing.assert_allclose(np.sort(rq.codebooks_[1][:, 0]), [-1.0, 1.0], atol=1e-4)
    codes = rq.transform(np.array([[-1.0], [1.0], [99.0], [101.0]]))
    level1 = rq.codebooks_[0][codes[:, 0], 0]
    level2 = rq.codebooks_[1][codes[:, 1], 0]
    np.testing.assert_allclose(level1, [0.0, 0.0, 100.0, 100.0], atol=1e-4)
    np.testing.assert_allclose(level2, [-1.0, 1.0, -1.0, 1.0], atol=1e-4)
    assert codes[0, 0] == codes[1, 0] != codes[2, 0] == codes[3, 0]
    assert rq.train_mse_[1] == pytest.approx(np.mean(jitter**2), rel=1e-3)  # only the jitter is left


def test_rq_hand_worked_two_levels_with_given_codebooks():
    """Eq. 4-5 by hand: nearest centroid, subtract, nearest centroid of the residual."""
    rq = ResidualKMeans.from_codebooks(
        [np.array([[0, 0], [10, 0]]), np.array([[0, 1], [0, -1], [1, 0]])], normalize=False)
    points = np.array([[10.9, 0.2], [0.1, -0.8], [9.8, 1.1], [-0.2, 0.1]])
    # (10.9, .2): level 1 -> (10, 0), residual (.9, .2): distances to level-2 centroids 1.45, 2.25, .05 -> 2
    # (.1, -.8): level 1 -> (0, 0), residual (.1, -.8): 3.25, .05, 1.45 -> 1
    # (9.8, 1.1): level 1 -> (10, 0), residual (-.2, 1.1): .05, 4.45, 2.65 -> 0
    # (-.2, .1): level 1 -> (0, 0), residual (-.2, .1): .85, 1.25, 1.45 -> 0
    np.testing.assert_array_equal(rq.transform(points), [[1, 2], [0, 1], [1, 0], [0, 0]])
    np.testing.assert_allclose(rq.reconstruct(np.array([[1, 2], [0, 1]])), [[11, 0], [0, -1]])


def test_rq_new_items_use_frozen_codebooks_without_refit(data, tmp_path, monkeypatch):
    x, _ = data
    rq = ResidualKMeans(levels=2, codebook_size=16, random_state=3).fit(x[:2000])
    path = rq.save(tmp_path / "rq.safetensors")
    new = x[2000:] + 0.05
    expected = rq.transform(new)

    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means must not run when coding new items")

    monkeypatch.setattr(faiss_ops, "kmeans", no_kmeans)
    loaded = ResidualKMeans.load(path)
    assert loaded.version_ == rq.version_
    np.testing.assert_array_equal(loaded.transform(new), expected)
    for a, b in zip(loaded.codebooks_, rq.codebooks_):
        np.testing.assert_array_equal(a, b)


def test_rq_version_changes_with_codebooks_and_detects_edits(data, tmp_path):
    x, _ = data
    a = ResidualKMeans(levels=2, codebook_size=8, random_state=0).fit(x)
    b = ResidualKMeans(levels=2, codebook_size=8, random_state=0).fit(x)
    c = ResidualKMeans(levels=2, codebook_size=8, random_state=1).fit(x)
    assert a.version_ == b.version_ != c.version_
    assert a.version_.startswith("rq-")
    path = a.save(tmp_path / "rq.safetensors")
    tensors, meta = read_safetensors(path, expected_format="qarm.rq/1")
    tensors["codebook_0"] = tensors["codebook_0"] + 1.0
    write_safetensors(path, tensors, meta)
    with pytest.raises(DataError, match="does not match the recorded version"):
        ResidualKMeans.load(path)


def test_rq_train_sample_and_subsampling(data):
    x, _ = data
    rq = ResidualKMeans(levels=2, codebook_size=8, train_sample=500, max_points_per_centroid=40).fit(x)
    assert rq.n_train_ == 500
    assert rq.transform(x).shape == (3000, 2)
    assert rq.fit_transform(x).shape == (3000, 2)


def test_rq_normalize_puts_codebooks_on_unit_vectors(data):
    x, _ = data
    rq = ResidualKMeans(levels=1, codebook_size=4).fit(x * 100)
    assert np.all(np.linalg.norm(rq.codebooks_[0], axis=1) <= 1.0 + 1e-5)
    np.testing.assert_array_equal(rq.transform(x * 100), rq.transform(x))  # scale does not matter


@pytest.mark.parametrize("params, message", [
    ({"levels": 0}, "The 'levels' parameter of ResidualKMeans must be an int >= 1. Got 0 instead."),
    ({"codebook_size": 0},
     "The 'codebook_size' parameter of ResidualKMeans must be an int >= 1 or a list of ints >= 1. Got 0 instead."),
    ({"levels": 3, "codebook_size": [4, 4]},
     "The 'codebook_size' parameter of ResidualKMeans must have one entry per level (levels=3). "
     "Got 2 entries instead."),
    ({"niter": 0}, "The 'niter' parameter of ResidualKMeans must be an int >= 1. Got 0 instead."),
    ({"train_sample": 0}, "The 'train_sample' parameter of ResidualKMeans must be an int >= 1 or None. Got 0 instead."),
    ({"normalize": "yes"}, "The 'normalize' parameter of ResidualKMeans must be a bool. Got 'yes' instead."),
])
def test_rq_parameter_errors(data, params, message):
    with pytest.raises(ConfigError) as exc:
        ResidualKMeans(**params).fit(data[0])
    assert str(exc.value) == message


def test_rq_needs_at_least_k_points_and_warns_below_39_per_centroid():
    x, _ = clustered(100, 8, 5)
    with pytest.raises(DataError, match="needs at least 256 training vectors for a codebook of 256 at level 1; "
                                        r"got 100. Use a smaller codebook \(--set rq.codebook_size=N"):
        ResidualKMeans(levels=2, codebook_size=256).fit(x)
    with pytest.warns(faiss_ops.SmallTrainingSetWarning, match="fewer than 39 points per centroid"):
        ResidualKMeans(levels=1, codebook_size=10).fit(x)
    with pytest.raises(DataError, match="at least 8 training points, got 5"):
        faiss_ops.kmeans(x[:5], 8)


def test_rq_input_errors(data):
    x, _ = data
    with pytest.raises(NotFittedError, match="not fitted yet"):
        ResidualKMeans().transform(x)
    rq = ResidualKMeans(levels=1, codebook_size=4).fit(x)
    with pytest.raises(DataError, match=r"vectors must be \(n, 16\), got \(5, 3\)"):
        rq.transform(np.zeros((5, 3)))
    bad = x[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(DataError, match=r"non-finite values.*\[1\]"):
        rq.transform(bad)
    with pytest.raises(DataError, match="codes out of range"):
        rq.reconstruct(np.array([[4]]))


# ---------------------------------------------------------------------------------------------- VQ
def brute_force_topk(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :k]


def test_vq_exact_matches_numpy_brute_force():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 12)).astype(np.float32)
    ids = 1000 + 3 * np.arange(400)  # codes are catalogue ids, not row numbers
    vq = TopKCodes(k=7, index="exact").fit(x, ids)
    new = rng.standard_normal((30, 12))
    np.testing.assert_array_equal(vq.transform(new), ids[brute_force_topk(x, new, 7)])
    codes, scores = vq.transform(new, return_scores=True)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # most similar first


def test_vq_self_exclusion(data):
    x, _ = data
    ids = np.arange(len(x)) * 10 + 5
    vq = TopKCodes(k=5, index="exact")
    codes = vq.fit_transform(x, ids)
    assert codes.shape == (len(x), 5)
    assert not (codes == ids[:, None]).any()
    # the same as the top-6 by brute force without the item itself
    top = ids[brute_force_topk(x, x[:50], 6)]
    np.testing.assert_array_equal(codes[:50], top[:, 1:])
    # without ids (new items) a catalogue vector finds itself first
    assert (vq.transform(x[:50])[:, 0] == ids[:50]).all()
    # exclude_self=False keeps it
    keep = TopKCodes(k=5, index="exact", exclude_self=False).fit(x, ids)
    assert (keep.transform(x[:50], ids[:50])[:, 0] == ids[:50]).all()


def test_vq_self_exclusion_with_duplicate_vectors():
    x = np.array([[1, 0], [1, 0], [0, 1], [0.9, 0.1]], dtype=np.float32)
    codes = TopKCodes(k=2, index="exact").fit_transform(x, [10, 11, 12, 13])
    assert codes[0].tolist() == [11, 13] and codes[1].tolist() == [10, 13]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_vq_approximate_recall_against_exact(kind):
    x, _ = clustered(4000, 16, 30, seed=2)
    vq = TopKCodes(k=10, index=kind).fit(x)
    assert vq.index_kind_ == kind
    result = vq.recall_against_exact(sample_size=500, random_state=0)
    assert result["sample_size"] == 500 and not result["exact"]
    assert result["recall_at_k"] > 0.9
    # the report is the overlap of the two code lists, computed here by hand
    exact = TopKCodes(k=10, index="exact").fit(x)
    rows = np.arange(0, 4000, 40)
    a, b = vq.transform(x[rows], rows), exact.transform(x[rows], rows)
    overlap = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(a, b)])
    assert overlap > 0.9


def test_vq_catalogue_rows_whose_search_went_astray_are_redone_exactly(data, monkeypatch):
    """An approximate search that misses the item itself ended in the wrong region: redo it exactly."""
    x, _ = data
    vq = TopKCodes(k=5, index="hnsw").fit(x)
    exact = TopKCodes(k=5, index="exact").fit(x)
    real_search = faiss_ops.search

    def astray_search(index, queries, k, **kwargs):
        scores, labels = real_search(index, queries, k, **kwargs)
        if index is vq.index_:  # rows 0-2 land among the neighbours of item 2999, far from themselves
            far_scores, far_labels = real_search(index, x[2999:3000] / np.linalg.norm(x[2999]), k)
            scores[:3], labels[:3] = far_scores, far_labels
        return scores, labels

    monkeypatch.setattr(faiss_ops, "search", astray_search)
    rows = np.arange(10)
    np.testing.assert_array_equal(vq.transform(x[rows], rows), exact.transform(x[rows], rows))
    assert vq.recall_against_exact(sample_size=3000)["share_researched"] == pytest.approx(3 / 3000)


def test_vq_auto_index_threshold_and_exact_recall(data):
    x, _ = data
    assert TopKCodes(k=3, exact_threshold=len(x)).fit(x).index_kind_ == "exact"
    vq = TopKCodes(k=3, exact_threshold=100).fit(x)
    assert vq.index_kind_ == "ivf"
    assert TopKCodes(k=3).fit(x).recall_against_exact()["recall_at_k"] == 1.0


def test_vq_save_load_round_trip(tmp_path, data):
    x, _ = data
    vq = TopKCodes(k=5, index="hnsw", hnsw_ef_search=32).fit(x, np.arange(len(x)) + 7)
    path = vq.save(tmp_path / "vq.safetensors")
    loaded = TopKCodes.load(path)
    assert loaded.version_ == vq.version_ and loaded.index_kind_ == "hnsw"
    np.testing.assert_array_equal(loaded.transform(x[:200] + 0.01), vq.transform(x[:200] + 0.01))


@pytest.mark.parametrize("params, message", [
    ({"k": 0}, "The 'k' parameter of TopKCodes must be an int >= 1. Got 0 instead."),
    ({"index": "flat"},
     "The 'index' parameter of TopKCodes must be one of 'auto', 'exact', 'hnsw', 'ivf'. Got 'flat' instead."),
    ({"hnsw_m": 1}, "The 'hnsw_m' parameter of TopKCodes must be an int >= 2. Got 1 instead."),
])
def test_vq_parameter_errors(data, params, message):
    with pytest.raises(ConfigError) as exc:
        TopKCodes(**params).fit(data[0])
    assert str(exc.value) == message


def test_vq_catalogue_too_small_and_bad_ids():
    x = np.eye(5, dtype=np.float32)
    with pytest.raises(DataError, match="k=5 and exclude_self needs a catalogue of at least 6 items; got 5"):
        TopKCodes(k=5).fit(x)
    with pytest.raises(DataError, match="duplicate ids"):
        TopKCodes(k=2).fit(x, [1, 1, 2, 3, 4])


# ----------------------------------------------------------------------------------------- quality
def test_entropy_and_collisions_hand_cases():
    assert entropy_bits(np.arange(64) % 8) == pytest.approx(3.0)  # uniform over 8 codes: log2(8)
    assert entropy_bits(np.zeros(10, dtype=int)) == 0.0
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 2]])
    assert collision_rate(codes) == {"distinct": 3, "collision_rate": 0.5, "max_bucket": 2}
    assert collision_rate(codes[:, :1])["collision_rate"] == 0.75
    pur = category_purity(np.array([0, 0, 0, 1, 1]), ["a", "a", "b", "b", "b"])
    assert pur["purity"] == pytest.approx(0.8) and pur["baseline"] == pytest.approx(0.6)


def test_rq_quality_report_hand_case():
    books = [np.array([[0.0], [10.0]]), np.array([[-1.0], [1.0]])]
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 0]])
    vectors = np.array([[-1.0], [1.0], [9.0], [9.5]])
    report = rq_quality(codes, books, vectors, categories=["x", "x", "y", None])
    lv1, lv2 = report["levels"]
    assert lv1["utilisation"] == 1.0 and lv1["entropy_bits"] == pytest.approx(1.0)
    assert lv1["perplexity"] == pytest.approx(2.0) and lv1["max_entropy_bits"] == 1.0
    # after level 1 the errors are 1, 1, 1, 0.25; after level 2: 0, 0, 0, 0.25
    assert lv1["mse"] == pytest.approx(3.25 / 4) and lv2["mse"] == pytest.approx(0.25 / 4)
    assert lv2["relative_error"] == pytest.approx(0.25 / (1 + 1 + 81 + 90.25))
    # against the spread around the mean 4.625: 5.625^2 + 3.625^2 + 4.375^2 + 4.875^2 = 87.6875
    assert lv2["unexplained_variance"] == pytest.approx(0.25 / 87.6875)
    assert lv1["unexplained_variance"] == pytest.approx(3.25 / 87.6875)
    assert lv2["entropy_bits"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert [p["collision_rate"] for p in report["prefixes"]] == [1.0, 0.5]
    assert report["full_code"]["distinct"] == 3
    assert report["category_purity"]["purity"] == 1.0  # the None category is left out


def test_vq_quality_hand_case():
    codes = np.array([[11, 12], [10, 12], [10, 11]])
    report = vq_quality(codes, np.array([10, 11, 12, 13]), categories=["a", "a", "b"],
                        catalogue_categories=["a", "a", "b", "b"], recall={"recall_at_k": 0.97, "k": 2})
    assert report["coverage"] == 0.75 and report["max_in_degree"] == 2
    assert report["entropy_bits"] == pytest.approx(math.log2(3))
    # item 0 (a): 11 a, 12 b; item 1 (a): 10 a, 12 b; item 2 (b): 10 a, 11 a -> 2 of 6 agree
    assert report["category_agreement"]["agreement"] == pytest.approx(2 / 6)
    assert report["recall"]["recall_at_k"] == 0.97
    with pytest.raises(DataError, match="not catalogue ids"):
        vq_quality(np.array([[99, 10]]), np.array([10, 11]))


# ------------------------------------------------------------------------------------ stage functions
def small_config(**rq) -> QuantizeConfig:
    return QuantizeConfig(vq=VQConfig(k=5), rq=RQConfig(levels=3, codebook_size=16, **rq))


def test_quantize_items_writes_a_complete_folder(tmp_path, data):
    x, labels = data
    ids = np.arange(len(x)) + 100
    lines: list[str] = []
    summary = quantize_items(x, ids, tmp_path / "q", small_config(), categories=labels, log=lines.append)
    out = tmp_path / "q"
    assert {p.name for p in out.iterdir()} == {"quantize.json", "rq_codebooks.safetensors", "vq_codebook.safetensors",
                                               "codes.parquet", "codes.sqlite", "quality.json", "quality.md"}
    table = pq.read_table(out / "codes.parquet")
    assert table.column_names == ["item_id"] + [f"vq_{j}" for j in range(5)] + [f"rq_{j}" for j in range(3)]
    read_ids, codes = read_codes(out)
    np.testing.assert_array_equal(read_ids, ids)
    rq = ResidualKMeans.load(out / "rq_codebooks.safetensors")
    np.testing.assert_array_equal(codes["rq"], rq.transform(x))
    with SQLiteCodeStore(out / "codes.sqlite") as store:
        assert store.version() == summary["codes_version"]
        np.testing.assert_array_equal(store.get(ids[::7], "vq"), codes["vq"][::7])
    meta = json.loads((out / "quantize.json").read_text())
    assert meta["config"]["rq"]["levels"] == 3 and meta["n_items"] == len(x)
    quality = json.loads((out / "quality.json").read_text())
    assert quality["rq"]["category_purity"]["purity"] > quality["rq"]["category_purity"]["baseline"]
    assert any("RQ 3 levels" in line for line in lines)
    with pytest.raises(DataError, match="already exists"):
        quantize_items(x, ids, out, small_config())

    report = inspect_codes(out)
    assert all(f["matches"] for f in report["files"].values())
    assert report["store"]["matches"] and report["store"]["items"] == len(x)
    assert "## RQ codes" in report["markdown"] and "## VQ codes" in report["markdown"]


def test_assign_new_items_matches_frozen_codebooks_and_fills_the_store(tmp_path, data, monkeypatch):
    x, _ = data
    out = tmp_path / "q"
    summary = quantize_items(x[:2500], None, out, small_config())
    monkeypatch.setattr(faiss_ops, "kmeans", lambda *a, **k: pytest.fail("no refit for new items"))
    new = x[2500:]
    new_ids = np.arange(len(new)) + 10_000
    assigned = assign_new_items(out, new, new_ids, store=out / "codes.sqlite")
    assert assigned.version == summary["codes_version"]
    rq = ResidualKMeans.load(out / "rq_codebooks.safetensors")
    vq = TopKCodes.load(out / "vq_codebook.safetensors")
    np.testing.assert_array_equal(assigned.codes["rq"], rq.transform(new))
    np.testing.assert_array_equal(assigned.codes["vq"], vq.transform(new))
    with SQLiteCodeStore(out / "codes.sqlite") as store:
        assert len(store) == 3000
        np.testing.assert_array_equal(store.get(new_ids, "rq"), assigned.codes["rq"])


def test_quantize_config_from_dict_checks_values():
    config = from_dict(QuantizeConfig, {"rq": {"levels": 4, "codebook_size": [8, 8, 4, 4]}, "vq": {"index": "ivf"}})
    assert config.rq.codebook_size == [8, 8, 4, 4] and config.vq.index == "ivf"
    with pytest.raises(ConfigError, match=r"The 'levels' parameter of ResidualKMeans must be an int >= 1\. Got 0"):
        from_dict(QuantizeConfig, {"rq": {"levels": 0}})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(QuantizeConfig, {"rq": {"level": 3}})


def test_faiss_ops_checks_inputs():
    with pytest.raises(DataError, match="2-D"):
        faiss_ops.as_float32(np.zeros(3))
    with pytest.raises(ConfigError, match="unknown index kind 'lsh'"):
        faiss_ops.build_index(np.eye(3), "lsh")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 200 points for 4 centroids: no warning
        centroids = faiss_ops.kmeans(np.random.default_rng(0).standard_normal((200, 2)), 4)
    assert centroids.shape == (4, 2) and centroids.dtype == np.float32


def test_codebook_size_auto_is_what_the_catalogue_supports_and_warnings_name_the_option():
    import warnings as _warnings

    from qarm.quantize.api import RQConfig
    from qarm.quantize.faiss_ops import auto_codebook_size, kmeans

    assert [auto_codebook_size(n) for n in (10, 100, 4000, 9983, 9984, 10**6)] == [2, 2, 64, 128, 256, 256]
    assert RQConfig(codebook_size="auto").build(n_items=4000).codebook_size == 64
    assert RQConfig().build(n_items=4000).codebook_size == 256  # the default is unchanged
    with pytest.raises(ConfigError, match="'auto'"):
        RQConfig(codebook_size="many")
    x = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        kmeans(x, 64)
    assert any("--set rq.codebook_size=4" in str(w.message) for w in caught), [str(w.message) for w in caught]

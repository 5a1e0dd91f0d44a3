"""``qarm run``'s configuration: the run's own defaults, and what a partial override changes."""

from __future__ import annotations

from qarm.pipeline import run_config_from_dict


def test_the_embedded_default_trains_three_rows_with_one_seed():
    config = run_config_from_dict({})
    assert config.rank.rows == ("ID-only", "Baseline", "+ VQ & RQ") and config.rank.seeds == (0,)
    assert config.quantize.rq.codebook_size == 64  # 5k items cannot fill 256 centroids


def test_asking_for_studies_trains_all_their_rows():
    config = run_config_from_dict({"rank": {"studies": ["table1", "k", "groups"], "seeds": [0, 1, 2]}})
    names = list(config.rank.variants(vq_k_stored=25))
    assert config.rank.rows is None
    assert names[:6] == ["ID-only", "Baseline", "+ aligned vector", "+ VQ", "+ RQ", "+ VQ & RQ"]
    assert "K=5" in names
    kept = run_config_from_dict({"rank": {"studies": ["table1"], "rows": ["ID-only", "+ VQ"]}})
    assert kept.rank.rows == ("ID-only", "+ VQ")


def test_other_datasets_start_from_the_library_defaults_and_keep_partial_overrides():
    config = run_config_from_dict({"dataset": "microlens50k", "align": {"train": {"max_steps": 50}}})
    assert config.quantize.rq.codebook_size == 256 and config.align.train.max_steps == 50
    assert config.align.train.temperature == 0.1  # the rest of the section keeps its default

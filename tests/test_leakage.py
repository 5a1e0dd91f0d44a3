"""The leakage probe: a hand-worked case, the generator's data with the past-only sampler (in the band)
and with the whole-log rule (caught), and a real dataset when ../shared/data is present."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import shared_folder

from qarm.data import schema as S
from qarm.data.build import assemble, sequence_numbers
from qarm.data.negatives import NegativeConfig
from qarm.data.prepare import PrepareConfig, prepare_dataset
from qarm.data.schema import Dataset, DatasetMeta
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.evaluate.leakage import BAND, describe_with_probe, item_scores, leakage_probe


def _clicks_only(ds: Dataset, time_unit: str | None = None) -> Dataset:
    """The generator's clicks as a positive-only log (what MicroLens-like sources give)."""
    inter = ds.interactions
    inter = inter[inter["click"] == 1].reset_index(drop=True)
    inter[S.SEQ] = sequence_numbers(inter[S.USER_ID].to_numpy())
    ds.meta.positive_only = True
    ds.meta.label_columns = ["click"]
    if time_unit is not None:
        ds.meta.time_unit = time_unit
    return Dataset(items=ds.items, interactions=inter.drop(columns=["convert"]), users=ds.users, meta=ds.meta)


def _prepared(counts: str, time_unit: str | None, **generator) -> Dataset:
    ds = _clicks_only(generate(SyntheticConfig(**generator)), time_unit)
    return prepare_dataset(ds, PrepareConfig(negatives=NegativeConfig(counts=counts)))  # type: ignore[arg-type]


def test_item_scores_and_probe_hand_case():
    # train: u1 a+ b-, u2 a+ c-, u3 c+ b-; valid: u1 a+ c-; test: u1 c+ b-, u2 b+ a-, u3 a+ c-.
    items = pd.DataFrame({"source_id": ["a", "b", "c"], "title": ["x", "y", "z"]})
    rows = [("u1", "a", 1, "train"), ("u1", "b", 0, "train"), ("u2", "a", 1, "train"), ("u2", "c", 0, "train"),
            ("u3", "c", 1, "train"), ("u3", "b", 0, "train"), ("u1", "a", 1, "valid"), ("u1", "c", 0, "valid"),
            ("u1", "c", 1, "test"), ("u1", "b", 0, "test"), ("u2", "b", 1, "test"), ("u2", "a", 0, "test"),
            ("u3", "a", 1, "test"), ("u3", "c", 0, "test")]
    inter = pd.DataFrame(rows, columns=["user", "item", "click", "part"])
    inter["time"] = inter["part"].map({"train": 0, "valid": 1, "test": 2})
    inter["click"] = inter["click"].astype(np.int8)
    meta = DatasetMeta(name="t", source="t", loader="t", text_columns=["title"], label_columns=["click"])
    ds = assemble(items=items, interactions=inter, meta=meta)
    ds.interactions[S.SPLIT] = ds.interactions.pop("part")
    ds.interactions[S.COLD_ITEM] = False
    scores = item_scores(ds, "click")
    # a: 2 positives, 0 negatives; b: 0 / 2; c: 1 / 1 in the training rows.
    np.testing.assert_allclose(scores["item_ratio"], [math.log(3 / 1), math.log(1 / 3), 0.0])
    np.testing.assert_array_equal(scores["popularity"], [2, 0, 1])
    probe = leakage_probe(ds)
    # item_ratio, test: u1 c (0) > b (-1.1): 1; u2 b < a: 0; u3 a > c: 1 -> GAUC (2 + 0 + 2) / 6.
    # valid: u1 a > c: 1. popularity, test: u1 c (1) > b (0): 1; u2 b < a: 0; u3 a > c: 1.
    assert probe["gauc"]["item_ratio"] == pytest.approx({"valid": 100.0, "test": 200 / 3})
    assert probe["gauc"]["popularity"] == pytest.approx({"valid": 100.0, "test": 200 / 3})
    assert probe["users"] == {"valid": 1, "test": 3}
    assert not probe["sampled_negatives"] and probe["warnings"] == []  # real negatives: no band, no warning


@pytest.mark.parametrize("time_unit,generator", [
    ("order", {}),  # leave-last-out on the generator's click order
    (None, {"initial_item_fraction": 1.0}),  # its own time split, every item present from the start
])
def test_probe_stays_in_the_band_on_the_generator_with_past_only_negatives(time_unit, generator):
    probe = leakage_probe(_prepared("train", time_unit, **generator))
    assert probe["sampled_negatives"]
    for name, values in probe["gauc"].items():
        for part, value in values.items():
            assert BAND[0] <= value <= BAND[1], (name, part, value)
    assert probe["warnings"] == []


def test_probe_catches_whole_log_negatives_on_the_generator():
    probe = leakage_probe(_prepared("whole_log", "order"))
    assert probe["gauc"]["item_ratio"]["test"] < BAND[0]
    assert any("item_ratio" in w and "test rows" in w for w in probe["warnings"])


def test_describe_reports_the_probe_and_renders_it():
    from qarm.data.describe import render_markdown

    stats = describe_with_probe(_prepared("whole_log", "order"))
    text = render_markdown(stats)
    assert "Leakage probe" in text and "| item_ratio |" in text and "**WARNING**" in text


@pytest.mark.shared_data
def test_probe_on_microlens(shared_data):
    folder = shared_folder(shared_data, "microlens50k")
    """MicroLens-50k: the per-item ratio in the band with past-only negatives, far below it with the
    whole-log rule (popularity drifts under leave-last-out there, so only the ratio is asserted)."""
    from qarm.data.loaders import load

    raw = load("microlens50k", folder, {})
    honest = leakage_probe(prepare_dataset(raw))
    for part in ("valid", "test"):
        assert BAND[0] <= honest["gauc"]["item_ratio"][part] <= BAND[1], honest["gauc"]
    leaky = leakage_probe(prepare_dataset(load("microlens50k", folder, {}),
                                          PrepareConfig(negatives=NegativeConfig(counts="whole_log"))))
    assert leaky["gauc"]["item_ratio"]["test"] < 35.0, leaky["gauc"]

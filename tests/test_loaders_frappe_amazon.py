"""Frappe (libFM) and S3-Rec Amazon / Yelp loaders on the real files in ../shared/data.

Real-data tests skip with a message when the shared folder is absent; the format checks build tiny
files in tmp_path and always run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_folder

from qarm.data.loaders import load
from qarm.data.loaders.frappe import CONTEXT_FIELDS, SOURCE_PART
from qarm.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def frappe(shared_data: Path):
    return load("frappe", source=shared_folder(shared_data, "frappe_nfm_partial"))


@pytest.mark.shared_data
def test_frappe_counts_and_parts(frappe):
    assert frappe.meta.counts == {"users": 913, "items": 4082, "interactions": 86582}
    parts = frappe.interactions[SOURCE_PART].value_counts()
    assert parts["validation"] == 57722 and parts["test"] == 28860
    assert frappe.meta.config["recommended_protocol"]["column"] == SOURCE_PART


@pytest.mark.shared_data
def test_frappe_fields(frappe):
    meta, inter = frappe.meta, frappe.interactions
    assert meta.context_columns == CONTEXT_FIELDS and meta.text_columns == []
    assert meta.label_columns == ["click"] and not meta.positive_only and meta.time_unit == "order"
    # one-hot fields keep their global libFM ids, in disjoint ranges (README: 7 daytimes, 7 weekdays, ...)
    users = frappe.users.source_id.astype(int)
    items = frappe.items.source_id.astype(int)
    assert users.max() < items.min() and items.min() == 957 and items.max() == 5038
    previous_max = items.max()
    for column, at_most in zip(CONTEXT_FIELDS, (7, 7, 2, 3, 2, 9, 80, 233)):
        values = inter[column]
        assert values.dtype == np.int64 and values.min() > previous_max and values.nunique() <= at_most
        previous_max = values.max()
    assert set(np.unique(inter.click)) == {0, 1}


@pytest.mark.shared_data
def test_frappe_label_rate(frappe):
    # the NFM release samples two negatives per positive
    for part, rows in frappe.interactions.groupby(SOURCE_PART):
        assert rows.click.mean() == pytest.approx(1 / 3, abs=0.005), part


def _libfm(folder: Path, lines: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    for name in ("frappe.validation.libfm", "frappe.test.libfm"):
        (folder / name).write_text("\n".join(lines) + "\n")


def test_frappe_overlapping_fields_raise(tmp_path: Path):
    good = "1 " + " ".join(f"{i * 10}:1" for i in range(10))
    # the user id 15 falls into the item range (10..): positions can no longer identify fields
    _libfm(tmp_path, [good, "-1 15:1 " + " ".join(f"{i * 10}:1" for i in range(1, 10)).replace("10:1", "16:1")])
    with pytest.raises(DataError, match=r"fields 'user' \(0\.\.15\) and 'item' \(10\.\.16\) overlap"):
        load("frappe", source=tmp_path)


def test_frappe_bad_lines_raise(tmp_path: Path):
    good = "1 " + " ".join(f"{i * 10}:1" for i in range(10))
    _libfm(tmp_path, [good, good.replace("1 ", "0 ", 1)])
    with pytest.raises(DataError, match=r"frappe\.validation\.libfm: labels must be -1 or 1 .*offending: \[2\]"):
        load("frappe", source=tmp_path)
    _libfm(tmp_path, [good, good.replace("30:1", "30:0.5")])
    with pytest.raises(DataError, match=r"expected one-hot 'feature_id:1' pairs .*offending: \[2\]"):
        load("frappe", source=tmp_path)


@pytest.mark.shared_data
@pytest.mark.parametrize("subset, name, users, items, interactions", [
    ("Beauty", "amazon-beauty", 22363, 12101, 198502),
    ("Sports_and_Outdoors", "amazon-sports-and-outdoors", 35598, 18357, 296337),
    ("Toys_and_Games", "amazon-toys-and-games", 19412, 11924, 167597),
    ("Yelp", "yelp", 30431, 20033, 316354),
])
def test_amazon_counts(shared_data: Path, subset, name, users, items, interactions):
    ds = load("amazon", source=shared_folder(shared_data, "s3rec_amazon_seq"), options={"subset": subset})
    assert ds.meta.name == name
    assert ds.meta.counts == {"users": users, "items": items, "interactions": interactions}
    assert ds.meta.positive_only and (ds.interactions.click == 1).all()
    assert ds.interactions.groupby("user_id").size().min() >= 5  # S3-Rec keeps users with 5+ events


@pytest.mark.shared_data
def test_amazon_beauty_items_and_order(shared_data: Path):
    folder = shared_folder(shared_data, "s3rec_amazon_seq")
    ds = load("amazon", source=folder)
    items = ds.items
    assert list(items.source_id[:3]) == ["1", "2", "3"] and items.source_id.astype(int).is_monotonic_increasing
    assert ds.meta.item_feature_columns == ["attributes"] and ds.meta.text_columns == []
    assert (items.category == items.attributes.str.split().str[0]).all()
    # the first line of Beauty.txt is "1 1 2 3 4 5": user "1" saw items 1..5 in this order
    first = ds.interactions[ds.interactions.user_id == 0]
    assert ds.users.source_id[0] == "1"
    assert list(items.source_id[first.item_id]) == ["1", "2", "3", "4", "5"]
    assert list(first.time) == list(first.seq) == [0, 1, 2, 3, 4]


def test_amazon_unknown_subset():
    with pytest.raises(ConfigError, match=r"unknown subset 'Books'; available: \['Beauty', 'Sports_and_Outdoors'"):
        load("amazon", options={"subset": "Books"})

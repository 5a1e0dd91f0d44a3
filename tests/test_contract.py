"""The dataset contract: validation errors (file, column, ids named; nothing written) and Parquet IO."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qarm.data import schema as S
from qarm.data.build import assemble, sequence_numbers
from qarm.data.io import load_dataset, save_dataset
from qarm.data.schema import Dataset, DatasetMeta
from qarm.data.validate import validate_dataset
from qarm.errors import DataError


def tiny(n_items: int = 6, n_users: int = 3, vectors: bool = True) -> Dataset:
    """Three users, six items, a text column, one label, a 4-d modality vector."""
    items = pd.DataFrame({"source_id": [f"i{k}" for k in range(n_items)],
                          "title": [f"title {k}" for k in range(n_items)]})
    rows = [(f"u{u}", f"i{(u + k) % n_items}", 10 * k + u, (u + k) % 2) for u in range(n_users) for k in range(4)]
    inter = pd.DataFrame(rows, columns=["user", "item", "time", "click"])
    inter["click"] = inter["click"].astype(np.int8)
    meta = DatasetMeta(name="tiny", source="test", loader="test", text_columns=["title"], label_columns=["click"])
    vec = {"audio": np.arange(n_items * 4, dtype=np.float32).reshape(n_items, 4)} if vectors else {}
    return assemble(items=items, interactions=inter, meta=meta, item_vectors=vec)


def test_assemble_gives_dense_ids_and_chronological_seq():
    ds = tiny()
    assert ds.items[S.ITEM_ID].tolist() == list(range(6))
    assert ds.users[S.SOURCE_ID].tolist() == ["u0", "u1", "u2"]
    for _, group in ds.interactions.groupby(S.USER_ID):
        assert group[S.SEQ].tolist() == [0, 1, 2, 3]
        assert group[S.TIME].is_monotonic_increasing


def test_sequence_numbers_hand_case():
    assert sequence_numbers(np.array([0, 0, 0, 2, 5, 5])).tolist() == [0, 1, 2, 0, 0, 1]


def test_round_trip_keeps_tables_vectors_and_meta(tmp_path: Path):
    ds = tiny()
    save_dataset(ds, tmp_path / "d")
    back = load_dataset(tmp_path / "d")
    pd.testing.assert_frame_equal(back.interactions, ds.interactions)
    pd.testing.assert_frame_equal(back.items, ds.items)
    np.testing.assert_array_equal(back.item_vectors["audio"], ds.item_vectors["audio"])
    assert back.item_vectors["audio"].dtype == np.float32
    meta = json.loads((tmp_path / "d" / S.META_FILE).read_text())
    assert meta["schema_version"] == S.SCHEMA_VERSION
    assert meta["counts"] == {"users": 3, "items": 6, "interactions": 12}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# Each case: (name, mutate(ds) -> ds, expected message regex). Every one must name its file/column.
def _set_items(ds, items):
    ds.items = items
    return ds


def _set_inter(ds, inter):
    ds.interactions = inter
    return ds


BAD_CASES = [
    ("duplicate item ids", lambda ds: _set_items(ds, ds.items.assign(item_id=[0, 1, 1, 3, 4, 5])),
     r"items\.parquet: column 'item_id': duplicate ids \(2 rows\); offending: \[1\]"),
    ("ids not dense", lambda ds: _set_items(ds, ds.items.assign(item_id=[0, 1, 2, 3, 4, 9])),
     r"items\.parquet: column 'item_id': ids must be dense 0\.\.5.*offending: \[9\]"),
    ("unknown item id", lambda ds: _set_inter(ds, ds.interactions.assign(
        item_id=ds.interactions.item_id.where(ds.interactions.index != 3, 42))),
     r"interactions\.parquet: column 'item_id': ids not found in items\.parquet; offending: \[42\]"),
    ("unknown user id", lambda ds: _set_inter(ds, ds.interactions.assign(
        user_id=ds.interactions.user_id.where(ds.interactions.index != 0, 7))),
     r"interactions\.parquet: column 'user_id': ids not found in users\.parquet; offending: \[7\]"),
    ("non-binary label", lambda ds: _set_inter(ds, ds.interactions.assign(
        click=ds.interactions.click.where(ds.interactions.index != 2, 3).astype(np.int8))),
     r"interactions\.parquet: column 'click': label must be 0 or 1; other values; offending: \[3\]"),
    ("missing label values", lambda ds: _set_inter(ds, ds.interactions.assign(
        click=ds.interactions.click.astype(float).where(ds.interactions.index != 2, np.nan))),
     r"interactions\.parquet: column 'click': label has missing values"),
    ("float label", lambda ds: _set_inter(ds, ds.interactions.assign(click=ds.interactions.click * 0.5)),
     r"column 'click': label must be 0/1 integers, got dtype float64"),
    ("missing label column", lambda ds: _set_inter(ds, ds.interactions.drop(columns=["click"])),
     r"interactions\.parquet: column 'click': missing label column"),
    ("missing text column", lambda ds: _set_items(ds, ds.items.drop(columns=["title"])),
     r"items\.parquet: column 'title': missing text column"),
    ("null text", lambda ds: _set_items(ds, ds.items.assign(title=["a", None, "c", "d", "e", "f"])),
     r"items\.parquet: column 'title': missing text \(null\).*offending: \[1\]"),
    ("NaN vector", lambda ds: (ds.item_vectors["audio"].__setitem__((2, 1), np.nan), ds)[1],
     r"items\.parquet: column 'audio': non-finite values \(NaN or inf\) in items; offending: \[2\]"),
    ("inf vector", lambda ds: (ds.item_vectors["audio"].__setitem__((4, 0), np.inf), ds)[1],
     r"column 'audio': non-finite values.*offending: \[4\]"),
    ("wrong vector rows", lambda ds: (ds.item_vectors.__setitem__("audio", np.zeros((5, 4), np.float32)), ds)[1],
     r"items\.parquet: column 'audio': modality vectors have 5 rows for 6 items"),
    ("float64 vectors", lambda ds: (ds.item_vectors.__setitem__("audio", np.zeros((6, 4))), ds)[1],
     r"column 'audio': modality vectors must be float32, got float64"),
    ("1-d vectors", lambda ds: (ds.item_vectors.__setitem__("audio", np.zeros(6, np.float32)), ds)[1],
     r"column 'audio': modality vectors must be a 2-d array"),
    ("empty interactions", lambda ds: _set_inter(ds, ds.interactions.iloc[:0]),
     r"interactions\.parquet: the table is empty"),
    ("missing time column", lambda ds: _set_inter(ds, ds.interactions.drop(columns=[S.TIME])),
     r"interactions\.parquet: column 'time': missing column"),
    ("string time", lambda ds: _set_inter(ds, ds.interactions.assign(time=ds.interactions.time.astype(str))),
     r"column 'time': expected integers"),
    ("no labels declared", lambda ds: (setattr(ds.meta, "label_columns", []), ds)[1],
     r"meta\.json: meta\.label_columns is empty"),
    ("bad split value", lambda ds: _set_inter(ds, ds.interactions.assign(split="training")),
     r"column 'split': split must be one of \['train', 'valid', 'test'\]; offending: \['training'\]"),
    ("negative seq", lambda ds: _set_inter(ds, ds.interactions.assign(seq=ds.interactions.seq - 1)),
     r"column 'seq': negative seq values"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_dataset_is_rejected_and_nothing_written(tmp_path: Path, name, mutate, message):
    ds = mutate(tiny())
    with pytest.raises(DataError, match=message):
        validate_dataset(ds)
    with pytest.raises(DataError, match=message):
        save_dataset(ds, tmp_path / "out")
    assert _listing(tmp_path) == [], f"{name}: something was written"


def test_assemble_names_unknown_source_item(tmp_path: Path):
    items = pd.DataFrame({"source_id": ["a", "b"], "title": ["x", "y"]})
    inter = pd.DataFrame({"user": ["u", "u"], "item": ["a", "zz"], "time": [1, 2], "click": [1, 0]})
    meta = DatasetMeta(name="t", source="t", loader="t", text_columns=["title"], label_columns=["click"])
    with pytest.raises(DataError, match=r"events\.csv: column 'item': item ids not found in items\.csv; offending: \['zz'\]"):
        assemble(items=items, interactions=inter, meta=meta, items_file="items.csv", interactions_file="events.csv")


def test_failed_write_keeps_the_previous_folder(tmp_path: Path, monkeypatch):
    """A write that dies midway (here: the users file raises) leaves the old dataset intact, no temp files."""
    out = tmp_path / "d"
    save_dataset(tiny(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import qarm.data.io as io

    real = io._write_table

    def dies_on_users(table, path, *rest):
        if path.name == S.USERS_FILE:
            raise OSError("disk full (simulated)")
        real(table, path, *rest)

    monkeypatch.setattr(io, "_write_table", dies_on_users)
    changed = tiny()
    changed.items["title"] = "changed"
    with pytest.raises(OSError, match="disk full"):
        save_dataset(changed, out, overwrite=True)
    assert _listing(tmp_path) == ["d"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_existing_folder_needs_overwrite(tmp_path: Path):
    save_dataset(tiny(), tmp_path / "d")
    with pytest.raises(DataError, match="already exists; pass overwrite=True"):
        save_dataset(tiny(), tmp_path / "d")


def test_load_rejects_missing_meta_corrupt_parquet_and_old_schema(tmp_path: Path):
    out = save_dataset(tiny(), tmp_path / "d")
    (out / S.ITEMS_FILE).write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"items\.parquet: cannot read Parquet"):
        load_dataset(out)
    meta = json.loads((out / S.META_FILE).read_text())
    meta["schema_version"] = 0
    (out / S.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match="schema_version 0 is not supported"):
        load_dataset(out)
    os.remove(out / S.META_FILE)
    with pytest.raises(DataError, match=r"meta\.json: missing; is .* a prepared dataset folder"):
        load_dataset(out)
    with pytest.raises(DataError, match="not a dataset folder"):
        load_dataset(tmp_path / "nowhere")

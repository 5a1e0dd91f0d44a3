"""The generic loader: a YAML mapping over the user's own files (examples/generic, no shared data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from qarm.data.loaders import load
from qarm.errors import ConfigError, DataError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generic"


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """A writable copy of examples/generic."""
    folder = tmp_path / "shop"
    shutil.copytree(EXAMPLE, folder)
    return folder


def mapping_of(folder: Path) -> dict:
    return yaml.safe_load((folder / "mapping.yaml").read_text())


def write_mapping(folder: Path, mapping: dict) -> Path:
    path = folder / "mapping.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def edit(folder: Path, section: str | None = None, **changes) -> Path:
    """Change keys of the mapping (top level, or inside ``section``) and write it back."""
    mapping = mapping_of(folder)
    (mapping[section] if section else mapping).update(changes)
    return write_mapping(folder, mapping)


# --- happy paths ---------------------------------------------------------------------------------------


def test_example_csv():
    ds = load("generic", source=EXAMPLE / "mapping.yaml")
    assert ds.meta.name == "tiny-shop"
    assert ds.meta.counts == {"users": 5, "items": 6, "interactions": 20}
    assert ds.meta.time_unit == "seconds"
    assert ds.meta.label_columns == ["click", "like"]
    assert ds.meta.signal_columns == ["rating"] and ds.meta.context_columns == ["device"]
    assert ds.meta.text_columns == ["title", "description"]
    inter = ds.interactions
    first = inter[(inter.user_id == 0) & (inter.seq == 0)].iloc[0]
    assert first.time == pd.Timestamp("2024-03-01 09:15:00", tz="UTC").timestamp()
    assert ds.items.source_id[first.item_id] == "A100" and first.device == "phone"
    # like = rating >= 4; a missing rating gives 0
    expected = (inter.rating >= 4).astype(np.int8)
    assert (inter.like == expected).all() and inter.rating.isna().sum() == 7
    assert inter.click.sum() == 13
    assert ds.items.description[ds.items.source_id == "D400"].item() == ""  # empty text -> ""
    assert ds.items.created_at[0] == pd.Timestamp("2023-11-02", tz="UTC").timestamp()
    assert list(ds.items.category.unique()) == ["shoes", "clothing", "accessories"]


def test_folder_source_and_mapping_option(shop: Path):
    (shop / "mapping.yaml").rename(shop / "other.yaml")
    ds = load("generic", source=shop, options={"mapping": "other.yaml"})
    assert ds.n_interactions == 20
    with pytest.raises(ConfigError, match=r"mapping\.yaml: mapping file not found"):
        load("generic", source=shop)


def test_parquet_numeric_time_and_npy_vectors(shop: Path):
    events = pd.read_csv(shop / "events.csv")
    events["ts"] = (pd.to_datetime(events.ts, utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    events.drop(columns="stars").to_parquet(shop / "events.parquet")
    items = pd.read_csv(shop / "items.csv")
    items["created"] = pd.to_datetime(items.created)  # a native Parquet timestamp without zone: UTC
    items.to_parquet(shop / "items.parquet")
    clip = np.arange(len(items) * 4, dtype=np.float64).reshape(len(items), 4)
    np.save(shop / "clip.npy", clip)
    mapping = mapping_of(shop)
    mapping["interactions"].update(path="events.parquet", signals={}, derive={})
    mapping["items"].update(path="items.parquet", vectors={"image_clip": {"path": "clip.npy"}})
    ds = load("generic", source=write_mapping(shop, mapping))
    csv = load("generic", source=EXAMPLE / "mapping.yaml")
    assert ds.meta.time_unit == "seconds"
    assert np.array_equal(ds.interactions.time, csv.interactions.time)
    assert np.array_equal(ds.items.created_at, csv.items.created_at)
    assert ds.item_vectors["image_clip"].dtype == np.float32
    assert np.array_equal(ds.item_vectors["image_clip"], clip.astype(np.float32))


def test_jsonl_datetimes_users_and_list_vectors(shop: Path):
    events = pd.read_csv(shop / "events.csv")
    events["clicked"] = events.clicked.astype(bool)  # JSON true / false
    events.to_json(shop / "events.jsonl", orient="records", lines=True)
    items = pd.read_csv(shop / "items.csv")
    items["emb"] = [[float(i), 1.0, -1.0] for i in range(len(items))]
    items.to_json(shop / "items.jsonl", orient="records", lines=True)
    pd.DataFrame({"uid": ["u5", "u4", "u3", "u2", "u1", "u9"], "age": [31, 25, 40, 19, 52, 33]}).to_csv(
        shop / "users.csv", index=False)
    mapping = mapping_of(shop)
    mapping["interactions"]["path"] = "events.jsonl"
    mapping["items"].update(path="items.jsonl", features=["cat"], vectors={"text_emb": {"column": "emb"}})
    mapping["users"] = {"path": "users.csv", "id": "uid", "features": ["age"]}
    ds = load("generic", source=write_mapping(shop, mapping))
    csv = load("generic", source=EXAMPLE / "mapping.yaml")
    assert list(ds.users.source_id) == ["u5", "u4", "u3", "u2", "u1", "u9"]  # the users file's order
    assert ds.meta.user_feature_columns == ["age"] and ds.meta.item_feature_columns == ["cat"]
    assert ds.item_vectors["text_emb"].shape == (6, 3)
    assert ds.interactions.click.sum() == csv.interactions.click.sum()
    assert sorted(ds.interactions.time) == sorted(csv.interactions.time)


def test_positive_only_without_labels_or_items_or_time(shop: Path):
    mapping = mapping_of(shop)
    mapping["interactions"] = {"path": "events.csv", "user": "uid", "item": "sku"}
    del mapping["items"]
    mapping["positive_only"] = True
    ds = load("generic", source=write_mapping(shop, mapping))
    assert ds.meta.positive_only and ds.meta.label_columns == ["click"]
    assert (ds.interactions.click == 1).all()
    assert ds.meta.time_unit == "order" and list(ds.items.source_id) == ["A100", "B200", "C300", "D400",
                                                                         "E500", "F600"]
    assert list(ds.interactions.time[ds.interactions.user_id == 0]) == [0, 1, 2, 3]  # file order


# --- mistakes in the mapping (ConfigError) --------------------------------------------------------------


def test_unknown_top_level_key(shop: Path):
    path = edit(shop, colour="blue")
    with pytest.raises(ConfigError, match=r"mapping\.yaml: mapping: unknown key\(s\) \['colour'\].*allowed keys"):
        load("generic", source=path)


def test_unknown_nested_key(shop: Path):
    path = edit(shop, "interactions", lables={"click": "clicked"})
    with pytest.raises(ConfigError, match=r"mapping\.interactions: unknown key\(s\) \['lables'\].*'labels'"):
        load("generic", source=path)


def test_bad_derive_rule(shop: Path):
    path = edit(shop, "interactions", derive={"like": "rating => 4"})
    with pytest.raises(ConfigError, match=r"interactions\.derive\.like: cannot parse the rule 'rating => 4'"):
        load("generic", source=path)


def test_derive_rule_is_never_evaluated(shop: Path):
    path = edit(shop, "interactions", derive={"like": "__import__('os').system('true') >= 1"})
    with pytest.raises(ConfigError, match=r"interactions\.derive\.like: cannot parse the rule"):
        load("generic", source=path)


def test_derive_rule_on_unknown_signal(shop: Path):
    path = edit(shop, "interactions", derive={"like": "stars >= 4"})
    with pytest.raises(ConfigError, match=r"uses 'stars', which is not a signal; mapped signals: \['rating'\]"):
        load("generic", source=path)


def test_no_labels_without_positive_only(shop: Path):
    path = edit(shop, "interactions", labels={}, derive={})
    with pytest.raises(ConfigError, match=r"interactions: no labels.*positive_only: true"):
        load("generic", source=path)


def test_reserved_column_name(shop: Path):
    path = edit(shop, "interactions", labels={"time": "clicked"})
    with pytest.raises(ConfigError, match=r"interactions: 'time' is a reserved column name"):
        load("generic", source=path)


def test_source_not_yaml(shop: Path):
    with pytest.raises(ConfigError, match=r"events\.csv: expected a YAML mapping file"):
        load("generic", source=shop / "events.csv")


# --- mistakes in the data (DataError naming file and column) ---------------------------------------------


def test_missing_column(shop: Path):
    path = edit(shop, "interactions", item="product")
    with pytest.raises(DataError, match=r"events\.csv: column 'product': missing column \(mapped by "
                                        r"interactions\.item\); the file has 6 columns: \['uid', 'sku'"):
        load("generic", source=path)


def test_missing_file(shop: Path):
    path = edit(shop, "items", path="catalogue.csv")
    with pytest.raises(DataError, match=r"catalogue\.csv: file not found \(named by items\.path in .*mapping\.yaml"):
        load("generic", source=path)


def test_unsupported_extension(shop: Path):
    (shop / "events.xlsx").write_bytes(b"PK\x03\x04")
    path = edit(shop, "interactions", path="events.xlsx")
    with pytest.raises(DataError, match=r"events\.xlsx: unsupported file type '\.xlsx'; use one of"):
        load("generic", source=path)


def test_unreadable_parquet(shop: Path):
    (shop / "items.parquet").write_text("this is not parquet")
    path = edit(shop, "items", path="items.parquet")
    with pytest.raises(DataError, match=r"items\.parquet: cannot read the Parquet file"):
        load("generic", source=path)


def test_unreadable_jsonl(shop: Path):
    (shop / "events.jsonl").write_text('{"uid": "u1", "sku": "A100"}\nnot json\n')
    path = edit(shop, "interactions", path="events.jsonl")
    with pytest.raises(DataError, match=r"events\.jsonl: cannot parse the file as JSON lines"):
        load("generic", source=path)


def test_empty_file(shop: Path):
    (shop / "events.csv").write_text("")
    with pytest.raises(DataError, match=r"events\.csv: the file is empty"):
        load("generic", source=shop / "mapping.yaml")


def test_header_only_file(shop: Path):
    (shop / "items.csv").write_text("sku,title,description,cat,created\n")
    with pytest.raises(DataError, match=r"items\.csv: the file has no rows"):
        load("generic", source=shop / "mapping.yaml")


def test_label_not_binary(shop: Path):
    events = pd.read_csv(shop / "events.csv")
    events.loc[3, "clicked"] = 2
    events.to_csv(shop / "events.csv", index=False)
    with pytest.raises(DataError, match=r"events\.csv: column 'clicked': a label must be 0/1 or true/false; "
                                        r"other values; offending: \[2\]"):
        load("generic", source=shop / "mapping.yaml")


def test_signal_not_numeric(shop: Path):
    events = pd.read_csv(shop / "events.csv")
    events["stars"] = events.stars.astype(object)
    events.loc[0, "stars"] = "five"
    events.to_csv(shop / "events.csv", index=False)
    with pytest.raises(DataError, match=r"events\.csv: column 'stars': a signal must be numeric.*'five'"):
        load("generic", source=shop / "mapping.yaml")


def test_unparseable_time(shop: Path):
    events = pd.read_csv(shop / "events.csv")
    events.loc[5, "ts"] = "last tuesday"
    events.to_csv(shop / "events.csv", index=False)
    with pytest.raises(DataError, match=r"events\.csv: column 'ts': cannot parse as numbers \(seconds\) or "
                                        r"date/times.*'last tuesday'"):
        load("generic", source=shop / "mapping.yaml")


def test_missing_time(shop: Path):
    events = pd.read_csv(shop / "events.csv")
    events.loc[[2, 7], "ts"] = None
    events.to_csv(shop / "events.csv", index=False)
    with pytest.raises(DataError, match=r"events\.csv: column 'ts': missing time values \(0-based rows\); "
                                        r"offending: \[2, 7\]"):
        load("generic", source=shop / "mapping.yaml")


def test_missing_user_id(shop: Path):
    events = pd.read_csv(shop / "events.csv")
    events.loc[4, "uid"] = None
    events.to_csv(shop / "events.csv", index=False)
    with pytest.raises(DataError, match=r"events\.csv: column 'uid': missing ids \(0-based rows\); offending: \[4\]"):
        load("generic", source=shop / "mapping.yaml")


def test_duplicate_item_ids(shop: Path):
    items = pd.read_csv(shop / "items.csv")
    pd.concat([items, items.iloc[[2]]]).to_csv(shop / "items.csv", index=False)
    with pytest.raises(DataError, match=r"items\.csv: column 'sku': duplicate item ids; offending: \['C300'\]"):
        load("generic", source=shop / "mapping.yaml")


def test_unknown_item_in_events(shop: Path):
    items = pd.read_csv(shop / "items.csv")
    items[items.sku != "E500"].to_csv(shop / "items.csv", index=False)
    with pytest.raises(DataError, match=r"events\.csv: column 'sku': ids not found in .*items\.csv; "
                                        r"offending: \['E500'\]"):
        load("generic", source=shop / "mapping.yaml")


def test_user_missing_from_users_file(shop: Path):
    pd.DataFrame({"uid": ["u1", "u2", "u3", "u5"]}).to_csv(shop / "users.csv", index=False)
    path = edit(shop, users={"path": "users.csv", "id": "uid"})
    with pytest.raises(DataError, match=r"events\.csv: column 'uid': ids not found in .*users\.csv; "
                                        r"offending: \['u4'\]"):
        load("generic", source=path)


def test_vector_row_count_mismatch(shop: Path):
    np.save(shop / "clip.npy", np.zeros((5, 8), dtype=np.float32))
    path = edit(shop, "items", vectors={"image_clip": {"path": "clip.npy"}})
    with pytest.raises(DataError, match=r"clip\.npy: vectors 'image_clip' have 5 rows, but .*items\.csv has 6"):
        load("generic", source=path)


def test_nan_in_vectors(shop: Path):
    clip = np.ones((6, 8), dtype=np.float32)
    clip[4, 2] = np.nan
    np.save(shop / "clip.npy", clip)
    path = edit(shop, "items", vectors={"image_clip": {"path": "clip.npy"}})
    with pytest.raises(DataError, match=r"clip\.npy: vectors 'image_clip': NaN or infinite values \(0-based rows\); "
                                        r"offending: \[4\]"):
        load("generic", source=path)


def test_vector_column_of_unequal_lengths(shop: Path):
    items = pd.read_csv(shop / "items.csv")
    items["emb"] = [[1.0, 2.0]] * 5 + [[1.0]]
    items.to_parquet(shop / "items.parquet")
    path = edit(shop, "items", path="items.parquet", vectors={"text_emb": {"column": "emb"}})
    with pytest.raises(DataError, match=r"items\.parquet: column 'emb': vectors must all have one non-zero length; "
                                        r"lengths found: \[1, 2\]"):
        load("generic", source=path)


def test_vector_needs_exactly_one_source(shop: Path):
    path = edit(shop, "items", vectors={"image_clip": {"path": "clip.npy", "column": "emb"}})
    with pytest.raises(ConfigError, match=r"items\.vectors\.image_clip: give exactly one of 'path'"):
        load("generic", source=path)


# --- the JSON layouts people keep data in ------------------------------------------------------------------


def _items_json(shop: Path, layout: str) -> None:
    items = pd.read_csv(shop / "items.csv", dtype=str)
    records = items.to_dict(orient="records")
    if layout == "array":
        (shop / "items.json").write_text(json.dumps(records))
    else:  # one object keyed by id
        (shop / "items.json").write_text(json.dumps({r["sku"]: {k: v for k, v in r.items() if k != "sku"}
                                                     for r in records}))
    edit(shop, "items", path="items.json")


@pytest.mark.parametrize("layout", ["array", "keyed"])
def test_items_as_a_json_array_or_an_object_keyed_by_id(shop: Path, layout: str):
    csv = load("generic", source=EXAMPLE / "mapping.yaml")
    _items_json(shop, layout)
    ds = load("generic", source=shop / "mapping.yaml")
    assert sorted(ds.items.source_id) == sorted(csv.items.source_id)
    mine = ds.items.set_index("source_id").sort_index()
    theirs = csv.items.set_index("source_id").sort_index()
    assert mine["title"].tolist() == theirs["title"].tolist()


def test_interactions_as_user_to_ordered_item_lists(shop: Path):
    events = pd.read_csv(shop / "events.csv", dtype=str)
    lists = {u: list(group.sort_values("ts")["sku"]) for u, group in events.groupby("uid")}
    (shop / "lists.json").write_text(json.dumps(lists))
    mapping = mapping_of(shop)
    mapping["interactions"] = {"path": "lists.json", "user": "uid", "item": "sku"}
    mapping["positive_only"] = True
    ds = load("generic", source=write_mapping(shop, mapping))
    assert ds.meta.time_unit == "order" and len(ds.interactions) == len(events)
    first_user = ds.users.set_index("source_id").loc["u1", "user_id"]
    order = ds.interactions[ds.interactions.user_id == first_user].sort_values("time")["item_id"]
    assert ds.items.source_id[order].tolist() == lists["u1"]


@pytest.mark.parametrize("content, found", [("42", "one JSON int"), ("[1, 2, 3]", "an array of int"),
                                            ('{"a": 1, "b": [2]}', "of mixed values")])
def test_a_json_layout_qarm_does_not_read_is_one_short_line(shop: Path, content: str, found: str):
    (shop / "items.json").write_text(content)
    edit(shop, "items", path="items.json")
    with pytest.raises(DataError) as info:
        load("generic", source=shop / "mapping.yaml")
    message = str(info.value)
    assert found in message and "JSON lines" in message and len(message) < 400, message


def test_a_wide_file_lists_a_few_columns_not_all(shop: Path):
    wide = {f"item-{k}": {"title": "x"} for k in range(5000)}  # an object keyed by id, read as a table
    (shop / "wide.jsonl").write_text(json.dumps(wide))  # one line: JSON lines of one huge row
    edit(shop, "items", path="wide.jsonl")
    with pytest.raises(DataError) as info:
        load("generic", source=shop / "mapping.yaml")
    assert len(str(info.value)) < 1000, str(info.value)[:300]


# --- multi-valued and hierarchical categories ---------------------------------------------------------

CATEGORY_CELLS = ["Electronics > Audio > Headphones|Gifts", "Books, Music & More > Fiction", "Comedy|Drama",
                  "", " > Audio", "Toys"]


def _with_categories(shop: Path, cells: list[str], **keys) -> Path:
    items = pd.read_csv(shop / "items.csv")
    items["cat"] = cells
    items.to_csv(shop / "items.csv", index=False)  # pandas quotes the names with commas
    return edit(shop, "items", **keys)


@pytest.mark.parametrize(("keys", "options", "expected"), [
    ({"category_separator": "|", "category_path_separator": ">"}, {},
     ["Electronics > Audio > Headphones", "Books, Music & More > Fiction", "Comedy", "unknown", "Audio", "Toys"]),
    ({"category_separator": "|", "category_path_separator": ">", "category_level": 1}, {},
     ["Electronics", "Books, Music & More", "Comedy", "unknown", "Audio", "Toys"]),
    ({"category_separator": "|", "category_path_separator": ">"}, {"category_level": 2},
     ["Electronics > Audio", "Books, Music & More > Fiction", "Comedy", "unknown", "Audio", "Toys"]),
    ({"category_separator": "|"}, {},
     ["Electronics > Audio > Headphones", "Books, Music & More > Fiction", "Comedy", "unknown", "> Audio", "Toys"]),
])
def test_multi_valued_and_hierarchical_categories(shop: Path, keys: dict, options: dict, expected: list[str]):
    """The item's category is the first value at the chosen level; commas inside names survive."""
    _with_categories(shop, CATEGORY_CELLS, **keys)
    ds = load("generic", source=shop / "mapping.yaml", options=options)
    by_id = dict(zip(ds.items.source_id, ds.items.category))
    assert [by_id[s] for s in ["A100", "B200", "C300", "D400", "E500", "F600"]] == expected
    assert any(note.startswith("category: ") for note in ds.meta.notes)


def test_categories_from_json_lists(shop: Path):
    """JSON items may hold a list of values or a list of paths (lists of levels)."""
    items = pd.read_csv(shop / "items.csv")
    records = items.drop(columns="cat").to_dict("records")
    cells = [[["Electronics", "Audio, Hi-Fi", "Headphones"], ["Gifts"]], ["Comedy", "Drama"], [], None,
             [["Home"]], ["Toys"]]
    with open(shop / "items.jsonl", "w") as f:
        for record, cell in zip(records, cells):
            f.write(json.dumps({**record, "cat": cell}) + "\n")
    edit(shop, "items", path="items.jsonl", category_level=2)
    ds = load("generic", source=shop / "mapping.yaml")
    assert list(ds.items.category) == ["Electronics > Audio, Hi-Fi", "Comedy", "unknown", "unknown", "Home", "Toys"]


def test_a_category_cell_that_is_an_object_is_refused(shop: Path):
    items = pd.read_csv(shop / "items.csv")
    with open(shop / "items.jsonl", "w") as f:
        for k, record in enumerate(items.drop(columns="cat").to_dict("records")):
            f.write(json.dumps({**record, "cat": {"name": "Audio"} if k == 2 else "Toys"}) + "\n")
    edit(shop, "items", path="items.jsonl")
    with pytest.raises(DataError, match=r"column 'cat': a category cell is a JSON object"):
        load("generic", source=shop / "mapping.yaml")


@pytest.mark.parametrize(("keys", "options", "message"), [
    ({"category_level": 0, "category_path_separator": ">"}, {}, r"items: category_level must be an int >= 1"),
    ({"category_separator": " "}, {}, r"items: category_separator must be a non-blank string"),
    ({"category_separator": "|", "category_path_separator": "|"}, {}, r"both '\|'"),
    ({"category_level": 2}, {}, r"category_level is set but not category_path_separator"),
    ({}, {"category_level": "x"}, r"category_level"),
    ({"category_path_separator": ">"}, {"category_level": -1}, r"--set category_level=-1: category_level must be"),
])
def test_category_options_are_checked(shop: Path, keys: dict, options: dict, message: str):
    _with_categories(shop, CATEGORY_CELLS, **keys)
    with pytest.raises(ConfigError, match=message):
        load("generic", source=shop / "mapping.yaml", options=options)


def test_category_options_need_a_category_column(shop: Path):
    mapping = mapping_of(shop)
    del mapping["items"]["cat" if "cat" in mapping["items"] else "category"]
    mapping["items"]["category_separator"] = "|"
    write_mapping(shop, mapping)
    with pytest.raises(ConfigError, match=r"need a category column"):
        load("generic", source=shop / "mapping.yaml")
    with pytest.raises(ConfigError, match=r"maps no items.category"):
        load("generic", source=shop / "mapping.yaml", options={"category_level": 1})

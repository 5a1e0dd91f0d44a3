"""Values that must never be stored: out-of-range or non-finite times, content that is the same for every
item, Parquet bytes flipped on disk. Each is an error naming the file and column (or the option that allows
it), and nothing is half written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qarm.data.io import load_dataset, save_dataset
from qarm.data.loaders import load
from qarm.data.prepare import prepare_dataset
from qarm.data.synthetic import SyntheticConfig, generate
from qarm.encode.content import ItemInputs, check_informative
from qarm.errors import DataError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generic"


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    folder = tmp_path / "shop"
    shutil.copytree(EXAMPLE, folder)
    events = pd.read_csv(folder / "events.csv")  # numeric seconds, so that numbers reach the range check
    events["ts"] = (pd.to_datetime(events.ts, utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    events.to_csv(folder / "events.csv", index=False)
    return folder


@pytest.mark.parametrize("value", ["1e30", "inf", "-inf", "-1e300", "9.3e18"])
def test_a_time_no_int64_holds_honestly_is_an_error_naming_file_and_column(shop: Path, value: str):
    events = pd.read_csv(shop / "events.csv", dtype={"ts": str})
    assert load("generic", source=shop / "mapping.yaml").interactions["time"].min() > 0  # the clean file loads
    events.loc[3, "ts"] = value
    events.to_csv(shop / "events.csv", index=False)
    with pytest.raises(DataError, match=r"events\.csv: column 'ts': times must be finite"):
        load("generic", source=shop / "mapping.yaml")


@pytest.fixture(scope="module")
def small():
    return prepare_dataset(generate(SyntheticConfig(n_items=120, n_users=40, n_interactions=1500)))


def test_the_contract_refuses_an_overflowed_time(small, tmp_path: Path):
    bad = small.interactions.copy()
    bad.loc[7, "time"] = np.iinfo(np.int64).min  # what a cast of inf gave before
    dataset = type(small)(items=small.items, interactions=bad, users=small.users, meta=small.meta,
                          item_vectors=small.item_vectors)
    with pytest.raises(DataError, match=r"interactions\.parquet: column 'time': times out of range"):
        save_dataset(dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_parquet_bytes_flipped_on_disk_are_an_error_never_other_data(small, tmp_path: Path):
    folder = save_dataset(small, tmp_path / "data")
    clean = load_dataset(folder).interactions
    path = folder / "interactions.parquet"
    original = path.read_bytes()
    footer = int.from_bytes(original[-8:-4], "little") + 8  # the footer's metadata: its own errors
    positions = np.linspace(4, len(original) - footer - 1, 40).astype(int)
    silent = []
    for at in positions:
        data = bytearray(original)
        data[at] ^= 0x5A
        path.write_bytes(bytes(data))
        try:
            got = load_dataset(folder).interactions
        except DataError as exc:
            assert "interactions.parquet" in str(exc)
            continue
        if not got.equals(clean):
            silent.append(int(at))
    path.write_bytes(original)
    assert not silent, f"flipped bytes at {silent} were read as other data"


def test_content_the_same_for_every_item_is_refused_unless_allowed():
    n = 5
    empty = ItemInputs([""] * n, {})
    with pytest.raises(DataError, match=r"all 5 texts empty.*encoder\.allow_uninformative=true"):
        check_informative(empty, True, "shop")
    same_vectors = ItemInputs([""] * n, {"image": np.ones((n, 3), np.float32)})
    with pytest.raises(DataError, match=r"'image' vectors equal for every item"):
        check_informative(same_vectors, True, "shop")
    check_informative(ItemInputs(["a", "b", "", "c", "d"], {}), True, "shop")  # texts differ: fine
    varied = ItemInputs([""] * n, {"image": np.arange(15, dtype=np.float32).reshape(n, 3)})
    check_informative(varied, True, "shop")  # no text, but vectors that differ: fine


# -- provenance: codes and vectors of another catalogue, a folder that mixes two quantize runs ---------

def _quantized(dataset, out: Path, levels: int = 2):
    from qarm.quantize.api import QuantizeConfig, RQConfig, VQConfig, quantize_items

    vectors = np.random.default_rng(levels).normal(size=(dataset.n_items, 8)).astype(np.float32)
    quantize_items(vectors, dataset.items["item_id"].to_numpy(), out,
                   QuantizeConfig(rq=RQConfig(codebook_size=4, levels=levels), vq=VQConfig(k=3), write_store=False),
                   inputs={"catalogue": dataset.catalogue_digest()})
    return out


@pytest.mark.filterwarnings("ignore:k-means of")
def test_codes_of_another_catalogue_with_the_same_item_count_are_refused(tmp_path: Path):
    from qarm.features import ExampleSource, ItemTables

    config = SyntheticConfig(n_items=120, n_users=40, n_interactions=1500)
    a = prepare_dataset(generate(config))
    b = prepare_dataset(generate(SyntheticConfig(n_items=120, n_users=40, n_interactions=1500, seed=1)))
    assert a.n_items == b.n_items and a.catalogue_digest() != b.catalogue_digest()
    codes = _quantized(a, tmp_path / "codes-a")
    ItemTables.build(ExampleSource(a, history_length=5), quantize_dir=codes)  # its own catalogue: fine
    with pytest.raises(DataError, match=rf"made for item catalogue {a.catalogue_digest()}, the dataset is "
                                        rf"{b.catalogue_digest()}.*--codes"):
        ItemTables.build(ExampleSource(b, history_length=5), quantize_dir=codes)


@pytest.mark.filterwarnings("ignore:k-means of")
def test_a_quantize_folder_holding_another_runs_codes_is_refused(small, tmp_path: Path):
    from qarm.quantize.api import read_codes

    first, second = _quantized(small, tmp_path / "first", levels=2), _quantized(small, tmp_path / "second", levels=3)
    read_codes(first)
    shutil.copy(second / "codes.parquet", first / "codes.parquet")
    with pytest.raises(DataError, match=r"codes\.parquet holds codes of version .* but .*quantize\.json records .*"
                                        r"qarm quantize --overwrite"):
        read_codes(first)


# -- leftovers: a killed writer's temporaries are removed by the next write ----------------------------

def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write(small, tmp_path: Path):
    import subprocess
    import sys

    out = tmp_path / "data"
    code = ("import os, sys; from pathlib import Path; from qarm.data.io import atomic_directory; "
            "atomic_directory(Path(sys.argv[1]), lambda tmp: ((tmp / 'half').write_text('x'), os._exit(9)))")
    assert subprocess.run([sys.executable, "-c", code, str(out)], timeout=120).returncode == 9
    leftovers = list(tmp_path.glob(".data.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "half").exists()  # what a kill -9 leaves
    live = tmp_path / f".data.tmp-{__import__('os').getpid()}-inflight"  # a live writer's: kept
    live.mkdir()
    save_dataset(small, out)
    assert not leftovers[0].exists()
    assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", live.name])

"""Provenance (qarm.provenance): every consumer refuses an upstream artifact of another run, naming both
digests (or run ids) and the flag that fixes it, and writes nothing.

The inputs are a small `qarm run` (the session's ``run_dir``) and a second preparation of the same catalogue
with other split / negative seeds (same items and texts, so the same catalogue digest and shapes, other
interactions): the cases below swap one of its artifacts in where the first run's belongs."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qarm import cli, provenance
from qarm.config import from_dict
from qarm.data.prepare import PrepareConfig, prepare
from qarm.quantize.api import QuantizeConfig, RQConfig, quantize_items
from tests.conftest import SMALL_RUN


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), " ".join((captured.err + captured.out).split())


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``roots``: path -> (size, mtime in ns)."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                stat = path.stat()
                out[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return out


def dataset_digest(folder: Path) -> str:
    return str(json.loads((folder / "meta.json").read_text())["provenance"]["digest"])


def record(manifest: Path) -> provenance.Provenance:
    made = provenance.read(manifest)
    assert made is not None, f"{manifest} has no provenance block"
    return made


@pytest.fixture(scope="module")
def reprepared(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's catalogue prepared again with other split and negative seeds."""
    out = tmp_path_factory.mktemp("provenance") / "data2"
    config = from_dict(PrepareConfig, {"split": {"seed": 1}, "negatives": {"seed": 1}}, where="test")
    prepare("synthetic", out, loader_options=SMALL_RUN["loader_options"], config=config)
    return out


@pytest.fixture(scope="module")
def other_codes(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quantize folder of other vectors (same item count and dimension) recorded as made from the run's dataset."""
    vectors = load_file(str(run_dir / "align" / "vectors.safetensors"))["aligned"]
    noise = np.random.default_rng(5).normal(size=vectors.shape).astype(np.float32)
    out = tmp_path_factory.mktemp("provenance") / "codes2"
    quantize_items(vectors + noise, np.arange(len(vectors)), out, QuantizeConfig(rq=RQConfig(codebook_size=16)),
                   inputs={"made_from": {"dataset": dataset_digest(run_dir / "data")}})
    return out


def test_every_stage_records_a_run_id_in_its_manifest_and_files(run_dir: Path) -> None:
    data = record(run_dir / "data" / "meta.json")
    assert data.digest.startswith("dataset-")
    for name in ("items.parquet", "interactions.parquet", "users.parquet"):
        assert provenance.parquet_run_id(run_dir / "data" / name) == data.run_id
    align = record(run_dir / "align" / "align_report.json")
    assert align.made_from == {"dataset": data.digest} and align.digest.startswith("vectors-")
    assert provenance.safetensors_run_id(run_dir / "align" / "vectors.safetensors") == align.run_id
    assert provenance.parquet_run_id(run_dir / "align" / "pairs.parquet") == align.run_id
    codes = record(run_dir / "quantize" / "quantize.json")
    assert codes.made_from == {"dataset": data.digest, "vectors": align.digest}
    assert codes.digest == json.loads((run_dir / "quantize" / "quantize.json").read_text())["codes_version"]
    assert provenance.parquet_run_id(run_dir / "quantize" / "codes.parquet") == codes.run_id
    runs = sorted((run_dir / "rank" / "runs").glob("*/seed0"))
    assert runs
    for run in runs:
        made = record(run / "report.json")
        assert made.made_from["dataset"] == data.digest and made.digest.startswith("model-")
        assert provenance.parquet_run_id(run / "predictions.parquet") == made.run_id
    from qarm.serve.bundle import current_version

    bundle = record(run_dir / "models" / "versions" / str(current_version(run_dir / "models")) / "bundle.json")
    assert bundle.made_from["codes"] == codes.digest and bundle.made_from["vectors"] == align.digest


Case = Callable[[Path, Path, Path, Path], tuple[list[str], list[str], Path, list[Path]]]


def _align_on_mixed_dataset(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    data = tmp / "data"
    shutil.copytree(run / "data", data)
    shutil.copyfile(data2 / "interactions.parquet", data / "interactions.parquet")
    expect = [record(data2 / "meta.json").run_id[:12], record(data / "meta.json").run_id[:12],
              "qarm data prepare", "--overwrite"]
    return ["align", str(data), "--out", str(tmp / "out")], expect, tmp / "out", [data]


def _quantize_align_with_other_vectors(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    align = tmp / "align"
    shutil.copytree(run / "align", align, ignore=shutil.ignore_patterns("cache", "train"))
    other = str(uuid.uuid4().hex)
    save_file(load_file(str(align / "vectors.safetensors")), str(align / "vectors.safetensors"),
              metadata={provenance.RUN_ID_KEY: other})
    expect = [other[:12], record(align / "align_report.json").run_id[:12], "--fresh"]
    return ["quantize", str(align), "--out", str(tmp / "out")], expect, tmp / "out", [align]


def _quantize_align_of_reprepared_dataset(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    align = tmp / "align"
    shutil.copytree(run / "align", align, ignore=shutil.ignore_patterns("cache", "train"))
    report = json.loads((align / "align_report.json").read_text())
    report["dataset"]["path"] = str(data2)  # the folder it was aligned on was prepared again since
    (align / "align_report.json").write_text(json.dumps(report))
    expect = [provenance.short(dataset_digest(run / "data")), provenance.short(dataset_digest(data2)), "--fresh"]
    return ["quantize", str(align), "--out", str(tmp / "out")], expect, tmp / "out", [align]


def _train_with_codes_of_other_dataset(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    expect = [provenance.short(dataset_digest(run / "data")), provenance.short(dataset_digest(data2)), "--codes"]
    return (["train", str(data2), "--out", str(tmp / "out"), "--model", "qarm", "--codes", str(run / "quantize")],
            expect, tmp / "out", [data2])


def _train_with_vectors_of_other_dataset(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    expect = [provenance.short(dataset_digest(run / "data")), provenance.short(dataset_digest(data2)), "--vectors"]
    return (["train", str(data2), "--out", str(tmp / "out"), "--model", "baseline", "--vectors", str(run / "align")],
            expect, tmp / "out", [data2])


def _mixed_codes_folder(run: Path, codes2: Path, tmp: Path) -> tuple[Path, list[str]]:
    """A copy of the run's quantize folder holding another quantize run's ``codes.parquet``, and what the
    refusal must name: both codes digests and the fix."""
    codes = tmp / "quantize"
    shutil.copytree(run / "quantize", codes)
    shutil.copyfile(codes2 / "codes.parquet", codes / "codes.parquet")
    expect = [provenance.short(record(codes2 / "quantize.json").digest),
              provenance.short(record(codes / "quantize.json").digest), "--overwrite"]
    return codes, expect


def _train_with_mixed_codes_folder(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    codes, expect = _mixed_codes_folder(run, codes2, tmp)
    return (["train", str(run / "data"), "--out", str(tmp / "out"), "--codes", str(codes)], expect, tmp / "out",
            [codes])


def _publish_mixed_codes_folder(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    codes, expect = _mixed_codes_folder(run, codes2, tmp)
    return ["codes", "publish", str(codes), "--to", str(tmp / "out")], expect, tmp / "out", [codes]


def _inspect_mixed_codes_folder(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    codes, expect = _mixed_codes_folder(run, codes2, tmp)
    return ["codes", "inspect", str(codes)], expect, tmp / "out", [codes]


def _ablate_with_codes_of_other_dataset(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    expect = [provenance.short(dataset_digest(run / "data")), provenance.short(dataset_digest(data2)), "--codes"]
    return (["ablate", str(data2), "--out", str(tmp / "out"), "--codes", str(run / "quantize"), "--vectors",
             str(run / "align"), "--set", "seeds=[0]"], expect, tmp / "out", [data2])


def _replay_with_codes_of_other_dataset(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    expect = [provenance.short(dataset_digest(run / "data")), provenance.short(dataset_digest(data2)), "--codes"]
    return (["replay", str(data2), "--out", str(tmp / "out"), "--codes", str(run / "quantize"), "--days", "1"],
            expect, tmp / "out", [data2])


def _warm_start_with_codes_of_other_dataset(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    last = next((run / "rank" / "runs").glob("*/seed0"))
    expect = [provenance.short(dataset_digest(run / "data")), provenance.short(dataset_digest(data2)), "--codes"]
    return (["train", str(data2), "--out", str(tmp / "out"), "--warm-start", str(last), "--window", ":",
             "--codes", str(run / "quantize"), "--vectors", str(run / "align")], expect, tmp / "out", [data2])


def _warm_start_from_a_run_folder_with_codes_of_other_dataset(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    expect = [provenance.short(dataset_digest(run / "data")), provenance.short(dataset_digest(data2)), "--codes"]
    return (["train", str(data2), "--out", str(tmp / "out"), "--warm-start", str(run), "--window", ":",
             "--codes", str(run / "quantize"), "--vectors", str(run / "align")], expect, tmp / "out", [data2])


def _export_run_whose_codes_were_replaced(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    copy = tmp / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("models", "cache"))
    shutil.rmtree(copy / "quantize")
    shutil.copytree(codes2, copy / "quantize")
    expect = [provenance.short(record(run / "quantize" / "quantize.json").digest),
              provenance.short(record(codes2 / "quantize.json").digest), "--fresh"]
    return ["export", str(copy), "--to", str(tmp / "out")], expect, tmp / "out", [copy]


def _export_run_whose_dataset_was_prepared_again(run: Path, data2: Path, codes2: Path, tmp: Path) -> Any:
    copy = tmp / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("models", "cache"))
    shutil.rmtree(copy / "data")
    shutil.copytree(data2, copy / "data")
    expect = [provenance.short(dataset_digest(run / "data")), provenance.short(dataset_digest(data2)), "--fresh"]
    return ["export", str(copy), "--to", str(tmp / "out")], expect, tmp / "out", [copy]


CASES: dict[str, Case] = {
    "align: dataset folder holding another prepare's interactions": _align_on_mixed_dataset,
    "quantize: align folder holding another run's vectors": _quantize_align_with_other_vectors,
    "quantize: align folder whose dataset was prepared again": _quantize_align_of_reprepared_dataset,
    "train: --codes of another dataset": _train_with_codes_of_other_dataset,
    "train: --vectors of another dataset": _train_with_vectors_of_other_dataset,
    "train: --codes folder holding another run's codes.parquet": _train_with_mixed_codes_folder,
    "codes publish: folder holding another run's codes.parquet": _publish_mixed_codes_folder,
    "codes inspect: folder holding another run's codes.parquet": _inspect_mixed_codes_folder,
    "ablate: --codes of another dataset": _ablate_with_codes_of_other_dataset,
    "replay: --codes of another dataset": _replay_with_codes_of_other_dataset,
    "train --warm-start: --codes of another dataset": _warm_start_with_codes_of_other_dataset,
    "train --warm-start RUN_FOLDER: --codes of another dataset": _warm_start_from_a_run_folder_with_codes_of_other_dataset,
    "export: run whose quantize folder was replaced": _export_run_whose_codes_were_replaced,
    "export: run whose dataset was prepared again": _export_run_whose_dataset_was_prepared_again,
}


@pytest.mark.parametrize("case", list(CASES))
def test_consumer_refuses_an_artifact_of_another_run(case: str, run_dir: Path, reprepared: Path, other_codes: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, expect, out, inputs = CASES[case](run_dir, reprepared, other_codes, tmp_path)
    assert expect[0] != expect[1]
    before = tree(run_dir, *inputs)
    code, message = run_main(capsys, *args)
    assert code == 2, message
    assert "error:" in message and "Traceback" not in message
    for text in expect:
        assert text in message, f"{text!r} not in {message!r}"
    assert not out.exists(), f"{out} was written"
    assert tree(run_dir, *inputs) == before, "an input was changed"


def test_folders_of_an_older_qarm_are_accepted_without_the_check(run_dir: Path, reprepared: Path,
                                                                 tmp_path: Path) -> None:
    """A quantize folder without a provenance block (an older qarm) is read as before: the catalogue and the
    item count are its only checks."""
    from qarm.features import ExampleSource, ItemTables

    codes = tmp_path / "quantize"
    shutil.copytree(run_dir / "quantize", codes)
    meta = json.loads((codes / "quantize.json").read_text())
    del meta["provenance"]
    (codes / "quantize.json").write_text(json.dumps(meta))
    tables = ItemTables.build(ExampleSource.from_folder(reprepared), quantize_dir=codes)
    assert tables.vq is not None


def test_a_prepare_run_again_has_the_same_digest_and_another_run_id(tmp_path: Path) -> None:
    """Digests are of content (an identical re-run is accepted by every consumer); run ids are per run."""
    options = {"n_items": 60, "n_users": 20, "n_interactions": 600}
    prepare("synthetic", tmp_path / "a", loader_options=options)
    prepare("synthetic", tmp_path / "b", loader_options=options)
    a, b = record(tmp_path / "a" / "meta.json"), record(tmp_path / "b" / "meta.json")
    assert a.digest == b.digest and a.run_id != b.run_id

"""The CLI's error boundary (``qarm.cli.main``): a failure of a file, a config, the disk or a service is one
``error:`` line and exit code 2, never a traceback, and nothing is written; a bug keeps its traceback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import qarm.quantize.store
import qarm.serve.store
from qarm import cli


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.err + captured.out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A server on 127.0.0.1 that accepts connections and never answers (bounded: 20 s at most)."""
    monkeypatch.setattr(qarm.quantize.store, "REDIS_TIMEOUT_S", 0.5)
    monkeypatch.setattr(qarm.serve.store, "REDIS_TIMEOUT_S", 0.5)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    for c in held:
        c.close()
    server.close()


YAML_CASES = {
    "python tag": (b'prepare: !!python/object/apply:os.system ["echo owned"]\n', "not valid YAML"),
    "unclosed list": (b"prepare: [1, 2\n", "not valid YAML"),
    "not UTF-8": (b"\xff\xfeprepare: 1\n", "not UTF-8"),
    "not a mapping": (b"- 1\n- 2\n", "expected a mapping"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
@pytest.mark.parametrize("command", ["run", "prepare", "quantize", "train"])
def test_a_bad_config_file_is_one_error_line_naming_it(tmp_path: Path, capsys, case: str, command: str):
    text, expected = YAML_CASES[case]
    config = tmp_path / "bad.yaml"
    config.write_bytes(text)
    out = tmp_path / "out"
    args = {"run": ["run", "--out", str(out)],
            "prepare": ["data", "prepare", "--dataset", "synthetic", "--out", str(out)],
            "quantize": ["quantize", str(tmp_path), "--out", str(out)],
            "train": ["train", str(tmp_path), "--out", str(out)]}[command]
    code, output = run_main(capsys, *args, "--config", str(config))
    assert code == 2, output
    assert "Traceback" not in output and output.count("error:") == 1, output
    assert expected in output and "bad.yaml" in output, output
    assert not out.exists(), "a refused command wrote its output folder"
    assert "owned" not in output


def test_a_redis_that_refuses_is_one_error_line(tmp_path: Path, capsys):
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, output = run_main(capsys, "serve", str(tmp_path), "--store", url)
    assert code == 2 and "Traceback" not in output and "error:" in output, output
    code, output = run_main(capsys, "codes", "publish", str(tmp_path), "--to", url)
    assert code == 2 and "Traceback" not in output and "error:" in output, output


def test_a_redis_that_never_answers_times_out_with_one_error_line(tmp_path: Path, capsys, silent_redis: str):
    from qarm.serve.store import open_live_store

    start = time.monotonic()
    with pytest.raises(Exception) as info:
        open_live_store(silent_redis)
    assert time.monotonic() - start < 10
    assert cli._known_failure(info.value) is not None and "Redis" in str(cli._known_failure(info.value))


def test_an_out_folder_under_a_file_is_one_error_line(tmp_path: Path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, output = run_main(capsys, "data", "prepare", "--dataset", "synthetic", "--out", str(blocker / "sub"),
                            "--set", "n_items=200", "--set", "n_users=50", "--set", "n_interactions=2000")
    assert code == 2 and "Traceback" not in output and output.count("error:") == 1, output
    assert "a-file" in output
    assert blocker.read_text() == "not a folder"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch):
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug in qarm")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(TypeError, match="a bug in qarm"):
        cli.main(["data", "list"])


def test_known_failures_name_the_path():
    error = FileNotFoundError(2, "No such file or directory", "/data/items.parquet")
    assert cli._known_failure(error) == "/data/items.parquet: No such file or directory"
    assert cli._known_failure(RuntimeError("Error in faiss::read_index at index_read.cpp")).startswith("faiss:")
    assert cli._known_failure(RuntimeError("CUDA out of memory")) is None


# -- output folders never overlap inputs ------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qarm.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare("synthetic", out, loader_options={"n_items": 200, "n_users": 50, "n_interactions": 3000})
    return out


OVERLAPS = {"same": lambda d: d, "parent": lambda d: d.parent, "child": lambda d: d / "sub"}
WRITERS = {
    "align": lambda d, out: ["align", str(d), "--out", str(out)],
    "quantize": lambda d, out: ["quantize", str(d), "--out", str(out), "--overwrite"],
    "train": lambda d, out: ["train", str(d), "--out", str(out), "--model", "id_only"],
    "train --codes": lambda d, out: ["train", str(d.parent / "other"), "--out", str(out), "--codes", str(d)],
    "ablate": lambda d, out: ["ablate", str(d), "--out", str(out)],
    "leaderboard": lambda d, out: ["leaderboard", str(d), "--out", str(out)],
    "replay": lambda d, out: ["replay", str(d), "--out", str(out)],
    "prepare --source": lambda d, out: ["data", "prepare", "--dataset", "generic", "--source", str(d), "--out",
                                        str(out), "--overwrite"],
    "run --source": lambda d, out: ["run", "--dataset", "generic", "--source", str(d), "--out", str(out)],
    "export": lambda d, out: ["export", str(d), "--to", str(out)],
}


@pytest.mark.parametrize("writer, overlap", [(w, o) for w in WRITERS for o in OVERLAPS
                                             # a bundles' folder inside its run folder is the usual layout
                                             if (w, o) != ("export", "child")])
def test_an_output_folder_overlapping_an_input_is_refused_before_anything_is_written(
        prepared: Path, tmp_path: Path, capsys, writer: str, overlap: str):
    data = tmp_path / "inputs" / "data"
    data.parent.mkdir()
    import shutil

    shutil.copytree(prepared, data)
    before = snapshot(tmp_path)
    out = OVERLAPS[overlap](data)
    code, output = run_main(capsys, *WRITERS[writer](data, out))
    assert code == 2, output
    assert "must not overlap an input" in output and "Traceback" not in output, output
    assert snapshot(tmp_path) == before, "a refused command changed its input"


def test_a_failed_run_leaves_nothing_it_created(tmp_path: Path, capsys):
    out = tmp_path / "runs" / "new"
    code, output = run_main(capsys, "run", "--dataset", "generic", "--source", str(tmp_path / "missing.yaml"),
                            "--out", str(out))
    assert code == 2 and "source not found" in output, output
    assert not out.exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "mine.txt").write_text("the user's")
    code, output = run_main(capsys, "run", "--dataset", "generic", "--source", str(tmp_path / "missing.yaml"),
                            "--out", str(existing))
    assert code == 2 and (existing / "mine.txt").read_text() == "the user's"  # a folder it did not create stays


def test_reports_piped_are_the_markdown_itself_never_cut(prepared: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "describe", str(prepared)])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table, text
    assert "…" not in text  # rich cut numbers to fit 80 columns when output was piped


@pytest.mark.parametrize("command", [["data", "prepare", "--dataset", "synthetic", "--overwrite"],
                                     ["quantize", "{data}", "--overwrite"], ["train", "{data}", "--model", "id_only"],
                                     ["align", "{data}"], ["export", "{data}"]])
def test_an_out_that_is_a_file_is_refused_and_the_file_kept(prepared: Path, tmp_path: Path, capsys, command):
    target = tmp_path / "notes.txt"
    target.write_text("the user's notes")
    args = [a.replace("{data}", str(prepared)) for a in command]
    flag = "--to" if command[0] == "export" else "--out"
    code, output = run_main(capsys, *args, flag, str(target))
    assert code == 2 and "is a file, not a folder" in output and "Traceback" not in output, output
    assert target.read_text() == "the user's notes" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_sqlite_store_under_a_file_names_the_file(tmp_path: Path):
    from qarm.errors import ConfigError
    from qarm.serve.store import open_live_store

    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"afile\.txt is a file, so no SQLite store can be made under it"):
        open_live_store(tmp_path / "afile.txt" / "live.sqlite")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    from qarm.quantize.api import QuantizeConfig, RQConfig, quantize_items

    out = tmp_path_factory.mktemp("inspect") / "codes"
    vectors = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    categories = np.array([f"Books, Music & More > Level {i % 7}" for i in range(400)], dtype=object)
    quantize_items(vectors, None, out, QuantizeConfig(rq=RQConfig(codebook_size=8)), categories=categories)
    return out


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "80-column terminal"])
def test_codes_inspect_never_cuts_a_number_at_80_columns(quantized: Path, capsys, monkeypatch, terminal: bool):
    """`qarm codes inspect` at 80 columns, piped or on a terminal: every number of the report printed whole."""
    import functools
    import re

    from qarm.quantize.api import inspect_codes, render_inspect_markdown

    monkeypatch.setenv("COLUMNS", "80")
    if terminal:
        monkeypatch.setattr(cli, "Console", functools.partial(cli.Console, force_terminal=True, width=80,
                                                              color_system=None))
    code, text = run_main(capsys, "codes", "inspect", str(quantized))
    assert code == 0, text
    assert "…" not in text
    numbers = set(re.findall(r"\d+\.\d+", render_inspect_markdown(inspect_codes(quantized))))
    assert numbers and all(n in text for n in numbers), sorted(n for n in numbers if n not in text)


def test_log_lines_are_never_wrapped_or_cut(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    line = "quantize: wrote /a/very/long/path/that/is/wider/than/forty/columns (codes version codes-0123456789abcdef)"
    cli.say(line)
    assert capsys.readouterr().err.strip() == line

"""Hostile and careless input to every CLI command, as a new user would give it: classify each outcome.

    python benchmarks/hostile_cli.py                      # writes benchmarks/results/hostile_cli.{json,md}
    python benchmarks/hostile_cli.py --only provenance,category   # some groups only (--name to keep the full results)

Each case runs ``qarm ...`` as a subprocess (the real entry point, its error boundary included) in a
scratch folder, with a time limit, and is classified:

* ``clear error``: a non-zero exit, an ``error:`` line, no Python traceback;
* ``traceback``: a Python traceback on the output (a bug, whatever the exit code);
* ``accepted``: exit 0. For these inputs that is a silent acceptance unless the case says it is fine
  (``ok_if_accepted``), e.g. an ``--out`` that merely does not exist yet;
* ``timeout``: the command did not end within its limit;
* ``left output``: refused, but the output the case names was created.

Groups: config files, ``--set`` values, input and output folders, stores, ``provenance`` (another run's
artifact where this run's belongs, once per consumer: the refusal must name both digests) and ``category``
(multi-valued and hierarchical category cells and their options in the generic loader).

Inputs are never the project's files: the script prepares, aligns and quantizes a tiny synthetic dataset
in the scratch folder first, and checks after every case that those inputs are byte-identical (a case that
changes them is ``damaged input``, whatever else it did).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SMALL = ["--set", "n_items=300", "--set", "n_users=80", "--set", "n_interactions=4000"]
FAST_ALIGN = ["--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "user2item.epochs=1",
              "--set", "tsne_sample=0"]


@dataclass
class Case:
    group: str
    stage: str
    name: str
    args: list[str]
    ok_if_accepted: bool = False
    writes_inside: str | None = None  # a fixture this case may write into by design (then not "damaged input")
    timeout: float = 120.0
    files: dict[str, bytes] = field(default_factory=dict)  # scratch files to write first (relative path)
    out: str | None = None  # the output a refused case must not have created ("left output" otherwise)


def qarm_command() -> list[str]:
    exe = shutil.which("qarm") or str(Path(sys.executable).with_name("qarm"))
    return [exe]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _fingerprint(path: Path) -> str:
    if path.is_dir():
        return digest(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def run(args: list[str], cwd: Path, timeout: float) -> tuple[int | None, str, float]:
    env = {**os.environ, "QARM_PROGRESS": "off", "HF_HUB_OFFLINE": "1", "COLUMNS": "100"}
    start = time.perf_counter()
    try:
        done = subprocess.run(qarm_command() + args, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, errors="replace")
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out, time.perf_counter() - start


def classify(case: Case, code: int | None, output: str) -> str:
    if code is None:
        return "timeout"
    if "Traceback (most recent call last)" in output:
        return "traceback"
    if code == 0:
        return "accepted (fine)" if case.ok_if_accepted else "accepted"
    if "error:" in output or "Error" in output or "Usage:" in output:
        return "clear error"
    return "unclear failure"


def silent_redis() -> tuple[str, threading.Event]:
    """A server on 127.0.0.1 that accepts connections and never answers (stops with the event, or 15 min)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.5)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        deadline = time.monotonic() + 900
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(server.accept()[0])
            except OSError:
                pass
        for c in held:
            c.close()
        server.close()

    threading.Thread(target=accept, daemon=True).start()
    return f"redis://127.0.0.1:{server.getsockname()[1]}/0", stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BAD_CONFIGS: dict[str, bytes] = {
    "python tag": b'x: !!python/object/apply:os.system ["echo owned"]\n',
    "unclosed list": b"x: [1, 2\n",
    "not UTF-8": b"\xff\xfe\x00x: 1\n",
    "a list at the top": b"- 1\n- 2\n",
    "empty": b"",
    "binary garbage": bytes(range(256)) * 4,
    "unknown section": b"nonsense: {a: 1}\n",
    "wrong type": b"train: 5\n",
}


def cases(scratch: Path) -> list[Case]:
    data, align, codes = "inputs/data", "inputs/align", "inputs/quantize"
    out: list[Case] = []
    # -- config files -------------------------------------------------------------------------------
    config_commands = {
        "run": ["run", "--out", "o/run"],
        "prepare": ["data", "prepare", "--dataset", "synthetic", "--out", "o/prep", *SMALL],
        "align": ["align", data, "--out", "o/align"],
        "quantize": ["quantize", align, "--out", "o/q"],
        "train": ["train", data, "--out", "o/train", "--codes", codes, "--vectors", align],
        "ablate": ["ablate", data, "--out", "o/ablate", "--codes", codes, "--vectors", align],
        "leaderboard": ["leaderboard", data, "--out", "o/board", "--codes", codes, "--vectors", align],
        "replay": ["replay", data, "--out", "o/replay", "--codes", codes, "--vectors", align],
    }
    for stage, args in config_commands.items():
        for name, text in BAD_CONFIGS.items():
            out.append(Case("config file", stage, name, [*args, "--config", "bad.yaml"], files={"bad.yaml": text}))
        out.append(Case("config file", stage, "missing file", [*args, "--config", "nowhere.yaml"]))
        out.append(Case("config file", stage, "a folder", [*args, "--config", "inputs"]))
    # -- --set values --------------------------------------------------------------------------------
    set_commands = {
        "prepare": (["data", "prepare", "--dataset", "synthetic", "--out", "o/prep2", *SMALL], "split.cold_item_fraction"),
        "align": (["align", data, "--out", "o/align2"], "train.max_steps"),
        "quantize": (["quantize", align, "--out", "o/q2"], "rq.levels"),
        "train": (["train", data, "--out", "o/train2", "--model", "id_only"], "train.batch_size"),
        "run": (["run", "--out", "o/run2", *SMALL], "rank.train.max_steps"),
    }
    for stage, (args, key) in set_commands.items():
        for name, value in {"unknown key": "nonsense.key=1", "no equals sign": "justtext",
                            "negative": f"{key}=-3", "NaN": f"{key}=.nan", "a string": f"{key}=lots",
                            "infinite": f"{key}=.inf", "a list": f"{key}=[1, 2]"}.items():
            out.append(Case("--set", stage, name, [*args, "--set", value]))
    # -- input folders -------------------------------------------------------------------------------
    readers = {
        "describe": lambda p: ["data", "describe", p],
        "align": lambda p: ["align", p, "--out", "o/a3"],
        "quantize": lambda p: ["quantize", p, "--out", "o/q3"],
        "train": lambda p: ["train", p, "--out", "o/t3", "--model", "id_only"],
        "train --codes": lambda p: ["train", data, "--out", "o/t4", "--codes", p],
        "train --vectors": lambda p: ["train", data, "--out", "o/t5", "--model", "baseline", "--vectors", p],
        "ablate": lambda p: ["ablate", p, "--out", "o/ab3"],
        "replay": lambda p: ["replay", p, "--out", "o/r3"],
        "codes inspect": lambda p: ["codes", "inspect", p],
        "codes publish": lambda p: ["codes", "publish", p, "--to", "o/codes.sqlite"],
        "export": lambda p: ["export", p, "--to", "o/models3"],
        "serve": lambda p: ["serve", p, "--port", str(free_port())],
    }
    broken = {
        "missing": "nowhere",
        "a file": "afile.txt",
        "an empty folder": "empty",
        "another kind of folder": "inputs",
        "truncated parquet + bad meta": "broken",
    }
    for stage, make in readers.items():
        for name, folder in broken.items():
            out.append(Case("input folder", stage, name, make(folder), timeout=60))
    # -- output folders ------------------------------------------------------------------------------
    writers = {
        "prepare --source": lambda o: ["data", "prepare", "--dataset", "generic", "--source", "shop", "--out", o,
                                       "--overwrite"],
        "align": lambda o: ["align", data, "--out", o],
        "quantize": lambda o: ["quantize", align, "--out", o, "--overwrite"],
        "train": lambda o: ["train", data, "--out", o, "--model", "id_only"],
        "ablate": lambda o: ["ablate", data, "--out", o, "--codes", codes, "--vectors", align],
        "replay": lambda o: ["replay", data, "--out", o],
        "export": lambda o: ["export", "inputs/run", "--to", o],
    }
    targets = {"the input itself": None, "the input's parent": None, "inside the input": None,
               "a file": "afile.txt", "under a file": "afile.txt/sub", "the current folder": "."}
    inputs_of = {"prepare --source": "shop", "align": data, "quantize": align, "train": data, "ablate": data,
                 "replay": data, "export": "inputs/run"}
    for stage, make in writers.items():
        for name, target in targets.items():
            if name == "the input itself":
                target = inputs_of[stage]
            elif name == "inside the input":
                target = inputs_of[stage] + "/sub"
            elif name == "the input's parent":
                target = str(Path(inputs_of[stage]).parent)
            inside_ok = stage == "export" and name == "inside the input"  # <run>/models is the usual layout
            out.append(Case("output folder", stage, name, make(str(target)), timeout=60, ok_if_accepted=inside_ok,
                            writes_inside="inputs" if inside_ok else None))
    # -- stores ---------------------------------------------------------------------------------------
    refused = f"redis://127.0.0.1:{free_port()}/0"
    for stage, make in {"serve": lambda s: ["serve", "inputs/run/models", "--store", s, "--port", str(free_port())],
                        "codes publish": lambda s: ["codes", "publish", codes, "--to", s]}.items():
        for name, store in {"Redis refuses": refused, "Redis never answers": "SILENT",
                            "SQLite under a file": "afile.txt/live.sqlite", "SQLite is a folder": "inputs",
                            "not a URL": "redis://"}.items():
            out.append(Case("store", stage, name, make(store), timeout=90))
    out += provenance_cases()
    out += category_cases()
    return out


def provenance_cases() -> list[Case]:
    """Another run's artifact where this run's belongs, once per consumer (fixtures: build_inputs)."""
    data, align, codes, data2 = "inputs/data", "inputs/align", "inputs/quantize", "inputs/data2"
    run_last = "inputs/run"
    table = {
        ("describe", "dataset folder holding another prepare's interactions"): ["data", "describe", "inputs/mixed/data"],
        ("align", "dataset folder holding another prepare's interactions"): ["align", "inputs/mixed/data", "--out", "o/p"],
        ("quantize", "align folder holding another run's vectors"): ["quantize", "inputs/mixed/align", "--out", "o/p"],
        ("quantize", "align folder whose dataset was prepared again"): ["quantize", "inputs/stale/align", "--out", "o/p"],
        ("train", "--codes of another dataset"): ["train", data2, "--out", "o/p", "--codes", codes],
        ("train", "--vectors of another dataset"): ["train", data2, "--out", "o/p", "--model", "baseline",
                                                    "--vectors", align],
        ("train", "--codes folder holding another run's codes.parquet"): ["train", data, "--out", "o/p", "--codes",
                                                                          "inputs/mixed/quantize"],
        ("train --warm-start", "--codes of another dataset"): ["train", data2, "--out", "o/p", "--warm-start",
                                                               run_last, "--window", ":", "--codes",
                                                               f"{run_last}/quantize", "--vectors", f"{run_last}/align"],
        ("ablate", "--codes and --vectors of another dataset"): ["ablate", data2, "--out", "o/p", "--codes", codes,
                                                                 "--vectors", align],
        ("leaderboard", "--codes and --vectors of another dataset"): ["leaderboard", data2, "--out", "o/p", "--codes",
                                                                      codes, "--vectors", align],
        ("replay", "--codes of another dataset"): ["replay", data2, "--out", "o/p", "--codes", codes],
        ("codes inspect", "folder holding another run's codes.parquet"): ["codes", "inspect", "inputs/mixed/quantize"],
        ("codes publish", "folder holding another run's codes.parquet"): ["codes", "publish", "inputs/mixed/quantize",
                                                                          "--to", "o/p.sqlite"],
        ("export", "run whose quantize folder was replaced"): ["export", "inputs/stale/run", "--to", "o/p"],
    }
    return [Case("provenance", stage, name, args, timeout=120, out=_output_of(args)) for (stage, name), args in
            table.items()]


def _output_of(args: list[str]) -> str | None:
    for flag in ("--out", "--to"):
        if flag in args:
            return args[args.index(flag) + 1]
    return None


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generic"
CATEGORY_CELLS = ["Electronics > Audio > Headphones|Gifts", "Books, Music & More > Fiction", "Comedy|Drama", "",
                  " > Audio", "Toys"]


def _shop_files(folder: str, items: dict[str, str], cells: list[object] | None = None, *, jsonl: bool = False
                ) -> dict[str, bytes]:
    """A copy of examples/generic under ``folder`` with its items' category cells replaced and ``items`` keys
    added to the mapping."""
    import csv
    import io

    import yaml

    rows = list(csv.DictReader(io.StringIO((EXAMPLE / "items.csv").read_text())))
    mapping = yaml.safe_load((EXAMPLE / "mapping.yaml").read_text())
    mapping["items"].update(items)
    files = {f"{folder}/events.csv": (EXAMPLE / "events.csv").read_bytes()}
    values = cells if cells is not None else CATEGORY_CELLS
    if jsonl:
        mapping["items"]["path"] = "items.jsonl"
        files[f"{folder}/items.jsonl"] = "".join(json.dumps({**r, "cat": v}) + "\n"
                                                 for r, v in zip(rows, values)).encode()
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "cat": v} for r, v in zip(rows, values))
        files[f"{folder}/items.csv"] = buffer.getvalue().encode()
    files[f"{folder}/mapping.yaml"] = yaml.safe_dump(mapping).encode()
    return files


def category_cases() -> list[Case]:
    """Multi-valued and hierarchical category cells and their options, through `qarm data prepare`."""
    paths = {"category_separator": "|", "category_path_separator": ">"}
    table: dict[str, tuple[dict[str, object], list[str], list[object] | None, bool, bool]] = {
        # name: (mapping keys, extra --set, cells, jsonl, fine when accepted)
        "separator and path, full path": (paths, [], None, False, True),
        "separator and path, level 1": ({**paths, "category_level": 1}, [], None, False, True),
        "--set category_level=2": (paths, ["--set", "category_level=2"], None, False, True),
        "JSON lists of values and of paths": ({"category_level": 2}, [],
                                              [[["Electronics", "Audio, Hi-Fi"]], ["Comedy", "Drama"], [], None,
                                               [["Home"]], ["Toys"]], True, True),
        "every cell empty": (paths, [], ["", "", "", "", "", ""], False, True),
        "level 0": ({**paths, "category_level": 0}, [], None, False, False),
        "--set category_level=-1": (paths, ["--set", "category_level=-1"], None, False, False),
        "--set category_level=lots": (paths, ["--set", "category_level=lots"], None, False, False),
        "--set category_level=1.5": (paths, ["--set", "category_level=1.5"], None, False, False),
        "level without a path separator": ({"category_level": 2}, [], None, False, False),
        "a blank separator": ({"category_separator": " "}, [], None, False, False),
        "the same separator twice": ({"category_separator": "|", "category_path_separator": "|"}, [], None, False,
                                     False),
        "a separator that is a list": ({"category_separator": ["|"]}, [], None, False, False),
        "a JSON object as a cell": ({}, [], [{"name": "Audio"}, "Toys", "Toys", "Toys", "Toys", "Toys"], True, False),
        "separator without a category column": ({"category": None, "category_separator": "|"}, [], None, False,
                                                False),
    }
    out = []
    for k, (name, (keys, sets, cells, jsonl, fine)) in enumerate(table.items()):
        folder = f"cat{k}"
        mapping_keys = {key: value for key, value in keys.items() if not (key == "category" and value is None)}
        files = _shop_files(folder, mapping_keys, cells, jsonl=jsonl)
        if keys.get("category", "") is None:  # drop the category column from the mapping
            import yaml

            mapping = yaml.safe_load(files[f"{folder}/mapping.yaml"])
            mapping["items"].pop("category", None)
            files[f"{folder}/mapping.yaml"] = yaml.safe_dump(mapping).encode()
        out.append(Case("category", "prepare --dataset generic", name,
                        ["data", "prepare", "--dataset", "generic", "--source", folder, "--out", f"o/{folder}", *sets],
                        ok_if_accepted=fine, files=files, out=None if fine else f"o/{folder}", timeout=60))
    return out


def build_inputs(scratch: Path) -> None:
    """A tiny prepared dataset, its alignment, codes and a run folder with a bundle; a generic source."""
    inputs = scratch / "inputs"
    steps = [
        ["data", "prepare", "--dataset", "synthetic", "--out", "inputs/data", *SMALL],
        ["align", "inputs/data", "--out", "inputs/align", *FAST_ALIGN],
        ["quantize", "inputs/align", "--out", "inputs/quantize", "--set", "rq.codebook_size=8", "--set", "vq.k=5"],
        ["run", "--out", "inputs/run", *SMALL, "--set", "align.train.max_steps=4", "--set", "align.train.eval_every=2",
         "--set", "align.user2item.epochs=1", "--set", "align.tsne_sample=0", "--set", "quantize.rq.codebook_size=8",
         "--set", "quantize.vq.k=5", "--set", "rank.train.max_steps=6"],
    ]
    steps.append(["quantize", "inputs/align", "--out", "inputs/quantize_seed1", "--set", "rq.seed=1",
                  "--set", "rq.codebook_size=8", "--set", "vq.k=5"])  # the same shapes, other codes
    steps.append(["data", "prepare", "--dataset", "synthetic", "--out", "inputs/data2", *SMALL,  # same catalogue,
                  "--set", "split.seed=1", "--set", "negatives.seed=1"])                      # other split
    for args in steps:
        code, output, _ = run(args, scratch, 900)
        if code != 0:
            raise SystemExit(f"building the inputs failed: qarm {' '.join(args)}\n{output[-2000:]}")
    build_mismatched(inputs)
    (scratch / "afile.txt").write_text("a file, not a folder\n")
    (scratch / "empty").mkdir()
    broken = scratch / "broken"
    shutil.copytree(inputs / "data", broken)
    parquet = broken / "interactions.parquet"
    parquet.write_bytes(parquet.read_bytes()[: len(parquet.read_bytes()) // 2])
    (broken / "meta.json").write_text("{not json")
    example = Path(__file__).resolve().parents[1] / "examples" / "generic"
    shutil.copytree(example, scratch / "shop")
    assert inputs.exists()


def build_mismatched(inputs: Path) -> None:
    """Folders holding another run's artifact (the provenance cases): ``mixed/`` a file of another run copied
    in, ``stale/`` a folder whose upstream was made again since."""
    skip = shutil.ignore_patterns("cache", "train")
    mixed, stale = inputs / "mixed", inputs / "stale"
    shutil.copytree(inputs / "data", mixed / "data")
    shutil.copyfile(inputs / "data2" / "interactions.parquet", mixed / "data" / "interactions.parquet")
    shutil.copytree(inputs / "align", mixed / "align", ignore=skip)
    shutil.copyfile(inputs / "run" / "align" / "vectors.safetensors", mixed / "align" / "vectors.safetensors")
    shutil.copytree(inputs / "quantize", mixed / "quantize")
    shutil.copyfile(inputs / "run" / "quantize" / "codes.parquet", mixed / "quantize" / "codes.parquet")
    shutil.copytree(inputs / "align", stale / "align", ignore=skip)
    report = json.loads((stale / "align" / "align_report.json").read_text())
    report["dataset"]["path"] = str((inputs / "data2").resolve())  # the dataset was prepared again since
    (stale / "align" / "align_report.json").write_text(json.dumps(report))
    shutil.copytree(inputs / "run", stale / "run", ignore=shutil.ignore_patterns("models", "cache"))
    shutil.rmtree(stale / "run" / "quantize")
    shutil.copytree(inputs / "quantize_seed1", stale / "run" / "quantize")  # codes of another quantize run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="groups, comma-separated: 'config file', '--set', 'provenance', ...")
    parser.add_argument("--name", default="hostile_cli")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qarm-hostile-") as tmp:
        scratch = Path(tmp)
        build_inputs(scratch)
        fixtures = ("inputs", "shop", "afile.txt", "empty", "broken")
        pristine = scratch.parent / f"{scratch.name}-pristine"
        pristine.mkdir(exist_ok=True)
        for p in fixtures:  # a copy to restore from after a case that changed a fixture
            (shutil.copytree if (scratch / p).is_dir() else shutil.copy2)(scratch / p, pristine / p)
        protected = {p: _fingerprint(scratch / p) for p in fixtures}
        silent, stop = silent_redis()
        rows = []
        all_cases = [c for c in cases(scratch) if args.only is None or c.group in args.only.split(",")]
        for k, case in enumerate(all_cases, start=1):
            for rel, content in case.files.items():
                (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
                (scratch / rel).write_bytes(content)
            argv_case = [silent if a == "SILENT" else a for a in case.args]
            code, output, seconds = run(argv_case, scratch, case.timeout)
            outcome = classify(case, code, output)
            damaged = [p for p, d in protected.items() if _fingerprint(scratch / p) != d]
            expected = case.writes_inside is not None and damaged == [case.writes_inside.split("/")[0]]
            if damaged and expected:
                outcome = "accepted (fine)"  # written where the command writes by design; restored below
            elif damaged:
                outcome = "damaged input"
            if case.out is not None and outcome == "clear error" and (scratch / case.out).exists():
                outcome = "left output"  # refused, but something was written
            if damaged:
                for p in damaged:  # restore the fixture for the next case
                    target = scratch / p
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink(missing_ok=True)
                    (shutil.copytree if (pristine / p).is_dir() else shutil.copy2)(pristine / p, target)
            errors = [line for line in output.splitlines() if "error:" in line]
            rows.append({"group": case.group, "stage": case.stage, "case": case.name, "args": argv_case,
                         "exit": code, "outcome": outcome, "seconds": round(seconds, 2),
                         "message": (errors[0] if errors else (output.strip().splitlines() or [""])[-1])[:300]})
            print(f"[{k}/{len(all_cases)}] {case.group} / {case.stage} / {case.name}: {outcome} ({seconds:.1f} s)",
                  flush=True)
            for name in ("o",):
                shutil.rmtree(scratch / name, ignore_errors=True)
            for rel in case.files:  # a case's own scratch files go with it
                folder = scratch / Path(rel).parts[0]
                if folder != scratch / rel and folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
        stop.set()
        shutil.rmtree(pristine, ignore_errors=True)
    counts = Counter(r["outcome"] for r in rows)
    by_stage: dict[str, Counter[str]] = {}
    for r in rows:
        by_stage.setdefault(r["stage"], Counter())[r["outcome"]] += 1
    outcomes = sorted(counts)
    lines = ["# Hostile input to the CLI", "",
             f"Machine {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
             f"Command: `python benchmarks/hostile_cli.py {' '.join(argv or sys.argv[1:])}`. {len(rows)} cases in "
             f"{time.perf_counter() - started:.0f} s.", "",
             "| outcome | cases |", "|---|---:|", *[f"| {o} | {counts[o]} |" for o in outcomes], "",
             "| stage | cases | " + " | ".join(outcomes) + " |", "|---|---:|" + "---:|" * len(outcomes)]
    for stage, c in sorted(by_stage.items()):
        lines.append(f"| {stage} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in outcomes) + " |")
    lines += ["", "Every case that was not a clear error:", ""]
    lines += [f"- {r['group']} / {r['stage']} / {r['case']}: **{r['outcome']}** (exit {r['exit']}): "
              f"`{r['message']}`" for r in rows if r["outcome"] not in ("clear error", "accepted (fine)")] or ["- none"]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text, encoding="utf-8")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": platform.platform(), "cases": rows,
                                                           "counts": dict(counts)}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

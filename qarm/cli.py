"""The ``qarm`` command line: each command parses its arguments and calls one library function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape

from qarm.config import from_dict, load_yaml
from qarm.errors import ConfigError, DataError, QarmError
from qarm.paths import check_output_folder

if TYPE_CHECKING:
    import numpy as np

    from qarm.quantize.api import QuantizeConfig

app = typer.Typer(help="qarm: multi-modal recommendation with trainable semantic-ID codes.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: list loaders, prepare a dataset folder, describe it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override an option: KEY=VALUE (loader options), or split.KEY=VALUE / "
                               "negatives.KEY=VALUE. Values are read as YAML (3, 0.5, true, text)."),
]
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="cpu, cuda, or auto (CUDA when available, else the CPU). Default: cpu."),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="YAML file with sections 'loader', 'split', 'negatives'."),
]


def say(message: str) -> None:
    """One progress or result line on stderr, printed as it is: never read as rich markup, never wrapped
    or cut to the terminal's width (a path or a number stays whole, and greppable). A module-level function:
    data-parallel ranks are handed it."""
    console.print(message, highlight=False, markup=False, soft_wrap=True)


def _error_line(message: str) -> None:
    """``error: <message>`` on stderr, the message printed as it is (never read as rich markup)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)


def _fail(exc: Exception) -> NoReturn:
    _error_line(str(exc))
    raise typer.Exit(code=2)


def _source_of(dataset: str, source: Path | None) -> Path | None:
    """The original files a loader will read (the explicit --source, else its shared folder, if any)."""
    from qarm.data.loaders.registry import get_loader, resolve_source

    try:
        return resolve_source(get_loader(dataset), source)
    except QarmError:
        return source  # the loader itself will say what is missing


def show_markdown(text: str) -> None:
    """A Markdown report on stdout: rendered by rich on a terminal wide enough for its tables; the Markdown
    text itself otherwise (piped, CI, a narrow terminal), so that no number is ever cut to fit a width."""
    out = Console()
    widest = max((len(line) for line in text.splitlines() if line.startswith("|")), default=0)
    if out.is_terminal and widest <= out.width:
        with out.capture() as captured:
            out.print(Markdown(text))
        rendered = captured.get()
        if "…" not in rendered or "…" in text:  # rich cut nothing to fit
            sys.stdout.write(rendered)
            return
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _prepared_name(folder: Path) -> str:
    """The dataset name recorded in a prepared folder's meta.json."""
    try:
        name = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["name"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--data {folder}: not a prepared dataset folder (no readable meta.json with a name); "
                          "make one with qarm data prepare") from exc
    return str(name)


def _clean_failed_run(out: Path, created: bool) -> None:
    """After a failed ``qarm run``: a folder this run created and in which no stage finished is removed
    (nothing is left behind); one with finished stages is kept, since the next run resumes from them."""
    import shutil

    from qarm.pipeline import STAGES_FILE

    if not created or not out.exists():
        return
    if (out / STAGES_FILE).exists():
        say(f"note: kept {out}: its finished stages are reused by the next `qarm run --out {out}` "
            "(delete the folder to start clean)")
        return
    shutil.rmtree(out, ignore_errors=True)


def _show(data: dict[str, Any], as_json: bool, markdown: Any) -> None:
    """Print a report as JSON on stdout, or rendered Markdown."""
    if as_json:
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        show_markdown(markdown(data))


def parse_sets(overrides: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are read as YAML."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        *parents, name = key.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is set to a value and cannot also have keys")
            node = child
        node[name] = yaml.safe_load(raw) if raw else ""
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two option dicts (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(config_file: Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (loader options, prepare config dict) from a YAML file and ``--set`` overrides."""
    loader: dict[str, Any] = {}
    prepare: dict[str, Any] = {}
    if config_file is not None:
        data = load_yaml(config_file)
        unknown = sorted(set(data) - {"loader", "split", "negatives"})
        if unknown:
            raise ConfigError(f"{config_file}: unknown section(s) {unknown}; allowed: loader, split, negatives")
        loader.update(data.get("loader") or {})
        prepare.update({k: data[k] for k in ("split", "negatives") if k in data})
    for key, value in parse_sets(overrides).items():
        if key in ("split", "negatives"):
            prepare[key] = merge(prepare.get(key, {}), value)
        elif isinstance(value, dict):
            raise ConfigError(f"--set {key}.*: unknown section {key!r}; use split.KEY, negatives.KEY or a loader KEY")
        else:
            loader[key] = value
    return loader, prepare


@app.command()
def run(
    dataset: Annotated[str, typer.Option(help="Dataset name (see `qarm data list`).")] = "synthetic",
    source: Annotated[Path | None, typer.Option(help="Where the dataset's original files are.")] = None,
    data: Annotated[Path | None, typer.Option(help="Start from an already prepared dataset folder (`qarm data "
                                              "prepare`): the prepare stage is skipped, the folder only read.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<dataset>).")] = None,
    fresh: Annotated[bool, typer.Option(help="Ignore the stage cache and run every stage.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with sections loader_options, prepare, "
                                                "align, quantize, rank (the fields of qarm.pipeline.RunConfig).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE for a loader option, or "
                    "split.KEY / negatives.KEY / align.SECTION.KEY / quantize.SECTION.KEY / rank.KEY=VALUE")] = None,
) -> None:
    """Run the pipeline end to end (the embedded synthetic default needs no download)."""
    from qarm.pipeline import run_config_from_dict, run_pipeline

    try:
        options = load_yaml(config) if config else {}
        for key, value in parse_sets(set_).items():
            if key in ("split", "negatives"):
                options.setdefault("prepare", {})[key] = merge(options.get("prepare", {}).get(key, {}), value)
            elif key in ("align", "quantize", "rank"):
                options[key] = merge(options.get(key, {}), value)
            else:
                options.setdefault("loader_options", {})[key] = value
        if data is not None:
            if source is not None:
                raise ConfigError("--data (a prepared folder) and --source (original files) exclude each other")
            dataset = _prepared_name(data)
            options["data"] = str(data)
        options.update(dataset=dataset, source=str(source) if source else None)
        run_config = run_config_from_dict(options)
        out = out or Path("runs") / dataset
        check_output_folder(out, {"source folder": _source_of(dataset, source) if data is None else None,
                                  "--data folder": data})
    except QarmError as exc:
        _fail(exc)
    created = not out.exists()
    try:
        run_pipeline(run_config, out, fresh=fresh, log=say)
    except BaseException as exc:
        _clean_failed_run(out, created)
        if isinstance(exc, QarmError):
            _fail(exc)
        raise
    say(f"report: {out / 'report.md'}")
    show_markdown((out / "report.md").read_text())


@data_app.command("list")
def data_list() -> None:
    """List the dataset loaders."""
    from qarm.data.loaders import LOADERS

    for name, spec in sorted(LOADERS.items()):
        typer.echo(f"{name:18s} {spec.description}")


@data_app.command("prepare")
def data_prepare(
    dataset: Annotated[str, typer.Option(help="Dataset name (see `qarm data list`).")],
    out: Annotated[Path, typer.Option(help="Output dataset folder.")],
    source: Annotated[Path | None, typer.Option(help="Original files (default: ../shared/data/<folder>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Load a dataset from its original files, split it, sample negatives, and write a dataset folder."""
    from qarm.data.describe import render_markdown
    from qarm.data.prepare import PrepareConfig, prepare
    from qarm.evaluate.leakage import describe_with_probe

    try:
        loader, prepare_dict = parse_overrides(config, set_)
        prepare_config = from_dict(PrepareConfig, prepare_dict, where="prepare config")
        check_output_folder(out, {"source folder": _source_of(dataset, source)})
        with console.status(f"preparing {dataset} ..."):
            path, ds, timings = prepare(dataset, out, source=source, loader_options=loader,
                                        config=prepare_config, overwrite=overwrite)
    except QarmError as exc:
        _fail(exc)
    say(f"wrote {path} (" + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ")")
    show_markdown(render_markdown(describe_with_probe(ds)))


@data_app.command("describe")
def data_describe(
    path: Annotated[Path, typer.Argument(help="A dataset folder written by `qarm data prepare`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Users, items, interactions, density, label rates, sequence lengths, modality dims, splits."""
    from qarm.data.describe import render_markdown
    from qarm.data.io import load_dataset
    from qarm.evaluate.leakage import describe_with_probe

    try:
        stats = describe_with_probe(load_dataset(path))
    except QarmError as exc:
        _fail(exc)
    _show(stats, as_json, render_markdown)


@app.command()
def align(
    data: Annotated[Path, typer.Argument(help="A prepared dataset folder (`qarm data prepare`).")],
    out: Annotated[Path, typer.Option(help="Output alignment folder.")],
    fresh: Annotated[bool, typer.Option(help="Ignore training checkpoints in OUT and start over.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with sections user2item, pairs, encoder, train.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="SECTION.KEY=VALUE, e.g. train.max_steps=300")] = None,
    device: DeviceOption = None,
    nproc: Annotated[int, typer.Option(help="Data-parallel processes for the contrastive fine-tuning (gloo on the "
                                            "CPU, NCCL on CUDA); the other steps run alike in each. Under torchrun "
                                            "leave it out.")] = 1,
) -> None:
    """Align item content vectors with user behaviour: User2Item model, Swing, pair mining, contrastive fine-tuning
    (on --device; the User2Item model and the encoding passes run on the CPU)."""
    from qarm.align.stage import AlignStageConfig, align_dataset
    from qarm.distributed import launched_world, process_group, resolve_device, spawn

    try:
        data_cfg = load_yaml(config) if config else {}
        sets = merge(data_cfg, parse_sets(set_))
        if device is not None:
            resolve_device(device)  # a bad value is named as the flag it came from
            sets = merge(sets, {"train": {"device": device}})
        stage_config = from_dict(AlignStageConfig, sets, where="align config")
        check_output_folder(out, {"dataset folder": data})
        if nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {nproc}")
        where = resolve_device(stage_config.train.device)
        if nproc > 1:
            spawn(nproc, align_dataset, data, out, stage_config, device=where, threads=stage_config.torch_threads,
                  resume=not fresh, log=say)
        else:
            with process_group(where):  # torchrun's ranks join one group; a lone process runs as it is
                align_dataset(data, out, stage_config, resume=not fresh, log=say)
            if launched_world()[0] != 0:
                return
    except QarmError as exc:
        _fail(exc)
    show_markdown((out / "align_report.md").read_text())


codes_app = typer.Typer(help="Codes: inspect a quantize folder, code new items, publish to a store.",
                        no_args_is_help=True)
app.add_typer(codes_app, name="codes")


def _quantize_config(config_file: Path | None, overrides: list[str] | None) -> QuantizeConfig:
    from qarm.quantize.api import QuantizeConfig

    data = load_yaml(config_file) if config_file else {}
    return from_dict(QuantizeConfig, merge(data, parse_sets(overrides)), where="quantize config")


@app.command()
def quantize(
    data: Annotated[Path, typer.Argument(help="An align folder (`qarm align`), or a dataset folder whose items "
                                              "have a vector column.")],
    out: Annotated[Path, typer.Option(help="Output quantize folder.")],
    vectors: Annotated[str | None, typer.Option(help="Which vectors: 'aligned' (default) or 'pretrained' of an "
                                                     "align folder; a vector column of a dataset folder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with sections 'vq', 'rq'.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="vq.KEY=VALUE or rq.KEY=VALUE, e.g. rq.levels=4")] = None,
) -> None:
    """VQ (top-K neighbour) and RQ (residual k-means) codes for every item, with a quality report."""
    from qarm.quantize.api import quantize_dataset, quantize_items

    try:
        quantize_config = _quantize_config(config, set_)
        check_output_folder(out, {"input folder": data})
        if (data / "align_report.json").exists():
            item_vectors, item_ids, categories, inputs = _align_folder_vectors(data, vectors or "aligned")
            summary = quantize_items(item_vectors, item_ids, out, quantize_config, categories=categories,
                                     overwrite=overwrite, log=say, progress=True, inputs=inputs)
        else:
            summary = quantize_dataset(data, out, quantize_config, vectors=vectors, overwrite=overwrite, log=say,
                                       progress=True)
    except QarmError as exc:
        _fail(exc)
    say(f"wrote {out} (codes version {summary.get('codes_version', '?')})")
    show_markdown((out / "quality.md").read_text())


def _align_folder_vectors(folder: Path, which: str
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(vectors, item ids, categories or None, provenance) of an align folder and the dataset it was made from."""
    import json as _json

    from qarm.align.contrastive import read_alignment
    from qarm.align.stage import made_from_align
    from qarm.data.io import load_dataset

    vectors, _ = read_alignment(folder)
    if which not in vectors:
        raise ConfigError(f"{folder}: unknown vectors {which!r}; available: {sorted(vectors)}")
    report = _json.loads((folder / "align_report.json").read_text())
    dataset = load_dataset(report["dataset"]["path"], validate=False)
    made_from = made_from_align(folder, dataset, report["dataset"]["path"])
    items = dataset.items
    categories = items["category"].to_numpy(dtype=object) if "category" in items.columns else None
    inputs = {"catalogue": dataset.catalogue_digest(), "align_dir": str(folder.resolve()), "vectors": which,
              "made_from": made_from}
    return vectors[which], items["item_id"].to_numpy(), categories, inputs


@codes_app.command("inspect")
def codes_inspect(
    folder: Annotated[Path, typer.Argument(help="A quantize folder written by `qarm quantize`.")],
    store: Annotated[str | None, typer.Option(help="Also check a code store: a SQLite file or redis://host:port/db.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of Markdown.")] = False,
) -> None:
    """Code quality: utilisation, entropy, reconstruction error, collisions, category purity, ANN overlap.
    Exits 2 after the report when a file or the store does not match the folder's codes version."""
    from qarm.quantize.api import inspect_codes, inspect_problems, render_inspect_markdown

    try:
        report = inspect_codes(folder, store=store)
    except QarmError as exc:
        _fail(exc)
    _show(report, as_json, render_inspect_markdown)
    problems = inspect_problems(report)
    if problems:
        _fail(DataError("; ".join(problems)))


@codes_app.command("publish")
def codes_publish(
    folder: Annotated[Path, typer.Argument(help="A quantize folder.")],
    to: Annotated[str, typer.Option(help="Target store: a SQLite file or redis://host:port/db.")],
    replace: Annotated[bool, typer.Option(help="Swap a store that holds another codes version.")] = False,
) -> None:
    """Copy a folder's codes into a code store (atomic; versions never mix)."""
    from qarm.quantize.api import publish_codes

    try:
        info = publish_codes(folder, to, replace=replace)
    except QarmError as exc:
        _fail(exc)
    say(f"published: {info}")


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="A prepared dataset folder (`qarm data prepare`).")],
    out: Annotated[Path, typer.Option(help="Output folder: checkpoints, predictions, report.json.")],
    model: Annotated[str, typer.Option(help="Model name: id_only, baseline, qarm, ...")] = "qarm",
    codes: Annotated[Path | None, typer.Option(help="A quantize folder (`qarm quantize`).")] = None,
    vectors: Annotated[Path | None, typer.Option(help="An align folder (`qarm align`): frozen vectors.")] = None,
    fresh: Annotated[bool, typer.Option(help="Ignore checkpoints in OUT and start over.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with the fields of "
                                                "qarm.train.stage.RankingConfig.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE, e.g. train.epochs=2 or "
                                                   "model_config.use_vq=false")] = None,
    warm_start: Annotated[Path | None, typer.Option(help="Continue the last model: a ranking run, a `qarm run` "
                                                    "folder, a bundle or a bundles' folder (its current version); "
                                                    "needs --window.")] = None,
    window: Annotated[str | None, typer.Option(help="START:END (the log's time unit, either side may be empty): "
                                               "the events a --warm-start trains on.")] = None,
    replay_fraction: Annotated[float, typer.Option(help="With --warm-start: older events mixed in, as a share of "
                                                   "the window's.")] = 0.0,
    device: DeviceOption = None,
    nproc: Annotated[int, typer.Option(help="Data-parallel training processes on this machine (DDP: gloo on the "
                                            "CPU, NCCL on CUDA), each training its share of every batch. Under "
                                            "torchrun leave it out.")] = 1,
) -> None:
    """Train and evaluate one ranking model (AUC / UAUC / GAUC / logloss per segment), or with --warm-start
    continue the last one on a time window (then `qarm export OUT` serves it).

    Data parallel: `qarm train DATA --out OUT --nproc 2`, or `torchrun --nproc_per_node 2 -m qarm train DATA
    --out OUT` (several machines: torchrun's --nnodes / --rdzv-endpoint); rank 0 writes OUT."""
    from qarm.distributed import launched_world, process_group, resolve_device, spawn
    from qarm.evaluate.report import write_report
    from qarm.train.stage import RankingConfig, train_ranking

    if (warm_start is None) != (window is None):
        _fail(ConfigError("--warm-start and --window go together"))
    if nproc < 1:
        _fail(ConfigError(f"--nproc must be >= 1, got {nproc}"))
    if nproc > 1 and warm_start is not None:
        _fail(ConfigError("--nproc with --warm-start is not supported: continue the last model in one process"))
    try:
        if device is not None:
            resolve_device(device)  # a bad value is named as the flag it came from
    except QarmError as exc:
        _fail(exc)
    if warm_start is not None and window is not None:
        from qarm.train.continual import parse_window, train_warm_start
        from qarm.train.trainer import TrainConfig

        try:
            sets = merge(load_yaml(config) if config else {}, parse_sets(set_))
            unknown = sorted(set(sets) - {"train"})
            if unknown:
                raise ConfigError(f"with --warm-start the model and its config are the last model's; only train.* "
                                  f"settings apply (got {unknown})")
            train_config = TrainConfig.from_dict({"epochs": 1, **(sets.get("train") or {}),
                                                  **({"device": device} if device else {})})
            check_output_folder(out, {"dataset folder": data, "--codes folder": codes, "--vectors folder": vectors,
                                      "--warm-start model": warm_start})
            train_warm_start(data, out, warm_start, parse_window(window), quantize_dir=codes, align_dir=vectors,
                             train_config=train_config, replay_fraction=replay_fraction, resume=not fresh,
                             progress=True, log=say)
        except QarmError as exc:
            _fail(exc)
        return

    try:
        options = merge(load_yaml(config) if config else {}, parse_sets(set_))
        options.setdefault("model", model)
        if device is not None:
            options = merge(options, {"train": {"device": device}})
        ranking = RankingConfig.from_dict(options)
        where = resolve_device(ranking.train.device)
        check_output_folder(out, {"dataset folder": data, "--codes folder": codes, "--vectors folder": vectors})
        arguments: dict[str, Any] = {"quantize_dir": codes, "align_dir": vectors, "resume": not fresh,
                                     "progress": True, "log": say}
        if nproc > 1:
            spawn(nproc, train_ranking, data, out, ranking, device=where, threads=ranking.train.threads, **arguments)
            report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        else:
            with process_group(where):  # torchrun's ranks join one group; a lone process runs as it is
                report = train_ranking(data, out, ranking, **arguments)
            if launched_world()[0] != 0:
                return
        _, md = write_report(out / "metrics", {ranking.model: report["metrics"]}, metrics=("gauc", "auc", "logloss"))
    except QarmError as exc:
        _fail(exc)
    show_markdown(md.read_text())


@app.command()
def ablate(
    data: Annotated[Path, typer.Argument(help="A prepared dataset folder (`qarm data prepare`).")],
    out: Annotated[Path, typer.Option(help="Output folder: runs/, ablation.json, ablation.md.")],
    codes: Annotated[Path | None, typer.Option(help="A quantize folder (`qarm quantize`) of aligned vectors.")] = None,
    vectors: Annotated[Path | None, typer.Option(help="An align folder (`qarm align`): pretrained + aligned.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with the fields of "
                                                "qarm.train.ablation.AblationConfig.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE, e.g. seeds=[0] or "
                                                   "studies=[table1,groups] or train.epochs=1 or workers=2")] = None,
    fresh: Annotated[bool, typer.Option(help="Retrain every run (ignore finished runs and checkpoints in OUT).")] = False,
) -> None:
    """The paper's ablations: ID-only, Baseline, + aligned, + VQ, + RQ, + VQ & RQ; K; d; per-group gains."""
    from qarm.train.ablation import AblationConfig, run_ablation

    try:
        ablation = AblationConfig.from_dict(merge(load_yaml(config) if config else {}, parse_sets(set_)))
        check_output_folder(out, {"dataset folder": data, "--codes folder": codes, "--vectors folder": vectors})
        run_ablation(data, out, ablation, quantize_dir=codes, align_dir=vectors, progress=ablation.workers == 1,
                     log=say, fresh=fresh)
    except QarmError as exc:
        _fail(exc)
    say(f"wrote {out / 'ablation.md'}")
    show_markdown((out / "ablation.md").read_text())


@app.command()
def leaderboard(
    data: Annotated[Path, typer.Argument(help="A prepared dataset folder (`qarm data prepare`).")],
    out: Annotated[Path, typer.Option(help="Output folder: runs/, leaderboard.json, leaderboard.md. The same "
                                           "folder as `qarm ablate` reuses its finished runs.")],
    codes: Annotated[Path | None, typer.Option(help="A quantize folder (`qarm quantize`) of aligned vectors.")] = None,
    vectors: Annotated[Path | None, typer.Option(help="An align folder (`qarm align`): pretrained + aligned.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with the fields of "
                                                "qarm.train.ablation.AblationConfig.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE, e.g. seeds=[0] or workers=2 or "
                                                   "train_overrides.em3.max_seconds=1800")] = None,
    fresh: Annotated[bool, typer.Option(help="Retrain every run (ignore finished runs and checkpoints in OUT).")] = False,
) -> None:
    """DIN, Baseline, FGCNN, EM3 and the QARM variants on one split: AUC / UAUC / GAUC / logloss, time, size."""
    from qarm.train.ablation import AblationConfig, run_ablation

    try:
        options = merge({"studies": ["leaderboard"]}, merge(load_yaml(config) if config else {}, parse_sets(set_)))
        board = AblationConfig.from_dict(options)
        check_output_folder(out, {"dataset folder": data, "--codes folder": codes, "--vectors folder": vectors})
        run_ablation(data, out, board, quantize_dir=codes, align_dir=vectors, progress=board.workers == 1,
                     log=say, report_name="leaderboard",
                     fresh=fresh)
    except QarmError as exc:
        _fail(exc)
    say(f"wrote {out / 'leaderboard.md'}")
    show_markdown((out / "leaderboard.md").read_text())


@app.command()
def replay(
    data: Annotated[Path, typer.Argument(help="A prepared, time-split dataset folder (`qarm data prepare`).")],
    out: Annotated[Path, typer.Option(help="Output folder: replay.json, replay.md, replay.png, seed-<n>.json.")],
    codes: Annotated[Path | None, typer.Option(help="A quantize folder (`qarm quantize`).")] = None,
    vectors: Annotated[Path | None, typer.Option(help="An align folder (`qarm align`).")] = None,
    days: Annotated[int, typer.Option(help="Days replayed after the time split's cut.")] = 14,
    day_seconds: Annotated[int, typer.Option(help="One day in the log's time unit.")] = 86_400,
    strategies: Annotated[str, typer.Option(help="Comma-separated: frozen, incremental, retrain.")] =
        "frozen,incremental,retrain",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    config: Annotated[Path | None, typer.Option("--config", help="YAML with the fields of "
                                                "qarm.train.continual.ReplayConfig.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE, e.g. model=id_only or "
                                                   "incremental_epochs=2 or replay_fraction=0.5")] = None,
) -> None:
    """Day-by-day simulation: each day scored by yesterday's model; frozen, incremental and retrain updates."""
    from qarm.train.continual import ReplayConfig
    from qarm.train.continual import replay as run_replay

    try:
        check_output_folder(out, {"dataset folder": data, "--codes folder": codes, "--vectors folder": vectors})
        options = merge(load_yaml(config) if config else {}, parse_sets(set_))
        options.setdefault("days", days)
        options.setdefault("day_seconds", day_seconds)
        options.setdefault("strategies", [s.strip() for s in strategies.split(",") if s.strip()])
        try:
            options.setdefault("seeds", [int(s) for s in seeds.split(",") if s.strip()])
        except ValueError as exc:
            raise ConfigError(f"--seeds must be comma-separated integers, got {seeds!r}") from exc
        replay_config = ReplayConfig.from_dict(options)
        run_replay(data, out, replay_config, quantize_dir=codes, align_dir=vectors,
                   log=say)
    except QarmError as exc:
        _fail(exc)
    show_markdown((out / "replay.md").read_text())


@app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="A `qarm run` folder, or one ranking run inside it.")],
    to: Annotated[Path, typer.Option(help="The bundles' folder (MODELS_DIR); the version goes to versions/<v>/.")],
    row: Annotated[str | None, typer.Option(help="Ablation row of a `qarm run` folder (default: '+ VQ & RQ').")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of that row (default: its first).")] = None,
    keep: Annotated[int, typer.Option(help="Versions kept (oldest removed first; the current one never).")] = 3,
    version: Annotated[str | None, typer.Option(help="Version name (default: v<UTC time>-<content hash>).")] = None,
    current: Annotated[bool, typer.Option(help="Make the new version current (atomic pointer swap).")] = True,
) -> None:
    """Export a trained ranking run as a versioned, hash-checked serving bundle."""
    from qarm.serve.bundle import export_bundle

    try:  # MODELS_DIR may lie inside the run folder (`qarm run` keeps it in <out>/models), never contain it
        check_output_folder(to, {"run folder": run_dir}, flag="--to", allow_inside=True)
        manifest = export_bundle(run_dir, to, row=row, seed=seed, keep=keep, version=version, make_current=current,
                                 log=say)
    except QarmError as exc:
        _fail(exc)
    typer.echo(manifest["version"])


@app.command()
def serve(
    models_dir: Annotated[Path, typer.Argument(help="A bundles' folder (`qarm export --to`, or <run>/models).")],
    store: Annotated[str | None, typer.Option(help="Live store: redis://host:port/db, or a SQLite file "
                                              "(default: MODELS_DIR/live.sqlite).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (more than 1 needs a Redis store).")] = 1,
    threads: Annotated[int | None, typer.Option(help="Torch threads per worker (default: cores / workers).")] = None,
    reload_interval: Annotated[float, typer.Option(help="Seconds between checks of MODELS_DIR/CURRENT "
                                                   "(0: no hot reload).")] = 1.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
    device: DeviceOption = None,
) -> None:
    """Serve the current bundle over HTTP (FastAPI + uvicorn; OpenAPI at /docs)."""
    import os

    import uvicorn

    from qarm.distributed import resolve_device
    from qarm.serve.bundle import current_version
    from qarm.serve.store import open_live_store

    if workers < 1:
        _fail(ConfigError(f"--workers must be >= 1, got {workers}"))
    target = store or str(models_dir / "live.sqlite")
    if workers > 1 and not target.startswith(("redis://", "rediss://", "unix://")):
        _fail(ConfigError("--workers > 1 needs a shared Redis store (--store redis://...); the SQLite store is for "
                          "one process"))
    try:
        where = resolve_device(device or "cpu")  # a bad --device fails here, once, not in every worker
        if current_version(models_dir) is None:
            raise ConfigError(f"{models_dir}: no current bundle; run `qarm export RUN_DIR --to {models_dir}` first")
        open_live_store(target).close()  # fail here, not in every worker, when the store cannot be opened
    except QarmError as exc:
        _fail(exc)
    os.environ.update(QARM_MODELS_DIR=str(models_dir), QARM_STORE=target, QARM_RELOAD_INTERVAL=str(reload_interval),
                      QARM_DEVICE=where.type,
                      QARM_THREADS=str(threads or max(1, (os.cpu_count() or 1) // workers)))
    say(f"serving {models_dir} (version {current_version(models_dir)}) on http://{host}:{port} "
        f"with {workers} worker(s), store {target}")
    uvicorn.run("qarm.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, access_log=False)


@app.command()
def learn(
    models_dir: Annotated[Path, typer.Argument(help="The bundles' folder the service serves (its current version "
                                               "is where learning starts).")],
    store: Annotated[str, typer.Option(help="The service's live store: redis://host:port/db, or its SQLite file "
                                       "(`qarm serve` defaults to MODELS_DIR/live.sqlite).")],
    every_events: Annotated[int | None, typer.Option(help="Update once this many new events wait (default 1000).")]
        = None,
    every_seconds: Annotated[float | None, typer.Option(help="Instead: update every T seconds when any event "
                                                        "waits.")] = None,
    max_updates: Annotated[int | None, typer.Option(help="Stop after this many updates.")] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    once: Annotated[bool, typer.Option(help="One update of whatever waits (or none), then exit: for a scheduler.")]
        = False,
    max_events: Annotated[int, typer.Option(help="Events one update reads at most.")] = 100_000,
    replay_fraction: Annotated[float, typer.Option(help="Older events mixed into an update, as a share of its new "
                                                   "ones.")] = 0.0,
    keep: Annotated[int, typer.Option(help="Bundle versions kept (the current one never removed).")] = 3,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: torch's).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with the fields of "
                                                "qarm.train.live.LearnConfig.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE, e.g. train.lr=0.0005 or "
                                                   "train.epochs=2 or poll_seconds=0.5")] = None,
) -> None:
    """Follow the service's event log: train each batch of new events into the current model and publish it
    as a new version (the service hot-reloads it). Resumes from the position the current version records."""
    from qarm.serve.store import open_live_store
    from qarm.train.live import LearnConfig
    from qarm.train.live import learn as run_learn

    try:
        options = merge(load_yaml(config) if config else {}, parse_sets(set_))
        flags = {"every_events": every_events, "every_seconds": every_seconds, "max_updates": max_updates,
                 "max_seconds": max_seconds, "once": once or None, "max_events": max_events,
                 "replay_fraction": replay_fraction, "keep": keep, "threads": threads}
        for key, value in flags.items():
            if value is not None:
                options.setdefault(key, value)
        options["train"] = {"epochs": 1, "checkpoint_every": 10**9, **(options.get("train") or {})}
        learn_config = LearnConfig.from_dict(options)
        live = open_live_store(store)
        try:
            updates = run_learn(models_dir, live, learn_config,
                                log=lambda msg: console.print(msg, highlight=False, markup=False))
        finally:
            live.close()
    except QarmError as exc:
        _fail(exc)
    console.print(f"learn: {len(updates)} update(s)", highlight=False, markup=False)


# ------------------------------------------------------------------------------------ error boundary

def _known_failure(exc: BaseException) -> str | None:
    """One line for a failure of the machine, a file or a service (not a bug of qarm), else None."""
    if isinstance(exc, QarmError):
        return str(exc)
    if isinstance(exc, OSError):  # files, disks, permissions, sockets: name the path when there is one
        where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)
        reason = exc.strerror or str(exc)
        return f"{where}: {reason}" if where else reason
    if isinstance(exc, yaml.YAMLError):
        return f"not valid YAML: {' '.join(str(exc).split())}"
    if isinstance(exc, UnicodeError):
        return f"text that is not valid UTF-8: {exc}"
    module = type(exc).__module__ or ""
    if module.startswith("redis"):
        return f"Redis: {exc} (check the --store URL and that the server answers)"
    if module.startswith("safetensors") or type(exc).__name__ == "SafetensorError":
        return f"not a readable safetensors file: {exc}"
    if isinstance(exc, RuntimeError) and "faiss" in str(exc).lower():
        return f"faiss: {' '.join(str(exc).split())}"
    return None


def main(argv: list[str] | None = None) -> None:
    """The ``qarm`` command: the Typer app behind one error boundary. A failure of a file, the disk, a
    config, Redis, faiss or safetensors is one ``error:`` line and exit code 2, never a traceback; an
    interrupt exits 130. Anything else is a bug of qarm and keeps its traceback."""
    try:
        app(args=argv, prog_name="qarm")
    except KeyboardInterrupt:
        _error_line("interrupted")
        sys.exit(130)
    except Exception as exc:
        message = _known_failure(exc)
        if message is None:
            raise
        _error_line(message)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()

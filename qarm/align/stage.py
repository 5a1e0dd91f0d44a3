"""``qarm align``: the whole item-alignment stage on a prepared dataset folder.

Steps, each timed and recorded:

1. **User2Item** two-tower retrieval model on item IDs (:mod:`qarm.align.user2item`); Recall@50 /
   NDCG@50 on the validation split, next to a popularity baseline.
2. **Pairs**: triggers mined in the User2Item item space, plus Swing, deduplicated, cold items
   dropped, a seeded hold-out (:mod:`qarm.align.pairs`).
3. **Alignment**: the content encoder (text + modality vectors) encodes every item (pre-trained), is
   fine-tuned with in-batch InfoNCE on the pairs, and encodes every item again (aligned)
   (:mod:`qarm.align.contrastive`).
4. **Evaluation**: held-out pair Recall@10/@50 with pre-trained vs aligned vectors, on the held-out
   pairs that early stopping never saw (the hold-out is split: up to ``train.eval_pairs``, at most
   half of it, drive early stopping, the rest are the test pairs); on generated data
   the rank correlation with the ground-truth business similarity; a t-SNE picture of both.

Output folder::

    user2item/             the retrieval model (model.safetensors, config.json)
    pairs.parquet          trigger, target, sources, scores, part ("train", "holdout_stopping", "holdout_test")
    vectors.safetensors    "pretrained" and "aligned", (n_items, out_dim) float32, row = item id
    encoder/ train/        the aligned encoder (for items added later) and the training checkpoints
    alignment.json         the trainer's record
    align_report.json/.md  every metric, count, time and the config that made them
    tsne.png               pre-trained vs aligned, coloured by business group or category
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qarm import __version__, provenance
from qarm.align.contrastive import VECTORS_FILE, AlignConfig, read_alignment, run_alignment
from qarm.align.evaluate import business_rank_correlation, pair_recall, plot_tsne
from qarm.align.pairs import PairMiningConfig, mine_pairs
from qarm.align.user2item import User2ItemConfig, evaluate_popularity, item_embeddings, save_user2item, train_user2item
from qarm.config import to_dict
from qarm.data import schema as S
from qarm.data.io import atomic_write_bytes, load_dataset, write_json
from qarm.distributed import is_main_process, rank
from qarm.encode.content import ContentEncoderConfig

if TYPE_CHECKING:
    import pandas as pd

    from qarm.data.schema import Dataset

REPORT_JSON = "align_report.json"
REPORT_MD = "align_report.md"
PAIRS_FILE = "pairs.parquet"
TSNE_FILE = "tsne.png"

Log = Callable[[str], None]


@dataclass
class AlignStageConfig:
    """Every part of the alignment stage, each with its own typed config."""

    user2item: User2ItemConfig = field(default_factory=User2ItemConfig)
    pairs: PairMiningConfig = field(default_factory=PairMiningConfig)
    encoder: ContentEncoderConfig = field(default_factory=ContentEncoderConfig)
    train: AlignConfig = field(default_factory=AlignConfig)
    tsne_sample: int = 2000  # points in the t-SNE picture; 0 skips it (t-SNE of 2k points: ~10 s)
    torch_threads: int | None = None  # None: torch's default; 1 is faster on a machine busy with other work


def align_dataset(
    dataset_dir: str | Path,
    out_dir: str | Path,
    config: AlignStageConfig | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Run the alignment stage on a prepared dataset folder and write ``out_dir``; return the report.

    Inside a process group (``qarm align --nproc N``, torchrun) the contrastive fine-tuning is data
    parallel (:func:`~qarm.align.contrastive.train_alignment`); the other steps are deterministic and run
    alike on every rank, and rank 0 alone writes and logs (the other ranks return ``{"rank": r}``)."""
    config = config or AlignStageConfig()
    out_dir = Path(out_dir)
    dataset = load_dataset(dataset_dir, ground_truth=True)  # refused (e.g. mixed files) before OUT is made
    main = is_main_process()
    log = log if main else (lambda line: None)
    progress = progress and main
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    run_id = provenance.new_run_id()
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    log("align: training the User2Item two-tower model ...")
    model, u2i_metrics = train_user2item(dataset, config.user2item, progress=progress, log=log)
    if main:
        save_user2item(model, out_dir / "user2item", u2i_metrics)
    popularity = evaluate_popularity(dataset, k=50)
    seconds["user2item"] = time.perf_counter() - start
    log(f"align: User2Item {_fmt(u2i_metrics)} (popularity {_fmt(popularity)})")

    start = time.perf_counter()
    mined = mine_pairs(dataset, item_embeddings(model), config.pairs)
    if len(mined.train) == 0:
        from qarm.errors import DataError

        raise DataError(f"{dataset_dir}: no item2item pairs could be mined; lower pairs.min_similarity")
    stopping, test = split_holdout(mined.holdout, config.train.eval_pairs, seed=config.train.seed)
    pairs = mined.pairs.copy()
    part = {key: "holdout_stopping" for key in zip(stopping["trigger"], stopping["target"])}
    part.update({key: "holdout_test" for key in zip(test["trigger"], test["target"])})
    pairs["part"] = [part.get(key, "train") for key in zip(pairs["trigger"], pairs["target"])]
    if main:
        atomic_write_bytes(out_dir / PAIRS_FILE, _parquet_bytes(pairs, run_id))
    seconds["pairs"] = time.perf_counter() - start
    counts = {**mined.counts, "holdout_stopping": len(stopping), "holdout_test": len(test)}
    log(f"align: pairs {counts}")

    start = time.perf_counter()
    result = run_alignment(dataset, mined.train, stopping, out_dir, encoder_config=config.encoder,
                           config=config.train, cache_dir=out_dir / "cache", resume=resume, progress=progress,
                           run_id=run_id)
    seconds.update({f"align_{k}": v for k, v in result.timings.items()})
    seconds["alignment"] = time.perf_counter() - start
    if not main:
        return {"rank": rank()}

    start = time.perf_counter()
    evaluation = evaluate_vectors(dataset, result.pretrained, result.aligned, test, out_dir,
                                  tsne_sample=config.tsne_sample)
    seconds["evaluate"] = time.perf_counter() - start
    seconds["total"] = sum(v for k, v in seconds.items() if not k.startswith("align_"))

    report = {
        "qarm_version": __version__,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads()},
        "dataset": {"path": str(Path(dataset_dir).resolve()), "name": dataset.meta.name,
                    "catalogue": dataset.catalogue_digest(),
                    "items": dataset.n_items, "cold_items": int(dataset.items[S.COLD_START].sum())},
        "config": to_dict(config),
        "user2item": {"model": u2i_metrics, "popularity": popularity},
        "pairs": {"counts": counts, "seconds": mined.seconds},
        "training": result.history.to_dict(),
        "evaluation": evaluation,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        provenance.BLOCK: provenance.Provenance(
            run_id, provenance.content_digest("vectors", arrays={"pretrained": result.pretrained,
                                                                  "aligned": result.aligned}),
            provenance.made_from(dataset=provenance.of_dataset(dataset.meta.provenance))).to_json(),
    }
    write_json(out_dir / REPORT_JSON, report)
    atomic_write_bytes(out_dir / REPORT_MD, render_markdown(report).encode())
    recall = evaluation["pair_recall"]
    log(f"align: done in {seconds['total']:.0f} s; held-out pair recall@10 {recall['pretrained']['recall@10']:.4f} "
        f"pre-trained -> {recall['aligned']['recall@10']:.4f} aligned")
    return report


def split_holdout(holdout: pd.DataFrame, eval_pairs: int, *, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stopping, test): a seeded sample of ``min(eval_pairs, len // 2)`` held-out pairs for early
    stopping, and the rest, which only the final evaluation reads."""
    n_stop = min(int(eval_pairs), len(holdout) // 2)
    order = np.random.default_rng([seed, 2]).permutation(len(holdout))
    stopping = holdout.iloc[np.sort(order[:n_stop])].reset_index(drop=True)
    test = holdout.iloc[np.sort(order[n_stop:])].reset_index(drop=True)
    return stopping, test


def evaluate_vectors(dataset: Dataset, pretrained: np.ndarray, aligned: np.ndarray, holdout: pd.DataFrame,
                     out_dir: Path, *, tsne_sample: int = 2000) -> dict[str, Any]:
    """Held-out pair recall before / after, business-similarity correlation when the data has ground
    truth, and the t-SNE picture."""
    out: dict[str, Any] = {"pair_recall": {
        "pretrained": pair_recall(pretrained, holdout, ks=(10, 50)),
        "aligned": pair_recall(aligned, holdout, ks=(10, 50)),
    }}
    gt_items = dataset.ground_truth.get("items")
    if gt_items is not None:
        out["business_rank_correlation"] = {
            "pretrained": business_rank_correlation(pretrained, gt_items),
            "aligned": business_rank_correlation(aligned, gt_items),
        }
        labels, label_name = gt_items["business_group"].to_numpy(), "business group"
    elif S.CATEGORY in dataset.items.columns:
        labels, label_name = dataset.items[S.CATEGORY].astype(str).to_numpy(), "category"
    else:
        labels, label_name = None, ""  # no labels, no picture
    if tsne_sample and labels is not None:
        plot_tsne(pretrained, aligned, labels, out_dir / TSNE_FILE, sample=tsne_sample, label_name=label_name)
        out["tsne"] = TSNE_FILE
    return out


def read_aligned_vectors(align_dir: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The aligned vectors of an align folder and its report (which names the dataset folder)."""
    vectors, _ = read_alignment(align_dir)
    report = json.loads((Path(align_dir) / REPORT_JSON).read_text())
    return vectors["aligned"], report


def render_markdown(report: dict[str, Any]) -> str:
    ev = report["evaluation"]
    pr = ev["pair_recall"]
    u2i = report["user2item"]
    lines = [
        f"# Alignment of {report['dataset']['name']}", "",
        f"{report['dataset']['items']:,} items ({report['dataset']['cold_items']:,} cold-start), "
        f"qarm {report['qarm_version']}, torch threads {report['machine']['torch_threads']}", "",
        "| measure | pre-trained | aligned |", "|---|---:|---:|",
        f"| held-out pair Recall@10 | {pr['pretrained']['recall@10']:.4f} | {pr['aligned']['recall@10']:.4f} |",
        f"| held-out pair Recall@50 | {pr['pretrained']['recall@50']:.4f} | {pr['aligned']['recall@50']:.4f} |",
        f"| held-out pair MRR | {pr['pretrained']['mrr']:.4f} | {pr['aligned']['mrr']:.4f} |",
        "", f"Held-out test pairs: {pr['aligned']['n_pairs']:,} (the pairs early stopping watched are not among "
            "them); each target ranked among all items by cosine to its trigger.",
    ]
    if "business_rank_correlation" in ev:
        bc = ev["business_rank_correlation"]
        lines.append(f"| Spearman(cosine, business similarity) | {bc['pretrained']:.4f} | {bc['aligned']:.4f} |")
    lines += ["", f"User2Item on valid: {_fmt(u2i['model'])}; popularity: {_fmt(u2i['popularity'])}", "",
              "Pairs: " + ", ".join(f"{k} {v:,}" for k, v in report["pairs"]["counts"].items()), "",
              "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items())]
    return "\n".join(lines) + "\n"


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _parquet_bytes(frame: pd.DataFrame, run_id: str) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    table = provenance.with_run_id(pa.Table.from_pandas(frame, preserve_index=False), run_id)
    pq.write_table(table, buffer, write_page_checksum=True)
    return buffer.getvalue()


def realign(align_dir: str | Path) -> str:
    """The fix for an align folder that mixes runs or was made from another dataset."""
    return f"align again into it (qarm align DATA --out {align_dir} --fresh)"


def check_align_folder(align_dir: str | Path, dataset: provenance.Provenance | None = None,
                       dataset_label: str = "the dataset", *,
                       fix: str = "pass the --vectors folder aligned on this dataset, or align it (qarm align)"
                       ) -> provenance.Provenance | None:
    """The align folder's provenance, after checking that its vectors and pairs are its own run's and that it
    was aligned on the dataset whose provenance is ``dataset`` (else
    :class:`~qarm.provenance.ProvenanceMismatch`, whose message ends with ``fix``)."""
    align_dir = Path(align_dir)
    made = provenance.check_folder(align_dir / REPORT_JSON, [align_dir / VECTORS_FILE, align_dir / PAIRS_FILE],
                                   realign(align_dir))
    provenance.check_made_from(align_dir, made, "dataset", dataset_label, dataset, fix)
    return made


def made_from_align(align_dir: str | Path, dataset: Dataset, dataset_dir: str | Path) -> dict[str, str]:
    """``made_from`` of a folder made from an align folder's vectors (qarm quantize), after checking that the
    align folder is whole and was aligned on ``dataset`` as it is now (read from ``dataset_dir``)."""
    upstream = provenance.of_dataset(dataset.meta.provenance)
    made = check_align_folder(align_dir, upstream, f"the dataset folder {dataset_dir}", fix=realign(align_dir))
    return provenance.made_from(dataset=upstream, vectors=made)

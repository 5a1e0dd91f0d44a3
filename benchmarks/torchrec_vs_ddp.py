"""Training speed of 2 gloo ranks: plain DDP (every rank holds every table) against TorchRec tables sharded
table-wise (qarm/models/torchrec_tables.py). Needs the optional torchrec extra.

    python benchmarks/torchrec_vs_ddp.py runs/synthetic/data --codes runs/synthetic/quantize \\
        --vectors runs/synthetic/align --name synthetic

The QARM row (``+ VQ & RQ``) on the data's training rows in the trainer's order (seed 0), batch ``--batch``
(global; each rank trains its half), ``--steps`` timed steps after ``--warmup``: forward, BCE, backward,
optimiser steps (DDP: Adam on everything; sharded: Adam on the dense part, row-wise Adagrad fused into the
backward pass on the user ID, item ID and VQ code tables). The two layouts alternate ``--repeats`` times
and each figure is the median. examples/s counts the global batch. Written to
``benchmarks/results/torchrec_vs_ddp_<name>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _machine import load_average

from qarm.distributed import rank, spawn, world_size
from qarm.features.examples import ExampleSource
from qarm.models import build_model
from qarm.train.ablation import TABLE1
from qarm.train.stage import build_tables
from qarm.train.trainer import loss_fn

RESULTS = Path(__file__).resolve().parent / "results"
ROW = "+ VQ & RQ"


def time_steps(data: Path, codes: Path, vectors: Path, layout: str, batch: int, steps: int, warmup: int,
               out: Path) -> None:
    """In each rank: build the model, wrap it as ``layout`` says, time the steps; rank 0 writes the figure."""
    from qarm.models.torchrec_tables import dense_parameters, shard_tables, use_torchrec_tables

    source = ExampleSource.from_folder(data, history_length=50)
    name, switches = TABLE1[ROW]
    tables = build_tables(source, data, name, quantize_dir=codes, align_dir=vectors)
    model = build_model(name, source.spec, tables, dict(switches), seed=0)
    if layout == "ddp":
        wrapped: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        wrapped = shard_tables(use_torchrec_tables(copy.deepcopy(model)))
        optimizer = torch.optim.Adam(dense_parameters(wrapped), lr=1e-3)
    order = source.order("train", shuffle=True, seed=0, epoch=0)
    batches = [source.batch(order[s * batch:(s + 1) * batch][rank()::world_size()]) for s in range(warmup + steps)]
    seconds = 0.0
    for step, b in enumerate(batches):
        torch.distributed.barrier()
        start = time.perf_counter()
        loss = loss_fn(wrapped(b), b.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            seconds += time.perf_counter() - start
    total = torch.tensor([seconds])
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    if rank() == 0:
        out.write_text(json.dumps({"examples_per_second": steps * batch / float(total)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--codes", type=Path, required=True)
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import torchrec

    header = {"command": " ".join([sys.executable, *sys.argv]),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", "?"),
                          "cpu_count": os.cpu_count(), "load_average_before": load_average(),
                          "note": "a machine shared with other work: figures move with its load"},
              "data": str(args.data), "row": ROW, "processes": 2, "threads_each": 1, "batch": args.batch,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "seed": 0}
    print(json.dumps(header, indent=1), flush=True)
    figures: dict[str, list[float]] = {"ddp": [], "torchrec_table_wise": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for layout in figures:
                out = Path(tmp) / f"{layout}.json"
                spawn(2, time_steps, args.data, args.codes, args.vectors, layout, args.batch, args.steps,
                      args.warmup, out, threads=1)
                figures[layout].append(round(json.loads(out.read_text())["examples_per_second"], 1))
                print(layout, figures[layout][-1], flush=True)
    header["machine"]["load_average_after"] = load_average()
    report: dict[str, Any] = {**header, "examples_per_second": figures,
                              "median": {k: statistics.median(v) for k, v in figures.items()}}
    print(json.dumps(report["median"]))
    path = RESULTS / f"torchrec_vs_ddp_{args.name}.json"
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

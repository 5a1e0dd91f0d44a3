"""What one gradient all-reduce costs between 2 gloo processes on this machine (DDP's per-step price).

    python benchmarks/allreduce_cost.py                      # QARM's and ID-only's MicroLens-50k sizes
    python benchmarks/allreduce_cost.py --floats 1000000 5000000

Each size is all-reduced 3 times to warm up, then 15 times after a barrier each; prints the median. The
default sizes are the parameter counts of QARM (3,429,159) and ID-only (2,220,262) on MicroLens-50k, and
a small model's 200,000. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _machine import load_average


def _rank(rank: int, sizes: list[int], port: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    medians = {}
    for n in sizes:
        tensor = torch.randn(n)
        for _ in range(3):
            dist.all_reduce(tensor)
        seconds = []
        for _ in range(15):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            seconds.append(time.perf_counter() - start)
        medians[n] = sorted(seconds)[len(seconds) // 2]
    if rank == 0:
        queue.put(medians)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floats", type=int, nargs="+", default=[3_429_159, 2_220_262, 200_000])
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    print(f"machine {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"load average {load_average()}")
    context = mp.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_rank, args=(r, args.floats, args.port, queue)) for r in range(2)]
    for process in ranks:
        process.start()
    medians = queue.get()
    for process in ranks:
        process.join()
    for n, seconds in medians.items():
        print(f"all-reduce of {n:,} float32 ({4 * n / 2**20:.1f} MiB): {1000 * seconds:.1f} ms "
              "(median of 15, 2 gloo ranks of 1 thread)")


if __name__ == "__main__":
    main()

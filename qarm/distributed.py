"""Processes and devices: data-parallel process groups (torchrun or ``--nproc N``) and ``--device``.

* :func:`resolve_device`: ``"cpu"``, ``"cuda"`` (an error naming ``--device`` when CUDA is absent) or
  ``"auto"`` (CUDA when available, else the CPU);
* :func:`launched_world`: the rank and world size a launcher (``torchrun``, or :func:`spawn`) put in the
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
* :func:`process_group`: joins the launcher's process group for the duration of a block (gloo on the CPU,
  NCCL on CUDA) and leaves it after; a single process (no launcher) runs the block as it is;
* :func:`spawn`: ``--nproc N`` on one machine: N processes on 127.0.0.1 running one function, the
  environment each gets being torchrun's, so a function written for torchrun runs the same under both;
* :func:`rank` / :func:`world_size` / :func:`is_main_process` / :func:`barrier`: what the code inside a
  process group asks (rank 0 alone writes files).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist

from qarm.errors import ConfigError, QarmError

DEVICES = ("cpu", "cuda", "auto")
DeviceName = Literal["cpu", "cuda", "auto"]


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``"cpu"`` / ``"cuda"`` / ``"auto"`` -> a torch device; ``"cuda"`` without CUDA is an error naming ``flag``.
    Under a launcher with CUDA, each rank takes the GPU of its ``LOCAL_RANK``."""
    if name not in DEVICES:
        raise ConfigError(f"{flag} must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{flag} cuda: torch sees no CUDA device here (torch {torch.__version__}); "
                          f"use {flag} cpu or {flag} auto")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local % torch.cuda.device_count())


def launched_world() -> tuple[int, int]:
    """``(rank, world size)`` set by torchrun or :func:`spawn`; ``(0, 1)`` without a launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints reports."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the launcher's process group for the block (nothing to join without a launcher, or when the
    caller already joined one)."""
    _, world = launched_world()
    if world == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method="env://")
    try:
        yield
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(nproc: int, function: Callable[..., Any], *args: Any, device: torch.device | None = None,
          threads: int | None = None, **kwargs: Any) -> None:
    """Run ``function(*args, **kwargs)`` in ``nproc`` new processes joined in one process group (gloo on
    the CPU, NCCL on CUDA), as ``torchrun --standalone --nproc_per_node nproc`` would; wait for all.

    ``function`` and its arguments must be picklable (a module-level function). Each process uses
    ``threads`` torch threads (default: the cores shared out, at least 1). A process failing with a
    :class:`~qarm.errors.QarmError` fails the call with that error's message; any other failure raises
    ``torch.multiprocessing.ProcessRaisedException`` with the process's traceback."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be an integer >= 1; got {nproc!r}")
    if launched_world()[1] > 1:
        raise ConfigError("--nproc starts its own processes: do not combine it with torchrun (under torchrun, "
                          "leave --nproc out and use --nproc_per_node)")
    per_process = threads or max(1, (os.cpu_count() or 1) // nproc)
    port = free_port()
    try:
        torch.multiprocessing.start_processes(
            _spawned, args=(nproc, port, per_process, device or torch.device("cpu"), function, args, kwargs),
            nprocs=nproc, join=True, start_method="spawn")
    except torch.multiprocessing.ProcessRaisedException as exc:
        last = exc.msg.strip().splitlines()[-1] if exc.msg.strip() else ""
        name, _, message = last.partition(": ")
        if name.startswith("qarm.errors."):
            raise QarmError(f"rank {exc.error_index}: {message}") from None
        raise


def _spawned(local_rank: int, nproc: int, port: int, threads: int, device: torch.device,
             function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    with process_group(device):
        function(*args, **kwargs)

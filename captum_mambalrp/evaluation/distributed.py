"""Sharded studies with ``torch.distributed``: ``torchrun --nproc_per_node N -m captum_mambalrp compare ...``.

Nothing of our own schedules work: ``torchrun`` starts the processes and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_from_env` joins the process group (gloo on
the CPU and for ranks that share a GPU, NCCL on GPUs of their own). A :class:`~.study.Study`
then takes the batches ``rank, rank + N, ...`` of its length-sorted batch list (the same list, the same seeds per batch as a
one-process run, so the same numbers), writes its records to ``results.rank<r>.jsonl`` (and
``examples``, ``layers``) as each (method, batch) finishes, and rank 0 writes the summary
from the union of all files once every rank is done. A rank that dies leaves its finished
records; the same command resumes (with any number of processes).

Rank 0's progress bar counts every rank's finished (method, example) pairs: each rank keeps
its count in ``progress.rank<r>`` (one number, rewritten), which rank 0 sums.

Fault injection for tests: ``CAPTUM_MAMBALRP_FAIL_AFTER=RANK:K`` makes rank ``RANK`` exit
(status 3) after ``K`` (method, batch) items, as a crash would.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

FAIL_AFTER = "CAPTUM_MAMBALRP_FAIL_AFTER"


@dataclass(frozen=True)
class Shard:
    """This process's place: ``rank`` of ``world`` processes.

    >>> Shard(1, 4).take(list(range(10)))
    [1, 5, 9]
    """

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: list) -> list:
        """The items of this rank: ``items[rank::world]`` (round robin: length-sorted batches
        give every rank short and long ones alike)."""
        return items[self.rank :: self.world]

    def suffix(self) -> str:
        """``""`` for one process, ``".rank<r>"`` for a rank of several."""
        return "" if self.world == 1 else f".rank{self.rank}"


def launched() -> bool:
    """Started by ``torchrun`` (or ``torch.distributed.run``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str) -> str:
    """``cuda`` becomes ``cuda:<LOCAL_RANK>`` under ``torchrun`` (one GPU per process; with more
    processes than GPUs, ``cuda:<LOCAL_RANK mod GPUs>``: several ranks share a GPU).

    >>> local_device("cpu")
    'cpu'
    """
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(torch.cuda.device_count(), 1)}"
    return device


def backend_for(device_type: str, local_world: int, n_devices: int) -> str:
    """The process group's backend: NCCL when every local rank has a GPU of its own, gloo for
    CPU models and for ranks that share a GPU (NCCL refuses two ranks on one device; a study's
    ranks only meet at barriers, which gloo does on the CPU).

    >>> backend_for("cuda", 4, 4), backend_for("cuda", 4, 1), backend_for("cpu", 2, 0)
    ('nccl', 'gloo', 'gloo')
    """
    return "nccl" if device_type == "cuda" and local_world <= n_devices else "gloo"


def init_from_env(device: torch.device) -> Shard:
    """Join the process group that ``torchrun`` describes (gloo for a CPU model, NCCL for a
    CUDA one, gloo where ranks share a GPU: :func:`backend_for`), once; one process without ``torchrun``.

    Returns:
        This process's :class:`Shard`.
    """
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    if not launched():
        return Shard()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    n_devices = torch.cuda.device_count() if device.type == "cuda" else 0
    if backend_for(device.type, local_world, n_devices) == "nccl":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("gloo")
    return Shard(dist.get_rank(), dist.get_world_size())


def barrier(shard: Shard) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if shard.world > 1:
        dist.barrier()


def wait_for_all(shard: Shard, poll: Callable[[], None], interval: float = 0.5) -> None:
    """Wait for every rank, calling ``poll`` meanwhile (rank 0's progress bar)."""
    if shard.world == 1:
        return
    work = dist.barrier(async_op=True)
    while not work.is_completed():
        poll()
        time.sleep(interval)
    work.wait()
    poll()


def fail_point(shard: Shard, done: int) -> None:
    """Exit like a crashed rank after ``done`` items when :data:`FAIL_AFTER` says so (tests)."""
    spec = os.environ.get(FAIL_AFTER)
    if not spec:
        return
    rank, _, k = spec.partition(":")
    if int(rank) == shard.rank and done >= int(k):
        sys.stderr.write(f"rank {shard.rank}: exiting after {done} items ({FAIL_AFTER}={spec})\n")
        sys.stderr.flush()
        os._exit(3)


def read_count(path: str) -> int:
    """The number in a progress file (0 when missing or half-written)."""
    try:
        with open(path, encoding="utf-8") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def write_count(path: str, count: int) -> None:
    """Rewrite a progress file atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(str(count))
    os.replace(tmp, path)


def progress_path(folder: str, shard: Shard, rank: Optional[int] = None) -> str:
    return os.path.join(folder, f"progress.rank{shard.rank if rank is None else rank}")

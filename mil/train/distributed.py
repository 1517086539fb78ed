"""Data-parallel training over several processes: ``torchrun --nproc_per_node=N -m mil train``.

Every process (rank) holds the whole cohort and the same model. Each loss
batch is dealt out across the ranks (bag ``i`` of the batch to rank
``i mod N``); each rank forwards its bags, the bag outputs of all ranks are
gathered, and every rank computes the loss over the *whole* batch, so a Cox
risk set spans all ranks' bags, exactly as in one process.
:class:`torch.nn.parallel.DistributedDataParallel` averages the gradients.
Because rank ``r``'s objective differentiates only through its own bags'
outputs, it is scaled by N: the average over ranks is then the gradient of
the single-process loss (tested against one process on CPU with gloo).

Validation and test bags are predicted in shards and gathered in their
order; only rank 0 writes files. One process per GPU (``nccl``), or CPU
processes (``gloo``). Outside torchrun (``WORLD_SIZE`` unset or 1) nothing
here changes a run.
"""

from __future__ import annotations

import atexit
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of ``items`` (item ``i`` goes to rank ``i mod world``)."""
        return items[self.rank :: self.world]

    def batch_share(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The positions of a loss batch of ``n`` bags this rank owns, and those it forwards:
        a rank without one (fewer bags than ranks) forwards bag 0 at weight 0, as DDP needs a
        forward and a backward on every rank."""
        mine = np.arange(n)[self.rank :: self.world]
        return mine, mine if len(mine) else np.zeros(1, dtype=int)

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, local: list, n: int) -> list:
        """The ``n`` items whose shards (:meth:`shard`) the ranks hold, in their original order."""
        if not self.enabled:
            return local
        parts: list[Any] = [None] * self.world
        tdist.all_gather_object(parts, local)
        out: list[Any] = [None] * n
        for r, part in enumerate(parts):
            out[r :: self.world] = part
        return out

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Rows ``[n_local, ...]`` of every rank put back in order: ``[n, ...]`` (no gradient)."""
        if not self.enabled:
            return local
        m = -(-n // self.world)  # the largest shard
        # NCCL gathers CUDA tensors only (predictions arrive on the CPU)
        comm = torch.device("cuda", torch.cuda.current_device()) if _nccl() else local.device
        padded = torch.zeros((m, *local.shape[1:]), dtype=local.dtype, device=comm)
        padded[: len(local)] = local.detach().to(comm)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        tdist.all_gather(parts, padded)
        parts = [part.to(local.device) for part in parts]
        out = local.new_empty((n, *local.shape[1:]))
        for r, part in enumerate(parts):
            rows = out[r :: self.world]
            rows.copy_(part[: len(rows)])
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if _nccl():
            t = t.cuda()
        tdist.all_reduce(t)
        return t.cpu().tolist()


SINGLE = Dist()


#: cgroup v2 CPU quota (``<quota> <period>`` or ``max <period>``), as containers and Slurm set
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores() -> int:
    """The CPU cores this process may use: its affinity mask (``taskset``, Slurm's
    ``--cpus-per-task``), capped by the cgroup's CPU quota (``cpu.max``: a container's
    ``--cpus``), which torch's default thread count ignores."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def _nccl() -> bool:
    return tdist.is_initialized() and tdist.get_backend() == "nccl"


def setup(device_name: str) -> tuple[Dist, torch.device | None]:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

    Returns this rank's :class:`Dist` and device (``cuda:<local rank>`` when
    ``device_name`` is ``auto`` or ``cuda`` and GPUs exist, else the CPU), or
    ``(SINGLE, None)`` outside torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, None
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name.startswith("cuda:"):
        cuda = True
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_teardown)
    return Dist(rank=rank, world=world, local_rank=local), device


def _teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def current() -> Dist:
    """This process's :class:`Dist` once :func:`setup` has run (else a single process)."""
    if not tdist.is_available() or not tdist.is_initialized():
        return SINGLE
    return Dist(
        rank=tdist.get_rank(),
        world=tdist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", tdist.get_rank())),
    )


def peer_failure(exc: BaseException) -> str | None:
    """The message for a collective broken by another rank's exit (that rank said why), or None."""
    if not tdist.is_available() or not tdist.is_initialized():
        return None
    broken = isinstance(exc, getattr(tdist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and "closed by peer" in str(exc)
    )
    if not broken:
        return None
    return (
        f"process {tdist.get_rank()} of {tdist.get_world_size()} stopped: another process of "
        "this run failed (its message is above); finished folds are kept"
    )

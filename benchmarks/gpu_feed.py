"""Feeding a GPU: a TCGA-size epoch from GPU-resident float16 features, and the streamed path
against the host-to-device bandwidth (issue 39).

One process, one device, the default model (``abmil_additive`` at its default widths) trained
with AdamW and cross-entropy on random bags of float16 features (``--instances`` in all, bags of
0.5-1.5x ``--bag-size`` tiles, D = ``--dim``), in loss batches of 16 bags forwarded in chunks of
``train.max_instances`` (mil's own :func:`~mil.train.loop.forward_bags`). Per precision it
measures, each the median of ``--epochs`` epochs after a warm-up epoch:

- ``resident``: the bags on the device in float16 for the whole run (``BagDataset.resident``),
  each chunk packed there;
- ``streamed``: the bags in host memory; each chunk packed into pinned memory in float16 and
  copied on a side stream while the chunk before it computes (:mod:`mil.data.staging`);
- ``synchronous``: the path before staging, in the same run: each chunk packed into pinned
  memory in the compute dtype and copied on the compute stream;

and the host-to-device bandwidth of one pinned 1 GiB buffer (the median of 5 copies). It prints
instances/s, the epoch's seconds scaled to 10 M instances, and for the host paths the bytes they
moved per second as a share of that bandwidth.

    python benchmarks/gpu_feed.py [--instances 10000000] [--bag-size 10000] [--dim 1024]
        [--epochs 2] [--precision fp32,bf16] [--smoke]

Needs a CUDA device (about 2.2x ``instances x dim x 2`` bytes of host memory and, for
``resident``, ``instances x dim x 2`` bytes of device memory: 20 GB each for the defaults).
``--smoke`` runs the same code on the CPU with a few tiny bags (there is no bus: ``streamed``
and ``synchronous`` are the CPU's packing path and no bandwidth is measured); its figures mean
nothing, ``tests/test_benchmarks.py`` runs it so that the code cannot rot.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from train_throughput import epoch_packed, sync

from mil.data.batch import Bag, BagBatch
from mil.data.staging import Stager
from mil.models import create
from mil.schema import TrainConfig

SMOKE = {"instances": 3000, "bag_size": 100, "dim": 16, "epochs": 1, "device": "cpu"}
GIB = 1 << 30


class SameStreamCopies:
    """The path before staging: the chunk packed pinned in the compute dtype, copied on the
    compute stream (which waits for the copy before it computes)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device

    def start(self, batch: BagBatch) -> tuple[BagBatch, Any]:
        return batch.to(self.device, non_blocking=True), None

    def finish(self, batch: BagBatch, ticket: Any) -> BagBatch:
        return batch


class ComputeDtypeStager(Stager):
    def wire_dtype(self, bags):
        return self.dtype


def host_bags(instances: int, bag_size: int, dim: int, device: torch.device) -> list[Bag]:
    """Bags of float16 features in host memory (drawn on ``device``: fast on a GPU)."""
    rng = np.random.default_rng(0)
    bags, total, i = [], 0, 0
    gen = torch.Generator(device=device).manual_seed(0)
    while total < instances:
        n = min(int(rng.integers(bag_size // 2, bag_size * 3 // 2 + 1)), instances - total)
        x = torch.randn(n, dim, generator=gen, device=device, dtype=torch.float16)
        bags.append(Bag(f"b{i}", x.cpu()))
        total, i = total + n, i + 1
    return bags


def h2d_bandwidth(device: torch.device) -> float:
    """GB/s of a pinned 1 GiB host-to-device copy (median of 5)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GIB, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - t)
    return GIB / statistics.median(times[1:]) / 1e9


def epoch(model, opt, bags, labels, device, precision, stager, max_instances, rng) -> float:
    """Instances per second of one training epoch in loss batches of 16 bags, in a random order
    (``train_throughput``'s packed epoch, the chunks moved by ``stager``)."""
    order = rng.permutation(len(bags))
    return epoch_packed(
        model, opt, bags, labels, order, precision, device, 16, 10**9, max_instances, stager
    )


def feed(
    instances: int = 10_000_000,
    bag_size: int = 10_000,
    dim: int = 1024,
    epochs: int = 2,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    device: str = "cuda",
) -> tuple[pd.DataFrame, float]:
    """Rows (precision, path, instances_per_s, seconds_per_10M, wire GB/s, share of the
    bandwidth) and the bandwidth in GB/s."""
    dev = torch.device(device)
    bags = host_bags(instances, bag_size, dim, dev)
    labels = torch.as_tensor(np.random.default_rng(1).integers(0, 2, len(bags)))
    bandwidth = h2d_bandwidth(dev)
    max_instances = TrainConfig().max_instances
    rows = []
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        paths = {
            "streamed": (bags, Stager(dev, dtype), 2),
            "synchronous": (
                bags,
                ComputeDtypeStager(dev, dtype, copies=SameStreamCopies(dev, dtype)),
                dtype.itemsize,
            ),
        }
        if dev.type == "cuda":  # the same bags resident on the device, for the whole run
            resident = [Bag(b.bag_id, b.x.to(dev)) for b in bags]
            paths = {"resident": (resident, Stager(dev, dtype), 0), **paths}
        for path, (these, stager, wire_bytes) in paths.items():
            torch.manual_seed(0)
            model = create("abmil_additive", in_dim=dim, n_out=2).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            rng = np.random.default_rng(2)
            args = (model, opt, these, labels, dev, precision, stager, max_instances, rng)
            epoch(*args)  # warm-up
            rate = statistics.median(epoch(*args) for _ in range(epochs))
            wire = rate * dim * wire_bytes / 1e9
            rows.append(
                {
                    "precision": precision,
                    "path": path,
                    "instances_per_s": rate,
                    "seconds_per_10M": 1e7 / rate,
                    "wire_gb_s": wire if wire_bytes else float("nan"),
                    "of_bandwidth": wire / bandwidth if wire_bytes else float("nan"),
                }
            )
            del model, opt
        if dev.type == "cuda":
            del resident
            torch.cuda.empty_cache()
    return pd.DataFrame(rows), bandwidth


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=10_000_000)
    ap.add_argument("--bag-size", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--smoke", action="store_true", help=f"seconds, on the CPU: {SMOKE}")
    args = ap.parse_args(argv)
    kw = dict(
        instances=args.instances,
        bag_size=args.bag_size,
        dim=args.dim,
        epochs=args.epochs,
        precisions=tuple(args.precision.split(",")),
        device="cuda",
    )
    if args.smoke:
        kw.update(SMOKE)
    frame, bandwidth = feed(**kw)
    where = torch.cuda.get_device_name() if kw["device"] == "cuda" else "cpu"
    print(
        f"{where}: {kw['instances']:,} instances in bags of ~{kw['bag_size']:,}, D = {kw['dim']},"
        f" abmil_additive; pinned host-to-device bandwidth {bandwidth:.1f} GB/s"
    )
    print(frame.to_string(index=False, float_format=lambda v: f"{v:,.3f}"))


if __name__ == "__main__":
    main()

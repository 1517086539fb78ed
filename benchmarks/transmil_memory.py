"""Peak memory and time of one TransMIL training step on a 100,000-instance bag (CPU).

    python benchmarks/transmil_memory.py [--instances 100000] [--dim 1024] [--threads N]

Builds one bag of random features, runs forward + backward of ``transmil``
with its default hyper-parameters, and prints the peak resident set size of
this process (``ru_maxrss``, which includes the input tensor) and the seconds
taken. The target is under 8 GB.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from mil.data.batch import Bag, collate_bags
from mil.models import create


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = create("transmil", in_dim=args.dim, n_out=2).train()
    batch = collate_bags([Bag("bench", torch.randn(args.instances, args.dim))])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = model(batch)
    forward_s = time.perf_counter() - start
    out.logits.square().sum().backward()
    total_s = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # ru_maxrss is in bytes there, kilobytes on Linux
        peak_kb, rss_before = peak_kb // 1024, rss_before // 1024
    print(
        f"transmil: 1 bag x {args.instances} instances x {args.dim} features, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"peak RSS before the step: {rss_before / 2**20:.2f} GiB")
    print(f"peak RSS: {peak_kb / 2**20:.2f} GiB")
    print(f"forward: {forward_s:.1f} s, forward + backward: {total_s:.1f} s")


if __name__ == "__main__":
    main()

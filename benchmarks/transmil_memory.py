"""Peak memory and time of one TransMIL training step on a 100,000-instance bag (CPU).

    python benchmarks/transmil_memory.py [--instances 100000] [--dim 1024] [--threads N] [--smoke]

Builds one bag of random features, runs forward + backward of ``transmil``
with its default hyper-parameters, and prints the peak resident set size of
this process (``ru_maxrss``, which includes the input tensor) and the seconds
taken. The target is under 8 GB. ``--smoke``: 500 instances of D = 32 (seconds).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from mil.data.batch import Bag, collate_bags
from mil.models import create

#: ``--smoke``: :func:`measure`'s arguments for a step of a fraction of a second
SMOKE = {"instances": 500, "dim": 32}


def measure(instances: int = 100_000, dim: int = 1024) -> dict[str, float]:
    """One training step of ``transmil`` (default hyper-parameters) on a random bag: peak RSS
    of this process before and after it (GiB; ``ru_maxrss``), the seconds of the forward pass
    and of forward + backward, and the number of parameters that received a gradient."""
    torch.manual_seed(0)
    model = create("transmil", in_dim=dim, n_out=2).train()
    batch = collate_bags([Bag("bench", torch.randn(instances, dim))])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = model(batch)
    forward_s = time.perf_counter() - start
    out.logits.square().sum().backward()
    total_s = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # ru_maxrss is in bytes there, kilobytes on Linux
        peak_kb, rss_before = peak_kb // 1024, rss_before // 1024
    return {
        "rss_before_gib": rss_before / 2**20,
        "peak_rss_gib": peak_kb / 2**20,
        "forward_s": forward_s,
        "total_s": total_s,
        "with_grad": sum(p.grad is not None for p in model.parameters()),
        "parameters": sum(1 for _ in model.parameters()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="500 instances of D = 32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SMOKE if args.smoke else {"instances": args.instances, "dim": args.dim}
    m = measure(**size)
    print(
        f"transmil: 1 bag x {size['instances']} instances x {size['dim']} features, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"peak RSS before the step: {m['rss_before_gib']:.2f} GiB")
    print(f"peak RSS: {m['peak_rss_gib']:.2f} GiB")
    print(f"forward: {m['forward_s']:.1f} s, forward + backward: {m['total_s']:.1f} s")


if __name__ == "__main__":
    main()

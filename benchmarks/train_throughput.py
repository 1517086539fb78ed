"""ABMIL training throughput: mil's packed batches vs a plain one-bag-at-a-time loop.

Both train the *same* model (gated ABMIL with mil's default widths, 1024 -> 128,
attention 128; ``--hidden 512 --attn 256`` for CLAM's size) with AdamW on
random bags of D = 1024, in the same process, 2 threads.
Figures are instances per second, the median of 3 epochs after one warm-up
epoch; the ratio packed / loop is what matters (absolute numbers depend on
the CPU).

    python benchmarks/train_throughput.py [--threads 2] [--quick] [--precision bf16]
        [--device cuda] [--smoke]

``--smoke`` times a few tiny bags of D = 32 for one epoch (seconds; the figures mean
nothing, ``tests/test_benchmarks.py`` runs it so that the code cannot rot).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mil.data.batch import Bag, chunk_by_budget
from mil.models import create
from mil.train.loop import forward_bags


def random_bags(
    n_bags: int, lo: int, hi: int, dim: int, seed: int
) -> tuple[list[Bag], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lo, hi + 1, (n_bags,), generator=g).tolist()
    bags = [Bag(str(i), torch.randn(n, dim, generator=g)) for i, n in enumerate(sizes)]
    return bags, torch.randint(0, 2, (n_bags,), generator=g)


def plain_forward(model, x: torch.Tensor) -> torch.Tensor:
    """The textbook one-bag ABMIL forward (Ilse et al.), on the same modules and weights."""
    h = model.encoder(x)
    a = torch.softmax(model.attention(h).squeeze(-1), 0)
    return model.head(a @ h)


def autocast(precision: str, device: torch.device):
    """bf16 autocast (matmuls in bfloat16, reductions and the loss in float32) or a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_loop(model, opt, bags, labels, order, precision, device) -> float:
    """The usual per-paper loop: each bag moved to the device and trained on alone."""
    model.train()
    sync(device)
    t = time.perf_counter()
    for i in order:
        x = bags[i].x.to(device)
        with autocast(precision, device):
            logits = plain_forward(model, x)[None]
        loss = F.cross_entropy(logits.float(), labels[i : i + 1].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return sum(len(b) for b in bags) / (time.perf_counter() - t)


def loss_batches(
    sizes: list[int], order: np.ndarray, max_bags: int, max_instances: int
) -> list[list[int]]:
    """Loss batches of at most ``max_bags`` bags and (beyond one bag) ``max_instances`` rows."""
    out = []
    for group in chunk_by_budget([sizes[i] for i in order], max_instances):
        idx = [int(order[j]) for j in group]
        out += [idx[k : k + max_bags] for k in range(0, len(idx), max_bags)]
    return out


def epoch_packed(
    model,
    opt,
    bags,
    labels,
    order,
    precision,
    device,
    max_bags,
    batch_instances,
    chunk_instances,
    stager=None,
) -> float:
    """mil's path: loss batches of bags packed in chunks (``stager``: how chunks reach the
    device, :class:`~mil.data.staging.Stager`; by default forward_bags' own)."""
    model.train()
    sizes = [len(b) for b in bags]
    sync(device)
    t = time.perf_counter()
    for idx in loss_batches(sizes, order, max_bags, batch_instances):
        # mil's path: features packed straight into bf16, the model under autocast
        out = forward_bags(
            model,
            [bags[i] for i in idx],
            chunk_instances,
            device,
            precision=precision,
            stager=stager,
        )
        loss = F.cross_entropy(out.logits.float(), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return sum(sizes) / (time.perf_counter() - t)


def measure(
    conf, bags, labels, epochs: int, seed: int, hidden: int, attn: int, precision: str, device
) -> float:
    """Median instances/s over ``epochs`` epochs after a warm-up, for a fresh model."""
    torch.manual_seed(0)
    model = create(
        "abmil",
        in_dim=bags[0].x.shape[1],
        n_out=2,
        hidden_dim=hidden,
        attn_dim=attn,
        gated=True,
        dropout=0.0,
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(seed)

    def one_epoch() -> float:
        order = rng.permutation(len(bags))
        if conf is None:
            return epoch_loop(model, opt, bags, labels, order, precision, device)
        return epoch_packed(model, opt, bags, labels, order, precision, device, *conf)

    one_epoch()  # warm-up
    return statistics.median(one_epoch() for _ in range(epochs))


#: (name, number of bags, fewest and most instances per bag) of the measured cohorts
COHORTS = (("small", 1500, 20, 200), ("large", 120, 500, 5000))
#: ``--smoke``: :func:`throughput`'s arguments for a run of seconds
SMOKE = {
    "cohorts": (("small", 24, 5, 40), ("large", 4, 200, 400)),
    "dim": 32,
    "hidden": 16,
    "attn": 16,
    "epochs": 1,
}
#: the packed configurations: (bags per loss batch, instances per loss batch, per compute chunk)
CONFIGS = {
    "one bag at a time": None,
    "packed, 16 bags": (16, 10**9, 8192),
    "packed, instance budget": (64, 8192, 8192),
}


def throughput(
    cohorts=COHORTS,
    dim: int = 1024,
    epochs: int = 3,
    hidden: int = 128,
    attn: int = 128,
    precision: str = "fp32",
    device: str = "cpu",
    scale: int = 1,
) -> pd.DataFrame:
    """Instances per second of every configuration of :data:`CONFIGS` on every cohort (a
    ``scale``-th of its bags): columns ``bags``, ``cohort``, ``method``, ``instances_per_s``
    and ``vs_loop`` (the ratio to one bag at a time)."""
    rows = []
    for name, n_bags, lo, hi in cohorts:
        bags, labels = random_bags(n_bags // scale, lo, hi, dim, seed=0)
        results = {
            label: measure(
                conf, bags, labels, epochs, 1, hidden, attn, precision, torch.device(device)
            )
            for label, conf in CONFIGS.items()
        }
        base = results["one bag at a time"]
        for label, v in results.items():
            rows.append(
                {
                    "bags": name,
                    "cohort": f"{n_bags // scale} bags of {lo}-{hi}",
                    "method": label,
                    "instances_per_s": v,
                    "vs_loop": v / base,
                }
            )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tenth of the bags (smoke run)")
    ap.add_argument(
        "--hidden", type=int, default=128, help="instance embedding width (mil's default 128)"
    )
    ap.add_argument(
        "--attn", type=int, default=128, help="attention width (mil's default = hidden)"
    )
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: both loops under bfloat16 autocast (train.precision: bf16)",
    )
    ap.add_argument(
        "--device", default="cpu", help="cpu or cuda (bags live in CPU memory, as in a run)"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()),
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = dict(dim=1024, epochs=args.epochs, hidden=args.hidden, attn=args.attn)
    if args.smoke:
        kw.update(SMOKE)
    frame = throughput(
        **kw, precision=args.precision, device=args.device, scale=10 if args.quick else 1
    )
    print(
        f"ABMIL (gated, {kw['dim']}->{kw['hidden']}, attention {kw['attn']}) training throughput, "
        f"{args.precision}, {args.device}, {args.threads} threads, median of {kw['epochs']} epochs after a warm-up"
    )
    print(f"{'bags':<6} {'cohort':<24} {'method':<26} {'instances/s':>12} {'vs loop':>8}")
    for r in frame.itertuples():
        print(
            f"{r.bags:<6} {r.cohort:<24} {r.method:<26} {r.instances_per_s:>12,.0f} {r.vs_loop:>7.2f}x"
        )


if __name__ == "__main__":
    main()

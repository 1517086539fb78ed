"""End-to-end training throughput: `mil train`'s own epochs beside a bare loop, in RAM and for a
cohort three times the cache budget (feature files, packed store), plus the raw read rate.

A cohort of fp16 h5 files (default 160 slides of 200-1,200 tiles at D = 1,024) is written to
``--out``. Each setting is a `mil train` run of fold 0 with mil's defaults (``abmil_additive``,
whitening, fp32, batch 16) for a fixed ``--epochs``; its rate is the median of
``history.csv``'s ``instances_per_s`` over the epochs after the first (the first also reads the
cohort and whitens each bag once: shown apart). The bare loop trains the same model, built from
the run's config, on the same training bags already in RAM as float32 tensors with
``forward_bags`` in loss batches of 16 (no reader, no preprocessing), in the same process.
Settings run in turn, ``--repeats`` times, each repeat beside its own bare loop; figures are
medians over repeats, ratios are per repeat then medians.

    python benchmarks/throughput_e2e.py [--threads 1] [--epochs 4] [--repeats 2]
        [--precision bf16] [--model abmil] [--out DIR] [--smoke]

``--smoke``: two dozen tiny slides at D = 16, one repeat of two epochs (seconds; the figures mean
nothing: ``tests/test_store.py`` runs it so that it cannot rot).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mil.config import config_from_dict
from mil.data.batch import Bag
from mil.data.readers import read_features
from mil.data.sources import load_cohort
from mil.models import create
from mil.train import loop
from mil.train.loop import forward_bags
from mil.train.runner import run_cv

#: (label, data: keys) of the `mil train` settings; "budget" is replaced by a third of the cohort
SETTINGS = (
    ("in RAM", {}),
    ("3x budget, files", {"cache_gb": "budget"}),
    ("3x budget, files, no read-ahead", {"cache_gb": "budget", "prefetch": 0}),
    ("3x budget, packed store", {"cache_gb": "budget", "store": "packed"}),
)
SMOKE = {"slides": 24, "lo": 20, "hi": 60, "dim": 16, "epochs": 2, "repeats": 1}


def write_cohort(root: Path, slides: int, lo: int, hi: int, dim: int, seed: int = 0) -> int:
    """``slides`` fp16 h5 files under ``root/features`` and ``root/cohort.csv`` (random
    binary labels); returns the number of instances."""
    rng = np.random.default_rng(seed)
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    sizes = rng.integers(lo, hi + 1, slides)
    for i, n in enumerate(sizes):
        x = rng.normal(0, 1, (n, dim)).astype(np.float16)
        with h5py.File(feats / f"s{i:04d}.h5", "w") as f:
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=rng.integers(0, 10**5, (n, 2)).astype(np.int32))
    labels = np.arange(slides) % 2
    ids = [f"s{i:04d}" for i in range(slides)]
    pd.DataFrame({"slide_id": ids, "case_id": ids, "label": labels}).to_csv(
        root / "cohort.csv", index=False
    )
    return int(sizes.sum())


def base_config(
    root: Path, epochs: int, threads: int, precision: str, model: str, standardize="whiten"
) -> dict:
    return {
        "name": "throughput",
        "task": {"type": "classification"},
        "data": {
            "csv": str(root / "cohort.csv"),
            "features": str(root / "features"),
            "standardize": standardize,
        },
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.2, "seed": 0},
        "model": {"name": model},
        "train": {
            "epochs": epochs,
            "patience": None,
            "min_steps": None,
            "threads": threads,
            "precision": precision,
            "faithfulness": False,
            "seed": 0,
        },
    }


def mil_rate(raw: dict, run_dir: Path) -> dict[str, float]:
    """`mil train`'s rates: ``mil_inst_per_s`` (history.csv, median over the epochs after the
    first), ``first_epoch_inst_per_s``, ``mil_inst_per_cpu_s`` (instances per CPU second of
    the whole process, read-ahead thread included, over the same epochs: steadier than wall
    time on a shared machine) and the run's wall time ``run_s``."""
    cpu, inner = [], loop._train_epoch

    def clocked(*args, **kw):  # mil train's own epoch, timed in CPU seconds as well
        c = time.process_time()
        out = inner(*args, **kw)
        cpu.append(out["instances"] / max(time.process_time() - c, 1e-9))
        return out

    t, loop._train_epoch = time.perf_counter(), clocked
    try:
        run = run_cv(
            config_from_dict(raw),
            run_dir,
            folds=[0],
            progress=False,
            log=lambda *a: None,
            n_boot=10,
        )
    finally:
        loop._train_epoch = inner
    rates = pd.read_csv(run / "fold_0" / "history.csv")["instances_per_s"].tolist()
    return {
        "mil_inst_per_s": statistics.median(rates[1:] or rates),
        "first_epoch_inst_per_s": rates[0],
        "mil_inst_per_cpu_s": statistics.median(cpu[1:] or cpu),
        "run_s": time.perf_counter() - t,
    }


def training_bags(raw: dict, run_dir: Path) -> tuple[list, torch.Tensor]:
    """Fold 0's training bags as float32 tensors in RAM, and their labels."""
    cohort, store = load_cohort(config_from_dict(raw))
    split = pd.read_csv(run_dir / "splits" / "splits_0.csv")
    train = cohort.bags[cohort.bags["bag_id"].isin(split["train"].dropna())]
    bags = [
        Bag(b, torch.from_numpy(read_features(store.index[b]).features).float())
        for b in train["bag_id"]
    ]
    return bags, torch.as_tensor(train["label"].to_numpy() % 2)


def bare_rate(raw: dict, bags: list, labels: torch.Tensor) -> tuple[float, float]:
    """The same model trained on ``bags`` with forward_bags in batches of 16: median
    instances per second, and per CPU second, over the epochs after the first."""
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    model = create(cfg.model_name, in_dim=bags[0].x.shape[1], n_out=2, **cfg.model_hparams)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    rng, rates, cpu = np.random.default_rng(0), [], []
    model.train()
    for _ in range(cfg.train.epochs):
        order, t, c = rng.permutation(len(bags)), time.perf_counter(), time.process_time()
        for i in range(0, len(order), 16):
            idx = order[i : i + 16]
            out = forward_bags(
                model,
                [bags[j] for j in idx],
                cfg.train.max_instances,
                torch.device("cpu"),
                precision=cfg.train.precision,
            )
            loss = F.cross_entropy(out.logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(sum(len(b) for b in bags) / (time.perf_counter() - t))
        cpu.append(sum(len(b) for b in bags) / max(time.process_time() - c, 1e-9))
    return statistics.median(rates[1:] or rates), statistics.median(cpu[1:] or cpu)


#: ``--precision-table``: (label, bags, fewest and most tiles) of the random cohorts, ~60k
#: instances each
BAG_SIZES = (("small", 500, 20, 200), ("medium", 80, 200, 1200), ("large", 20, 1000, 5000))


def precision_table(
    models=("abmil_additive", "abmil"), sizes=BAG_SIZES, dim=1024, epochs=3, threads=1
) -> pd.DataFrame:
    """The bare loop's instances/s per model, bag size and precision (fp32, bf16; ``_cpu``:
    per CPU second), on random bags in RAM, and bf16's ratios to fp32: where bfloat16 pays
    on this CPU."""
    torch.set_num_threads(threads)
    rows = []
    for label, n, lo, hi in sizes:
        g = torch.Generator().manual_seed(0)
        bags = [
            Bag(str(i), torch.randn(int(k), dim, generator=g))
            for i, k in enumerate(torch.randint(lo, hi + 1, (n,), generator=g))
        ]
        labels = torch.arange(n) % 2
        for model in models:
            rate = {}
            for precision in ("fp32", "bf16"):
                raw = {
                    "task": {"type": "classification"},
                    "model": {"name": model},
                    "data": {"csv": "unread.csv", "features": "unread"},
                    "train": {"epochs": epochs, "precision": precision},
                }
                rate[precision], rate[f"{precision}_cpu"] = bare_rate(raw, bags, labels)
            rate["bf16_vs_fp32_cpu"] = rate["bf16_cpu"] / rate["fp32_cpu"]
            rows.append(
                {
                    "model": model,
                    "bags": f"{label} ({lo}-{hi})",
                    **rate,
                    "bf16_vs_fp32": rate["bf16"] / rate["fp32"],
                }
            )
    return pd.DataFrame(rows)


def read_rate(raw: dict) -> dict[str, float]:
    """Instances/s and GB/s (as stored, fp16) of reading every file once with mil's reader,
    and of copying every slide out of the packed store."""
    cohort, store = load_cohort(
        config_from_dict({**raw, "data": {**raw["data"], "store": "packed"}})
    )
    ids = cohort.slides["slide_id"].tolist()
    t, rows, nbytes = time.perf_counter(), 0, 0
    for s in ids:
        x = read_features(store.index[s]).features
        rows, nbytes = rows + len(x), nbytes + x.nbytes
    files = time.perf_counter() - t
    t = time.perf_counter()
    for s in ids:
        np.array(store.packed.get(s).features)
    packed = time.perf_counter() - t
    return {
        "instances": rows,
        "files_inst_per_s": rows / files,
        "files_gb_per_s": nbytes / files / 1e9,
        "packed_inst_per_s": rows / packed,
        "packed_gb_per_s": nbytes / packed / 1e9,
    }


def throughput(
    out: Path,
    slides=160,
    lo=200,
    hi=1200,
    dim=1024,
    epochs=4,
    repeats=2,
    threads=1,
    precision="fp32",
    model="abmil_additive",
    standardize="whiten",
) -> tuple[pd.DataFrame, dict]:
    """One row per setting and repeat: ``setting``, ``repeat``, :func:`mil_rate`'s figures,
    ``bare_inst_per_s`` and ``bare_inst_per_cpu_s`` (that repeat's bare loop), ``cache_gb``,
    and the ratios ``vs_bare``, ``vs_ram`` (wall clock), ``cpu_vs_bare``, ``cpu_vs_ram`` (CPU
    time); and the read rates (plus ``cohort_gb``, the cohort as float32)."""
    torch.set_num_threads(threads)
    out = Path(out)
    n = write_cohort(out, slides, lo, hi, dim) if not (out / "cohort.csv").exists() else None
    raw = base_config(out, epochs, threads, precision, model, standardize)
    cohort_gb = n or sum(len(read_features(p).features) for p in (out / "features").glob("*.h5"))
    cohort_gb = cohort_gb * dim * 4 / 2**30
    rows = []
    for r in range(repeats):
        bags = labels = bare = None
        for label, data in SETTINGS:
            data = {k: cohort_gb / 3 if v == "budget" else v for k, v in data.items()}
            cfg = {**raw, "data": {**raw["data"], **data}}
            run_dir = out / "runs" / f"{r}-{label.replace(' ', '_').replace(',', '')}"
            got = mil_rate(cfg, run_dir)
            if bare is None:  # the bare loop of this repeat, beside its runs
                bags, labels = training_bags(raw, run_dir)
                bare, bare_cpu = bare_rate(raw, bags, labels)
            rows.append(
                {
                    "setting": label,
                    "repeat": r,
                    **got,
                    "bare_inst_per_s": bare,
                    "bare_inst_per_cpu_s": bare_cpu,
                    "cache_gb": data.get("cache_gb", 8.0),
                }
            )
    frame = pd.DataFrame(rows)
    frame["vs_bare"] = frame["mil_inst_per_s"] / frame["bare_inst_per_s"]
    frame["cpu_vs_bare"] = frame["mil_inst_per_cpu_s"] / frame["bare_inst_per_cpu_s"]
    for col, rate in (("vs_ram", "mil_inst_per_s"), ("cpu_vs_ram", "mil_inst_per_cpu_s")):
        ram = frame[frame["setting"] == "in RAM"].set_index("repeat")[rate]
        frame[col] = frame[rate] / frame["repeat"].map(ram)
    return frame, {**read_rate(raw), "cohort_gb": cohort_gb}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/throughput_e2e", help="cohort and runs folder")
    ap.add_argument("--slides", type=int, default=160)
    ap.add_argument("--lo", type=int, default=200)
    ap.add_argument("--hi", type=int, default=1200)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--model", default="abmil_additive")
    ap.add_argument(
        "--standardize",
        default="whiten",
        type=lambda v: {"true": True, "false": False}.get(v, v),
        help="data.standardize of the runs: whiten (the default), true or false (raw features)",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()),
    )
    ap.add_argument(
        "--precision-table",
        action="store_true",
        help="only the bare loop per model, bag size and precision (fp32 vs bf16)",
    )
    args = ap.parse_args(argv)
    if args.precision_table:
        kw = (
            {"sizes": [(s[0], 4, 5, 20) for s in BAG_SIZES], "dim": 16, "epochs": 2}
            if args.smoke
            else {}
        )
        table = precision_table(threads=args.threads, **kw)
        print(f"bare loop, instances/s, {args.threads} thread(s), D = {kw.get('dim', 1024)}")
        print(
            table.to_string(
                index=False, float_format=lambda v: f"{v:,.2f}" if v < 10 else f"{v:,.0f}"
            )
        )
        return table
    kw = {k: getattr(args, k) for k in ("slides", "lo", "hi", "dim", "epochs", "repeats")}
    if args.smoke:
        kw.update(SMOKE)
    frame, reads = throughput(
        Path(args.out),
        **kw,
        threads=args.threads,
        precision=args.precision,
        model=args.model,
        standardize=args.standardize,
    )
    frame.to_csv(Path(args.out) / "throughput.csv", index=False)
    print(
        f"{args.model}, {args.precision}, data.standardize {args.standardize}, {args.threads} "
        f"thread(s), {kw['slides']} slides of {kw['lo']}-{kw['hi']} tiles at D = {kw['dim']} "
        f"({reads['cohort_gb']:.2f} GB as float32), fold 0, {kw['epochs']} epochs, "
        f"{kw['repeats']} repeat(s): medians"
    )
    print("instances per wall-clock second (per CPU second of the process in brackets)")
    print(
        f"{'setting':<32} {'cache GB':>8} {'mil train':>18} {'1st epoch':>9} "
        f"{'bare loop':>18} {'vs bare':>13} {'vs RAM':>13}"
    )
    for setting, g in frame.groupby("setting", sort=False):
        m = g.median(numeric_only=True)
        print(
            f"{setting:<32} {m.cache_gb:>8.3f} {m.mil_inst_per_s:>8,.0f} ({m.mil_inst_per_cpu_s:>7,.0f}) "
            f"{m.first_epoch_inst_per_s:>9,.0f} {m.bare_inst_per_s:>8,.0f} "
            f"({m.bare_inst_per_cpu_s:>7,.0f}) {m.vs_bare:>5.2f}x ({m.cpu_vs_bare:.2f}x) "
            f"{m.vs_ram:>5.2f}x ({m.cpu_vs_ram:.2f}x)"
        )
    print(
        f"raw reads of {reads['instances']:,} instances: files {reads['files_inst_per_s']:,.0f} "
        f"inst/s ({reads['files_gb_per_s']:.2f} GB/s fp16), packed store "
        f"{reads['packed_inst_per_s']:,.0f} inst/s ({reads['packed_gb_per_s']:.2f} GB/s)"
    )
    return frame


if __name__ == "__main__":
    main()

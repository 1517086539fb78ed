"""The classic MIL benchmarks (Ilse et al., ICML 2018, Table 1) with the `mil` runner.

MUSK1, MUSK2, Fox, Tiger and Elephant, each with ABMIL and gated ABMIL
(``experiments/classic_mil/<dataset>_<model>.yaml``), 5 repetitions of
10-fold cross-validation (the fixed fold files of the dataset collection;
stratified folds with fixed seeds for MUSK2). Writes ``classic_mil.md``:
test accuracy as mean ± SEM over the 5 repetition means and mean ± sd over
the 50 folds, beside the published figures.

    python benchmarks/classic_mil.py [--out results/classic_mil] [--jobs 2] [--only musk1,fox]

``--select`` instead reruns the inner-validation sweep that chose the
configs' hyper-parameters (slow: over an hour on two cores). It trains on
each training fold of repetition 0 minus a stratified 20% inner validation
split, records the validation accuracy after every epoch and, per config,
picks the grid point of best mean validation accuracy, preferring fewer
epochs among those within ``--tolerance`` of the best. Test folds are never
scored for the choice; it prints the choice and writes ``selection.csv``.

    python benchmarks/classic_mil.py --select [--out results/classic_mil_select] [--jobs 2]

``--seeds 0,1,2,3,4`` reruns every config, unchanged, once per training seed
(``train.seed``: initialisation, bag order, dropout; the folds stay fixed) and
writes ``seeds.md``: each seed's 50-fold mean accuracy, their mean and sd. It
measures how much of a table figure is chance; nothing is chosen from it
(about 15 minutes on two cores).

    python benchmarks/classic_mil.py --seeds 0,1,2,3,4 [--out results/classic_mil_seeds]

``--smoke`` runs the table's steps on MUSK1's two configs, their first 2 folds of 2 epochs
each, in this process: seconds (``tests/test_benchmarks.py``).

Run from the repository root: the configs read ``../shared/datasets/classic_mil/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from jobs import run_jobs

DATASETS = ("musk1", "musk2", "fox", "tiger", "elephant")
MODELS = ("attention", "gated_attention")
CONFIG_DIR = Path("experiments/classic_mil")

# Ilse, Tomczak & Welling (2018), Table 1: accuracy, mean ± (as the caption says) standard error
PUBLISHED = {
    "musk1": {"attention": (0.892, 0.040), "gated_attention": (0.900, 0.050)},
    "musk2": {"attention": (0.858, 0.048), "gated_attention": (0.863, 0.042)},
    "fox": {"attention": (0.615, 0.043), "gated_attention": (0.603, 0.029)},
    "tiger": {"attention": (0.839, 0.022), "gated_attention": (0.845, 0.018)},
    "elephant": {"attention": (0.868, 0.022), "gated_attention": (0.857, 0.027)},
}
# the acceptance margin: our better variant within this of the published mean of that variant
MARGIN = 0.02

# --select: the inner-validation grid. Round 1 (batch 16, for the CPU budget): three learning
# rates, then dropout or no standardisation at the two larger ones. Round 2, added after round 1
# fell short on MUSK1 and Tiger: strong decoupled weight decay and batches of 8. Round 3, added
# after round 2 still missed MUSK1 and Tiger by ~0.001: the paper's optimiser (Adam, coupled L2
# weight decay 1e-4) and mi-Net's (SGD, momentum 0.9, L2 weight decay 0.005-0.03). Round 4, the
# last protocol difference from the paper's code: one bag per step (AdamW, and the paper's Adam).
SELECT_EPOCHS = 40
EPOCH_CHOICES = (5, 10, 15, 20, 30, 40)
BASE = {
    "data.standardize": True,
    "model.dropout": 0.0,
    "train.batch_size": 16,
    "train.weight_decay": 1e-4,
}
GRID = (
    [{"train.lr": lr} for lr in (1e-4, 5e-4, 1e-3)]
    + [
        {"train.lr": lr, **extra}
        for lr in (5e-4, 1e-3)
        for extra in ({"model.dropout": 0.25}, {"data.standardize": False})
    ]
    + [{"train.lr": lr, "train.weight_decay": 1.0} for lr in (5e-4, 1e-3)]
    + [{"train.lr": lr, "train.batch_size": 8} for lr in (1e-4, 5e-4)]
    + [{"train.optimizer": "adam", "train.lr": lr} for lr in (5e-4, 1e-3)]
    + [
        {"train.optimizer": "sgd", "train.lr": lr, "train.weight_decay": wd}
        for lr, wd in ((5e-4, 0.005), (5e-4, 0.03), (5e-3, 0.005))
    ]
    + [{"train.batch_size": 1, "train.lr": lr} for lr in (1e-4, 5e-4)]
    + [{"train.batch_size": 1, "train.optimizer": "adam", "train.lr": 5e-4}]
)
# rough relative cost, to start the slow configs first
COST = {"musk2": 3, "tiger": 2, "fox": 2, "elephant": 2, "musk1": 1}
#: ``--smoke``: :func:`table`'s arguments for MUSK1's two configs, 2 folds of 2 epochs
SMOKE = {
    "only": ["musk1"],
    "jobs": 1,
    "threads": 1,
    "n_boot": 20,
    "folds": 2,
    "sets": ("train.epochs=2",),
}


def config_names(only: list[str] | None) -> list[str]:
    names = [f"{d}_{m}" for d in DATASETS for m in MODELS if not only or d in only]
    return sorted(names, key=lambda n: -COST[n.split("_")[0]])


def _quiet(*args) -> None:
    pass


def run_config(
    name: str,
    out: str,
    threads: int,
    n_boot: int,
    seed: int | None = None,
    folds: int | None = None,
    sets: tuple[str, ...] = (),
) -> dict:
    """One config's 5 x 10-fold CV (resuming finished folds); its accuracy summary and wall time.

    ``seed`` replaces the config's ``train.seed`` (initialisation, bag order, dropout); the
    folds do not depend on it (``splits.seed``). ``folds``: only the first ones (a smoke run),
    ``sets``: further ``KEY=VALUE`` overrides."""
    import torch

    from mil.config import load_config
    from mil.train.runner import run_cv

    torch.set_num_threads(threads)
    seeds = [] if seed is None else [f"train.seed={seed}"]
    cfg = load_config(CONFIG_DIR / f"{name}.yaml", [*seeds, *sets])
    t = time.perf_counter()
    first = None if folds is None else range(folds)
    run = run_cv(cfg, Path(out) / name, folds=first, progress=False, log=_quiet, n_boot=n_boot)
    seconds = time.perf_counter() - t
    acc = json.loads((run / "summary.json").read_text())["metrics"]["accuracy"]
    return {
        "name": name,
        "mean": acc["mean"],
        "sd_folds": acc["sd"],
        "sem_repeats": acc.get("sem_over_repeats", float("nan")),
        "repeat_means": acc.get("repeat_means", []),
        "n_folds": len(acc["folds"]),
        "seconds": seconds,
        "seed": cfg.train.seed,
    }


def _rows_by_dataset(row, verdict) -> tuple[list[str], list[str]]:
    """Table rows for every dataset and model, and one verdict per dataset with both models.

    ``row(dataset, model, published_mean)`` gives ``(ours, cells)`` (``None`` to skip);
    ``verdict(DATASET, gap)`` words the better variant's gap to its published mean."""
    lines, verdicts = [], []
    for d in DATASETS:
        gaps = []
        for m in MODELS:
            pub = PUBLISHED[d][m][0]
            got = row(d, m, pub)
            if got is None:
                continue
            ours, cells = got
            gaps.append(ours - pub)
            lines.append(
                f"| {d.upper()} | {'gated ABMIL' if m.startswith('gated') else 'ABMIL'} | {cells} |"
            )
        if len(gaps) == 2:
            verdicts.append(verdict(d.upper(), max(gaps)))
    return lines, verdicts


def markdown_table(results: dict[str, dict], wall: float) -> str:
    """Ours (mean ± SEM over repeats; mean ± sd over folds) beside the published figures."""

    def row(d: str, m: str, pub: float):
        r = results.get(f"{d}_{m}")
        if r is None:
            return None
        return r["mean"], (
            f"{r['mean']:.3f} ± {r['sem_repeats']:.3f} | {r['mean']:.3f} ± {r['sd_folds']:.3f} "
            f"| {pub:.3f} ± {PUBLISHED[d][m][1]:.3f} | {r['mean'] - pub:+.3f} | {r['seconds']:.0f}"
        )

    rows, verdicts = _rows_by_dataset(
        row,
        lambda d, best: (
            f"{d}: better variant {best:+.3f} vs its published mean "
            f"({'meets' if best >= -MARGIN else 'MISSES'} the −{MARGIN} bar)"
        ),
    )
    head = [
        "| dataset | model | ours: mean ± SEM (5 repeats) | ours: mean ± sd (50 folds) "
        "| published (Ilse et al. 2018) | ours − published | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(
        head + rows + ["", *[f"- {v}" for v in verdicts], "", f"Total wall time: {wall:.0f} s."]
    )


def table(
    out: Path,
    only: list[str] | None,
    jobs: int = 2,
    threads: int = 1,
    n_boot: int = 200,
    folds: int | None = None,
    sets: tuple[str, ...] = (),
) -> dict[str, dict]:
    """Every config of ``only`` (all five datasets if None; ``folds``, ``sets``: see
    :func:`run_config`): ``classic_mil.md`` and ``classic_mil.json``; returns the results."""
    names = config_names(only)
    t0 = time.perf_counter()
    k = len(names)
    runs = run_jobs(
        run_config,
        jobs,
        names,
        [str(out)] * k,
        [threads] * k,
        [n_boot] * k,
        [None] * k,
        [folds] * k,
        [sets] * k,
    )
    results = {}
    for r in runs:
        results[r["name"]] = r
        print(f"{r['name']}: accuracy {r['mean']:.3f} ({r['n_folds']} folds, {r['seconds']:.0f} s)")
    wall = time.perf_counter() - t0
    text = markdown_table(results, wall)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classic_mil.md").write_text(text + "\n")
    (out / "classic_mil.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    print(f"written: {out / 'classic_mil.md'}")
    return results


def run_table(args: argparse.Namespace) -> None:
    table(Path(args.out), args.only, args.jobs, args.threads, args.n_boot)


def seed_table(results: dict[tuple[str, int], dict], seeds: list[int]) -> str:
    """Per config: the 50-fold mean accuracy for every training seed, their mean and sd."""

    def row(d: str, m: str, pub: float):
        accs = [results[(f"{d}_{m}", s)]["mean"] for s in seeds if (f"{d}_{m}", s) in results]
        if len(accs) != len(seeds):
            return None
        mean, sd = float(np.mean(accs)), float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        cells = " | ".join(f"{a:.3f}" for a in accs)
        return mean, f"{cells} | {mean:.3f} | {sd:.3f} | {pub:.3f} | {mean - pub:+.3f}"

    rows, verdicts = _rows_by_dataset(
        row,
        lambda d, best: (
            f"{d}: better variant, averaged over seeds, {best:+.3f} vs its published "
            f"mean ({'within' if best >= -MARGIN else 'OUTSIDE'} −{MARGIN})"
        ),
    )
    head = [
        f"| dataset | model | {' | '.join(f'seed {s}' for s in seeds)} | mean over seeds "
        "| sd over seeds | published | mean over seeds − published |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|---|",
    ]
    return "\n".join(head + rows + ["", *[f"- {v}" for v in verdicts]])


def run_seeds(args: argparse.Namespace) -> None:
    """Every config once per training seed: how much of a table figure is training randomness.

    The configs and the main table are not changed by this; seed ``s`` runs under
    ``<out>/seed_<s>/`` (resuming finished folds)."""
    out = Path(args.out)
    names = config_names(args.only)
    t0 = time.perf_counter()
    jobs = [
        (n, str(out / f"seed_{s}"), args.threads, args.n_boot, s) for s in args.seeds for n in names
    ]
    results = {}
    for r in run_jobs(run_config, args.jobs, *zip(*jobs)):
        results[(r["name"], r["seed"])] = r
        print(f"{r['name']} seed {r['seed']}: accuracy {r['mean']:.3f} ({r['seconds']:.0f} s)")
    text = (
        seed_table(results, args.seeds) + f"\n\nTotal wall time: {time.perf_counter() - t0:.0f} s."
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.md").write_text(text + "\n")
    rows = [{k: v for k, v in r.items() if k != "repeat_means"} for r in results.values()]
    pd.DataFrame(rows).to_csv(out / "seeds.csv", index=False)
    print(text)
    print(f"written: {out / 'seeds.md'}")


def validation_curve(
    name: str, point: int, grid_point: dict, out: str, threads: int
) -> pd.DataFrame:
    """Mean inner-validation accuracy per epoch over the 10 folds of repetition 0."""
    import torch

    from mil.config import load_config
    from mil.train.runner import run_cv

    torch.set_num_threads(threads)
    over = {
        **BASE,
        **grid_point,
        "splits.val_fraction": 0.2,
        "train.patience": None,
        "train.epochs": SELECT_EPOCHS,
    }
    sets = [f"{k}={'null' if v is None else str(v).lower()}" for k, v in over.items()]
    cfg = load_config(CONFIG_DIR / f"{name}.yaml", sets)
    run = run_cv(
        cfg, Path(out) / f"{name}_{point}", folds=range(10), progress=False, log=_quiet, n_boot=10
    )
    hist = pd.concat(
        [pd.read_csv(run / f"fold_{k}" / "history.csv") for k in range(10)], ignore_index=True
    )
    curve = hist.groupby("epoch")["val_accuracy"].mean().reset_index()
    return curve.assign(config=name, point=point)


def run_select(args: argparse.Namespace) -> None:
    out = Path(args.out)
    names = config_names(args.only)
    jobs = [(n, p, GRID[p], str(out), args.threads) for n in names for p in range(len(GRID))]
    curves = list(run_jobs(validation_curve, args.jobs, *zip(*jobs)))
    c = pd.concat(curves)
    c = c[c["epoch"].isin([e - 1 for e in EPOCH_CHOICES])].assign(epochs=lambda d: d["epoch"] + 1)
    rows = []
    for name, g in c.groupby("config", sort=False):
        best = g["val_accuracy"].max()
        near = g[g["val_accuracy"] >= best - args.tolerance]
        pick = near.sort_values(["epochs", "val_accuracy"], ascending=[True, False]).iloc[0]
        rows.append(
            {
                "config": name,
                **BASE,
                **GRID[int(pick["point"])],
                "train.epochs": int(pick["epochs"]),
                "val_accuracy": float(pick["val_accuracy"]),
                "best_val_accuracy": float(best),
            }
        )
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    c.to_csv(out / "validation_curves.csv", index=False)
    table.to_csv(out / "selection.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default results/classic_mil[_select])")
    p.add_argument("--jobs", type=int, default=2, help="configs trained at once (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--only", type=lambda s: s.split(","), help="datasets, e.g. musk1,fox")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for pooled CIs")
    p.add_argument("--select", action="store_true", help="rerun the inner-validation selection")
    p.add_argument("--tolerance", type=float, default=0.01, help="--select: accuracy tolerance")
    p.add_argument(
        "--seeds",
        type=lambda s: [int(x) for x in s.split(",")],
        help="run every config once per training seed, e.g. 0,1,2,3,4 (robustness report)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()),
    )
    args = p.parse_args(argv)
    if args.select and args.seeds:
        p.error("--select and --seeds are separate runs")
    if args.smoke:
        table(Path(args.out or "results/classic_mil_smoke"), **SMOKE)
        return
    default = (
        "classic_mil_select"
        if args.select
        else "classic_mil_seeds"
        if args.seeds
        else "classic_mil"
    )
    args.out = args.out or f"results/{default}"
    (run_select if args.select else run_seeds if args.seeds else run_table)(args)


if __name__ == "__main__":
    main()

"""How much of a result is the seed? The spread of a cohort's pooled metric over training seeds,
for one model per fold and for seed ensembles of N (``train.seeds``).

Runs the cohort's config ``--runs`` times on the same split files with ``train.seed = 0 ..
runs-1`` (one model per fold: ``train.seeds: 1``; every run folder is an ordinary run, so the
study resumes). A seed ensemble of N is the average of N of those runs' fold predictions, each
on its own training scale (:meth:`mil.tasks.Task.average_predictions`: probabilities; Cox
risks standardised by their training-fold risks), which is what ``train.seeds: N`` computes
from N replicas of differently seeded models. The runs are split into disjoint groups of N, so
each ensemble's figure is independent of the others'.

Writes ``<out>/seeds.csv`` (one row per run or ensemble) and prints, per N, the mean, sd and
range of the pooled headline metric (AUC or C-index)::

    python benchmarks/seed_ensembles.py CONFIG --out results/seeds --runs 15 --sizes 1,3,5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
#: ``--smoke``: a tiny synthetic cohort, 4 runs of 2 epochs, ensembles of 2
SMOKE = {"runs": 4, "sizes": (1, 2)}


def run_seeds(
    config: str | Path, out: Path, runs: int, overrides: list[str] | None = None
) -> list[Path]:
    """``runs`` ordinary runs of ``config`` with train.seed 0..runs-1 on one set of split files."""
    from mil.config import load_config
    from mil.train.runner import run_cv

    dirs = []
    for s in range(runs):
        sets = [
            *(overrides or []),
            f"train.seed={s}",
            "train.seeds=1",
            f"splits.dir={out / 'splits'}",
        ]
        cfg = load_config(config, sets)
        dirs.append(run_cv(cfg, out / f"seed{s}", progress=False, log=lambda *a: None, n_boot=10))
    return dirs


def ensemble_predictions(task, run_dirs: list[Path]) -> pd.DataFrame:
    """The out-of-fold predictions of the average of ``run_dirs`` (same folds and bags)."""
    from mil.results import PREDICTIONS_TRAIN, RunFolder

    folds = RunFolder(run_dirs[0]).finished_folds()
    parts = []
    for f in folds:
        runs = [RunFolder(d) for d in run_dirs]
        preds = [r.predictions(f) for r in runs]
        train = [
            r.predictions(f, PREDICTIONS_TRAIN)
            if r.fold_file(f, PREDICTIONS_TRAIN).is_file()
            else None
            for r in runs
        ]
        scales = [task.output_scale(t) for t in train]
        avg = task.average_predictions(preds, scales).assign(fold_dir=f"fold_{f}")
        parts.append(avg)
    return pd.concat(parts, ignore_index=True)


def study(run_dirs: list[Path], sizes: tuple[int, ...]) -> pd.DataFrame:
    """One row per ensemble of each size N (disjoint groups of the runs): its pooled metric."""
    from mil.train.summary import run_task

    task = run_task(run_dirs[0])
    metric = task.headline()
    rows = []
    for n in sizes:
        for g in range(len(run_dirs) // n):
            group = run_dirs[g * n : (g + 1) * n]
            pred = ensemble_predictions(task, group)
            rows.append(
                {
                    "size": n,
                    "group": g,
                    "runs": ",".join(d.name for d in group),
                    "metric": metric,
                    "value": task.metric_value(pred, metric),
                }
            )
    return pd.DataFrame(rows)


def describe(table: pd.DataFrame) -> str:
    lines = ["| seeds per fold | ensembles | mean | sd | range |", "|---|---|---|---|---|"]
    for n, g in table.groupby("size"):
        v = g["value"].to_numpy(float)
        sd = f"{v.std(ddof=1):.4f}" if len(v) > 1 else "–"
        lines.append(f"| {n} | {len(v)} | {v.mean():.4f} | {sd} | {v.min():.3f} – {v.max():.3f} |")
    return "\n".join(lines)


def smoke_config(out: Path) -> Path:
    """A tiny synthetic classification cohort and its config (for ``--smoke``)."""
    import yaml

    from mil.data.synthetic import write_synthetic_cohort

    root = out / "cohort"
    if not (root / "cohort.csv").exists():
        write_synthetic_cohort(
            "classification",
            root / "cohort.csv",
            root / "features",
            n_patients=24,
            n_two_slides=0,
            dim=8,
            min_tiles=10,
            max_tiles=30,
            shift_norm=6.0,
        )
    cfg = {
        "name": "seeds_smoke",
        "task": {"type": "classification"},
        "data": {
            "csv": str(root / "cohort.csv"),
            "features": str(root / "features"),
            "patient_col": "case_id",
        },
        "splits": {"folds": 2, "val_fraction": 0.2, "seed": 0},
        "model": {"name": "abmil", "hidden_dim": 8},
        "train": {"epochs": 2, "batch_size": 8, "threads": 1, "faithfulness": False},
    }
    path = out / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", help="the cohort's config (its defaults are studied)")
    p.add_argument("--out", default="results/seeds")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--sizes", default="1,3,5", help="ensemble sizes N")
    p.add_argument("--set", action="append", default=[], help="config overrides, as mil train's")
    p.add_argument("--smoke", action="store_true", help="a tiny synthetic cohort (seconds)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, sizes = args.runs, tuple(int(s) for s in args.sizes.split(","))
    config = args.config
    if args.smoke:
        config, runs, sizes = smoke_config(out), SMOKE["runs"], SMOKE["sizes"]
    if config is None:
        p.error("give a config (or --smoke)")
    table = study(run_seeds(config, out, runs, args.set), sizes)
    table.to_csv(out / "seeds.csv", index=False)
    print(describe(table))
    return table


if __name__ == "__main__":
    main()

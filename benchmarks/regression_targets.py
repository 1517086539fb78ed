"""Regression of continuous targets: the defaults against ridge regression on the same folds.

Two kinds of cohort:

- ``synthetic``: ``data.synthetic: regression`` (experiments/demo_regression.yaml: each
  patient's target is the share of planted tiles in percent, plus noise of sd 2), 100
  patients; the acceptance asks for a pooled out-of-fold R² of at least 0.8;
- the six TCGA cohorts of ``../shared/datasets/real`` (HIPT region embeddings) with the
  survival time (months) of the *uncensored* patients as the target: a hard, honest check
  (overall survival time from morphology alone is weakly predictable, and keeping only the
  deaths selects a cohort), run with ``target_scaling: standard`` (the default) and ``log``.

Each cohort runs the defaults (``task: {type: regression}``, the default model and training,
patient bags, 5 folds) and ``meanpool_linear`` / ``bow_linear`` (ridge regression on the pooled
bags, ``mil train --baseline``) on the same split files; the table gives pooled out-of-fold R²,
Pearson r and MAE with patient-bootstrap CIs (``summary.json``) and the paired difference of R²
against each baseline (``baselines.csv``)::

    python benchmarks/regression_targets.py --out results/regression            # ~1 h on 2 CPUs
    python benchmarks/regression_targets.py --out /tmp/reg --smoke              # seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mil.compare import run_baselines
from mil.config import config_from_dict
from mil.data.synthetic import demo_config, write_synthetic_cohort
from mil.metrics.regression import regression_metrics
from mil.train.runner import run_cv

REAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "real"
BASELINES = ["meanpool_linear", "bow_linear"]
#: the smoke preset: a tiny synthetic cohort, 3 folds, 2 epochs, no real cohort
SMOKE = {"n_patients": 24, "dim": 12, "tiles": (15, 40), "folds": 3, "epochs": 2, "real": [], "n_boot": 20}
#: the real cohorts (as benchmarks/survival_stopping.py names them)
REAL_COHORTS = ("nsclc", "blca", "hnsc", "stad", "lihc", "skcm")
FULL = {"n_patients": 100, "dim": 64, "tiles": (200, 2000), "folds": 5, "epochs": None, "n_boot": 1000,
        "real": list(REAL_COHORTS)}  # fmt: skip


def synthetic_config(out: Path, preset: dict) -> dict:
    """The regression demo's config with its cohort written under ``out`` (smaller for the smoke)."""
    raw = demo_config("regression", out)
    csv, feats = Path(raw["data"]["csv"]), Path(raw["data"]["features"])
    if not csv.is_file():
        lo, hi = preset["tiles"]
        write_synthetic_cohort(
            "regression", csv, feats, n_patients=preset["n_patients"], dim=preset["dim"],
            min_tiles=lo, max_tiles=hi, n_two_slides=preset["n_patients"] // 5,
        )  # fmt: skip
    return raw


def uncensored_config(out: Path, short: str, scaling: str) -> dict:
    """A real cohort's deaths, their survival time (months) as the target."""
    src = REAL / (f"hipt4k_tcga_{short}" + ("" if short == "nsclc" else "_surv"))
    csv = out / "cohorts" / src.name / "deaths.csv"
    if not csv.is_file():
        df = pd.read_csv(src / "cohort.csv")
        csv.parent.mkdir(parents=True, exist_ok=True)
        df = df[df["event"] == 1]
        df.drop(columns=[c for c in ("label", "label_name") if c in df]).to_csv(csv, index=False)
    return {
        "name": f"{short}_{scaling}",
        "task": {"type": "regression", "target_scaling": scaling},
        "data": {"csv": str(csv), "features": str(src / "features"), "patient_col": "case_id",
                 "label_col": "time", "bag_level": "patient"},
        "splits": {"dir": str(out / "splits" / short), "folds": 5, "seed": 0},
    }  # fmt: skip


def run_one(raw: dict, out: Path, preset: dict, baselines: list[str]) -> dict:
    """The defaults and the baselines on one cohort: a row of the table."""
    raw = {**raw, "splits": {**raw["splits"], "folds": preset["folds"]}}
    if preset["epochs"]:
        raw["train"] = {"epochs": preset["epochs"], "threads": 1}
    cfg = config_from_dict(raw, source=raw["name"])
    run_dir = run_cv(cfg, out / "runs" / raw["name"], progress=False, log=lambda *a: None, n_boot=preset["n_boot"])
    table = run_baselines(cfg, run_dir, baselines, progress=False, log=lambda *a: None, n_boot=preset["n_boot"])
    summary = json.loads((run_dir / "summary.json").read_text())["metrics"]
    pred = pd.concat(pd.read_csv(p) for p in sorted(run_dir.glob("fold_*/predictions.csv")))
    pooled = regression_metrics(pred["target"], pred["prediction"])
    row = {"cohort": raw["name"], "patients": pred["patient_id"].nunique()}
    for k in ("r2", "pearson_r", "mae"):  # pooled out-of-fold, with summary.json's bootstrap CI
        row[k] = pooled[k]
        row[f"{k}_ci"] = summary[k]["ci95_pooled"]
    for r in table.itertuples():
        row[f"{r.baseline}_r2"] = r.baseline_value
        row[f"delta_{r.baseline}"] = r.delta
        row[f"delta_{r.baseline}_ci"] = [r.delta_ci_low, r.delta_ci_high]
    row.update(averaged(run_dir, "meanpool_linear", preset["n_boot"]))
    return row


def averaged(run_dir: Path, member: str, n_boot: int) -> dict:
    """The model averaged with a baseline fitted on the same training bags (what ``ensemble:
    [member]`` predicts): its pooled R² and the paired difference to the model alone."""
    from mil.tasks.paired import paired_metric_difference
    from mil.train.summary import run_predictions, run_task

    task = run_task(run_dir)
    model = run_predictions(run_dir)
    other = run_predictions(run_dir / "baselines" / member)
    avg = task.average_predictions([model, other])  # rows matched by bag (one repeat)
    d = paired_metric_difference(task, avg, model, "r2", n_boot=n_boot)
    return {f"avg_{member}_r2": d["value"], f"avg_{member}_delta": d["delta"],
            f"avg_{member}_delta_ci": [d["ci_low"], d["ci_high"]]}  # fmt: skip


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/regression")
    ap.add_argument("--smoke", action="store_true", help="a tiny synthetic run (seconds)")
    ap.add_argument("--cohorts", help=f"comma-separated: synthetic and/or {', '.join(REAL_COHORTS)}")
    args = ap.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    out = Path(args.out)
    names = args.cohorts.split(",") if args.cohorts else ["synthetic", *preset["real"]]
    rows = []
    for name in names:
        if name == "synthetic":
            rows.append(run_one(synthetic_config(out, preset), out, preset, BASELINES))
            continue
        for scaling in ("standard", "log"):
            rows.append(run_one(uncensored_config(out, name, scaling), out, preset, BASELINES))
    table = pd.DataFrame(rows)
    table.to_csv(out / "regression_targets.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return table


if __name__ == "__main__":
    main()

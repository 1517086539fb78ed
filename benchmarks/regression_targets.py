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
``ensemble: auto``, patient bags, 5 folds). With ``ensemble: auto`` a regression fold trains the
model and fits ``meanpool_linear`` and ``bow_linear`` (ridge regression on the pooled bags) on
the same training bags, and predicts their average; each member's own predictions are kept
(``members/<name>/``), so one run gives the model alone, each ridge model, the default average
and (here) the model averaged with ``bow_linear`` only, all on the same folds. The table gives
pooled out-of-fold R², Pearson r and MAE with patient-bootstrap CIs (``summary.json``) and the
paired differences of R² (the average minus each member)::

    python benchmarks/regression_targets.py --out results/regression            # ~1 h on 2 CPUs
    python benchmarks/regression_targets.py --out /tmp/reg --smoke              # seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mil.config import config_from_dict
from mil.data.synthetic import sized_demo_config
from mil.metrics.regression import regression_metrics
from mil.train.runner import run_cv

REAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "real"
#: the smoke preset: a tiny synthetic cohort, 3 folds, 2 epochs, no real cohort
SMOKE = {
    "n_patients": 24,
    "dim": 12,
    "tiles": (15, 40),
    "folds": 3,
    "epochs": 2,
    "real": [],
    "n_boot": 20,
}
#: the real cohorts (as benchmarks/survival_stopping.py names them)
REAL_COHORTS = ("nsclc", "blca", "hnsc", "stad", "lihc", "skcm")
FULL = {
    "n_patients": 100,
    "dim": 64,
    "tiles": (200, 2000),
    "folds": 5,
    "epochs": None,
    "n_boot": 1000,
    "real": list(REAL_COHORTS),
}


def synthetic_config(out: Path, preset: dict) -> dict:
    """The regression demo's config with its cohort written under ``out`` (smaller for the smoke)."""
    raw = sized_demo_config("regression", out, preset["n_patients"], preset["dim"], preset["tiles"])
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
        "data": {
            "csv": str(csv),
            "features": str(src / "features"),
            "patient_col": "case_id",
            "label_col": "time",
            "bag_level": "patient",
        },
        "splits": {"dir": str(out / "splits" / short), "folds": 5, "seed": 0},
    }


def run_one(raw: dict, out: Path, preset: dict) -> dict:
    """The defaults on one cohort (the model averaged with its ridge members, ``ensemble:
    auto``): a row of the table, with each member's own figure and the paired difference of
    the average against it (``summary.json``'s ``ensemble``), and the model averaged with
    ``bow_linear`` alone (from the members' saved predictions)."""
    raw = {**raw, "splits": {**raw["splits"], "folds": preset["folds"]}}
    if preset["epochs"]:
        raw["train"] = {"epochs": preset["epochs"], "threads": 1}
    cfg = config_from_dict(raw, source=raw["name"])
    run_dir = run_cv(
        cfg,
        out / "runs" / raw["name"],
        progress=False,
        log=lambda *a: None,
        n_boot=preset["n_boot"],
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    pred = pd.concat(pd.read_csv(p) for p in sorted(run_dir.glob("fold_*/predictions.csv")))
    pooled = regression_metrics(pred["target"], pred["prediction"])
    row = {"cohort": raw["name"], "patients": pred["patient_id"].nunique()}
    for k in ("r2", "pearson_r", "mae"):  # pooled out-of-fold, with summary.json's bootstrap CI
        row[k] = pooled[k]
        row[f"{k}_ci"] = summary["metrics"][k]["ci95_pooled"]
    ens = summary.get("ensemble") or {"members": {}}
    for name, m in ens["members"].items():
        key = "model" if name == cfg.model_name else name
        row[f"{key}_r2"] = m["value"]
        d = m["average_minus_member"]
        row[f"avg_minus_{key}"] = d["delta"]
        row[f"avg_minus_{key}_ci"] = [d["ci_low"], d["ci_high"]]
    if "bow_linear" in ens["members"]:
        row.update(pair_average(run_dir, cfg.model_name, "bow_linear", preset["n_boot"]))
    return row


def pair_average(run_dir: Path, model: str, member: str, n_boot: int) -> dict:
    """The model averaged with one member only (its saved predictions): pooled R² and the
    paired difference to the model alone."""
    from mil.tasks.paired import paired_metric_difference
    from mil.train.summary import run_task

    def pooled(name: str) -> pd.DataFrame:
        files = sorted(run_dir.glob(f"fold_*/members/{name}/predictions.csv"))
        parts = (pd.read_csv(p).assign(fold_dir=p.parents[2].name) for p in files)
        return pd.concat(parts, ignore_index=True)

    task = run_task(run_dir)
    alone = pooled(model)
    avg = task.average_predictions([alone, pooled(member)])
    d = paired_metric_difference(task, avg, alone, "r2", n_boot=n_boot)
    return {
        f"model+{member}_r2": d["value"],
        f"model+{member}_minus_model": d["delta"],
        f"model+{member}_minus_model_ci": [d["ci_low"], d["ci_high"]],
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/regression")
    ap.add_argument("--smoke", action="store_true", help="a tiny synthetic run (seconds)")
    ap.add_argument(
        "--cohorts", help=f"comma-separated: synthetic and/or {', '.join(REAL_COHORTS)}"
    )
    ap.add_argument(
        "--scalings", default="standard,log", help="task.target_scaling of the real cohorts"
    )
    args = ap.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    out = Path(args.out)
    names = args.cohorts.split(",") if args.cohorts else ["synthetic", *preset["real"]]
    rows = []
    for name in names:
        if name == "synthetic":
            rows.append(run_one(synthetic_config(out, preset), out, preset))
            continue
        for scaling in args.scalings.split(","):
            rows.append(run_one(uncensored_config(out, name, scaling), out, preset))
    table = pd.DataFrame(rows)
    table.to_csv(out / "regression_targets.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return table


if __name__ == "__main__":
    main()

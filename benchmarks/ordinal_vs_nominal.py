"""Ordinal grading: the cumulative-link head (``task: {type: ordinal}``) against nominal
cross-entropy (``task: {type: classification}``) on the same folds.

The cohort is ``data.synthetic: ordinal`` (experiments/demo_ordinal.yaml): each patient's
grade 1-4 is cut from a severity (the share of planted tiles in its slides) plus noise, so
neighbouring grades overlap. Both tasks run the defaults otherwise (model, training, patient
bags, 5 folds, 120 patients of 200-1000 tiles) on the same split files, with ``--seeds``
training seeds each (default 1). Every run's pooled
out-of-fold predictions are scored by the ordinal task's metrics: ``qwk`` and ``mae`` of each
run's own predicted grade (the ordinal head's median grade; the classifier's most probable
class), the macro ``auc`` of its grade probabilities and its ``balanced_accuracy``; the
difference ordinal minus nominal of each, per seed, with a paired patient-bootstrap 95% CI
(:func:`mil.tasks.paired.paired_metric_difference`)::

    python benchmarks/ordinal_vs_nominal.py --out results/ordinal              # ~40 min on 2 CPUs
    python benchmarks/ordinal_vs_nominal.py --out /tmp/ord --smoke             # seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from mil.config import config_from_dict
from mil.data.synthetic import sized_demo_config
from mil.tasks import make_task
from mil.tasks.paired import paired_metric_difference
from mil.train.runner import run_cv
from mil.train.summary import run_predictions

SMOKE = {
    "n_patients": 30,
    "dim": 12,
    "tiles": (15, 40),
    "folds": 3,
    "epochs": 2,
    "seeds": 1,
    "n_boot": 20,
}
FULL = {
    "n_patients": 120,
    "dim": 64,
    "tiles": (200, 1000),
    "folds": 5,
    "epochs": None,
    "seeds": 1,
    "n_boot": 1000,
}
METRICS = ("qwk", "mae", "auc", "balanced_accuracy")
TASKS = ("ordinal", "classification")


def configs(out: Path, preset: dict, seed: int) -> dict[str, dict]:
    """The ordinal demo's config and its nominal twin (same cohort and split files)."""
    raw = sized_demo_config("ordinal", out, preset["n_patients"], preset["dim"], preset["tiles"])
    raw["splits"] = {**raw["splits"], "folds": preset["folds"]}
    raw["train"] = {
        "seed": seed,
        "threads": 1,
        **({"epochs": preset["epochs"]} if preset["epochs"] else {}),
    }
    nominal = {**raw, "name": "demo_ordinal_nominal", "task": {"type": "classification"}}
    return {"ordinal": raw, "classification": nominal}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="a tiny cohort, 3 folds, 2 epochs")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds per task")
    args = ap.parse_args(argv)
    preset = dict(SMOKE if args.smoke else FULL)
    if args.seeds:
        preset["seeds"] = args.seeds
    rows = []
    for seed in range(preset["seeds"]):
        raws = configs(args.out, preset, seed)
        runs = {}
        for kind, raw in raws.items():
            cfg = config_from_dict(raw, source=raw["name"])
            folder = args.out / "runs" / f"{kind}_seed{seed}"
            run_cv(cfg, folder, progress=False, log=lambda *a: None, n_boot=preset["n_boot"])
            runs[kind] = run_predictions(folder)
        cfg = config_from_dict(raws["ordinal"], source="ordinal")
        classes = sorted(runs["ordinal"]["label"].astype(str).unique(), key=float)
        task = make_task(cfg, classes)
        row: dict = {"seed": seed, "patients": runs["ordinal"]["patient_id"].nunique()}
        for metric in METRICS:
            d = paired_metric_difference(
                task,
                runs["ordinal"],
                runs["classification"],
                metric,
                n_boot=preset["n_boot"],
                seed=seed,
                names=("the ordinal run's predictions", "the nominal run's"),
            )
            row[f"ordinal_{metric}"] = d["value"]
            row[f"nominal_{metric}"] = d["reference_value"]
            row[f"delta_{metric}"] = d["delta"]
            row[f"delta_{metric}_ci"] = [d["ci_low"], d["ci_high"]]
        rows.append(row)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "ordinal_vs_nominal.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()

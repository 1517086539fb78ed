"""Several targets: one multi-target run (``task: {type: multitarget}``) against one run per
target on the same folds.

The cohort is ``data.synthetic: multitarget`` (experiments/demo_multitarget.yaml): MSI status
(a planted region along one direction), TMB and grade (both from each patient's share of tiles
planted along another direction), each target's cell empty for 30% of the patients. The
multi-target run (equal weights, one head block per target) trains on every bag; each
single-target run (classification, regression, ordinal: the target's entry as its own
``task:``) trains on the bags with that target's label, on the same split files (the
multi-target run's, restricted to those bags), so both predict the same test bags of every
fold. Model and training: the library defaults (patient bags, 5 folds, the default cohort of
100 patients with 200-2000 tiles per slide), ``--seeds`` training seeds (default 1). Per target:
its task's headline metric (msi: AUC, tmb: R², grade: quadratic-weighted kappa) of each run's
pooled out-of-fold predictions on the bags with its label, and the difference multi-target minus
single-target with a paired patient-bootstrap 95% CI
(:func:`mil.tasks.paired.paired_metric_difference`)::

    python benchmarks/multitarget_vs_single.py --out results/multitarget    # ~30 min on 1 CPU
    python benchmarks/multitarget_vs_single.py --out /tmp/mt --smoke         # seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from mil.config import config_from_dict
from mil.data.synthetic import sized_demo_config
from mil.io import write_csv
from mil.run import Run
from mil.tasks import make_task
from mil.tasks.multitarget_targets import ENTRY_KEYS
from mil.tasks.paired import paired_metric_difference
from mil.train.runner import run_cv
from mil.train.summary import run_predictions

SMOKE = {
    "n_patients": 36,
    "dim": 12,
    "tiles": (15, 40),
    "folds": 3,
    "epochs": 2,
    "seeds": 1,
    "n_boot": 20,
}
FULL = {
    "n_patients": 100,
    "dim": 64,
    "tiles": (200, 2000),
    "folds": 5,
    "epochs": None,
    "seeds": 1,
    "n_boot": 1000,
}


def multitarget_config(out: Path, preset: dict, seed: int) -> dict:
    """The multi-target demo's config on a cohort under ``out`` (written once)."""
    raw = sized_demo_config(
        "multitarget", out, preset["n_patients"], preset["dim"], preset["tiles"]
    )
    raw["splits"] = {**raw["splits"], "dir": str(out / "splits" / "multitarget")}
    raw["splits"]["folds"] = preset["folds"]
    raw["train"] = {
        "seed": seed,
        "threads": 1,
        **({"epochs": preset["epochs"]} if preset["epochs"] else {}),
    }
    return raw


def single_config(raw: dict, entry: dict, out: Path) -> dict:
    """Target ``entry`` of the multi-target config ``raw`` as a run of its own task: a cohort
    CSV of the slides with its label, and the multi-target split files restricted to them."""
    name = entry["name"]
    df = pd.read_csv(raw["data"]["csv"])
    df = df[df[entry["label_col"]].notna()]
    csv = out / "single" / f"{name}.csv"
    write_csv(csv, df)
    keep = set(df["slide_id"].astype(str))
    split_dir = out / "splits" / f"single_{name}"
    for path in sorted(Path(raw["splits"]["dir"]).glob("splits_*.csv")):
        if path.stem.endswith("_descriptor"):
            continue
        parts = pd.read_csv(path, dtype=str)
        cols = {c: pd.Series([s for s in parts[c].dropna() if s in keep]) for c in parts.columns}
        write_csv(split_dir / path.name, pd.DataFrame(cols))
    data = {k: v for k, v in raw["data"].items() if k != "synthetic"}
    data.update(csv=str(csv), label_col=entry["label_col"])
    if entry.get("classes"):
        data["classes"] = list(entry["classes"])
    task = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    return {
        **raw,
        "name": f"single_{name}",
        "task": {"type": entry.get("type", "classification"), **task},
        "data": data,
        "splits": {**raw["splits"], "dir": str(split_dir)},
    }


def compare_seed(out: Path, preset: dict, seed: int) -> list[dict]:
    """One seed: the multi-target run, one run per target, and per target the paired rows."""
    quiet = dict(progress=False, log=lambda *a: None, n_boot=preset["n_boot"])
    raw = multitarget_config(out, preset, seed)
    t0 = time.perf_counter()
    multi_dir = run_cv(
        config_from_dict(raw, source=raw["name"]), out / "runs" / f"multi_s{seed}", **quiet
    )
    seconds = {"multi": time.perf_counter() - t0}
    task = make_task(config_from_dict(raw, source=raw["name"]), Run(multi_dir).classes)
    multi = run_predictions(multi_dir)
    rows = []
    for entry in raw["task"]["targets"]:
        name = entry["name"]
        single_raw = single_config(raw, entry, out)
        t0 = time.perf_counter()
        cfg = config_from_dict(single_raw, source=single_raw["name"])
        single_dir = run_cv(cfg, out / "runs" / f"{name}_s{seed}", **quiet)
        seconds[name] = time.perf_counter() - t0
        sub = task.subs[name]
        d = paired_metric_difference(
            sub,
            task.part(multi, name),
            run_predictions(single_dir),
            sub.headline(),
            n_boot=preset["n_boot"],
            seed=seed,
            names=(f"the multi-target run's {name} predictions", "the single-target run's"),
        )
        rows.append(
            {
                "seed": seed,
                "target": name,
                "type": entry.get("type", "classification"),
                "bags": len(task.part(multi, name)),
                "metric": d["metric"],
                "multi": d["value"],
                "single": d["reference_value"],
                "delta": d["delta"],
                "delta_ci": [d["ci_low"], d["ci_high"]],
                "p": d["p"],
                "single_seconds": seconds[name],
            }
        )
    for r in rows:
        r["multi_seconds"] = seconds["multi"]
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="a tiny cohort, 3 folds, 2 epochs")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds")
    args = ap.parse_args(argv)
    preset = dict(SMOKE if args.smoke else FULL)
    if args.seeds:
        preset["seeds"] = args.seeds
    rows = [r for seed in range(preset["seeds"]) for r in compare_seed(args.out, preset, seed)]
    table = pd.DataFrame(rows)
    write_csv(args.out / "multitarget_vs_single.csv", table)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()

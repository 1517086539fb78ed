"""The survival recipe on the survival selection cohorts: which training settings of the default
model close the gap to ``bow_linear`` on tile-share signals without costing the real cohorts?

Every run is the default config of a cohort (``task: {type: survival}``, its ``data``, 5
patient-level folds) with one variant's keys (:data:`VARIANTS`) and
``ensemble: [meanpool_linear, bow_linear]``, so that one run holds, per fold, the model and
both linear models fitted on the same training bags. From their saved predictions it scores
(pooled Harrell's C, pairs within a fold) the model alone, the model averaged with
``meanpool_linear`` as ``ensemble: auto`` averages them (the default's prediction), and the two
linear models alone; and per variant the default's prediction minus the current default's and
minus ``bow_linear`` (paired patient bootstrap, 95% CI).

Cohorts: the six TCGA overall-survival cohorts of ``../shared/datasets/real`` and the
synthetic ``surv-fraction`` and ``surv-presence`` (the selection cohorts of
``benchmarks/survival_stopping.py`` and ``benchmarks/cohort_zoo.py``); confirmation cohorts
(``benchmarks/zoo_cohorts.py``) are measured by ``cohort_zoo.py --role confirmation`` only.

    python benchmarks/survival_recipe.py --out results/survival_recipe [--only blca,surv-fraction]
        [--variants defaults,batch-64] [--jobs 2]

Runs resume (ordinary run folders). ``--smoke``: one tiny synthetic cohort, 2 folds, 3 epochs,
two variants: seconds (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from inner_selection import averaged, pooled
from jobs import run_jobs
from survival_stopping import REAL_SURVIVAL, real_data, synthetic_data

#: variant -> dotted config keys beside the defaults
VARIANTS = {
    "defaults": {},
    "batch-64": {"train.batch_size": 64},
    # one Cox risk set over the training fold: one step an epoch, so a validation per step
    # (about 10 minutes a fold on NSCLC)
    "whole-fold": {"train.batch_size": 100_000},
    "raw": {"data.standardize": False},
    "lr-2e-4": {"train.lr": 2.0e-4},
    "dropout-0.5": {"model.dropout": 0.5},
    "gated-abmil": {"model.name": "abmil"},
}
MEMBERS = ["meanpool_linear", "bow_linear"]
SMOKE = {"names": ["surv-smoke"], "variants": ["defaults", "batch-64"]}


def cohort_data(name: str, out: Path) -> dict:
    if name in REAL_SURVIVAL:
        return real_data(name)
    if name == "surv-presence":
        from cohort_zoo import make_cohort

        return make_cohort(name, out)
    return synthetic_data(name, out)


def config(name: str, variant: str, out: Path, smoke: bool = False) -> dict:
    raw = {
        "name": f"{name}-{variant}",
        "task": {"type": "survival"},
        "data": cohort_data(name, out),
        "splits": {"folds": 2 if smoke else 5, "seed": 0, "dir": str(out / "splits" / name)},
        "train": {"threads": 1, "faithfulness": False},
        "ensemble": MEMBERS,
    }
    if smoke:
        raw["train"].update(epochs=3, patience=None)
        raw["splits"]["val_fraction"] = 0.3
    for key, value in VARIANTS[variant].items():
        section, k = key.split(".")
        raw.setdefault(section, {})[k] = value
    return raw


def train_one(job: tuple[str, str, str, bool]) -> str:
    import warnings

    from mil.config import config_from_dict
    from mil.train.runner import run_cv

    name, variant, out, smoke = job
    warnings.simplefilter("ignore")
    folder = Path(out) / "runs" / name / variant
    cfg = config_from_dict(config(name, variant, Path(out), smoke), source=f"{name}/{variant}")
    run_cv(cfg, folder, progress=False, log=lambda *a: None, n_boot=100)
    return str(folder)


def predictors(folder: Path) -> dict[str, pd.DataFrame]:
    """Out-of-fold predictions of the run's model alone, its default average with
    ``meanpool_linear``, and each linear member alone."""
    from mil.results import RunFolder
    from mil.train.summary import run_task

    run, task = RunFolder(folder), run_task(folder)
    model = run.read_config().model_name
    names = {"model": [model], "default": [model, "meanpool_linear"]}
    names.update({m: [m] for m in MEMBERS})
    return {
        k: pooled(run, task, lambda f, n=n: averaged(run, task, f, n)) for k, n in names.items()
    }


def score(name: str, out: Path, variants: list[str], n_boot: int) -> list[dict]:
    from mil.tasks.paired import paired_metric_difference
    from mil.train.summary import run_task

    folders = {v: out / "runs" / name / v for v in variants}
    task = run_task(folders[variants[0]])
    preds = {v: predictors(f) for v, f in folders.items()}
    reference = preds["defaults"]["default"] if "defaults" in preds else None
    rows = []
    for v, p in preds.items():
        row = {"cohort": name, "variant": v}
        row.update({k: task.metric_value(frame, "c_index") for k, frame in p.items()})
        for label, ref in (("vs_defaults", reference), ("vs_bow", p["bow_linear"])):
            if ref is None or (label == "vs_defaults" and v == "defaults"):
                continue
            d = paired_metric_difference(task, p["default"], ref, "c_index", n_boot=n_boot)
            row.update(
                {label: d["delta"], f"{label}_low": d["ci_low"], f"{label}_high": d["ci_high"]}
            )
        rows.append(row)
    return rows


def markdown(table: pd.DataFrame) -> str:
    def ci(r, k):
        if pd.isna(r.get(k)):
            return ""
        return f"{r[k]:+.3f} [{r[k + '_low']:+.3f}, {r[k + '_high']:+.3f}]"

    lines = [
        "| cohort | variant | model alone | default (model + mean-pool) | − current default | − `bow_linear` | `meanpool_linear` | `bow_linear` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        lines.append(
            f"| {r['cohort']} | {r['variant']} | {r['model']:.3f} | {r['default']:.3f} | "
            f"{ci(r, 'vs_defaults')} | {ci(r, 'vs_bow')} | {r['meanpool_linear']:.3f} | "
            f"{r['bow_linear']:.3f} |"
        )
    means = table.groupby("variant", sort=False)[["model", "default"]].mean()
    lines += ["", "| variant | mean C, model alone | mean C, default |", "|---|---|---|"]
    lines += [f"| {v} | {r.model:.3f} | {r.default:.3f} |" for v, r in means.iterrows()]
    return "\n".join(lines)


def study(
    out: Path, names: list[str], variants: list[str], jobs: int = 2, smoke: bool = False
) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:  # generated once, before the jobs share them
        cohort_data(name, out)
    work = [(n, v, str(out), smoke) for n in names for v in variants]
    for done in run_jobs(train_one, jobs, work):
        print(f"done {done}", flush=True)
    rows = [r for n in names for r in score(n, out, variants, 100 if smoke else 1000)]
    table = pd.DataFrame(rows)
    table.to_csv(out / "survival_recipe.csv", index=False)
    text = markdown(table)
    (out / "survival_recipe.md").write_text(text + "\n")
    print(text)
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="default results/survival_recipe (_smoke)")
    ap.add_argument("--only", help="comma-separated cohorts")
    ap.add_argument("--variants", help="comma-separated variants of VARIANTS")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help=f"seconds: {SMOKE}")
    args = ap.parse_args(argv)
    out = Path(
        args.out or ("results/survival_recipe_smoke" if args.smoke else "results/survival_recipe")
    )
    if args.smoke:
        return study(out, SMOKE["names"], SMOKE["variants"], jobs=1, smoke=True)
    names = (
        args.only.split(",") if args.only else [*REAL_SURVIVAL, "surv-fraction", "surv-presence"]
    )
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    return study(out, names, variants, jobs=args.jobs)


if __name__ == "__main__":
    main()

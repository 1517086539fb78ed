"""Selection inside each outer fold's training data (``select: {mode: inner}``) against the
default recipe and against every candidate alone, on the same folds.

One run per cohort with ``select.mode: inner`` (the library defaults otherwise, 5 folds) holds
everything the comparison needs: each fold's ``members/<name>/predictions.csv`` are the model's
and every linear candidate's own test predictions, ``members.json`` their scales (so the
default, the model averaged with ``ensemble:``, is rebuilt exactly as a run without selection
averages it), and ``predictions.csv`` the selected candidate's. Per cohort: the pooled
out-of-fold headline metric of the default, of each candidate alone, of the selection, of the
oracle (the candidate best on the test folds, known only afterwards), and the selection minus
the default and minus the best single candidate with a paired patient-bootstrap 95% CI
(:func:`mil.tasks.paired.paired_metric_difference`); and what the folds chose.

    python benchmarks/inner_selection.py --out results/selection [--only blca,nsclc-subtype]
    python benchmarks/inner_selection.py --smoke --out /tmp/sel_smoke        # seconds

Cohorts: the six TCGA overall-survival cohorts and the NSCLC subtyping cohort of
``../shared/datasets/real`` (HIPT region features), and the zoo's synthetic ``surv-fraction``.
Runs resume (each is an ordinary run folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from survival_stopping import REAL, SYNTHETIC, real_data, synthetic_data  # noqa: E402

from mil.config import config_from_dict  # noqa: E402
from mil.results import RunFolder  # noqa: E402
from mil.results.members import member_dir, read_members  # noqa: E402
from mil.tasks.paired import paired_metric_difference  # noqa: E402
from mil.train.runner import run_cv  # noqa: E402
from mil.train.summary import run_task  # noqa: E402

SURVIVAL = ("blca", "hnsc", "lihc", "skcm", "stad", "nsclc")
COHORTS = (*SURVIVAL, "nsclc-subtype", "surv-fraction")


def cohort_config(name: str, out: Path, folds: int, smoke: bool) -> dict:
    """The run's config: the defaults with ``select.mode: inner``."""
    if name == "nsclc-subtype":
        folder = REAL / "hipt4k_tcga_nsclc"
        data = {"csv": str(folder / "cohort.csv"), "features": str(folder / "features")}
        data.update(patient_col="case_id", label_col="label_name", bag_level="patient")
        task = {"type": "classification"}
    else:
        data = synthetic_data(name, out) if name in SYNTHETIC else real_data(name)
        task = {"type": "survival"}
    raw = {
        "name": name,
        "task": task,
        "data": data,
        "splits": {"folds": folds},
        "select": {"mode": "inner"},
    }
    if smoke:
        raw["model"] = {"name": "abmil", "hidden_dim": 16}
        raw["train"] = {"epochs": 3, "patience": None}
        raw["splits"]["val_fraction"] = 0.3
    return raw


def pooled(run: RunFolder, task, which) -> pd.DataFrame:
    """Out-of-fold predictions of every finished fold, ``which(fold)`` giving one fold's."""
    return pd.concat(
        [which(f).assign(fold_dir=f"fold_{f}") for f in run.finished_folds()], ignore_index=True
    )


def predictors(run_dir: Path, cfg) -> dict[str, pd.DataFrame]:
    """Out-of-fold predictions of the default, each candidate alone and the selection."""
    run = RunFolder(run_dir)
    task = run_task(run_dir)
    first = read_members(run.fold_dir(run.finished_folds()[0]))
    names = [e["name"] for e in first]

    def member(name):
        return lambda f: pd.read_csv(member_dir(run.fold_dir(f), name) / "predictions.csv")

    def default(f):
        return averaged(run, task, f, [cfg.model_name, *cfg.members])

    out = {"default": pooled(run, task, default)}
    out.update({n: pooled(run, task, member(n)) for n in names})
    out["selection"] = pooled(run, task, run.predictions)
    return out


def averaged(run: RunFolder, task, fold: str, names: list[str]) -> pd.DataFrame:
    """Fold ``fold``'s test predictions of the members ``names`` averaged as the run averages
    them (each on its training scale, ``members.json``)."""
    entries = {e["name"]: e for e in read_members(run.fold_dir(fold))}
    parts = [pd.read_csv(member_dir(run.fold_dir(fold), n) / "predictions.csv") for n in names]
    if len(parts) == 1:
        return parts[0]
    return task.average_predictions(parts, [entries[n]["scale"] for n in names])


#: choice rules compared by ``--rules``: (standard errors, absolute margin) the mean inner gain
#: of the best candidate over the default must exceed (``select:``'s rule is the first)
RULES = {
    "1 SE": (1.0, 0.0),
    "2 SE": (2.0, 0.0),
    "1 SE, 0.01": (1.0, 0.01),
    "1 SE, 0.02": (1.0, 0.02),
}


def rules(name: str, run_dir: Path, cfg, n_boot: int) -> list[dict]:
    """The same run's folds re-chosen under each of :data:`RULES` from their recorded inner
    scores (``metrics.json``), the chosen candidates' own outer predictions pooled: the
    headline metric and its paired difference to the default, and what the folds chose."""
    from mil.train.selection import candidates, choose

    run, task = RunFolder(run_dir), run_task(run_dir)
    options, metric = candidates(cfg), task.headline()
    inner = {
        f: json.loads((run.fold_dir(f) / "metrics.json").read_text())["selection"]["inner"]
        for f in run.finished_folds()
    }
    default = pooled(run, task, lambda f: averaged(run, task, f, options["default"]))
    rows = []
    for rule, (k, margin) in RULES.items():
        chosen = {f: choose(s, k, margin)[0] for f, s in inner.items()}
        pred = pooled(run, task, lambda f, c=chosen: averaged(run, task, f, options[c[f]]))
        d = paired_metric_difference(task, pred, default, metric, n_boot=n_boot)
        rows.append(
            {
                "cohort": name,
                "rule": rule,
                "metric": metric,
                "value": round(task.metric_value(pred, metric), 4),
                "rule - default": f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
                "chosen": ", ".join(chosen.values()),
            }
        )
    return rows


def study(name: str, run_dir: Path, cfg, n_boot: int) -> dict:
    task = run_task(run_dir)
    preds = predictors(run_dir, cfg)
    metric = task.headline()
    values = {k: task.metric_value(v, metric) for k, v in preds.items()}
    singles = [k for k in values if k not in ("default", "selection")]
    best = max(singles, key=lambda k: values[k])
    row = {"cohort": name, "metric": metric, **{k: round(v, 4) for k, v in values.items()}}
    row["oracle"] = best
    for ref in ("default", best):
        d = paired_metric_difference(task, preds["selection"], preds[ref], metric, n_boot=n_boot)
        row[f"selection - {'best single' if ref == best else ref}"] = (
            f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        )
    chosen = [
        json.loads((run_dir / f"fold_{f}" / "metrics.json").read_text())["selection"]["chosen"]
        for f in RunFolder(run_dir).finished_folds()
    ]
    row["chosen"] = ", ".join(chosen)
    return row


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/selection")
    ap.add_argument("--only", help="comma-separated cohorts of " + ", ".join(COHORTS))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="one tiny synthetic cohort, 2 folds")
    ap.add_argument(
        "--rules", action="store_true", help="also re-choose each fold under RULES (rules.md)"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.smoke:
        names, folds, n_boot = ["surv-smoke"], 2, 20
    else:
        names = args.only.split(",") if args.only else list(COHORTS)
        folds, n_boot = args.folds, args.n_boot
    rows, by_rule = [], []
    for name in names:
        cfg = config_from_dict(cohort_config(name, out, folds, args.smoke))
        run_dir = run_cv(cfg, out / name, progress=False, log=lambda *a: None, n_boot=n_boot)
        rows.append(study(name, run_dir, cfg, n_boot))
        print(pd.DataFrame([rows[-1]]).to_string(index=False), flush=True)
        if args.rules:
            by_rule += rules(name, run_dir, cfg, n_boot)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    if by_rule:
        (out / "rules.md").write_text(markdown(pd.DataFrame(by_rule)))
        print(markdown(pd.DataFrame(by_rule)))
    table.to_csv(out / "selection.csv", index=False)
    (out / "selection.md").write_text(markdown(table))
    print(markdown(table))
    return table


def markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in table.iterrows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

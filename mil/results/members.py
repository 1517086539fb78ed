"""A fold's ensemble (``ensemble:``) in its folder: which models were averaged, and each one's
own predictions, read back for the summary, the report and prediction on new bags.

Layout, in a fold folder (``fold_<k>/``, ``refit/``) whose ``predictions.csv`` is the average::

    members.json          {"combine": "mean", "members": [{"name", "model", "scale"}, ...]}:
                          the model first (its ``model.pt`` is the fold's; with
                          ``train.seeds`` its ``replicas``, each {"name", "model", "scale"},
                          whose average it is), then each linear member; ``scale``: what put
                          its outputs on the common scale (:meth:`mil.tasks.Task.output_scale`,
                          fitted on its training bags)
    members/<name>/       each member's own predictions.csv (+ _train, _val); a linear
                          member's model.pt and history.csv
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.errors import DataError
from mil.io import read_json
from mil.results import PREDICTIONS, RunFolder
from mil.tasks import Task
from mil.tasks.paired import paired_metric_difference

MEMBERS_JSON = "members.json"
MEMBERS_DIR = "members"


def member_dir(fold_dir: str | Path, name: str) -> Path:
    """The folder of one member's files within a fold folder."""
    return Path(fold_dir) / MEMBERS_DIR / name


def read_members(fold_dir: str | Path) -> list[dict[str, Any]] | None:
    """``members.json`` of a fold folder (None: the fold's model alone); a damaged one is a
    :class:`DataError` naming it."""
    path = Path(fold_dir) / MEMBERS_JSON
    if not path.is_file():
        return None
    fix = f"delete {Path(fold_dir) / 'metrics.json'} and re-run `mil train` to train the fold again"
    record = read_json(path, "ensemble record", fix)
    members = record.get("members") if isinstance(record, dict) else None

    def ok(m: Any) -> bool:
        return isinstance(m, dict) and {"name", "model", "scale"} <= set(m)

    if not isinstance(members, list) or not all(
        ok(m) and all(ok(r) for r in m.get("replicas", [])) for m in members
    ):
        raise DataError(f"{path}: not an ensemble record (a 'members' list); {fix}")
    return members


def members_summary(run_dir: str | Path, task: Task, n_boot: int) -> dict[str, Any] | None:
    """``summary.json``'s ``ensemble`` entry: per member (the model first) its pooled
    out-of-fold headline metric with a patient-bootstrap CI, and the average's minus it with a
    paired CI and p, on the folds that saved every member. None without an ensemble."""
    run = RunFolder(run_dir)
    folds = [f for f in run.records() if read_members(run.fold_dir(f))]
    if not folds:
        return None

    def names_of(fold: str) -> list[str]:  # every member, each seed replica after its model
        entries = read_members(run.fold_dir(fold)) or []
        return [
            n for e in entries for n in [e["name"], *(r["name"] for r in e.get("replicas", []))]
        ]

    names = names_of(folds[0])
    folds = [f for f in folds if names_of(f) == names]
    metric = task.headline()

    def pooled(path_of) -> pd.DataFrame:
        return pd.concat(
            [
                pd.read_csv(path_of(f), dtype={"bag_id": str, "patient_id": str}).assign(
                    fold_dir=run.fold_dir(f).name
                )
                for f in folds
            ],
            ignore_index=True,
        )

    average = pooled(lambda f: run.fold_file(f, PREDICTIONS))
    out: dict[str, Any] = {"metric": metric, "folds": folds, "members": {}}
    out["average"] = {
        "value": task.metric_value(average, metric),
        "ci95_pooled": task.pooled_ci(average, n_boot=n_boot).get(metric),
    }
    for name in names:
        own = pooled(lambda f, n=name: member_dir(run.fold_dir(f), n) / PREDICTIONS)
        d = paired_metric_difference(
            task,
            average,
            own,
            metric,
            n_boot=n_boot,
            names=("the averaged predictions", f"member {name}'s"),
        )
        out["members"][name] = {
            "value": d["reference_value"],
            "ci95_pooled": task.pooled_ci(own, n_boot=n_boot).get(metric),
            "average_minus_member": {k: d[k] for k in ("delta", "ci_low", "ci_high", "p")},
        }
    return out


def ensemble_lines(summary: dict[str, Any]) -> list[str]:
    """``report.md``'s "Ensemble" section: each member's pooled metric, the average's, and
    the average minus each member (paired over patients)."""
    entry = summary.get("ensemble")
    if not entry:
        return []
    m = entry["metric"]

    def fmt(v: Any, ci: Any = None, signed: bool = False) -> str:
        if v is None or not np.isfinite(v):
            return "undefined"
        s = f"{v:+.3f}" if signed else f"{v:.3f}"
        if ci and None not in ci[:2]:
            s += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        return s

    lines = [
        "## Ensemble",
        "",
        "Each fold's prediction is an average of models fitted on its training bags (the model, "
        "itself the average of its seed replicas `<model>_seed<j>` with `train.seeds`, and its "
        "linear members; `members.json`, their own predictions in `members/<name>/`). Pooled "
        f"out-of-fold {m} with 95% CI, and the average minus each member (paired patient "
        f"bootstrap, {len(entry['folds'])} folds):",
        "",
        f"| predictor | {m} | average minus it | p |",
        "|---|---|---|---|",
        f"| **average** | {fmt(entry['average']['value'], entry['average']['ci95_pooled'])} | | |",
    ]
    for name, e in entry["members"].items():
        d = e["average_minus_member"]
        p = "" if d["p"] is None or not np.isfinite(d["p"]) else f"{d['p']:.2g}"
        lines.append(
            f"| `{name}` | {fmt(e['value'], e['ci95_pooled'])} | "
            f"{fmt(d['delta'], [d['ci_low'], d['ci_high']], signed=True)} | {p} |"
        )
    return [*lines, ""]

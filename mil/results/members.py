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

import pandas as pd

from mil.errors import DataError
from mil.io import read_json
from mil.reporting import p_value, value_ci
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


def read_chosen(fold_dir: str | Path) -> list[str] | None:
    """The members a fold predicts with (``members.json``'s ``chosen``, written where
    ``select:`` chose); None: all of them."""
    if read_members(fold_dir) is None:
        return None
    chosen = read_json(Path(fold_dir) / MEMBERS_JSON, "ensemble record").get("chosen")
    if chosen is not None and not (isinstance(chosen, list) and chosen):
        raise DataError(f"{Path(fold_dir) / MEMBERS_JSON}: 'chosen' is not a list of members")
    return chosen


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
        f"| **average** | {value_ci(entry['average']['value'], entry['average']['ci95_pooled'])} | | |",
    ]
    for name, e in entry["members"].items():
        d = e["average_minus_member"]
        lines.append(
            f"| `{name}` | {value_ci(e['value'], e['ci95_pooled'])} | "
            f"{value_ci(d['delta'], [d['ci_low'], d['ci_high']], signed=True)} | "
            f"{p_value(d['p'])} |"
        )
    return [*lines, ""]


def selection_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """``summary.json``'s ``selection`` entry (``select.mode: inner``): how often each
    candidate was chosen, and per fold the choice, the runner-up and every candidate's mean
    inner score. None without selection."""
    records = RunFolder(run_dir).records()
    folds = {f: r["selection"] for f, r in records.items() if "selection" in r}
    if not folds:
        return None
    first = next(iter(folds.values()))
    counts: dict[str, int] = {}
    for s in folds.values():
        counts[s["chosen"]] = counts.get(s["chosen"], 0) + 1
    return {
        "metric": first["metric"],
        "rule": first["rule"],
        "chosen": counts,
        "folds": {
            f: {k: s[k] for k in ("chosen", "members", "runner_up", "inner_mean")}
            for f, s in folds.items()
        },
    }


def selection_lines(summary: dict[str, Any]) -> list[str]:
    """``report.md``'s "Selection inside the training folds" section."""
    entry = summary.get("selection")
    if not entry:
        return []
    names = list(next(iter(entry["folds"].values()))["inner_mean"])
    lines = [
        "## Selection inside the training folds",
        "",
        f"Each fold chose what it predicts with by the mean inner-fold {entry['metric']} on its "
        "own training bags (`select:`; the test fold took no part): `default` is the model "
        "averaged with `ensemble:`, kept unless another candidate's mean gain exceeded one "
        "standard error of its inner-fold differences. Heatmaps stay the model's own.",
        "",
        f"| fold | chosen | runner-up | {' | '.join(f'`{n}`' for n in names)} |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for fold, s in entry["folds"].items():
        means = " | ".join(f"{s['inner_mean'].get(n, float('nan')):.3f}" for n in names)
        lines.append(f"| {fold} | `{s['chosen']}` | `{s['runner_up']}` | {means} |")
    return [*lines, ""]

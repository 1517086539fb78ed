"""Summaries of a run folder: per-fold metrics, mean ± sd, and bootstrap CIs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.config import config_from_dict, read_yaml_mapping
from mil.errors import DataError, MilWarning
from mil.io import json_float, write_csv, write_json
from mil.tasks.base import first_repeat_folds


def fold_dirs(run_dir: Path) -> list[Path]:
    return sorted(
        (p for p in Path(run_dir).glob("fold_*") if (p / "metrics.json").is_file()),
        key=lambda p: _fold_key(p.name[5:]),
    )


def _fold_key(name: str) -> tuple[int, int]:
    if name.startswith("r"):
        r, k = name[1:].split("_")
        return int(r), int(k)
    return 0, int(name)


def read_run_config(run_dir: Path):
    """The run's saved ``config.yaml``, validated; a missing or broken one is a clear error."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise DataError(f"{run_dir}: config.yaml missing; is this a mil run folder?")
    return config_from_dict(read_yaml_mapping(cfg_path, "run's saved config"), source=str(cfg_path))


def fold_records(run_dir: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    """The finished fold folders and their ``metrics.json`` records.

    A damaged ``metrics.json`` (the folder was copied in part, or edited) is
    left out with a warning naming it; re-running ``mil train`` on the run
    trains that fold again.
    """
    dirs, records = [], []
    for d in fold_dirs(run_dir):
        path = d / "metrics.json"
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
                raise ValueError("no 'metrics' record")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            warnings.warn(
                f"{path} is damaged ({exc}); fold {d.name[5:]} is left out. Re-run `mil train` "
                f"on this run folder (--out {run_dir}) to train it again",
                MilWarning,
                stacklevel=1,  # one warning per damaged file, whichever reader meets it
            )
            continue
        dirs.append(d)
        records.append(record)
    return dirs, records


def _finished(run_dir: Path, what: str) -> tuple[Any, list[Path], list[dict[str, Any]]]:
    """A run folder's config, its finished fold folders and their ``metrics.json`` records."""
    cfg = read_run_config(run_dir)
    done, records = fold_records(run_dir)
    if not done:
        raise DataError(f"{run_dir}: no finished folds (fold_*/metrics.json) to {what}")
    return cfg, done, records


def run_task(run_dir: str | Path):
    """The task (metrics, pooled statistics) of a finished run, as its folds were scored."""
    from mil.tasks import make_task

    cfg, _, records = _finished(Path(run_dir), "score")
    return make_task(cfg, records[0].get("classes", []))


def run_predictions(run_dir: str | Path) -> pd.DataFrame:
    """Out-of-fold predictions of every finished fold (all repeats), with a ``fold_dir``
    column (``fold_3``, ``fold_r1_3``, ...) naming the fold that made each row."""
    parts = []
    for d in fold_records(Path(run_dir))[0]:
        path = d / "predictions.csv"
        try:
            pred = pd.read_csv(path, dtype={"bag_id": str, "patient_id": str})
        except (OSError, ValueError) as err:  # missing, empty or unparsable
            raise DataError(
                f"{path}: cannot read this finished fold's predictions ({err}); "
                f"delete {d.name} to retrain the fold"
            ) from None
        parts.append(pred.assign(fold_dir=d.name))
    if not parts:
        raise DataError(f"{run_dir}: no finished folds (fold_*/metrics.json) with predictions")
    return pd.concat(parts, ignore_index=True)


def summarize(run_dir: str | Path, n_boot: int = 1000) -> dict[str, Any]:
    """Rebuild ``summary.csv`` and ``summary.json`` from the finished fold folders."""
    run_dir = Path(run_dir)
    cfg, done, records = _finished(run_dir, "summarise")
    # a metric a fold could not define is NaN, written as null (strict JSON)
    scalar = sorted(
        {
            k
            for r in records
            for k, v in r["metrics"].items()
            if (v is None or isinstance(v, (int, float))) and k not in ("epochs",)
        },
        key=lambda k: (k in ("train_seconds", "seconds_per_epoch"), k),
    )
    rows = []
    for r in records:
        rows.append({"fold": r["fold"], **{k: json_float(r["metrics"].get(k)) for k in scalar}})
    table = pd.DataFrame(rows)
    metrics: dict[str, Any] = {}
    for k in scalar:
        vals = table[k].to_numpy(float)
        ok = vals[np.isfinite(vals)]
        metrics[k] = {
            "mean": float(ok.mean()) if len(ok) else float("nan"),
            "sd": float(ok.std(ddof=1)) if len(ok) > 1 else float("nan"),
            "folds": [None if not np.isfinite(v) else float(v) for v in vals],
        }
    repeats = sorted({r.get("repeat", 0) for r in records})
    if len(repeats) > 1:
        for k in scalar:
            per_rep = table.groupby([r.get("repeat", 0) for r in records])[k].mean().to_numpy(float)
            metrics[k]["repeat_means"] = per_rep.tolist()
            metrics[k]["sem_over_repeats"] = float(per_rep.std(ddof=1) / np.sqrt(len(per_rep)))

    from mil.tasks import make_task

    task = make_task(cfg, records[0].get("classes", []))
    pooled = run_predictions(run_dir)
    for k, (lo, hi) in task.pooled_ci(pooled, n_boot=n_boot).items():
        if k in metrics:
            metrics[k]["ci95_pooled"] = [lo, hi]
    summary = {
        "name": cfg.name,
        "task": cfg.task.type,
        "model": cfg.model_name,
        "folds": [r["fold"] for r in records],
        "n_folds_expected": cfg.splits.folds * cfg.splits.repeats,
        "n_boot": n_boot,
        "n_bags": int(pooled["bag_id"].nunique()),  # tested bags (each once per repeat)
        "n_patients": int(pooled["patient_id"].nunique()),
        "metrics": metrics,
    }
    # task-specific run-level results (survival: pooled KM plot and log-rank p)
    hook = getattr(task, "summary_artifacts", None)
    if hook is not None:
        summary.update(hook(run_dir, done) or {})
    group_cols = list(dict.fromkeys([c for c in [cfg.data.site_col, *cfg.data.subgroup_cols] if c]))
    if group_cols:
        first = pd.concat(first_repeat_folds(done, "predictions.csv").values(), ignore_index=True)
        first = join_group_columns(first, cfg, group_cols)
        table_sub = subgroup_metrics(task, first, group_cols, n_boot=n_boot)
        tests = [group_difference_test(task, first, col, n_perm=n_boot) for col in group_cols]
        table_sub["p_difference"] = table_sub["column"].map(
            {t["column"]: t["p"] for t in tests}
        ).astype(float)
        summary["subgroup_tests"] = tests
        write_csv(run_dir / "subgroups.csv", table_sub)
        summary["subgroups"] = [
            {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
            for r in table_sub.to_dict("records")
        ]
    agg = pd.DataFrame(
        [
            {"fold": "mean", **{k: metrics[k]["mean"] for k in scalar}},
            {"fold": "sd", **{k: metrics[k]["sd"] for k in scalar}},
        ]
    )
    write_csv(run_dir / "summary.csv", pd.concat([table, agg], ignore_index=True))
    write_json(run_dir / "summary.json", summary)
    from mil.train.report import write_report

    write_report(run_dir)
    return summary


def join_group_columns(pred: pd.DataFrame, cfg, cols: list[str]) -> pd.DataFrame:
    """``pred`` with every group column in ``cols`` it lacks, joined by bag from the cohort CSV.

    Folds write the group columns the config named when they ran; columns
    added to the config afterwards come from the CSV, read and checked as a
    run reads it (a missing value is the group ``"missing"``).
    """
    absent = [c for c in cols if c not in pred.columns]
    if not absent:
        return pred
    from mil.data.cohort import Cohort

    bags = Cohort.from_config(cfg).bags.set_index("bag_id")
    unknown = sorted(set(pred["bag_id"]) - set(bags.index))
    if unknown:
        raise DataError(
            f"{cfg.data.csv}: bag {unknown[0]} of the run's predictions is not in the cohort "
            f"CSV, so its {absent[0]!r} value is unknown; was the CSV changed after the run?"
        )
    out = pred.copy()
    for col in absent:
        out[col] = bags.loc[out["bag_id"], col].to_numpy()
    return out


def subgroup_metrics(task, pred: pd.DataFrame, cols: list[str], n_boot: int = 1000) -> pd.DataFrame:
    """Pooled out-of-fold metrics with bootstrap 95% CIs (patients resampled), for all
    bags (``column = value = "all"``) and for each value of each column in ``cols``.

    One row per group: ``column, value, n_bags, n_patients``, the task's outcome
    counts, then each metric with ``<metric>_ci_low`` / ``<metric>_ci_high``. A
    metric a group cannot define (one class only, no comparable pair) is NaN.
    """
    groups = [("all", "all", pred)]
    for col in cols:
        keys = pred[col].astype(str)
        groups += [(col, value, pred[keys == value]) for value in sorted(keys.unique())]
    rows = []
    for col, value, sub in groups:
        row: dict[str, Any] = {
            "column": col,
            "value": value,
            "n_bags": len(sub),
            "n_patients": int(sub["patient_id"].nunique()),
            **task.counts(sub),
        }
        ci = task.pooled_ci(sub, n_boot=n_boot)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a one-class group warns in scikit-learn
            point = task.pooled_metrics(sub)
        for k, v in point.items():
            lo, hi = ci.get(k, (float("nan"), float("nan")))
            row.update({k: float(v), f"{k}_ci_low": lo, f"{k}_ci_high": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def group_difference_test(
    task, pred: pd.DataFrame, col: str, n_perm: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Permutation test of "the main metric is the same in every group of ``col``".

    Statistic: the range (largest minus smallest) of the pooled out-of-fold
    AUC (classification) or within-fold Harrell's C (survival) over the groups
    that define it. Null distribution: the group labels shuffled among
    patients (among bags if a patient's bags differ in ``col``) within each
    class (classification) or event status (survival), so every group keeps
    its outcome mix. p = (1 + #{permuted >= observed}) / (1 + n_perm).
    Returns ``column, metric, groups, range, p, n_perm`` (``range``/``p``
    None with fewer than two groups that define the metric).
    """
    metric = "auc" if task.name == "classification" else "c_index"
    keys = pred[col].astype(str).to_numpy()
    values = sorted(set(keys))

    def spread(labels: np.ndarray) -> tuple[float, int]:
        found = []
        for v in values:
            rows = np.flatnonzero(labels == v)
            if len(rows) == 0:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one-class groups
                x = task.pooled_metrics(pred.iloc[rows]).get(metric, float("nan"))
            if np.isfinite(x):
                found.append(x)
        return (max(found) - min(found) if len(found) > 1 else float("nan")), len(found)

    observed, n_defined = spread(keys)
    out: dict[str, Any] = {"column": col, "metric": metric, "groups": n_defined, "n_perm": n_perm}
    if not np.isfinite(observed):
        return {**out, "range": None, "p": None}
    stratum = (pred["label_index"] if metric == "auc" else pred["event"]).to_numpy(int)
    per_patient = pred.groupby("patient_id")[col].nunique().max() == 1
    unit = pred["patient_id"].astype(str).to_numpy() if per_patient else np.arange(len(pred))
    units, first, inverse = np.unique(unit, return_index=True, return_inverse=True)
    unit_group, unit_stratum = keys[first], stratum[first]
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        shuffled = unit_group.copy()
        for s_ in np.unique(unit_stratum):
            idx = np.flatnonzero(unit_stratum == s_)
            shuffled[idx] = shuffled[rng.permutation(idx)]
        value, _ = spread(shuffled[inverse])
        hits += bool(np.isfinite(value) and value >= observed - 1e-12)
    return {**out, "range": float(observed), "p": (1 + hits) / (1 + n_perm)}


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table: metric, mean ± sd over folds, pooled bootstrap 95% CI.

    P-values (``*_p``) are not averaged: the line shows their median and range
    over folds, and the pooled test where the run has one (``<name>_pooled``).
    Settings that vary by fold (``*_tau``, Uno's truncation time) show their range.
    """
    lines = [
        f"{summary['name']}  ({summary['task']}, model {summary['model']}, "
        f"{len(summary['folds'])}/{summary['n_folds_expected']} folds)"
    ]
    lines.append(f"  {'metric':<20} {'mean ± sd':>17}   95% CI (pooled bootstrap)")
    for k, m in summary["metrics"].items():
        folds = np.array([v for v in m.get("folds", []) if v is not None], float)
        lo_hi = f"[{folds.min():.3g}, {folds.max():.3g}]" if len(folds) else "[]"
        if k.endswith("_p"):
            med = f"{np.median(folds):.2g}" if len(folds) else "nan"
            pooled = summary.get(f"{k}_pooled")
            tail = f"; pooled over folds {pooled:.2g}" if pooled is not None else ""
            lines.append(f"  {k:<20} median {med} over folds, range {lo_hi}{tail}")
            continue
        if k.endswith("_tau"):
            lines.append(f"  {k:<20} per fold {lo_hi} (a time horizon, not a metric)")
            continue
        ci = m.get("ci95_pooled")
        ci_s = (
            f"[{ci[0]:.3f}, {ci[1]:.3f}]"
            if ci and None not in ci[:2] and np.isfinite(ci[0])
            else ""
        )
        lines.append(
            f"  {k:<20} {json_float(m['mean']):>8.3f} ± {json_float(m['sd']):<6.3f}   {ci_s}"
        )
    if summary.get("subgroups"):
        metric = "auc" if summary["task"] == "classification" else "c_index"
        lines.append(
            f"  subgroups (pooled out-of-fold {metric}, 95% bootstrap CI; subgroups.csv):"
        )
        for r in summary["subgroups"]:
            v, lo, hi = r.get(metric), r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high")
            est = "undefined" if v is None else f"{v:.3f}"
            ci_s = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
            name = "all" if r["column"] == "all" else f"{r['column']}={r['value']}"
            lines.append(
                f"    {name:<24} {r['n_bags']:>5} bags {r['n_patients']:>5} patients   {est}{ci_s}"
            )
        for t in summary.get("subgroup_tests", []):
            if t["p"] is None:
                lines.append(f"    {t['column']}: fewer than two groups define {t['metric']}; not tested")
            else:
                lines.append(
                    f"    {t['column']}: groups differ in {t['metric']} by up to {t['range']:.3f}, "
                    f"permutation p = {t['p']:.3g} ({t['n_perm']} permutations)"
                )
    return "\n".join(lines)

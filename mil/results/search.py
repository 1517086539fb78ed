"""A hyper-parameter search's files in its run folder: the grid points' runs and ``search.csv``.

Layout, beside an ordinary run's files (:mod:`mil.results`)::

    search/<label>/      one ordinary run per grid point, on the run's split files
    search.csv           per outer fold and point: the point's values, its validation
                         loss, and whether it was selected (its fold copied to fold_<k>/)
    search_average/      fold_<k>/: the average of every point's predictions of that test
                         fold (predictions.csv, metrics.json), set beside the selection
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mil.errors import DataError
from mil.reporting import MISSING, interval, p_phrase, value_ci
from mil.results import HISTORY, RunFolder
from mil.tasks import Task
from mil.tasks.paired import paired_metric_difference

SEARCH_DIR = "search"
SEARCH_CSV = "search.csv"
AVERAGE_DIR = "search_average"


def point_dir(run_dir: str | Path, label: str) -> Path:
    """The run folder of the grid point ``label``."""
    return Path(run_dir) / SEARCH_DIR / label


def average_dir(run_dir: str | Path) -> Path:
    """The run-shaped folder of the points' averaged predictions."""
    return Path(run_dir) / AVERAGE_DIR


def average_summary(run_dir: str | Path, task: Task, n_boot: int) -> dict[str, Any] | None:
    """``summary.json``'s ``search`` entry: the headline metric of the selected points' and of
    the averaged points' pooled out-of-fold predictions (on the folds both have), each with
    its patient-bootstrap CI, and average minus selected with a paired CI and p. None for a
    plain run or before any fold is averaged."""
    run, avg = RunFolder(run_dir), RunFolder(average_dir(run_dir))
    folds = [f for f in avg.records() if f in run.records()]
    if not folds:
        return None
    metric = task.headline()

    def pooled(folder: RunFolder) -> pd.DataFrame:
        return pd.concat(
            [folder.predictions(f).assign(fold_dir=folder.fold_dir(f).name) for f in folds],
            ignore_index=True,
        )

    selected, average = pooled(run), pooled(avg)
    d = paired_metric_difference(
        task,
        average,
        selected,
        metric,
        n_boot=n_boot,
        names=("the averaged points' predictions", "the selected points'"),
    )
    ci = {
        name: task.pooled_ci(p, n_boot=n_boot).get(metric)
        for name, p in (("selected", selected), ("average", average))
    }
    points = avg.record(folds[0]).get("points", [])
    return {
        "metric": metric,
        "folds": folds,
        "points": points,
        "selected": {"value": d["reference_value"], "ci95_pooled": ci["selected"]},
        "average": {"value": d["value"], "ci95_pooled": ci["average"]},
        "average_minus_selected": {k: d[k] for k in ("delta", "ci_low", "ci_high", "p")},
    }


def kept_val_loss(history: str | Path, best_from_epoch: int) -> float:
    """The validation loss of the weights a fold kept, from its ``history.csv``: the row
    marked ``best`` (early stopping's lowest loss from ``best_from_epoch`` on; the last epoch
    with fixed epochs), else the lowest from ``best_from_epoch`` on; NaN without validation."""
    try:
        h = pd.read_csv(history)
    except (OSError, ValueError) as err:
        raise DataError(f"{history}: cannot read this fold's training history ({err})") from None
    if "val_loss" not in h.columns:
        return float("nan")
    if "best" in h.columns and h["best"].astype(bool).any():
        return float(h.loc[h["best"].astype(bool), "val_loss"].iloc[0])
    return float(h.loc[h["epoch"] >= best_from_epoch, "val_loss"].min())


def point_val_losses(runs: list[RunFolder], fold: str, best_from: list[int]) -> np.ndarray:
    """Each point's kept validation loss on ``fold`` (``best_from``: its ``train.best_from_epoch``)."""
    return np.array(
        [kept_val_loss(r.fold_file(fold, HISTORY), b) for r, b in zip(runs, best_from)], float
    )


def read_search_table(run_dir: str | Path) -> pd.DataFrame | None:
    """``search.csv`` of a search run (None for a plain run)."""
    path = Path(run_dir) / SEARCH_CSV
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, dtype={"fold": str, "point": str})
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the search table ({err})") from None


def search_section(run_dir: str | Path) -> list[str]:
    """``report.md``'s "Hyper-parameter search" section (markdown lines; none for a plain run):
    the grid, the selection criterion and the values selected for each outer fold."""
    table = read_search_table(run_dir)
    if table is None:
        return []
    cfg = RunFolder(run_dir).read_config()
    keys = list(cfg.search)
    n_points = int(np.prod([len(v) for v in cfg.search.values()]))
    grid = "; ".join(
        f"`{k}` ∈ {{{', '.join(show_value(v) for v in vals)}}}" for k, vals in cfg.search.items()
    )
    kept = (
        f"the weights early stopping kept by its criterion (train.stop_on = {cfg.train.stop_on}) "
        f"from epoch {cfg.train.best_from_epoch} on"
        if cfg.train.patience is not None
        else "with fixed epochs, the last epoch's"
    )
    lines = [
        "## Hyper-parameter search",
        "",
        f"Grid of {n_points} points (every combination): {grid}. In each outer fold every point "
        "was trained on the same training and validation patients, and the point whose kept "
        f"weights had the lowest validation loss ({kept}) was selected; only its predictions on "
        "the outer test fold are reported, and the test folds took no part in the selection. "
        "Methods gives the config's own values; the selected ones, per fold:",
        "",
        "| fold | point | " + " | ".join(f"`{k}`" for k in keys) + " | validation loss |",
        "|" + "---|" * (len(keys) + 3),
    ]
    chosen = table[table["selected"].astype(bool)]
    for r in chosen.to_dict("records"):
        cells = [str(r["fold"]), f"`{r['point']}`", *[show_value(r[k]) for k in keys]]
        lines.append("| " + " | ".join(cells) + f" | {r['val_loss']:.4f} |")
    search = RunFolder(run_dir).summary().get("search")
    if search:
        lines += ["", f"Selecting against averaging: {average_words(search)}."]
    lines += [
        "",
        f"All points' validation losses: `{SEARCH_CSV}`; their runs: `{SEARCH_DIR}/`; the "
        f"averaged predictions: `{AVERAGE_DIR}/`.",
        "",
    ]
    return lines


def average_words(search: dict[str, Any]) -> str:
    """The ``search`` entry of a summary in a sentence: selected and averaged points' pooled
    metric with CIs, and their paired difference."""
    m, d = search["metric"], search["average_minus_selected"]

    def value(entry: dict[str, Any]) -> str:
        return value_ci(entry["value"], entry.get("ci95_pooled"))

    ci = (d["ci_low"], d["ci_high"])
    diff = value_ci(d["delta"], ci, signed=True)
    if diff != MISSING and interval(ci):
        diff += f", {p_phrase(d['p'])}"
    return (
        f"pooled out-of-fold {m} of the selected points {value(search['selected'])}, of the "
        f"average of all {len(search['points'])} points' predictions {value(search['average'])}; "
        f"average minus selected {diff} (paired bootstrap over patients, "
        f"{len(search['folds'])} folds)"
    )


def show_value(value: Any) -> str:
    """A grid value as the report and the point labels write it (floats in %g)."""
    return format(value, "g") if isinstance(value, float) else str(value)

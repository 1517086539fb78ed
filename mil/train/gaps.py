"""Differences of a metric between two settings, with bootstrap CIs: the generalization gap
of an external cohort (other patients: unpaired) and the difference between two
cross-validations of one cohort (the same patients: paired)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from mil.errors import DataError
from mil.metrics import paired_difference, unpaired_difference
from mil.tasks import Task


def generalization_gap(
    task: Task, internal: pd.DataFrame, external: pd.DataFrame, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Per headline metric of the task: its value on the run's pooled out-of-fold predictions
    (``internal``, as the run summary pools them) and on the external predictions, and
    ``difference`` = external minus internal with a percentile-bootstrap ``ci95`` and ``p``.
    The cohorts hold different patients, so each is resampled on its own, whole patients
    at a time (:func:`mil.metrics.unpaired_difference`)."""
    names = task.headline_metrics

    def scorer(frame: pd.DataFrame):
        def score(rows: np.ndarray) -> dict[str, float]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one-class resamples
                values = task.pooled_metrics(frame.iloc[rows])
            return {k: float(values[k]) for k in names if k in values}

        return score

    score_ext, score_int = scorer(external), scorer(internal)
    point_ext = score_ext(np.arange(len(external)))
    point_int = score_int(np.arange(len(internal)))
    diffs = unpaired_difference(
        score_ext,
        len(external),
        score_int,
        len(internal),
        n_boot=n_boot,
        seed=seed,
        groups_a=external["patient_id"].astype(str).to_numpy(),
        groups_b=internal["patient_id"].astype(str).to_numpy(),
    )
    return {
        k: {
            "internal": point_int[k],
            "external": point_ext[k],
            "difference": diffs[k]["delta"],
            "ci95": [diffs[k]["ci_low"], diffs[k]["ci_high"]],
            "p": diffs[k]["p"],
            "n_resamples": diffs[k]["n_resamples"],
        }
        for k in names
        if k in diffs
    }


def paired_setting_difference(
    task: Task, a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per headline metric: the pooled metric of predictions ``a`` minus that of ``b``, where
    both predict the same patients (e.g. site-preserved and patient-level folds of one cohort),
    with a paired percentile-bootstrap 95% CI and p (:func:`mil.metrics.paired_difference`).

    A resample draws patients; each drawn patient brings all its rows of ``a`` *and* of ``b``
    (each frame keeps its own folds, so survival pairs stay within a fold). Patients in only
    one frame are a :class:`DataError`."""
    pa, pb = a["patient_id"].astype(str), b["patient_id"].astype(str)
    only = sorted(set(pa) ^ set(pb))
    if only:
        raise DataError(
            f"patient {only[0]} is predicted in one setting but not the other; both must "
            "cover the same patients to be compared pairwise"
        )
    patients = np.array(sorted(set(pa)))
    rows_a = [np.flatnonzero(pa.to_numpy() == p) for p in patients]
    rows_b = [np.flatnonzero(pb.to_numpy() == p) for p in patients]

    out = {}
    for m in task.headline_metrics:

        def diff(idx: np.ndarray, m=m) -> float:
            ia = np.concatenate([rows_a[i] for i in idx])
            ib = np.concatenate([rows_b[i] for i in idx])
            return task.metric_value(a.iloc[ia], m) - task.metric_value(b.iloc[ib], m)

        out[m] = paired_difference(diff, len(patients), n_boot=n_boot, seed=seed)
    return out

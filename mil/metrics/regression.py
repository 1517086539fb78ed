"""Regression metrics of predictions on the targets' own scale: scikit-learn's R², MAE and RMSE,
scipy's Pearson and Spearman correlations, and the ROC AUC of the prediction for a target at
or above a cutoff."""

from __future__ import annotations

import warnings

import numpy as np


def regression_metrics(
    y: np.ndarray, p: np.ndarray, cutoff: float | None = None
) -> dict[str, float]:
    """``r2``, ``pearson_r``, ``spearman_r``, ``mae``, ``rmse`` of predictions ``p`` of targets
    ``y`` (NaN where undefined: fewer than two bags, a constant target or prediction); with
    ``cutoff`` also ``auc``, the ROC AUC of ``p`` for ``y >= cutoff`` (NaN without both sides)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    nan = float("nan")
    out = {"r2": nan, "pearson_r": nan, "spearman_r": nan, "mae": nan, "rmse": nan}
    if len(y) == 0:
        return {**out, **({"auc": nan} if cutoff is not None else {})}
    out["mae"] = float(mean_absolute_error(y, p))
    out["rmse"] = float(np.sqrt(mean_squared_error(y, p)))
    if len(y) >= 2 and np.ptp(y) > 0:
        out["r2"] = float(r2_score(y, p))
        if np.ptp(p) > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nearly constant inputs
                out["pearson_r"] = float(pearsonr(y, p)[0])
                out["spearman_r"] = float(spearmanr(y, p)[0])
    if cutoff is not None:
        above = y >= cutoff
        out["auc"] = float(roc_auc_score(above, p)) if 0 < above.sum() < len(y) else nan
    return out


def residuals_by_group(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Residuals ``p - y`` per value of ``groups`` (sorted), for a subgroup figure."""
    r = np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    g = np.asarray(groups).astype(str)
    return {k: r[g == k] for k in sorted(set(g.tolist()))}

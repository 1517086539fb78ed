"""Paired statistics of the localization benchmark (``benchmarks/localization.py``).

The acceptance of issue 22 compares two instance rankers on the *same* test bags:
a model's default heatmap score and the instance-level logistic regression. With
80-200 bags, differences of a few hundredths are within noise, so each is given
with a bootstrap 95% CI that resamples test bags (within each fold; both rankers'
scores of a drawn bag are taken together):

- ``within``: mean over positive test bags of the within-bag ROC AUC (as
  ``witness_auc_<kind>`` of ``metrics.json``, mean over folds);
- ``pooled``: ROC AUC of every test instance of a fold ranked together, mean over
  folds (as ``witness_auc_pooled_<kind>``).

Bag-level AUC differences between two runs use :func:`mil.compare.paired_differences`
(patients resampled).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from sklearn.metrics import roc_auc_score

#: fold -> bag id -> instance scores ``[N]`` (evidence for the positive class)
FoldScores = dict[str, dict[str, np.ndarray]]


def read_fold_scores(folder: Path, kind: str) -> FoldScores:
    """A finished run's saved instance scores of ``kind`` (``main``: the model's own score)
    per fold and test bag, as the positive class's column."""
    from mil.metrics.instances import score_column

    out: FoldScores = {}
    for path in sorted(folder.glob("fold_*/attention.h5")):
        fold = path.parent.name
        with h5py.File(path, "r") as f:
            key = "scores" if kind == "main" else f"scores_{kind}"
            out[fold] = {
                str(g.attrs.get("bag_id", name)): score_column(g[key][()])
                for name, g in f.items()
                if key in g
            }
    return out


def _bag_aucs(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], bags) -> np.ndarray:
    """Within-bag AUC of each bag in ``bags`` (NaN where the bag's instances are one label)."""
    out = np.full(len(bags), np.nan)
    for i, b in enumerate(bags):
        y = labels[b]
        if 0 < y.sum() < len(y):
            out[i] = roc_auc_score(y, scores[b])
    return out


def _pooled(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], bags) -> float:
    y = np.concatenate([labels[b] for b in bags])
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.concatenate([scores[b] for b in bags])))


def paired_witness(
    a: FoldScores,
    b: FoldScores,
    labels: dict[str, np.ndarray],
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, float]:
    """``a`` minus ``b`` on the folds and test bags both scored: within-bag and pooled
    witness AUC with bootstrap 95% CIs (bags resampled within each fold, the same draw
    for both). Keys: ``within_a``, ``within_b``, ``within_delta``, ``within_low``,
    ``within_high``, and the same for ``pooled``."""
    rng = np.random.default_rng(seed)
    folds = [f for f in a if f in b]
    per_fold = []
    for f in folds:
        bags = [x for x in a[f] if x in b[f] and x in labels]
        auc_a, auc_b = _bag_aucs(a[f], labels, bags), _bag_aucs(b[f], labels, bags)
        per_fold.append((bags, auc_a, auc_b))

    def stats(draws: list[np.ndarray]) -> tuple[float, float, float, float]:
        wa, wb, pa, pb = [], [], [], []
        for (bags, auc_a, auc_b), idx, f in zip(per_fold, draws, folds):
            ok = idx[~np.isnan(auc_a[idx])]
            wa.append(np.mean(auc_a[ok]) if len(ok) else np.nan)
            wb.append(np.mean(auc_b[ok]) if len(ok) else np.nan)
            drawn = [bags[i] for i in idx]
            pa.append(_pooled(a[f], labels, drawn)), pb.append(_pooled(b[f], labels, drawn))
        return tuple(float(np.nanmean(v)) for v in (wa, wb, pa, pb))

    point = stats([np.arange(len(p[0])) for p in per_fold])
    boots = np.array(
        [stats([rng.integers(0, len(p[0]), len(p[0])) for p in per_fold]) for _ in range(n_boot)]
    )
    out = {}
    for name, (i, j) in {"within": (0, 1), "pooled": (2, 3)}.items():
        delta = boots[:, i] - boots[:, j]
        low, high = np.nanpercentile(delta, [2.5, 97.5])
        out.update(
            {
                f"{name}_a": point[i],
                f"{name}_b": point[j],
                f"{name}_delta": point[i] - point[j],
                f"{name}_low": low,
                f"{name}_high": high,
            }
        )
    return out


def instance_labels(root: Path) -> dict[str, np.ndarray]:
    """Every bag's 0/1 instance labels of a generated cohort (``features/<bag>.h5``)."""
    out = {}
    for path in sorted((root / "features").glob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.stem] = f["instance_label"][()].astype(int)
    return out

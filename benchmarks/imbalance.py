"""Rare classes: how cross-entropy, class weights, balanced batches, the focal loss and SC-MIL
fare when the minority class is made rare in the training folds only.

For each cohort the folds are made once (patient-level, stratified). At each ratio 1:r the
minority class (the positive, last class) is subsampled, whole patients at a time, in every
fold's training and validation partitions to ``floor(majority / r)`` patients; the test folds
are never touched, so every method and ratio is scored on the same bags. Each (ratio, method)
is an ordinary run folder (the study resumes). The pooled out-of-fold predictions give the
minority class's AUPRC, balanced accuracy and macro F1 (at the most probable class), each with
its patient-bootstrap CI, and the paired patient-bootstrap difference against cross-entropy at
the same ratio (:func:`mil.tasks.paired.paired_metric_difference`). With ``--seeds N`` each
setting runs N times (seed ``s`` draws the subsample and trains with ``train.seed: s``); the
test bags are the same in every seed, so a metric is the mean over seeds and each bootstrap
resample scores every seed's predictions of the same patients.

Cohorts: ``real`` (../shared/datasets/real/hipt4k_tcga_nsclc: LUAD positive, LUSC negative) and
``synthetic`` (the built-in classification cohort, small lesions). Writes
``<out>/imbalance.csv`` and prints a markdown table::

    python benchmarks/imbalance.py --out results/imbalance --cohorts real,synthetic \\
        --ratios 1,5,20 --folds 3 --seeds 1
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "datasets" / "real" / "hipt4k_tcga_nsclc"
#: the compared settings: config changes against plain cross-entropy
METHODS = {
    "ce": {},
    "class_weights": {"task.class_weights": "balanced"},
    "balanced": {"train.sampler": "balanced"},
    "focal": {"task.loss": "focal", "task.gamma": 2.0},
    "supcon": {"task.supcon": {"weight": 1.0, "temperature": 0.1, "schedule": "parabolic"}},
    "supcon_balanced": {"task.supcon": {"weight": 1.0}, "train.sampler": "balanced"},
}
#: ``--smoke``: the tiny synthetic cohort, two ratios, two epochs, two methods
SMOKE = {
    "cohorts": ["synthetic"],
    "ratios": [1, 5],
    "methods": ["ce", "balanced"],
    "folds": 2,
}


def base_config(cohort: str, out: Path, folds: int, smoke: bool) -> dict:
    """The cohort's plain config (cross-entropy on shuffled batches, the default model and
    budget, one thread): ``train.sampler: random`` is set, since ``auto`` follows this study."""
    train = {"threads": 1, "faithfulness": False, "seed": 0, "sampler": "random"}
    if cohort == "real":
        data = {
            "csv": str(REAL / "cohort.csv"),
            "features": str(REAL / "features"),
            "patient_col": "case_id",
            "label_col": "label_name",
            "classes": ["LUSC", "LUAD"],
        }
    else:
        from mil.data.synthetic import SMALL_LESION_WITNESS_FRACTION, write_synthetic_cohort

        csv, feats = out / "synthetic" / "cohort.csv", out / "synthetic" / "features"
        if not csv.exists():
            n = 40 if smoke else 300
            write_synthetic_cohort(
                "classification",
                csv,
                feats,
                seed=0,
                n_patients=n,
                n_two_slides=0,
                dim=16 if smoke else 32,
                min_tiles=20,
                max_tiles=60 if smoke else 120,
                shift_norm=6.0 if smoke else 3.0,
                witness_fraction=SMALL_LESION_WITNESS_FRACTION,
            )
        data = {"csv": str(csv), "features": str(feats), "patient_col": "case_id"}
    if smoke:
        train.update(epochs=2, batch_size=8, patience=None)
    return {
        "name": f"imbalance_{cohort}",
        "task": {"type": "classification"},
        "data": data,
        "splits": {
            "dir": str(out / cohort / "splits"),
            "folds": folds,
            "val_fraction": 0.15,
            "seed": 0,
        },
        "model": {"name": "abmil_additive", "hidden_dim": 16}
        if smoke
        else {"name": "abmil_additive"},
        "train": train,
    }


def subsampled_splits(raw: dict, ratio: int, seed: int, where: Path) -> Path:
    """Split files at ``1:ratio``: in each fold's train and val partitions the positive (last)
    class cut to ``floor(negatives / ratio)`` patients (whole patients; seeded); test kept."""
    from mil.config import config_from_dict
    from mil.io import write_csv
    from mil.splits import write_splits
    from mil.splits.folds import Split
    from mil.train.experiment import Experiment

    target = where / f"splits_r{ratio}_s{seed}"
    if (target / "counts.csv").is_file():
        return target
    exp = Experiment(config_from_dict(raw), where / "probe", progress=False)
    slides = exp.cohort.slides.set_index("slide_id")
    minority = len(exp.cohort.classes) - 1
    rng = np.random.default_rng(seed)
    out, counts = [], []
    for sp in exp.splits:
        parts = {}
        for part in ("train", "val"):
            s = slides.loc[sp.part(part)]
            pos = s["label"].to_numpy(int) == minority
            patients = sorted(s.loc[pos, "patient_id"].unique())
            n_neg = s.loc[~pos, "patient_id"].nunique()
            keep = set(rng.permutation(patients)[: max(1, math.floor(n_neg / ratio))])
            parts[part] = [
                i for i, p, y in zip(s.index, s["patient_id"], pos) if not y or p in keep
            ]
        out.append(Split(sp.fold, parts["train"], parts["val"], list(sp.test), sp.repeat))
        y = slides.loc[parts["train"], "label"].to_numpy(int)
        counts.append(
            {
                "cohort": where.name,
                "ratio": ratio,
                "seed": seed,
                "fold": sp.name,
                "n_train_minority": int((y == minority).sum()),
                "n_train_majority": int((y != minority).sum()),
                "n_test": len(sp.test),
            }
        )
    write_splits(target, out, exp.cohort)
    write_csv(target / "counts.csv", pd.DataFrame(counts))
    return target


def run_method(raw: dict, splits: Path, method: str, run_dir: Path, seed: int) -> Path:
    """One (ratio, method) cross-validation on ``splits``: an ordinary run folder."""
    from mil.config import config_from_dict, derive
    from mil.train.runner import run_cv

    changes = {
        **METHODS[method],
        "splits.dir": str(splits),
        "train.seed": seed,
        "name": run_dir.name,
    }
    cfg = derive(config_from_dict(raw), changes, source=f"imbalance {method}")
    return run_cv(cfg, run_dir, progress=False, log=lambda *a: None, n_boot=10)


def pooled(run_dir: Path) -> pd.DataFrame:
    """A run's out-of-fold test predictions, every fold (with its ``fold_dir``)."""
    from mil.results import RunFolder

    folder = RunFolder(run_dir)
    parts = [folder.predictions(f).assign(fold_dir=f"fold_{f}") for f in folder.finished_folds()]
    return pd.concat(parts, ignore_index=True)


def _ap(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y == p.shape[1] - 1, p[:, -1]))


def _bacc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y, p.argmax(1)))


def _f1(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    labels = np.arange(p.shape[1])
    return float(f1_score(y, p.argmax(1), average="macro", labels=labels, zero_division=0))


#: each metric alone, as :func:`mil.metrics.classification_metrics` computes it (scikit-learn):
#: a task's ``metric_value`` computes them all, 30 ms a resample on this cohort
SCORERS = {"auprc": _ap, "balanced_accuracy": _bacc, "f1": _f1}


def compare(
    y: np.ndarray,
    pa: list[np.ndarray],
    pb: list[np.ndarray],
    groups: np.ndarray,
    n_boot: int,
) -> dict[str, float]:
    """Each metric of probabilities ``pa`` with its CI, and ``pa``'s minus ``pb``'s with its CI
    (labels ``y``; rows resampled by ``groups``, both sides together). ``pa`` and ``pb`` hold
    one array per seed, on the same rows: a metric is the mean over seeds, so each resample
    scores every seed's predictions of the same patients."""
    from mil.metrics import paired_difference

    def mean(f, r, parts):
        return float(np.mean([f(y[r], p[r]) for p in parts]))

    out = {}
    for m, f in SCORERS.items():
        one = paired_difference(lambda r, f=f: mean(f, r, pa), len(y), n_boot, groups=groups)
        d = paired_difference(
            lambda r, f=f: mean(f, r, pa) - mean(f, r, pb), len(y), n_boot, groups=groups
        )
        out.update({m: one["delta"], f"{m}_lo": one["ci_low"], f"{m}_hi": one["ci_high"]})
        out.update(
            {f"diff_{m}": d["delta"], f"diff_{m}_lo": d["ci_low"], f"diff_{m}_hi": d["ci_high"]}
        )
    return out


def score(runs: dict[tuple[int, str], list[Path]], n_boot: int) -> pd.DataFrame:
    """One row per (ratio, method), its runs one per seed: each metric (the mean over seeds)
    with its patient-bootstrap CI, and its paired difference against cross-entropy at the same
    ratio and seeds with CI (whole patients resampled, every predictor together:
    :func:`mil.metrics.paired_difference`, as :func:`mil.tasks.paired.paired_metric_difference`
    uses it, on the one metric). Every seed's test bags are the same (only the training folds
    are subsampled), so the seeds are scored on the same resampled patients."""
    from mil.tasks.paired import PAIR_KEY
    from mil.train.summary import run_task

    key = list(PAIR_KEY)
    rows = []
    for (ratio, method), run_dirs in runs.items():
        task = run_task(run_dirs[0])
        a = [pooled(d).sort_values(key, ignore_index=True) for d in run_dirs]
        b = [pooled(d).sort_values(key, ignore_index=True) for d in runs[(ratio, "ce")]]
        for d, frame in zip([*run_dirs, *runs[(ratio, "ce")]], [*a, *b]):
            if not frame[key].equals(a[0][key]):
                raise ValueError(f"{d}: not the test bags of {run_dirs[0]}")
        y, groups = a[0]["label_index"].to_numpy(int), a[0]["patient_id"].astype(str).to_numpy()
        pa, pb = (
            [f[[f"prob_{c}" for c in task.classes]].to_numpy(float) for f in x] for x in (a, b)
        )
        row = {
            "ratio": ratio,
            "method": method,
            "seeds": len(run_dirs),
            "n_test": len(a[0]),
            "auc": float(np.mean([task.metric_value(f, "auc") for f in a])),
        }
        row.update(compare(y, pa, pb, groups, n_boot))
        rows.append(row)
    return pd.DataFrame(rows)


def fold_counts(out: Path) -> pd.DataFrame:
    """Per cohort, ratio, seed and fold: training minority and majority slides, test slides
    (the ``counts.csv`` :func:`subsampled_splits` writes beside its split files)."""
    return pd.concat(
        [pd.read_csv(p) for p in sorted(out.glob("*/splits_r*/counts.csv"))], ignore_index=True
    )


def markdown(table: pd.DataFrame) -> str:
    """The study's table: value [CI] and the paired difference against CE [CI] per metric."""
    head = "| cohort | ratio | method | seeds | AUC | minority AUPRC | Δ vs CE | balanced acc. | Δ vs CE | macro F1 | Δ vs CE |"
    lines = [head, "|" + "---|" * 11]
    for _, r in table.iterrows():
        cells = [r["cohort"], f"1:{r['ratio']}", r["method"], str(r["seeds"]), f"{r['auc']:.3f}"]
        for m in SCORERS:
            cells.append(f"{r[m]:.3f} [{r[f'{m}_lo']:.3f}, {r[f'{m}_hi']:.3f}]")
            cells.append(
                "–"
                if r["method"] == "ce"
                else f"{r[f'diff_{m}']:+.3f} [{r[f'diff_{m}_lo']:+.3f}, {r[f'diff_{m}_hi']:+.3f}]"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "imbalance")
    p.add_argument("--cohorts", default="real,synthetic")
    p.add_argument("--ratios", default="1,5,10,20")
    p.add_argument("--methods", default="ce,class_weights,balanced,focal,supcon")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--seeds", type=int, default=1, help="training seeds per setting (0..N-1)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    cohorts, ratios = a.cohorts.split(","), [int(r) for r in a.ratios.split(",")]
    methods, folds, n_boot = a.methods.split(","), a.folds, a.n_boot
    if a.smoke:
        cohorts, ratios, methods, folds, n_boot = (
            *(SMOKE[k] for k in ("cohorts", "ratios", "methods", "folds")),
            50,
        )
    tables = []
    for cohort in cohorts:
        raw = base_config(cohort, a.out, folds, a.smoke)
        runs: dict[tuple[int, str], list[Path]] = {}
        for seed in range(a.seeds):
            for ratio in ratios:
                splits = subsampled_splits(raw, ratio, seed, a.out / cohort)
                for method in methods:
                    run_dir = a.out / cohort / f"r{ratio}" / f"{method}_s{seed}"
                    run = run_method(raw, splits, method, run_dir, seed)
                    runs.setdefault((ratio, method), []).append(run)
        tables.append(score(runs, n_boot).assign(cohort=cohort))
    table = pd.concat(tables, ignore_index=True)
    from mil.io import write_csv

    write_csv(a.out / "imbalance.csv", table)
    print(markdown(table))
    return table


if __name__ == "__main__":
    main()

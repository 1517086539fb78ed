"""Localization benchmark: which instance score finds the instances that make a bag positive?

Every aggregator of the registry (the tabular fusion models aside) runs with its
defaults through the same patient-level folds of cohorts with instance labels, and
every score kind it saves (``mil.models.base.SCORE_KINDS``; ``main`` is the
model's own instance score, attention logits for attention models) is compared
with the instance labels of the test bags:

- ``within``: mean ROC AUC of the instance scores within each positive test bag
  (``witness_auc_<kind>`` of the fold's ``metrics.json``);
- ``pooled``: ROC AUC of all test instances ranked together, for kinds comparable
  across bags (``witness_auc_pooled_<kind>``);
- ``bag AUC``: the run's slide-level AUC (mean over folds).

Beside each cohort: an instance-level logistic regression (scikit-learn, features
standardised on the training fold), fitted on the training-fold instances with
their bag's label (Ilse et al. 2018's mi-SVM-style baseline), scored the same way.

Cohorts (generated once under ``<out>/cohorts``): MNIST-bags-style bags of
scikit-learn's bundled 8x8 digits (positive bags hold 1..k nines; Ilse et al.
2018) at two bag sizes and witness rates (the generator of
``benchmarks/cohort_zoo.py``), the demo's spatial-cluster classification cohort
(``mil.data.synthetic``), and a distractor cohort: every bag, negative or
positive, holds a few unusual instances (far out along one direction) that say
nothing of the label; positive bags also hold witnesses shifted along another.

    python benchmarks/localization.py [--out results/localization] [--jobs 2] [--folds 3]
        [--only digits-b10,distractors] [--models abmil,abmil_additive]

Runs resume (each is an ordinary ``mil`` run folder). Writes ``localization.csv`` and
``localization.md`` under ``--out`` and prints the table. ``--faithfulness`` then
re-predicts the test bags of finished runs (no training) for deletion / insertion
areas (``mil.explain.faithfulness``) per score kind: ``faithfulness.csv``.
``--smoke`` runs every step (both tables) on one 40-bag cohort with two models for
two epochs, in seconds (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cohort_zoo import _write_bags, digits_cohort  # noqa: E402  (the zoo's generators)
from jobs import run_jobs  # noqa: E402


def distractor_cohort(root: Path, n_bags: int, sizes: tuple[int, int], dim: int, seed: int) -> None:
    """N(0, I) instances; 5-10% of every bag's instances are distractors (shifted by 5 along
    one direction, in negative and positive bags alike); positive bags hold 5-15%
    witnesses shifted by 2 along an orthogonal direction (the only label signal)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
    witness_dir, distractor_dir = basis[:, 0], basis[:, 1]
    bags, labels, target = [], [], []
    for i in range(n_bags):
        n = int(rng.integers(sizes[0], sizes[1] + 1))
        x, lab = rng.normal(size=(n, dim)), np.zeros(n, bool)
        order = rng.permutation(n)
        n_dis = max(1, int(round(rng.uniform(0.05, 0.10) * n)))
        x[order[:n_dis]] += 5.0 * distractor_dir
        if i % 2:
            k = max(1, int(round(rng.uniform(0.05, 0.15) * n)))
            lab[order[n_dis : n_dis + k]] = True
            x[lab] += 2.0 * witness_dir
        bags.append(x), labels.append(lab), target.append("positive" if i % 2 else "negative")
    _write_bags(root, bags, labels, pd.DataFrame({"label": target}))


def demo_cohort(root: Path, n_patients: int = 60) -> None:
    from mil.data.synthetic import SMALL_LESION_WITNESS_FRACTION, write_synthetic_cohort

    write_synthetic_cohort(
        "classification",
        root / "cohort.csv",
        root / "features",
        n_patients=n_patients,
        n_two_slides=0,
        dim=64,
        min_tiles=40,
        max_tiles=200,
        seed=7,
        witness_fraction=SMALL_LESION_WITNESS_FRACTION,
    )


#: name -> generator writing cohort.csv and features/ under a folder
COHORTS = {
    "digits-b10": lambda r, n: digits_cohort(r, n, 10, 2, 3, 1),  # 1-3 nines of ~10: 10-30%
    "digits-b50": lambda r, n: digits_cohort(r, n, 50, 10, 2, 2),  # 1-2 nines of ~50: 2-4%
    "demo": lambda r, n: demo_cohort(r, max(1, n * 3 // 4)),  # patients (a few hold two slides)
    "distractors": lambda r, n: distractor_cohort(r, n, (30, 80), 32, 3),
}
#: bags per cohort unless ``--bags`` says otherwise (the demo cohort: 60 patients)
N_BAGS = 80
#: ``--smoke``: every step on a tiny cohort, a fixed two-epoch budget, in this process
SMOKE = {
    "names": ["distractors"],
    "models": ["abmil", "abmil_additive"],
    "folds": 2,
    "bags": 40,
    "train": {"epochs": 2, "patience": None},
    "n_boot": 20,
    "jobs": 1,
}


def make_cohort(name: str, out: Path, n_bags: int = N_BAGS) -> dict:
    root = out / "cohorts" / name
    if not (root / "cohort.csv").exists():
        COHORTS[name](root, n_bags)
    return {
        "csv": str(root / "cohort.csv"),
        "features": str(root / "features"),
        "patient_col": "case_id",
    }


def slide_models() -> list[str]:
    from mil.models import available, get

    return [m for m in available() if not getattr(get(m), "uses_tabular", False)]


def config(name: str, model: str, out: Path, folds: int, train: dict | None = None) -> dict:
    """The run's config: the model's defaults; ``train`` keys (the smoke run's budget) if given."""
    data = make_cohort(name, out)
    if model in ("meanpool_linear", "bow_linear"):  # they standardise their pooled vectors
        data = {**data, "standardize": False}
    raw = {
        "name": f"{name}-{model}",
        "task": {"type": "classification"},
        "data": data,
        "model": {"name": model},
        "splits": {
            "dir": str(out / "splits" / name),
            "folds": folds,
            "val_fraction": 0.15,
            "seed": 0,
        },
    }
    return {**raw, "train": train} if train else raw


def run_one(args: tuple[str, str, str, int, dict | None]) -> list[dict]:
    """One model on one cohort: a row per score kind (mean over folds)."""
    import torch

    from mil.config import config_from_dict
    from mil.results import RunFolder
    from mil.train.runner import run_cv

    name, model, out, folds, train = args
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    folder = Path(out) / "runs" / name / model
    run_cv(
        config_from_dict(config(name, model, Path(out), folds, train)),
        folder,
        progress=False,
        log=lambda *a: None,
        n_boot=50,
    )
    records = list(RunFolder(folder).records().values())
    metrics = [r["metrics"] for r in records]
    kinds = sorted(
        {
            k[len("witness_auc_") :]
            for m in metrics
            for k in m
            if k.startswith("witness_auc_") and not k.startswith("witness_auc_pooled_")
        }
    )
    rows = []
    for kind in ["main", *kinds]:
        key = "witness_auc" if kind == "main" else f"witness_auc_{kind}"
        pooled = f"witness_auc_pooled_{kind}"
        rows.append(
            {
                "cohort": name,
                "model": model,
                "kind": kind,
                "within": _mean(m.get(key) for m in metrics),
                "pooled": _mean(m.get(pooled) for m in metrics),
                "bag_auc": _mean(m.get("auc") for m in metrics),
            }
        )
    print(
        f"{name} {model}: " + ", ".join(f"{r['kind']} {r['within']:.3f}" for r in rows), flush=True
    )
    return rows


#: the class-specific kinds whose deletion / insertion curves are measured (beside ``main``)
CLASS_KINDS = ("contribution", "instance_logits", "attention_x_logit")
#: models of the deletion / insertion table (inference on every fold's test bags, per kind)
FAITHFULNESS_MODELS = ("abmil", "abmil_additive", "clam_sb", "dsmil", "mean")


def faithfulness_table(out: Path, names: list[str], models: list[str]) -> pd.DataFrame:
    rows = []
    for name in names:
        for model in models:
            folder = out / "runs" / name / model
            if (folder / "summary.json").is_file():
                areas = deletion_insertion(folder)
                kinds = [k[len("deletion_") :] for k in areas if k.startswith("deletion_")]
                rows += [
                    {
                        "cohort": name,
                        "model": model,
                        "kind": k,
                        "deletion": areas[f"deletion_{k}"],
                        "insertion": areas[f"insertion_{k}"],
                    }
                    for k in kinds
                ]
                print(
                    f"{name} {model}: "
                    + ", ".join(f"{k} {areas[f'deletion_{k}']:.3f}" for k in kinds),
                    flush=True,
                )
    return pd.DataFrame(rows)


def deletion_insertion(folder: Path) -> dict[str, float]:
    """Deletion / insertion areas (``mil.explain.faithfulness``) of a finished run's folds, mean
    over folds: each fold's saved model re-predicts its test bags
    (:meth:`mil.Run.faithfulness`, through ``mil.train.scoring.score_fold``: the fold's own
    preprocessing applied), whole and with their top-scored instances removed or kept, for its
    main score and the kinds of :data:`CLASS_KINDS` (each read at the bag's predicted class).
    A graph model's graph is built afresh on the instances kept."""
    from mil.run import Run

    run = Run(folder)
    per_fold = [run.faithfulness(fold, kinds=CLASS_KINDS) for fold in run.folds]
    return {k: _mean(f.get(k) for f in per_fold) for k in per_fold[0]} if per_fold else {}


def _mean(values) -> float:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else float("nan")


def instance_lr(name: str, out: Path, folds: int) -> tuple[dict, dict]:
    """The instance-level logistic regression on the run's own split files: its table row,
    and its scores per fold and test bag (``localization_stats.FoldScores``)."""
    import h5py
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mil.metrics.instances import pooled_witness_auc, witness_auc

    root = out / "cohorts" / name
    cohort = pd.read_csv(root / "cohort.csv", dtype={"slide_id": str})
    label = dict(zip(cohort["slide_id"], cohort["label"] == "positive"))
    feats, inst = {}, {}
    for sid in cohort["slide_id"]:
        with h5py.File(root / "features" / f"{sid}.h5", "r") as f:
            feats[sid], inst[sid] = f["features"][()].astype(np.float64), f["instance_label"][()]
    within, pooled, fold_scores = [], [], {}
    for k in range(folds):
        split = pd.read_csv(out / "splits" / name / f"splits_{k}.csv", dtype=str)
        train = [s for s in pd.concat([split["train"], split["val"]]).dropna()]
        test = list(split["test"].dropna())
        x = np.concatenate([feats[s] for s in train])
        y = np.concatenate([np.full(len(feats[s]), label[s]) for s in train])
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
        scores = [clf.decision_function(feats[s]) for s in test]
        fold_scores[f"fold_{k}"] = dict(zip(test, scores))
        within.append(witness_auc(test, scores, np.array([label[s] for s in test]), inst.get))
        pooled.append(pooled_witness_auc(test, scores, inst.get))
    return {
        "cohort": name,
        "model": "instance_lr",
        "kind": "instance_logits",
        "within": _mean(within),
        "pooled": _mean(pooled),
        "bag_auc": float("nan"),
    }, fold_scores


def format_table(frame: pd.DataFrame) -> str:
    """One row per model and kind: within / pooled witness AUC per cohort, and bag AUC."""
    cohorts = list(dict.fromkeys(frame["cohort"]))
    head = (
        "| model | kind | " + " | ".join(f"{c}: within / pooled / bag AUC" for c in cohorts) + " |"
    )
    lines = [head, "|---|---|" + "---|" * len(cohorts)]
    f = frame.set_index(["model", "kind", "cohort"])
    for model, kind in dict.fromkeys(zip(frame["model"], frame["kind"])):
        cells = []
        for c in cohorts:
            if (model, kind, c) not in f.index:
                cells.append("")
                continue
            r = f.loc[(model, kind, c)]
            cells.append(
                " / ".join(
                    "–" if pd.isna(r[k]) else f"{r[k]:.3f}" for k in ("within", "pooled", "bag_auc")
                )
            )
        lines.append(f"| {model} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def benchmark(
    out: Path,
    names: list[str],
    models: list[str],
    folds: int = 3,
    bags: int = N_BAGS,
    jobs: int = 2,
    train: dict | None = None,
    n_boot: int = 500,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every model on every cohort, and the instance-level LR: ``localization.csv``/``.md``, and
    the acceptance table (``acceptance.csv``/``.md``) with ``n_boot`` paired resamples."""
    out.mkdir(parents=True, exist_ok=True)
    for n in names:  # generate in this process, once
        make_cohort(n, out, bags)
    todo = [(n, m, str(out), folds, train) for n in names for m in models]
    rows = [r for part in run_jobs(run_one, jobs, todo) for r in part]
    lr = {n: instance_lr(n, out, folds) for n in names}
    frame = pd.DataFrame(rows + [row for row, _ in lr.values()])
    frame.to_csv(out / "localization.csv", index=False)
    table = format_table(frame)
    (out / "localization.md").write_text(table + "\n")
    print(table)
    accept = acceptance(out, names, models, {n: s for n, (_, s) in lr.items()}, n_boot)
    accept.to_csv(out / "acceptance.csv", index=False)
    (out / "acceptance.md").write_text(format_acceptance(accept) + "\n")
    print(format_acceptance(accept))
    return frame, accept


def write_faithfulness(out: Path, names: list[str], models: list[str]) -> pd.DataFrame:
    """:func:`faithfulness_table` of the finished runs, written to ``faithfulness.csv``."""
    frame = faithfulness_table(out, names, models)
    frame.to_csv(out / "faithfulness.csv", index=False)
    print(frame.round(3).to_string(index=False) if len(frame) else "no finished runs")
    return frame


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/localization")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument(
        "--bags", type=int, default=N_BAGS, help="bags per cohort (demo: 3/4 as patients)"
    )
    p.add_argument("--only", help="comma-separated cohort names")
    p.add_argument("--models", help="comma-separated model names (default: every slide model)")
    p.add_argument(
        "--faithfulness",
        action="store_true",
        help="instead: deletion / insertion areas of the finished runs of FAITHFULNESS_MODELS",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: "
        + ", ".join(f"{k} {v}" for k, v in SMOKE.items())
        + "; then --faithfulness",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.smoke:
        benchmark(out, **SMOKE)
        write_faithfulness(out, SMOKE["names"], SMOKE["models"])
        return
    names = args.only.split(",") if args.only else list(COHORTS)
    models = args.models.split(",") if args.models else slide_models()
    out.mkdir(parents=True, exist_ok=True)
    if args.faithfulness:
        write_faithfulness(
            out, names, [m for m in models if m in FAITHFULNESS_MODELS or args.models]
        )
        return
    (out / "command.json").write_text(
        json.dumps(sys.argv if argv is None else [sys.argv[0], *argv])
    )
    benchmark(out, names, models, args.folds, args.bags, args.jobs)


def acceptance(
    out: Path, names: list[str], models: list[str], lr_scores: dict, n_boot: int = 500
) -> pd.DataFrame:
    """Per cohort and model: its default heatmap score minus the instance-level LR (within
    positive bags and pooled, paired bootstrap over test bags), and its bag AUC minus
    ``abmil``'s (paired over patients): issue 22's acceptance, with CIs."""
    import h5py
    from localization_stats import instance_labels, paired_witness, read_fold_scores

    from mil.compare import paired_differences
    from mil.tasks import ClassificationTask

    rows = []
    for name in names:
        labels = instance_labels(out / "cohorts" / name)
        ref = out / "runs" / name / "abmil"
        for model in models:
            folder = out / "runs" / name / model
            first = next(iter(sorted(folder.glob("fold_*/attention.h5"))), None)
            if not (folder / "summary.json").is_file() or first is None:
                continue
            with h5py.File(first, "r") as f:
                g = next(iter(f.values()))
                kind = next(
                    k
                    for k in (*ClassificationTask.score_order, "main")
                    if k == "main" or f"scores_{k}" in g
                )
            row = {"cohort": name, "model": model, "kind": kind}
            row.update(
                paired_witness(read_fold_scores(folder, kind), lr_scores[name], labels, n_boot)
            )
            if (ref / "summary.json").is_file():
                d = paired_differences({model: folder, "abmil": ref}, "abmil", n_boot=n_boot)
                d = d.set_index("model").loc[model]
                row.update(
                    bag_auc=d["value"],
                    bag_delta=d["delta"],
                    bag_low=d["delta_ci_low"],
                    bag_high=d["delta_ci_high"],
                )
            rows.append(row)
    return pd.DataFrame(rows)


def format_acceptance(frame: pd.DataFrame) -> str:
    """Markdown: one row per cohort and model, differences with their 95% CIs."""

    def cell(r, name: str) -> str:
        if f"{name}_delta" not in r or pd.isna(r[f"{name}_delta"]):
            return "–"
        return f"{r[f'{name}_delta']:+.3f} [{r[f'{name}_low']:+.3f}, {r[f'{name}_high']:+.3f}]"

    lines = [
        "| cohort | model (default score) | within: model / LR | − LR [95% CI] | pooled: model / LR "
        "| − LR [95% CI] | bag AUC | − abmil [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in frame.iterrows():
        bag = "–" if pd.isna(r.get("bag_auc", np.nan)) else f"{r['bag_auc']:.3f}"
        lines.append(
            f"| {r['cohort']} | {r['model']} ({r['kind']}) | {r['within_a']:.3f} / {r['within_b']:.3f} "
            f"| {cell(r, 'within')} | {r['pooled_a']:.3f} / {r['pooled_b']:.3f} | {cell(r, 'pooled')} "
            f"| {bag} | {cell(r, 'bag')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

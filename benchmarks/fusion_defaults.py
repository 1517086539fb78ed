"""Multimodal survival: the fusion models at the library defaults against the linear fusion
baseline and against the demo's hand-set budget, on the same folds (issue 31 item 4).

Two cohorts of the multimodal generator (:mod:`mil.data.synthetic_multimodal`: slides, an
omics table whose hazard is linear in two gene families, clinical covariates, 30% of the
patients without omics): ``demo`` (seed 2, the multimodal demo's cohort: a *selection* cohort,
the one the demo's budget was set on) and ``multimodal-surv`` (seed 5, the cohort zoo's
*confirmation* cohort). On each, 5 patient-level folds, every run an ordinary run folder:

- ``slides``: the defaults, no model key (the slide model averaged with ``meanpool_linear``;
  the tables unread);
- ``slides+tables``: the same with ``ensemble: [meanpool_linear, clinical_linear]`` (the slide
  model and both linear models averaged: a late fusion of risks);
- ``clinical_linear``, ``meanpool_linear``: the linear models alone (ridge Cox);
- ``linear_fusion``: ``meanpool_linear`` and ``clinical_linear`` averaged, each on its training
  scale, from the members of ``slides+tables`` (no run of its own): the linear fusion baseline;
- ``late_fusion``, ``mcat``, ``survpath``: the fusion models with the library's training defaults;
- ``<model>@demo``: the same models with the demo's hand-set budget (experiments/
  demo_multimodal.yaml: 25 epochs, no early stopping, batch 32, hidden 32, modality dropout).

Table: pooled Harrell's C of each, and each minus ``linear_fusion`` with a paired
patient-bootstrap 95% CI. Writes ``<out>/fusion.csv`` and ``fusion.md``::

    python benchmarks/fusion_defaults.py --out results/fusion [--jobs 2] [--only demo] [--ablate]
    python benchmarks/fusion_defaults.py --smoke --out /tmp/fusion_smoke      # seconds
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inner_selection import averaged, markdown, pooled  # noqa: E402
from jobs import run_jobs  # noqa: E402
from zoo_cohorts import multimodal_data  # noqa: E402

#: cohort -> (generator seed, role)
COHORTS = {"demo": (2, "selection"), "multimodal-surv": (5, "confirmation")}
FUSIONS = ("late_fusion", "mcat", "survpath")
#: the demo's hand-set model and training settings (experiments/demo_multimodal.yaml)
DEMO_MODEL = {"hidden_dim": 32, "modality_dropout": 0.3}
DEMO_TRAIN = {
    "epochs": 25,
    "batch_size": 32,
    "lr": 1.0e-3,
    "weight_decay": 1.0e-4,
    "patience": None,
}
LINEAR_FUSION = ("meanpool_linear", "clinical_linear")


def runs(smoke: bool, ablate: bool = False) -> dict[str, dict]:
    """Run label -> the keys it sets on the cohort's plain config (``ablate``: also each
    attention fusion with the demo's model keys alone, ``@demo-model``, and its training keys
    alone, ``@demo-train``)."""
    out: dict[str, dict] = {
        "slides": {},
        "slides+tables": {"ensemble": list(LINEAR_FUSION)},
        "clinical_linear": {"model": {"name": "clinical_linear"}},
        "meanpool_linear": {"model": {"name": "meanpool_linear"}},
    }
    for m in FUSIONS[:1] if smoke else FUSIONS:
        out[m] = {"model": {"name": m}}
        out[f"{m}@demo"] = {"model": {"name": m, **DEMO_MODEL}, "train": dict(DEMO_TRAIN)}
    for m in ("mcat", "survpath") if ablate else ():
        out[f"{m}@demo-model"] = {"model": {"name": m, **DEMO_MODEL}}
        out[f"{m}@demo-train"] = {"model": {"name": m}, "train": dict(DEMO_TRAIN)}
    if smoke:  # seconds: every run two epochs
        for keys in out.values():
            keys["train"] = {**keys.get("train", {}), "epochs": 2, "patience": None}
    return out


def cohort_config(name: str, out: Path, smoke: bool) -> dict:
    """The cohort's plain config: task, data (written on first use), splits; no model keys."""
    from mil.data.synthetic_multimodal import write_multimodal_cohort

    root = out / "cohorts" / name
    if not (root / "cohort.csv").is_file():
        kw = {"n_patients": 48, "min_tiles": 10, "max_tiles": 30, "dim": 16} if smoke else {}
        write_multimodal_cohort(root, seed=COHORTS[name][0], **kw)
    return {
        "name": name,
        "task": {"type": "survival"},
        "data": {
            "csv": str(root / "cohort.csv"),
            "features": str(root / "features"),
            "patient_col": "case_id",
            "bag_level": "patient",
            **multimodal_data(root),  # the zoo's: its survival columns and tables
        },
        "splits": {"dir": str(out / name / "splits"), "folds": 2 if smoke else 5, "seed": 0},
        "train": {"threads": 1},
    }


def train_one(job: tuple[str, str, str, bool]) -> str:
    """One run (a spawned worker's job): cohort, label, output root, smoke."""
    import torch

    from mil.config import config_from_dict
    from mil.train.runner import run_cv

    name, label, out, smoke = job
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    raw = cohort_config(name, Path(out), smoke)
    keys = runs(smoke, ablate=True)[label]
    raw.update({k: v for k, v in keys.items() if k != "train"})
    raw["train"] = {**raw["train"], **keys.get("train", {})}
    raw["name"] = label.replace("+", "_").replace("@", "_")
    folder = Path(out) / name / raw["name"]
    run_cv(config_from_dict(raw), folder, progress=False, log=lambda *a: None, n_boot=10)
    return str(folder)


def linear_fusion(folder: Path, task) -> pd.DataFrame:
    """The out-of-fold predictions of ``LINEAR_FUSION``'s members of run ``folder`` averaged as
    a run averages its members (each on its training scale, ``members.json``)."""
    from mil.results import RunFolder

    run = RunFolder(folder)
    return pooled(run, task, lambda f: averaged(run, task, f, LINEAR_FUSION))


def score(name: str, folders: dict[str, Path], n_boot: int) -> list[dict]:
    """Each run's pooled C and its difference to ``linear_fusion`` (paired patient bootstrap)."""
    from mil.results import RunFolder
    from mil.tasks.paired import paired_metric_difference
    from mil.train.summary import run_task

    task = run_task(folders["slides"])
    preds = {label: RunFolder(f).all_predictions() for label, f in folders.items()}
    preds["linear_fusion"] = linear_fusion(folders["slides+tables"], task)
    ref = preds["linear_fusion"]
    rows = []
    for label, pred in preds.items():
        d = paired_metric_difference(task, pred, ref, n_boot=n_boot)
        rows.append(
            {
                "cohort": name,
                "role": COHORTS.get(name, (None, "smoke"))[1],
                "run": label,
                "c_index": round(d["value"], 4),
                "minus linear_fusion": f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/fusion")
    ap.add_argument("--only", help="comma-separated cohorts of " + ", ".join(COHORTS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="one tiny cohort, 2 folds, 2 epochs")
    ap.add_argument(
        "--ablate", action="store_true", help="also the demo's model or train keys alone"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    names = args.only.split(",") if args.only else list(COHORTS)
    n_boot = args.n_boot
    if args.smoke:
        names, n_boot = ["demo"], 20
    labels = list(runs(args.smoke, args.ablate))
    jobs = [(n, label, str(out), args.smoke) for n in names for label in labels]
    done = list(run_jobs(train_one, args.jobs, jobs))
    rows = []
    for name in names:
        folders = {j[1]: Path(f) for j, f in zip(jobs, done) if j[0] == name}
        rows += score(name, folders, n_boot)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "fusion.csv", index=False)
    (out / "fusion.md").write_text(markdown(table))
    print(markdown(table))
    return table


if __name__ == "__main__":
    main()

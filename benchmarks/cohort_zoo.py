"""A cohort zoo: do `mil`'s defaults train on cohorts nobody tuned them for?

Ten *selection* cohorts that differ in size (60-2,000 bags), bag size (8-10,000 instances),
feature dimension (30-1,536), feature scale (0-1 pixel values, raw, standardised,
foundation-model-like) and signal (few witnesses, a witness fraction, a spatial
cluster, survival by presence and by fraction of a tile kind), two of them real
(MUSK1 and Tiger from ``../shared/datasets/classic_mil``) and two MNIST-bags
style cohorts from scikit-learn's bundled 8x8 digits (Ilse et al. 2018's
protocol: a bag is positive when it holds a 9). The defaults were chosen on these. The
*confirmation* cohorts (``benchmarks/zoo_cohorts.py``: two real TCGA cohorts, patient-level
label noise, two slides per patient, pixel-like features, a fresh fractional survival draw,
multimodal survival) are measured only after a choice; zoo.csv's ``role`` column says which
is which, and zoo.md has a table per role, the selection cohorts first.

Every cohort runs through the same 5-fold patient-level splits with:

- ``defaults``: a config with only ``task``, ``data`` and ``splits`` (no
  ``train:`` or ``model:`` keys): what a new user gets;
- the linear baselines ``meanpool_linear`` and ``bow_linear`` (mil.models.linear);
- a small grid of training settings for the default model (``GRID``).

It writes ``<out>/zoo.csv`` and ``<out>/zoo.md``: per cohort and run the
headline metric (AUC or C-index) as mean ± sd over folds, the pooled
out-of-fold value minus the mean-pool baseline's with a paired patient-bootstrap
95% CI, and the folds that raised an under-training warning.

    python benchmarks/cohort_zoo.py [--out results/zoo] [--jobs 2] [--only digits-b10,musk1]
        [--role selection|confirmation|all]

Runs resume (each is an ordinary `mil` run folder); cohorts are generated once
under ``<out>/cohorts``. Run from the repository root (MUSK1/Tiger are read from
``../shared/datasets``). About an hour on two cores.

    python benchmarks/cohort_zoo.py --smoke [--out results/zoo_smoke]

runs the same steps on three tiny cohorts of the same generators (``SMOKE_COHORTS``: two
selection cohorts, one classification and one survival, and a label-noise confirmation
cohort) with 2 folds, 2 fixed epochs per run and the last grid point
only, in this process: seconds (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from jobs import run_jobs
from zoo_cohorts import COHORT_MODELS, CONFIRMATION, SMOKE_CONFIRMATION

ROOT = Path(__file__).resolve().parents[1]
CLASSIC = ROOT.parent / "shared" / "datasets" / "classic_mil"

#: training settings of the default model tried on every cohort (dotted config keys; every
#: budget key explicit, so that a point means the same whatever the defaults are). The
#: ``raw-`` points feed the features unpreprocessed (the defaults before whitening).
CONSTANT = {"train.min_steps": None, "train.schedule": "constant", "train.warmup_steps": 0}
STEPS = {"train.min_steps": 500, "train.schedule": "cosine", "train.warmup_steps": 50}
RAW = {"data.standardize": False}
GRID = {
    "raw-lr2e-4": {"train.lr": 2.0e-4, **CONSTANT, **RAW},  # the defaults until the zoo
    "raw-lr1e-3": {"train.lr": 1.0e-3, **CONSTANT, **RAW},
    "raw-lr1e-3-steps": {"train.lr": 1.0e-3, **STEPS, **RAW},  # the step budget, unwhitened
    "whiten-lr1e-3-steps": {
        "train.lr": 1.0e-3,
        **STEPS,
        "data.standardize": "whiten",
    },  # the defaults
}
BASELINES = ("meanpool_linear", "bow_linear")


# ---- cohorts -----------------------------------------------------------------------------


def _write_bags(root: Path, bags: list[np.ndarray], labels: list[np.ndarray], extra: pd.DataFrame):
    """One h5 per bag (``features``, grid ``coords``, ``instance_label``) and cohort.csv."""
    from mil.data.synthetic import write_slide

    (root / "features").mkdir(parents=True, exist_ok=True)
    ids = [f"B{i:04d}" for i in range(len(bags))]
    for bag_id, x, lab in zip(ids, bags, labels):
        side = int(np.ceil(np.sqrt(len(x))))
        coords = np.stack([np.arange(len(x)) % side, np.arange(len(x)) // side], 1) * 256.0
        write_slide(
            root / "features" / f"{bag_id}.h5", x.astype(np.float32), coords, lab.astype(np.uint8)
        )
    frame = pd.DataFrame({"case_id": [f"P{i:04d}" for i in range(len(bags))], "slide_id": ids})
    frame = pd.concat([frame, extra.reset_index(drop=True)], axis=1)
    frame.to_csv(root / "cohort.csv", index=False)


def digits_cohort(root: Path, n_bags: int, mean: int, sd: int, max_nines: int, seed: int) -> None:
    """MNIST-bags from sklearn's digits: 0-1 pixel vectors (64-d); positive bags hold 1 to
    ``max_nines`` nines, negative bags none."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    nines, others = np.flatnonzero(y == 9), np.flatnonzero(y != 9)
    bags, labels, target = [], [], []
    for i in range(n_bags):
        n = int(max(2, round(rng.normal(mean, sd))))
        idx = rng.choice(others, n, replace=True)
        lab = np.zeros(n, bool)
        if i % 2:
            k = int(rng.integers(1, min(max_nines, n) + 1))
            pos = rng.choice(n, k, replace=False)
            idx[pos], lab[pos] = rng.choice(nines, k, replace=True), True
        bags.append(x[idx]), labels.append(lab), target.append("positive" if i % 2 else "negative")
    _write_bags(root, bags, labels, pd.DataFrame({"label": target}))


def gaussian_cohort(
    root: Path,
    n_bags: int,
    sizes: tuple[int, int],
    dim: int,
    witness: tuple[float, float],
    shift: float,
    seed: int,
    foundation: bool = False,
    min_witnesses: int = 1,
) -> None:
    """Instances N(0, I) (or foundation-model-like: a 32-d latent through a random map plus
    a common offset, norms of tens); positive bags shift a fraction of their instances by
    ``shift`` along one direction. Bag sizes log-uniform in ``sizes``."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    if foundation:
        mix, offset = rng.normal(size=(32, dim)) * 0.6, rng.normal(size=dim) * 0.8
    bags, labels, target = [], [], []
    for i in range(n_bags):
        n = int(np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1] + 1))))
        if foundation:
            x = rng.normal(size=(n, 32)) @ mix + offset + rng.normal(size=(n, dim)) * 0.3
        else:
            x = rng.normal(size=(n, dim))
        lab = np.zeros(n, bool)
        if i % 2:
            k = max(min_witnesses, int(round(rng.uniform(*witness) * n)))
            lab[rng.choice(n, min(k, n), replace=False)] = True
            x[lab] += shift * direction
        bags.append(x), labels.append(lab), target.append("positive" if i % 2 else "negative")
    _write_bags(root, bags, labels, pd.DataFrame({"label": target}))


def presence_survival_cohort(
    root: Path, n: int, sizes: tuple[int, int], dim: int, seed: int
) -> None:
    """Survival by presence: 40% of patients hold a rare tile kind (1-5% of tiles, shifted
    by 3 along one direction); their log-hazard is +1.2; exponential times, uniform censoring."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    bags, labels, risk = [], [], []
    for _ in range(n):
        m = int(rng.integers(sizes[0], sizes[1] + 1))
        x, lab = rng.normal(size=(m, dim)), np.zeros(m, bool)
        present = rng.random() < 0.4
        if present:
            lab[rng.choice(m, max(1, int(rng.uniform(0.01, 0.05) * m)), replace=False)] = True
            x[lab] += 3.0 * direction
        bags.append(x), labels.append(lab), risk.append(1.2 * present)
    risk = np.array(risk) - np.mean(risk)
    t = rng.exponential(30.0 * np.exp(-risk))
    c = rng.uniform(10, 90, n)
    extra = pd.DataFrame(
        {"time": np.minimum(t, c), "event": (t <= c).astype(int), "true_risk": risk}
    )
    _write_bags(root, bags, labels, extra)


def _instances_data(name: str) -> dict:
    return {
        "instances": str(CLASSIC / f"{name}.csv.gz"),
        "bag_col": "bag_id",
        "label_col": "bag_label",
    }


#: name -> (task, generator or None, data keys); generators write cohort.csv and features/.
#: The selection cohorts: the defaults were chosen on them (docs/benchmarks.md)
SELECTION = {
    "large-bags-few": (
        "classification",
        lambda r: gaussian_cohort(r, 60, (1000, 10000), 30, (0.005, 0.02), 3.0, 4),
        {},
    ),
    "many-small": (
        "classification",
        lambda r: gaussian_cohort(r, 2000, (8, 16), 32, (0.0, 0.0), 2.5, 5),
        {},
    ),
    "digits-b10": ("classification", lambda r: digits_cohort(r, 200, 10, 2, 3, 1), {}),
    "digits-b100": ("classification", lambda r: digits_cohort(r, 120, 100, 20, 3, 2), {}),
    "musk1": ("classification", None, _instances_data("musk1")),
    "tiger": ("classification", None, _instances_data("tiger")),
    "fm1536-fraction": (
        "classification",
        lambda r: gaussian_cohort(r, 200, (20, 200), 1536, (0.05, 0.3), 6.0, 3, foundation=True),
        {},
    ),
    "spatial-cluster": ("classification", "synthetic", {}),
    "surv-fraction": ("survival", "synthetic", {}),
    "surv-presence": (
        "survival",
        lambda r: presence_survival_cohort(r, 150, (50, 300), 128, 6),
        {},
    ),
}
#: every cohort: the selection cohorts, then the confirmation cohorts (benchmarks/zoo_cohorts.py),
#: measured only after a choice and reported in a table of their own
COHORTS = {**SELECTION, **CONFIRMATION}
#: ``--smoke``: tiny cohorts of the same generators (not part of the zoo's table)
SMOKE_SELECTION = {
    "smoke-digits": ("classification", lambda r: digits_cohort(r, 40, 8, 2, 2, 1), {}),
    "smoke-presence": ("survival", lambda r: presence_survival_cohort(r, 40, (10, 30), 16, 6), {}),
}
SMOKE_COHORTS = {**SMOKE_SELECTION, **SMOKE_CONFIRMATION}
#: cohort -> ``selection`` or ``confirmation``
ROLES = {
    **dict.fromkeys([*SELECTION, *SMOKE_SELECTION], "selection"),
    **dict.fromkeys([*CONFIRMATION, *SMOKE_CONFIRMATION], "confirmation"),
}
#: ``--smoke``: every run for two fixed epochs (budget keys explicit, as the grid's are)
SMOKE_TRAIN = {"train.epochs": 2, "train.patience": None, **CONSTANT}


def make_cohort(name: str, out: Path) -> dict:
    """The cohort's ``data`` section (generating the cohort once)."""
    task, gen, data = {**COHORTS, **SMOKE_COHORTS}[name]
    if gen is None:
        return data
    root = out / "cohorts" / name
    if not (root / "cohort.csv").exists():
        if gen == "synthetic":
            from mil.data.synthetic import SMALL_LESION_WITNESS_FRACTION, write_synthetic_cohort

            kw = dict(n_patients=150, n_two_slides=10, dim=64, min_tiles=40, max_tiles=400, seed=7)
            if task == "classification":
                kw["witness_fraction"] = SMALL_LESION_WITNESS_FRACTION
            write_synthetic_cohort(task, root / "cohort.csv", root / "features", **kw)
        else:
            gen(root)
    extra = data(root) if callable(data) else data
    data = {
        "csv": str(root / "cohort.csv"),
        "features": str(root / "features"),
        "patient_col": "case_id",
        **extra,
    }
    if gen == "synthetic" and task == "survival":
        data.update(time_col="survival_months", event_col="censorship", censored_value=1)
    return data


# ---- runs --------------------------------------------------------------------------------


def base_config(name: str, out: Path, folds: int = 5) -> dict:
    task = {**COHORTS, **SMOKE_COHORTS}[name][0]
    return {
        "name": name,
        "task": {"type": task},
        "data": make_cohort(name, out),
        "splits": {
            "dir": str(out / "splits" / name),
            "folds": folds,
            "val_fraction": 0.15,
            "seed": 0,
        },
    }


def run_configs(
    name: str, out: Path, models: tuple[str, ...] = (), smoke: bool = False
) -> dict[str, dict]:
    """label -> config dict: defaults, the baselines, the grid, and every model of ``models``
    with its own defaults (labelled by its name). ``smoke``: 2 folds, the last grid point
    only, and every run's budget :data:`SMOKE_TRAIN`."""
    base = base_config(name, out, folds=2 if smoke else 5)
    runs = {"defaults": base}
    runs.update({m: {**base, "model": {"name": m}} for m in models})
    for b in BASELINES:  # closed-form fits standardise their pooled vectors themselves
        runs[b] = {**base, "data": {**base["data"], "standardize": False}, "model": {"name": b}}
    grid = dict(list(GRID.items())[-1:]) if smoke else GRID
    runs.update({label: _with(base, keys) for label, keys in grid.items()})
    if smoke:
        runs = {label: _with(raw, SMOKE_TRAIN) for label, raw in runs.items()}
    return runs


def _with(raw: dict, keys: dict) -> dict:
    """A copy of the config ``raw`` with the dotted ``keys`` set."""
    raw = json.loads(json.dumps(raw))
    for key, value in keys.items():
        section, k = key.split(".")
        raw.setdefault(section, {})[k] = value
    return raw


def _folder(out: Path, name: str, label: str, raw: dict) -> Path:
    """Run folders keyed by the resolved config, so that 'defaults' reuses an identical grid
    point's run (and a change of the defaults gets a fresh one). An existing folder whose saved
    config is the same run (``mil.results.run_identity``, keys a later ``mil`` added taking
    their defaults) is reused: a new config key alone does not retrain the zoo."""
    from mil.config import config_from_dict
    from mil.results import run_identity, saved_config
    from mil.schema import dump_config

    cfg = config_from_dict(raw)
    mine = run_identity(yaml.safe_load(dump_config(cfg)))
    for saved in sorted((out / "runs" / name).glob("*/config.yaml")):
        if run_identity(saved_config(saved)) == mine:
            return saved.parent
    text = dump_config(cfg).replace(f"name: {name}\n", "")
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return out / "runs" / name / digest


def run_cohort(
    name: str, out: str, models: tuple[str, ...] = (), smoke: bool = False
) -> list[dict]:
    """Every run of :func:`run_configs` on the cohort, and its rows of the zoo's table."""
    import torch

    from mil.compare import comparison_table, paired_differences
    from mil.config import config_from_dict
    from mil.results import RunFolder
    from mil.train.runner import run_cv

    torch.set_num_threads(1)
    models = tuple(dict.fromkeys((*models, *COHORT_MODELS.get(name, ()))))
    warnings.simplefilter("ignore")
    out = Path(out)
    folders = {}
    n_boot = 20 if smoke else 500
    for label, raw in run_configs(name, out, models, smoke).items():
        folders[label] = _folder(out, name, label, raw)
        run_cv(
            config_from_dict(raw),
            folders[label],
            progress=False,
            log=lambda *a: None,
            n_boot=n_boot * 2 // 5,
        )
    table = comparison_table(folders).set_index("model")
    diffs = paired_differences(folders, "meanpool_linear", n_boot=n_boot).set_index("model")
    metric = diffs["metric"].iloc[0]
    versus = paired_differences(
        {m: folders[m] for m in ("defaults", *models)}, "defaults", n_boot=n_boot
    )
    versus = versus.set_index("model")
    rows = []
    for label, folder in folders.items():
        findings = [
            f for r in RunFolder(folder).records().values() for f in r.get("diagnostics", [])
        ]
        rows.append(
            {
                "cohort": name,
                "role": ROLES[name],
                "run": label,
                "metric": metric,
                "mean": table.loc[label, f"{metric}_mean"],
                "sd": table.loc[label, f"{metric}_sd"],
                "pooled": diffs.loc[label, "value"],
                "delta_vs_meanpool": diffs.loc[label, "delta"],
                "ci_low": diffs.loc[label, "delta_ci_low"],
                "ci_high": diffs.loc[label, "delta_ci_high"],
                "undertrained_folds": sum(f["kind"] == "under-training" for f in findings),
                **(
                    {
                        "delta_vs_defaults": versus.loc[label, "delta"],
                        "defaults_ci_low": versus.loc[label, "delta_ci_low"],
                        "defaults_ci_high": versus.loc[label, "delta_ci_high"],
                    }
                    if label in models
                    else {}
                ),
                "folder": str(folder.relative_to(out)),
            }
        )
    print(f"{name}: " + ", ".join(f"{r['run']} {r['mean']:.3f}" for r in rows), flush=True)
    return rows


#: the heading of each role's table in zoo.md
ROLE_HEADINGS = {
    "selection": "Selection cohorts (the defaults were chosen on these)",
    "confirmation": "Confirmation cohorts (measured after the choice: not for choosing)",
}


def format_zoo(frame: pd.DataFrame) -> str:
    """zoo.md: a table per role, the selection cohorts first."""
    parts = [
        f"### {heading}\n\n{format_table(frame[frame['role'] == role])}"
        for role, heading in ROLE_HEADINGS.items()
        if (frame["role"] == role).any()
    ]
    return "\n\n".join(parts)


def format_table(frame: pd.DataFrame) -> str:
    lines = [
        "| cohort | run | metric | mean ± sd (5 folds) | pooled − mean-pool [95% CI] | under-trained folds |",
        "|---|---|---|---|---|---|",
    ]
    for r in frame.itertuples():
        delta = (
            "ref."
            if r.run == "meanpool_linear"
            else f"{r.delta_vs_meanpool:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
        )
        lines.append(
            f"| {r.cohort} | {r.run} | {r.metric} | {r.mean:.3f} ± {r.sd:.3f} | {delta} | {r.undertrained_folds} |"
        )
    has = "delta_vs_defaults" in frame
    extra = frame.dropna(subset=["delta_vs_defaults"]) if has else frame.iloc[:0]
    if len(extra):
        lines += [
            "",
            "| cohort | model | metric | pooled − defaults [95% CI] |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r.cohort} | {r.run} | {r.metric} | {r.delta_vs_defaults:+.3f} "
            f"[{r.defaults_ci_low:+.3f}, {r.defaults_ci_high:+.3f}] |"
            for r in extra.itertuples()
        ]
    return "\n".join(lines)


def zoo(
    out: Path, names: list[str], models: tuple[str, ...] = (), jobs: int = 2, smoke: bool = False
) -> pd.DataFrame:
    """Every cohort of ``names`` through :func:`run_cohort`: ``zoo.csv`` and ``zoo.md``."""
    out.mkdir(parents=True, exist_ok=True)
    for n in names:  # generate in this process, once
        make_cohort(n, out)
    k = len(names)
    results = run_jobs(run_cohort, jobs, names, [str(out)] * k, [models] * k, [smoke] * k)
    frame = pd.DataFrame([r for rows in results for r in rows])
    from mil.io import write_csv, write_text

    write_csv(out / "zoo.csv", frame)
    write_text(out / "zoo.md", format_zoo(frame) + "\n")
    print(format_zoo(frame))
    return frame


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default results/zoo, or results/zoo_smoke)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", help="comma-separated cohort names")
    p.add_argument(
        "--role",
        choices=("selection", "confirmation", "all"),
        default="all",
        help="the cohorts the defaults were chosen on (selection), those measured only "
        "after the choice (confirmation), or both (default)",
    )
    p.add_argument(
        "--models",
        default="",
        help="further models, each with its own defaults, compared with the default model (paired)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the SMOKE_COHORTS, 2 folds, 2 epochs "
        "per run, the last grid point, in this process (seconds)",
    )
    args = p.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    pool = SMOKE_COHORTS if args.smoke else COHORTS
    known = [n for n in pool if args.role in ("all", ROLES[n])]
    names = args.only.split(",") if args.only else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown cohort {unknown[0]!r} (role {args.role}); choose from {', '.join(known)}")
    if args.out is None:
        args.out = "results/zoo_smoke" if args.smoke else "results/zoo"
    zoo(Path(args.out), names, models, 1 if args.smoke else args.jobs, args.smoke)


if __name__ == "__main__":
    main()

"""How much does internal cross-validation flatter a model when sites differ? (``mil generalize``)

A synthetic classification cohort is split over four sites. Every site adds its
own offset to all its tiles (a stain or scanner signature, of norm
``--site-norm``), and the sites differ in prevalence (sites A and B hold 75% of
the positive patients: ``--confounding 0.75``), so a model can score well by
recognising the site. A fifth site, balanced, is the external cohort. The
script runs ``mil generalize`` with ABMIL and the mean-pooled linear baseline
and prints the table: internal CV, site-preserved CV (paired difference on the
same patients) and the external site (unpaired gap).

    python benchmarks/site_shift.py --out results/site_shift [--patients 120] [--confounding 0.75]

With ``--confounding 0.5`` (no site-label link) the internal and site-preserved
rows should agree within their CIs; with confounding, internal CV is optimistic
and the paired CI says by how much. ``--smoke`` runs it on 40 patients, 2 folds of 2
epochs: seconds (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml

from mil.config import config_from_dict
from mil.data.synthetic import write_synthetic_cohort
from mil.generalization import format_generalization, run_generalization

SITES = ("A", "B", "C", "D")
#: ``--smoke``: :func:`site_shift`'s arguments for a run of seconds
SMOKE = {"patients": 40, "dim": 8, "epochs": 2, "folds": 2, "n_boot": 10, "models": ("abmil",)}


def site_cohort(
    root: Path, name: str, seed: int, n: int, sites, confounding, site_norm, dim, shift
):
    """A cohort whose slides carry their site's offset; positives sit in the first half of
    ``sites`` with probability ``confounding``."""
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    df = write_synthetic_cohort(
        "classification",
        csv,
        feats,
        seed=seed,
        n_patients=n,
        n_two_slides=0,
        dim=dim,
        min_tiles=40,
        max_tiles=160,
        shift_norm=shift,
    )
    rng = np.random.default_rng(seed + 100)
    offsets = {s: rng.normal(size=dim) for s in sites}
    offsets = {s: site_norm * v / np.linalg.norm(v) for s, v in offsets.items()}
    half = max(1, len(sites) // 2)
    site_of = {}
    for case, label in df.groupby("case_id")["label"].first().items():
        first = rng.random() < (confounding if label == "positive" else 1 - confounding)
        pool = sites[:half] if first or len(sites) == 1 else sites[half:]
        site_of[case] = pool[rng.integers(len(pool))]
    df["site"] = df["case_id"].map(site_of)
    df.to_csv(csv, index=False)
    for slide, site in zip(df["slide_id"], df["site"]):
        with h5py.File(feats / f"{slide}.h5", "r+") as f:
            x = f["features"][()].astype(np.float32) + offsets[site]
            f["features"][...] = x.astype(f["features"].dtype)
    return {"csv": str(csv), "features": str(feats), "patient_col": "case_id", "site_col": "site"}


def site_shift(
    out: Path,
    patients: int = 120,
    confounding: float = 0.75,
    site_norm: float = 3.0,
    dim: int = 32,
    shift_norm: float = 2.0,
    epochs: int = 20,
    folds: int = 4,
    n_boot: int = 1000,
    models: tuple[str, ...] = ("abmil", "meanpool_linear"),
) -> tuple[pd.DataFrame, str]:
    """The cohorts (made once under ``out``) and ``mil generalize`` of ``models`` (ABMIL and
    the mean-pooled linear baseline): the table (``out/generalize``) and its markdown."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "internal.csv"
    common = (confounding, site_norm, dim, shift_norm)
    internal = (
        {
            "csv": str(data),
            "features": str(root / "internal_features"),
            "patient_col": "case_id",
            "site_col": "site",
        }
        if data.is_file()
        else site_cohort(root, "internal", 0, patients, SITES, *common)
    )
    external = root / "site_E.yaml"
    if not external.is_file():
        ext = site_cohort(root, "external", 1, patients // 2, ("E",), 0.5, *common[1:])
        external.write_text(yaml.safe_dump({"data": ext}))
    cfg = config_from_dict(
        {
            "name": "site_shift",
            "task": {"type": "classification"},
            "data": internal,
            "splits": {"folds": folds, "val_fraction": 0.2},
            "train": {"epochs": epochs},  # a fixed budget: the benchmark is about splits
            "compare": [{"model": {"name": m}} for m in models],
        },
        source="benchmarks/site_shift.py",
    )
    table = run_generalization(cfg, [external], root / "generalize", n_boot=n_boot, progress=False)
    return table, format_generalization(table, cfg, n_boot=n_boot)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/site_shift")
    ap.add_argument("--patients", type=int, default=120)
    ap.add_argument("--confounding", type=float, default=0.75)
    ap.add_argument("--site-norm", type=float, default=3.0)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--shift-norm", type=float, default=2.0, help="the witness tiles' shift")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()),
    )
    args = ap.parse_args(argv)
    if args.smoke:
        _, text = site_shift(Path(args.out), **{"confounding": args.confounding, **SMOKE})
    else:
        kw = {
            k: getattr(args, k)
            for k in (
                "patients",
                "confounding",
                "site_norm",
                "dim",
                "shift_norm",
                "epochs",
                "folds",
                "n_boot",
            )
        }
        _, text = site_shift(Path(args.out), **kw)
    print(text)


if __name__ == "__main__":
    main()

"""Can mean pooling separate the small-lesion classification cohort at all?

Mean pooling computes a slide score as the average of an instance function
f(x). This script measures the slide-level AUC of two such averages on a
synthetic classification cohort (by default the small-lesion one: 4-10% witness
tiles per positive slide, the demo cohort until session 12), using the witness
labels the cohort stores (an oracle a trained model never sees):

- f(x) = x . d, the projection on the witness direction d (the difference of
  the mean witness and mean non-witness tile): what mean pooling of a
  *linear* instance embedding can reach;
- f(x) = relu(x . d - t), a single thresholded unit: what a one-hidden-unit
  mean-pooling network *could* represent.

If the second is near 1 and the first is not, the model class can solve the
task and the failure of the trained `mean` model (docs/benchmarks.md) is one
of learning from bag labels, not of capacity.

    python benchmarks/mean_pooling_ceiling.py [--root results/small_lesion]
    python benchmarks/mean_pooling_ceiling.py --root results/demo --witness-fraction 0.10 0.20

The cohort is ``<root>/cohort_classification`` (a ``mil demo --out`` folder has
one); it is generated there if absent, with ``--witness-fraction`` (default
0.04 0.10; the demo's is 0.10 0.20). ``--smoke`` generates a 24-patient cohort of
16-d tiles instead (seconds; ``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from mil.data.readers import read_features
from mil.data.synthetic import SMALL_LESION_WITNESS_FRACTION, write_synthetic_cohort

#: ``--smoke``: ``write_synthetic_cohort``'s size arguments for a cohort of a few seconds
SMOKE = {
    "n_patients": 24,
    "n_two_slides": 0,
    "dim": 16,
    "min_tiles": 20,
    "max_tiles": 60,
    "seed": 0,
}
#: thresholds of the one-unit network, in sd of the non-witness tiles' projections
THRESHOLDS = (1.0, 2.0, 3.0)


def ceiling(cohort: Path) -> dict[str, float]:
    """The oracle AUCs of the cohort at ``cohort`` (``cohort.csv``, ``features/``): tile-level
    AUC of the projection on the witness direction (``tile_auc``), slide-level AUC of its bag
    mean (``linear_auc``) and of the bag mean of ``relu(x.d - t sd)`` (``relu_auc_<t>``), with
    the counts of slides, tiles and witness tiles."""
    df = pd.read_csv(cohort / "cohort.csv")
    y = (df["label"] == "positive").to_numpy()
    bags = [read_features(cohort / "features" / f"{s}.h5") for s in df["slide_id"]]
    x = [b.features.astype(np.float64) for b in bags]
    w = [np.asarray(b.instance_label) for b in bags]
    allx, allw = np.concatenate(x), np.concatenate(w).astype(bool)
    d = allx[allw].mean(0) - allx[~allw].mean(0)
    d /= np.linalg.norm(d)
    proj = [xi @ d for xi in x]
    z = np.concatenate(proj)
    mu, sd = z[~allw].mean(), z[~allw].std()  # thresholds in sd of the non-witness tiles
    out = {
        "slides": len(df),
        "tiles": len(allw),
        "witness_tiles": int(allw.sum()),
        "tile_auc": roc_auc_score(allw, z),
        "linear_auc": roc_auc_score(y, [q.mean() for q in proj]),
    }
    for t in THRESHOLDS:
        out[f"relu_auc_{t:.0f}"] = roc_auc_score(
            y, [np.maximum((q - mu) / sd - t, 0).mean() for q in proj]
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="results/small_lesion", help="holds cohort_classification/")
    p.add_argument(
        "--witness-fraction",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        default=SMALL_LESION_WITNESS_FRACTION,
        help="witness tiles per positive slide, if the cohort is generated (default 0.04 0.10)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a cohort of " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()) + " (seconds)",
    )
    args = p.parse_args(argv)
    cohort = Path(args.root) / "cohort_classification"
    if not (cohort / "cohort.csv").exists():
        try:
            write_synthetic_cohort(
                "classification",
                cohort / "cohort.csv",
                cohort / "features",
                witness_fraction=tuple(args.witness_fraction),
                **(SMOKE if args.smoke else {}),
            )
        except ValueError as e:  # a bad --witness-fraction
            p.error(str(e))
    c = ceiling(cohort)
    print(f"{c['slides']} slides, {c['witness_tiles']} witness tiles of {c['tiles']}")
    print(f"tile-level AUC of x.d (witness vs rest): {c['tile_auc']:.3f}")
    print("slide-level AUC of the bag mean of f(x):")
    print(f"  f = x.d (linear)           {c['linear_auc']:.3f}")
    for t in THRESHOLDS:
        print(f"  f = relu(x.d - {t:.0f} sd)      {c[f'relu_auc_{t:.0f}']:.3f}")


if __name__ == "__main__":
    main()

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
0.04 0.10; the demo's is 0.10 0.20).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from mil.data.readers import read_features
from mil.data.synthetic import SMALL_LESION_WITNESS_FRACTION, write_synthetic_cohort


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="results/small_lesion", help="holds cohort_classification/")
    p.add_argument(
        "--witness-fraction", nargs=2, type=float, metavar=("LO", "HI"),
        default=SMALL_LESION_WITNESS_FRACTION,
        help="witness tiles per positive slide, if the cohort is generated (default 0.04 0.10)",
    )
    args = p.parse_args()
    cohort = Path(args.root) / "cohort_classification"
    if not (cohort / "cohort.csv").exists():
        try:
            write_synthetic_cohort(
                "classification", cohort / "cohort.csv", cohort / "features",
                witness_fraction=tuple(args.witness_fraction),
            )
        except ValueError as e:  # a bad --witness-fraction
            p.error(str(e))
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
    print(f"{len(df)} slides, {allw.sum()} witness tiles of {len(allw)}")
    print(f"tile-level AUC of x.d (witness vs rest): {roc_auc_score(allw, z):.3f}")
    print("slide-level AUC of the bag mean of f(x):")
    print(f"  f = x.d (linear)           {roc_auc_score(y, [q.mean() for q in proj]):.3f}")
    for t in (1.0, 2.0, 3.0):
        s = [np.maximum((q - mu) / sd - t, 0).mean() for q in proj]
        print(f"  f = relu(x.d - {t:.0f} sd)      {roc_auc_score(y, s):.3f}")


if __name__ == "__main__":
    main()

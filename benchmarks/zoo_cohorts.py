"""The cohort zoo's *confirmation* cohorts (``benchmarks/cohort_zoo.py``).

The zoo's first ten cohorts are *selection* cohorts: the defaults were chosen on them. These
are measured only after a choice, and reported in a table of their own, so that nobody
reads them while choosing:

- ``nsclc-subtype``: TCGA NSCLC, LUAD against LUSC, one bag per patient (real data);
- ``blca-surv``: TCGA BLCA overall survival (real data);
- ``label-noise``: ``mil``'s small-lesion classification cohort with the labels of 15% of
  the patients flipped after generation (all the slides of a patient together);
- ``two-slides``: every patient has two slides, which share the patient's label;
- ``pixel-like``: values in [0, 1] (the tiles squashed through a sigmoid) with a quarter of
  the dimensions near-constant (sd :data:`NEAR_CONSTANT_SD`), as pixel features have;
- ``surv-fraction-150``: a fresh draw of the fractional survival signal (another seed,
  128-d, one slide per patient), 150 patients;
- ``multimodal-surv``: slides, an omics table with a linear signal in two gene families and
  clinical covariates (``mil.data.synthetic_multimodal``); ``late_fusion`` runs beside the
  defaults (which read no table), compared paired with them.

Each entry is ``(task, generator, data keys)`` as in the zoo's ``COHORTS``; a generator
writes ``cohort.csv`` and ``features/`` under the folder it is given, and data keys may be a
function of that folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from survival_stopping import real_data

#: share of the patients whose label ``label-noise`` flips
FLIP_SHARE = 0.15
#: share of ``pixel-like``'s dimensions held near-constant, and their sd
CONSTANT_SHARE = 0.25
NEAR_CONSTANT_SD = 0.005
#: survival columns of ``mil.data.synthetic``'s cohorts
SYNTHETIC_SURVIVAL = {"time_col": "survival_months", "event_col": "censorship", "censored_value": 1}


def flip_patients(
    frame: pd.DataFrame, share: float, seed: int, patient_col: str = "case_id"
) -> pd.DataFrame:
    """``frame`` with the binary ``label`` of ``round(share * patients)`` patients (drawn with
    ``seed``) flipped on every row of theirs; the label as generated kept in ``true_label``."""
    rng = np.random.default_rng(seed)
    patients = frame[patient_col].drop_duplicates().to_numpy()
    flip = rng.choice(patients, int(round(share * len(patients))), replace=False)
    a, b = sorted(frame["label"].unique())
    out = frame.assign(true_label=frame["label"])
    hit = out[patient_col].isin(flip)
    out.loc[hit, "label"] = out.loc[hit, "label"].map({a: b, b: a})
    return out


def label_noise_cohort(root: Path, n_patients: int, seed: int, **kw) -> None:
    """The small-lesion classification cohort, then :data:`FLIP_SHARE` of the patients'
    labels flipped (whole patients)."""
    from mil.data.synthetic import SMALL_LESION_WITNESS_FRACTION, write_synthetic_cohort
    from mil.io import write_csv

    frame = write_synthetic_cohort(
        "classification",
        root / "cohort.csv",
        root / "features",
        seed=seed,
        n_patients=n_patients,
        witness_fraction=SMALL_LESION_WITNESS_FRACTION,
        **kw,
    )
    write_csv(root / "cohort.csv", flip_patients(frame, FLIP_SHARE, seed))


def squash_features(features: Path, seed: int) -> None:
    """Rewrite every slide of ``features`` pixel-like: a sigmoid of each value, and the same
    :data:`CONSTANT_SHARE` of the dimensions replaced by a level in [0.05, 0.95] plus noise of
    sd :data:`NEAR_CONSTANT_SD` (clipped to [0, 1])."""
    import h5py

    from mil.data.synthetic import write_slide

    rng = np.random.default_rng(seed)
    paths = sorted(Path(features).glob("*.h5"))
    with h5py.File(paths[0], "r") as f:
        dim = f["features"].shape[1]
    const = rng.choice(dim, int(round(CONSTANT_SHARE * dim)), replace=False)
    level = rng.uniform(0.05, 0.95, len(const))
    for path in paths:
        with h5py.File(path, "r") as f:
            x, coords, lab = (f[k][:] for k in ("features", "coords", "instance_label"))
        x = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
        x[:, const] = np.clip(level + rng.normal(0, NEAR_CONSTANT_SD, (len(x), len(const))), 0, 1)
        write_slide(path, x, coords, lab)


def pixel_like_cohort(root: Path, n_patients: int, seed: int, **kw) -> None:
    """A classification cohort of ``mil``'s tiles through :func:`squash_features`."""
    from mil.data.synthetic import write_synthetic_cohort

    kw = {"n_two_slides": 0, **kw}
    write_synthetic_cohort(
        "classification",
        root / "cohort.csv",
        root / "features",
        seed=seed,
        n_patients=n_patients,
        **kw,
    )
    squash_features(root / "features", seed)


def synthetic(kind: str, **kw):
    """A generator of ``mil.data.synthetic.write_synthetic_cohort(kind, **kw)``."""

    def write(root: Path) -> None:
        from mil.data.synthetic import write_synthetic_cohort

        write_synthetic_cohort(kind, root / "cohort.csv", root / "features", **kw)

    return write


def multimodal_cohort(root: Path) -> None:
    from mil.data.synthetic_multimodal import write_multimodal_cohort

    write_multimodal_cohort(root, seed=5)


def multimodal_data(root: Path) -> dict:
    from mil.data.synthetic_multimodal import multimodal_tabular

    return {**SYNTHETIC_SURVIVAL, "tabular": multimodal_tabular(root)}


def _nsclc_subtype() -> dict:
    data = {k: v for k, v in real_data("nsclc").items() if k not in ("time_col", "event_col")}
    return {**data, "label_col": "label_name"}


TILES = {"min_tiles": 40, "max_tiles": 400}
#: name -> (task, generator or None, data keys or a function of the cohort's folder)
CONFIRMATION = {
    "nsclc-subtype": ("classification", None, _nsclc_subtype()),
    "blca-surv": ("survival", None, real_data("blca")),
    "label-noise": (
        "classification",
        lambda r: label_noise_cohort(r, 150, 21, n_two_slides=10, dim=64, **TILES),
        {},
    ),
    "two-slides": (
        "classification",
        synthetic("classification", seed=22, n_patients=100, n_two_slides=100, dim=64, **TILES),
        {},
    ),
    "pixel-like": ("classification", lambda r: pixel_like_cohort(r, 150, 23, dim=64, **TILES), {}),
    "surv-fraction-150": (
        "survival",
        synthetic("survival", seed=24, n_patients=150, n_two_slides=0, dim=128, **TILES),
        SYNTHETIC_SURVIVAL,
    ),
    "multimodal-surv": ("survival", multimodal_cohort, multimodal_data),
}
#: models run beside the defaults on a cohort (compared paired with them)
COHORT_MODELS = {"multimodal-surv": ("late_fusion",)}
#: ``--smoke``: a tiny confirmation cohort
SMOKE_CONFIRMATION = {
    "smoke-label-noise": (
        "classification",
        lambda r: label_noise_cohort(r, 40, 21, n_two_slides=6, dim=16, min_tiles=10, max_tiles=30),
        {},
    ),
}

"""The built-in synthetic cohorts behind ``mil demo``: written to disk like a user's data.

Slides are blobs of tiles on a 256-px grid; tile features come from a few
spatially coherent tissue types plus per-slide stain-like offsets. Positive
(classification) or aggressive (survival) slides carry one small, spatially
clustered region of *witness* tiles whose features are shifted along one
fixed direction; in the regression cohort the target is the share of such
tiles (plus noise). Witness tiles are stored as ``instance_label`` so that the
runner can measure how well attention finds them (``witness_auc``).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from mil.io import atomic_path, write_csv

TILE = 256


def tissue_coords(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 2]`` level-0 pixel coordinates of a blob-shaped piece of tissue on a tile grid."""
    side = int(np.ceil(np.sqrt(n / 0.5))) + 6
    ii, jj = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    pts = np.stack([jj.ravel(), ii.ravel()], 1).astype(float)
    centre = pts.mean(0) + rng.normal(0, 1, 2)
    d = pts - centre
    theta = np.arctan2(d[:, 1], d[:, 0])
    a, b, c = rng.uniform(0.1, 0.3), rng.uniform(0.0, 0.15), rng.uniform(0.6, 1.4)
    shape = (
        1
        + a * np.sin(3 * theta + rng.uniform(0, 6.3))
        + b * np.sin(5 * theta + rng.uniform(0, 6.3))
    )
    r = np.hypot(d[:, 0] * c, d[:, 1] / c) / shape
    keep = np.argsort(r + rng.normal(0, 0.3, len(r)), kind="stable")[:n]
    offset = rng.integers(0, 40, 2) * TILE
    return (pts[keep] * TILE + offset).astype(np.int32)


def synthetic_slide(
    rng: np.random.Generator,
    n: int,
    prototypes: np.ndarray,
    shift: np.ndarray,
    witness_fraction: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features ``[n, D]``, coords ``[n, 2]`` and witness labels ``[n]`` of one slide."""
    coords = tissue_coords(rng, n)
    # tissue types as Voronoi regions around a few random seed tiles
    seeds = coords[rng.choice(n, size=min(5, n), replace=False)]
    region = np.argmin(((coords[:, None, :] - seeds[None]) ** 2).sum(-1), 1)
    types = rng.choice(len(prototypes), size=len(seeds))[region]
    dim = prototypes.shape[1]
    feats = prototypes[types] + rng.normal(0, 1.0, (n, dim)) + rng.normal(0, 0.3, dim)
    label = np.zeros(n, dtype=np.int8)
    m = int(round(witness_fraction * n))
    if m > 0:
        centre = coords[rng.integers(n)]
        near = np.argsort(((coords - centre) ** 2).sum(1), kind="stable")[:m]
        label[near] = 1
        feats[near] += shift
    return feats.astype(np.float32), coords, label


def write_slide(path: Path, feats: np.ndarray, coords: np.ndarray, label: np.ndarray) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float16))
        f.create_dataset("coords", data=coords)
        f.create_dataset("instance_label", data=label)
        f.attrs["patch_size_level0"] = TILE
        f.attrs["magnification"] = 20
        f.attrs["encoder"] = "synthetic"


def _patients(rng: np.random.Generator, n_patients: int, n_two: int) -> list[tuple[str, int]]:
    """(patient id, number of slides); ``n_two`` patients have two slides."""
    two = set(rng.choice(n_patients, n_two, replace=False).tolist())
    return [(f"P{p:03d}", 2 if p in two else 1) for p in range(n_patients)]


# Witness tiles per positive slide: the demo's range, and the small-lesion cohort's
# (the demo until session 12, on which mean pooling fails; docs/benchmarks.md).
DEMO_WITNESS_FRACTION = (0.10, 0.20)
SMALL_LESION_WITNESS_FRACTION = (0.04, 0.10)


def write_synthetic_cohort(
    kind: str,
    csv: Path,
    features: Path,
    seed: int | None = None,
    n_patients: int = 100,
    n_two_slides: int = 20,
    dim: int = 64,
    min_tiles: int = 200,
    max_tiles: int = 2000,
    shift_norm: float = 5.0,
    witness_fraction: tuple[float, float] = DEMO_WITNESS_FRACTION,
) -> pd.DataFrame:
    """Write a synthetic cohort (CSV + one h5 per slide); returns the CSV's frame.

    ``kind="classification"``: half the patients are positive; each positive
    slide has one clustered region of witness tiles, a fraction drawn uniformly
    from ``witness_fraction`` (10-20% of its tiles; ``SMALL_LESION_WITNESS_FRACTION``
    gives the small-lesion cohort). ``kind="survival"``: each patient has an
    aggressive-tile fraction f (0 for a third, else 2-25%; aggressive tiles are
    shifted by 1.5 ``shift_norm``); the true log-hazard ``true_risk`` is
    ``1.6 (f - mean f) / sd(f)``; times are exponential with uniform censoring.
    CLAM/Patch-GCN columns: ``case_id, slide_id, label`` or
    ``case_id, slide_id, survival_months, censorship`` (1 = censored), plus
    ``true_risk`` for survival (the oracle). ``kind="regression"``: each patient's
    planted-tile share f is uniform on 0-30% (tiles shifted as for survival); the target
    ``planted_percent`` is ``100 f`` plus Gaussian noise of sd :data:`REGRESSION_NOISE`
    (``true_percent``: ``100 f``, the oracle). ``kind="ordinal"``: each patient has a severity
    u uniform on 0-1, planted-tile share ``0.3 u`` (tiles shifted as for survival) and a
    ``grade`` 1-4 cut from u plus Gaussian noise of sd :data:`~mil.data.synthetic_targets.ORDINAL_GRADE_NOISE` at 0.25,
    0.5 and 0.75, so neighbouring grades overlap as a pathologist's do (``true_severity``: u).
    ``kind="multitarget"``: two kinds of planted tiles along two directions: 40% of patients
    are ``msi_status`` ``MSI`` (a clustered region of 8-20% of each slide's tiles along the
    first, the witnesses), the others ``MSS``; a second share ``f`` uniform on 0-30% along the
    second gives ``tmb`` (``5 + 60 f`` plus noise of sd 2) and ``grade`` 1-3 (``f`` plus noise
    of sd 0.03 cut at 0.1 and 0.2); each of the three cells is empty for a random
    :data:`~mil.data.synthetic_targets.MULTITARGET_MISSING` of the patients (``true_share``: ``f``).
    """
    lo, hi = witness_fraction
    if not 0 < lo <= hi < 1:
        raise ValueError(
            f"witness_fraction must be (lo, hi) with 0 < lo <= hi < 1, got {witness_fraction}"
        )
    seeds = {"classification": 0, "survival": 1, "regression": 2, "ordinal": 3, "multitarget": 4}
    seed = seeds.get(kind, 0) if seed is None else seed
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(0, 1.0, (6, dim))
    direction = rng.normal(0, 1, dim)
    shift = shift_norm * direction / np.linalg.norm(direction)
    patients = _patients(rng, n_patients, n_two_slides)
    features = Path(features)
    features.mkdir(parents=True, exist_ok=True)
    tiles = (min_tiles, max_tiles)
    rows = []
    if kind == "classification":
        positive = rng.permutation(np.arange(n_patients) < n_patients // 2)
        for (pid, n_slides), pos in zip(patients, positive):
            frac = (lambda: rng.uniform(lo, hi)) if pos else 0.0
            for sid in _write_slides(rng, features, pid, n_slides, frac, prototypes, shift, tiles):
                rows.append(
                    {"case_id": pid, "slide_id": sid, "label": "positive" if pos else "negative"}
                )
    elif kind == "survival":
        rows = _survival_patients(rng, features, patients, prototypes, 1.5 * shift, tiles)
    elif kind == "regression":
        rows = _regression_patients(rng, features, patients, prototypes, 1.5 * shift, tiles)
    elif kind in ("ordinal", "multitarget"):
        from mil.data.synthetic_targets import multitarget_patients, ordinal_patients

        make = ordinal_patients if kind == "ordinal" else multitarget_patients
        rows = make(
            rng, features, patients, prototypes, (1.5 if kind == "ordinal" else 1.0) * shift, tiles
        )
    else:
        raise ValueError(f"unknown synthetic cohort kind {kind!r}")
    df = pd.DataFrame(rows)
    write_csv(csv, df)
    return df


def _survival_patients(rng, features, patients, prototypes, shift, tiles) -> list[dict]:
    """The survival cohort's slides and rows. Aggressive tiles stand further out than
    classification witnesses (``shift`` is 1.5 times theirs): the hazard follows their
    *fraction*, which a model can only measure if tiles are separable."""
    n_patients = len(patients)
    frac = np.where(rng.uniform(size=n_patients) < 1 / 3, 0.0, rng.uniform(0.02, 0.25, n_patients))
    eta = 1.6 * (frac - frac.mean()) / frac.std()
    t_event = rng.exponential(24.0 * np.exp(-eta))
    t_cens = rng.uniform(12.0, 120.0, n_patients)
    time = np.minimum(t_event, t_cens)
    censored = (t_cens < t_event).astype(int)
    rows = []
    for i, (pid, n_slides) in enumerate(patients):
        sids = _write_slides(rng, features, pid, n_slides, frac[i], prototypes, shift, tiles)
        rows += [
            {
                "case_id": pid,
                "slide_id": sid,
                "survival_months": round(float(time[i]), 3),
                "censorship": int(censored[i]),
                "true_risk": float(eta[i]),
            }
            for sid in sids
        ]
    return rows


#: sd of the noise on the regression cohort's target (percentage points of planted tiles)
REGRESSION_NOISE = 2.0


def _regression_patients(rng, features, patients, prototypes, shift, tiles) -> list[dict]:
    """The regression cohort's slides and rows: target = 100 x planted share + noise."""
    frac = rng.uniform(0.0, 0.3, len(patients))
    target = 100.0 * frac + rng.normal(0.0, REGRESSION_NOISE, len(patients))
    rows = []
    for i, (pid, n_slides) in enumerate(patients):
        sids = _write_slides(rng, features, pid, n_slides, frac[i], prototypes, shift, tiles)
        rows += [
            {
                "case_id": pid,
                "slide_id": sid,
                "planted_percent": round(float(target[i]), 3),
                "true_percent": round(100.0 * float(frac[i]), 3),
            }
            for sid in sids
        ]
    return rows


def _write_slides(
    rng: np.random.Generator,
    features: Path,
    pid: str,
    n_slides: int,
    frac,
    prototypes: np.ndarray,
    shift: np.ndarray,
    tiles: tuple[int, int],
) -> list[str]:
    """Write a patient's slides (``<pid>-S<k>.h5``); ``frac`` is the witness fraction, or a
    function drawing one per slide. Returns the slide ids."""
    sids = []
    for s in range(n_slides):
        sid = f"{pid}-S{s + 1}"
        f_slide = frac() if callable(frac) else frac
        f, c, lab = synthetic_slide(
            rng, int(rng.integers(tiles[0], tiles[1] + 1)), prototypes, shift, f_slide
        )
        write_slide(features / f"{sid}.h5", f, c, lab)
        sids.append(sid)
    return sids


def demo_config(kind: str, root: str | Path, loss: str = "cox") -> dict:
    """The config of a demo run whose cohort lives under ``root`` (same keys as experiments/demo_*.yaml)."""
    root = Path(root)
    cohort = root / f"cohort_{kind}"
    if kind == "classification":
        return {
            "name": "demo_classification",
            "task": {"type": "classification"},
            "data": {
                "csv": str(cohort / "cohort.csv"),
                "features": str(cohort / "features"),
                "slide_col": "slide_id",
                "patient_col": "case_id",
                "label_col": "label",
                "bag_level": "slide",
                "standardize": True,
                "synthetic": "classification",
            },
            "splits": {
                "dir": str(root / "data_splits" / "demo_classification"),
                "folds": 5,
                "val_fraction": 0.15,
                "seed": 0,
            },
            "model": {"name": "abmil_additive", "gated": True, "hidden_dim": 128, "dropout": 0.25},
            "train": {
                "epochs": 40,
                "batch_size": 8,
                "lr": 1.0e-3,
                "weight_decay": 1.0e-4,
                "patience": 8,
                "min_epochs": 15,
                "seed": 0,
            },
        }
    if kind == "survival":
        return {
            "name": f"demo_survival_{loss}",
            # alpha (nll only): Patch-GCN's extra weight on the uncensored terms
            "task": {"type": "survival", "loss": loss, "ties": "efron", "bins": 4, "alpha": 0.4},
            "data": {
                "csv": str(cohort / "cohort.csv"),
                "features": str(cohort / "features"),
                "slide_col": "slide_id",
                "patient_col": "case_id",
                "time_col": "survival_months",
                "event_col": "censorship",
                "censored_value": 1,
                "bag_level": "patient",
                "standardize": True,
                "synthetic": "survival",
            },
            "splits": {
                "dir": str(root / "data_splits" / "demo_survival"),
                "folds": 5,
                "val_fraction": 0.15,
                "seed": 0,
            },
            "model": {"name": "abmil", "gated": True, "hidden_dim": 64, "dropout": 0.25},
            # Fixed epochs: ~12 validation patients make the validation loss too noisy to
            # stop on (it picked near-untrained weights in some folds); 512 random tiles
            # per bag and epoch regularise and keep each epoch well under a second.
            "train": {
                "epochs": 20,
                "batch_size": 16,
                "lr": 2.0e-3,
                "weight_decay": 1.0e-4,
                "patience": None,
                "subsample": 512,
                "seed": 0,
            },
        }
    if kind == "regression":
        return _regression_demo(root, cohort)
    if kind in ("ordinal", "multitarget"):
        from mil.data.synthetic_targets import targets_demo

        return targets_demo(kind, root, cohort)
    raise ValueError(f"unknown demo kind {kind!r}")


def patient_demo(name: str, task: dict, root: Path, cohort: Path, kind: str, **data) -> dict:
    """A demo config over the synthetic cohort of ``kind`` at ``cohort``: patient bags, the
    library defaults otherwise, 5 folds whose split files go under ``root/data_splits``."""
    return {
        "name": name,
        "task": task,
        "data": {
            "csv": str(cohort / "cohort.csv"),
            "features": str(cohort / "features"),
            "slide_col": "slide_id",
            "patient_col": "case_id",
            **data,
            "bag_level": "patient",
            "synthetic": kind,
        },
        "splits": {"dir": str(root / "data_splits" / name), "folds": 5, "seed": 0},
    }


def _regression_demo(root: Path, cohort: Path) -> dict:
    """The regression demo: the defaults (model, training) on patient bags."""
    task = {"type": "regression", "loss": "mse", "target_scaling": "standard", "cutoff": 15}
    return patient_demo(
        "demo_regression", task, root, cohort, "regression", label_col="planted_percent"
    )


def sized_demo_config(
    kind: str, root: str | Path, n_patients: int, dim: int, tiles: tuple[int, int]
) -> dict:
    """:func:`demo_config` of ``kind`` with its cohort written once under ``root`` at this size
    (``n_patients``, a fifth of them with two slides; ``dim``-dimensional features; ``tiles``:
    the range of tiles per slide): the studies' cohorts (benchmarks/)."""
    raw = demo_config(kind, root)
    csv, feats = Path(raw["data"]["csv"]), Path(raw["data"]["features"])
    if not csv.is_file():
        write_synthetic_cohort(
            kind,
            csv,
            feats,
            n_patients=n_patients,
            dim=dim,
            min_tiles=tiles[0],
            max_tiles=tiles[1],
            n_two_slides=n_patients // 5,
        )
    return raw

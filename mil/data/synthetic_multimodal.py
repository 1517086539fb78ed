"""The multimodal demo cohort: slides, an omics table in gene families and clinical covariates,
with a hazard driven partly by the slides and partly by two gene families.

Written like a TCGA study prepared for MCAT/PORPOISE: ``cohort.csv`` (``case_id, slide_id,
survival_months, censorship``), ``rna.csv`` (``case_id`` and per gene ``<gene>_rnaseq``,
``<gene>_cnv``, and ``<gene>_mut`` for some), MCAT's ``signatures.csv`` (one column of gene
symbols per family), ``clinical.csv`` (``age``, ``stage`` with missing cells, ``sex``) and one
h5 feature file per slide. A fraction of the patients (30% by default) has no omics row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mil.data.synthetic import synthetic_slide, write_slide
from mil.io import write_csv

FAMILIES = (
    "tumor_suppressor",
    "oncogene",
    "kinase",
    "differentiation",
    "transcription",
    "cytokine",
)
#: the gene families whose activity drives the hazard (the others are noise)
RISK_FAMILIES = ("oncogene", "kinase")


def write_multimodal_cohort(
    root: str | Path,
    seed: int = 2,
    n_patients: int = 240,
    genes_per_family: int = 6,
    dim: int = 32,
    min_tiles: int = 60,
    max_tiles: int = 240,
    missing_omics: float = 0.3,
    slide_weight: float = 1.2,
    omics_weight: float = 1.2,
    shift_norm: float = 7.5,
    csv: str | Path | None = None,
    features: str | Path | None = None,
) -> pd.DataFrame:
    """Write the cohort under ``root`` (``csv``, ``features``: elsewhere); returns the
    cohort CSV's frame.

    Each patient has an aggressive-tile fraction ``f`` (0 for a third, else 5-30%; those
    tiles shifted by ``shift_norm`` along one direction) and a latent activity ``u_j ~ N(0, 1)``
    per gene family. The log-hazard is ``slide_weight * z(f) + omics_weight * (u_onc +
    u_kin) / sqrt(2)`` (``z``: standardised), recorded as ``true_risk`` with its parts
    ``true_slide_risk`` and ``true_omics_risk``; times are exponential with uniform
    censoring. A gene's ``_rnaseq`` is ``0.8 u_j`` plus noise, its ``_cnv`` a rounded, clipped
    copy, and every third gene has a ``_mut`` (1 when ``u_j`` plus noise exceeds 1.2).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    feats_dir = Path(features) if features else root / "features"
    feats_dir.mkdir(parents=True, exist_ok=True)
    prototypes = rng.normal(0, 1.0, (6, dim))
    direction = rng.normal(0, 1, dim)
    shift = shift_norm * direction / np.linalg.norm(direction)
    frac = np.where(rng.uniform(size=n_patients) < 1 / 3, 0.0, rng.uniform(0.05, 0.30, n_patients))
    u = rng.normal(0, 1, (n_patients, len(FAMILIES)))
    slide_risk = (frac - frac.mean()) / frac.std()
    risk_cols = [FAMILIES.index(f) for f in RISK_FAMILIES]
    omics_risk = u[:, risk_cols].sum(1) / np.sqrt(len(risk_cols))
    eta = slide_weight * slide_risk + omics_weight * omics_risk
    t_event = rng.exponential(24.0 * np.exp(-eta))
    t_cens = rng.uniform(12.0, 120.0, n_patients)
    pids = [f"MM{p:03d}" for p in range(n_patients)]
    rows = []
    for i, pid in enumerate(pids):
        n = int(rng.integers(min_tiles, max_tiles + 1))
        f, c, lab = synthetic_slide(rng, n, prototypes, shift, float(frac[i]))
        write_slide(feats_dir / f"{pid}-S1.h5", f, c, lab)
        rows.append(
            {
                "case_id": pid,
                "slide_id": f"{pid}-S1",
                "survival_months": round(float(min(t_event[i], t_cens[i])), 3),
                "censorship": int(t_cens[i] < t_event[i]),
                "true_risk": float(eta[i]),
                "true_slide_risk": float(slide_weight * slide_risk[i]),
                "true_omics_risk": float(omics_weight * omics_risk[i]),
            }
        )
    cohort = pd.DataFrame(rows)
    write_csv(Path(csv) if csv else root / "cohort.csv", cohort)
    _write_omics(root, rng, pids, u, genes_per_family, missing_omics)
    _write_clinical(root, rng, pids)
    return cohort


def _write_omics(
    root: Path,
    rng: np.random.Generator,
    pids: list[str],
    u: np.ndarray,
    per_family: int,
    missing: float,
) -> None:
    """``rna.csv`` (without the patients that lack omics) and ``signatures.csv``."""
    n = len(pids)
    omics: dict[str, np.ndarray] = {}
    signatures: dict[str, list[str]] = {}
    for j, fam in enumerate(FAMILIES):
        genes = [f"{fam[:3].upper()}{k + 1}" for k in range(per_family)]
        signatures[fam] = genes
        for k, gene in enumerate(genes):
            expr = 0.8 * u[:, j] + rng.normal(0, 0.6, n)
            omics[f"{gene}_rnaseq"] = np.round(expr * 2.0 + 8.0, 4)  # log-expression-like scale
            omics[f"{gene}_cnv"] = np.clip(np.round(0.7 * u[:, j] + rng.normal(0, 0.7, n)), -2, 2)
            if k % 3 == 0:
                omics[f"{gene}_mut"] = (u[:, j] + rng.normal(0, 0.8, n) > 1.2).astype(int)
    table = pd.DataFrame({"case_id": pids, **omics})
    keep = rng.uniform(size=n) >= missing
    write_csv(root / "rna.csv", table[keep].reset_index(drop=True))
    write_csv(root / "signatures.csv", pd.DataFrame(signatures))


def _write_clinical(root: Path, rng: np.random.Generator, pids: list[str]) -> None:
    """``clinical.csv``: age (years), stage (I-IV, 10% missing), sex; none drives the hazard."""
    n = len(pids)
    stage = rng.choice(["I", "II", "III", "IV"], n).astype(object)
    stage[rng.uniform(size=n) < 0.1] = None
    clinical = pd.DataFrame(
        {
            "case_id": pids,
            "age": np.round(rng.normal(62, 10, n), 1),
            "stage": stage,
            "sex": rng.choice(["female", "male"], n),
        }
    )
    write_csv(root / "clinical.csv", clinical)


def multimodal_tabular(root: str | Path) -> list[dict]:
    """The ``data.tabular`` entries of the cohort under ``root``."""
    root = Path(root)
    return [
        {
            "name": "rna",
            "csv": str(root / "rna.csv"),
            "id_col": "case_id",
            "groups": str(root / "signatures.csv"),
        },
        {
            "name": "clinical",
            "csv": str(root / "clinical.csv"),
            "id_col": "case_id",
            "categorical": ["stage", "sex"],
        },
    ]

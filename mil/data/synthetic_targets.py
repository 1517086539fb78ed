"""The synthetic cohorts of the ordinal and the multi-target tasks (``data.synthetic: ordinal``,
``multitarget``), written by :func:`mil.data.synthetic.write_synthetic_cohort` like the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mil.data import synthetic as _s

#: sd of the noise on the ordinal cohort's severity before it is cut into grades
ORDINAL_GRADE_NOISE = 0.08
#: the severities at which the ordinal cohort's grades 1 | 2 | 3 | 4 are cut
ORDINAL_CUTS = (0.25, 0.5, 0.75)


def ordinal_patients(rng, features, patients, prototypes, shift, tiles) -> list[dict]:
    """The ordinal cohort's slides and rows: planted share 0.3 u, grade 1-4 cut from u + noise."""
    u = rng.uniform(0.0, 1.0, len(patients))
    grade = 1 + np.digitize(u + rng.normal(0.0, ORDINAL_GRADE_NOISE, len(patients)), ORDINAL_CUTS)
    rows = []
    for i, (pid, n_slides) in enumerate(patients):
        sids = _s._write_slides(rng, features, pid, n_slides, 0.3 * u[i], prototypes, shift, tiles)
        rows += [
            {
                "case_id": pid,
                "slide_id": sid,
                "grade": int(grade[i]),
                "true_severity": round(float(u[i]), 4),
            }
            for sid in sids
        ]
    return rows


#: the share of patients whose cell of each target the multi-target cohort leaves empty
MULTITARGET_MISSING = 0.3


def multitarget_patients(rng, features, patients, prototypes, shift, tiles) -> list[dict]:
    """The multi-target cohort's slides and rows (see :func:`write_synthetic_cohort`)."""
    n = len(patients)
    second = rng.normal(0, 1, len(shift))
    second -= second @ shift / (shift @ shift) * shift  # orthogonal to the first direction
    second *= 1.5 * np.linalg.norm(shift) / np.linalg.norm(second)
    msi = rng.uniform(size=n) < 0.4
    share = rng.uniform(0.0, 0.3, n)
    tmb = np.clip(5.0 + 60.0 * share + rng.normal(0.0, 2.0, n), 0.5, None)
    grade = 1 + np.digitize(share + rng.normal(0.0, 0.03, n), (0.1, 0.2))
    empty = rng.uniform(size=(n, 3)) < MULTITARGET_MISSING
    rows = []
    for i, (pid, n_slides) in enumerate(patients):
        for s in range(n_slides):
            sid = f"{pid}-S{s + 1}"
            m = int(rng.integers(tiles[0], tiles[1] + 1))
            feats, coords, label = _s.synthetic_slide(
                rng, m, prototypes, shift, rng.uniform(0.08, 0.2) if msi[i] else 0.0
            )
            k = int(round(share[i] * m))
            if k:
                near = np.argsort(((coords - coords[rng.integers(m)]) ** 2).sum(1), kind="stable")[
                    :k
                ]
                feats[near] += second.astype(np.float32)
            _s.write_slide(features / f"{sid}.h5", feats, coords, label)
            rows.append(
                {
                    "case_id": pid,
                    "slide_id": sid,
                    "msi_status": None if empty[i, 0] else ("MSI" if msi[i] else "MSS"),
                    "tmb": None if empty[i, 1] else round(float(tmb[i]), 3),
                    "grade": None if empty[i, 2] else int(grade[i]),
                    "true_share": round(float(share[i]), 4),
                }
            )
    return rows


def _ordinal_demo(root: Path, cohort: Path) -> dict:
    """The ordinal demo: grades 1-4 of patient bags, the defaults otherwise."""
    task = {"type": "ordinal", "thresholds": "marginal", "decision": "median"}
    return _s.patient_demo("demo_ordinal", task, root, cohort, "ordinal", label_col="grade")


def _multitarget_demo(root: Path, cohort: Path) -> dict:
    """The multi-target demo: MSI status, TMB and grade of patient bags, 30% of each missing."""
    task = {
        "type": "multitarget",
        "weights": "equal",
        "targets": [
            {"name": "msi", "label_col": "msi_status", "classes": ["MSS", "MSI"]},
            {"name": "tmb", "label_col": "tmb", "type": "regression"},
            {"name": "grade", "label_col": "grade", "type": "ordinal"},
        ],
    }
    return _s.patient_demo("demo_multitarget", task, root, cohort, "multitarget")


def targets_demo(kind: str, root: Path, cohort: Path) -> dict:
    """The demo config of ``kind`` (``ordinal``, ``multitarget``) with its cohort at ``cohort``."""
    return (_ordinal_demo if kind == "ordinal" else _multitarget_demo)(root, cohort)

"""Shared fixtures: small synthetic cohorts written to disk like a user's data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mil.config import config_from_dict
from mil.data.synthetic import SMALL_LESION_WITNESS_FRACTION, write_synthetic_cohort

# small tensors: one thread avoids oversubscription when other processes share the two cores
torch.set_num_threads(1)


def small_config(root: Path, **train) -> dict:
    """A fast classification config over a small cohort under ``root`` (cohort written once)."""
    csv, feats = root / "cohort.csv", root / "features"
    if not csv.exists():
        write_synthetic_cohort(
            "classification",
            csv,
            feats,
            n_patients=30,
            n_two_slides=6,
            dim=16,
            min_tiles=20,
            max_tiles=80,
            shift_norm=6.0,
            witness_fraction=SMALL_LESION_WITNESS_FRACTION,
        )
    return {
        "name": "small",
        "task": {"type": "classification"},
        "data": {"csv": str(csv), "features": str(feats), "patient_col": "case_id"},
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.2, "seed": 0},
        "model": {"name": "abmil", "hidden_dim": 16},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-3, "patience": None, "seed": 0, **train},
    }


@pytest.fixture
def small_cohort(tmp_path: Path) -> dict:
    return small_config(tmp_path)


@pytest.fixture
def small_cfg(small_cohort):
    return config_from_dict(small_cohort)

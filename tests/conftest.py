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


def flipped_test_labels(raw: dict, clean_run: Path, out: Path) -> dict:
    """``raw`` (a :func:`small_config`) on the split files of ``clean_run``, with the labels of
    fold 0's test slides flipped in a copy of its cohort CSV at ``out``: a poisoning test's
    second run, whose training bags are the clean run's own."""
    import pandas as pd

    cohort = pd.read_csv(raw["data"]["csv"])
    test0 = set(pd.read_csv(clean_run / "splits" / "splits_0.csv")["test"].dropna())
    flip = cohort["slide_id"].isin(test0)
    cohort.loc[flip, "label"] = cohort.loc[flip, "label"].map(
        {"positive": "negative", "negative": "positive"}
    )
    cohort.to_csv(out, index=False)
    return {
        **raw,
        "data": {**raw["data"], "csv": str(out)},
        "splits": {**raw["splits"], "dir": str(clean_run / "splits")},
    }


def evaluate_both_ways(run_dir: Path, data: dict, out: Path) -> list[tuple]:
    """``mil evaluate RUN EXT`` on the external cohort ``data`` (a ``data:`` section), with the
    fold ensemble and with ``--refit``: each one's ``predictions.csv`` and ``summary.json``
    metrics (the round trip every task's tests make)."""
    import json

    import pandas as pd
    import yaml

    from mil.cli import main

    out.mkdir(parents=True, exist_ok=True)
    ext = out / "ext.yaml"
    ext.write_text(yaml.safe_dump({"data": data}))
    found = []
    for extra in ([], ["--refit"]):
        where = out / f"eval{len(extra)}"
        argv = ["evaluate", str(run_dir), str(ext), "--out", str(where), "--n-boot", "20"]
        assert main([*argv, "--quiet", *extra]) == 0
        summary = json.loads((where / "summary.json").read_text())
        found.append((pd.read_csv(where / "predictions.csv"), summary["metrics"]))
    return found


def assert_predict_reproduces(run, fold: int, columns: list[str], bags=None, **tol) -> None:
    """``Run.predict`` of a fold's test bags (``bags``: a mapping from bag to slides, for
    patient bags; their ids otherwise) equals the fold's saved ``predictions.csv`` in
    ``columns`` (``tol``: numpy's ``rtol``/``atol``)."""
    import numpy as np

    saved = run.predictions(fold)
    again = run.predict(saved["bag_id"].tolist() if bags is None else bags, folds=[fold])
    again = again.set_index("bag_id").loc[saved["bag_id"]]
    for col in columns:
        np.testing.assert_allclose(again[col], saved[col].to_numpy(), **tol)

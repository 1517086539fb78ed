"""Data-parallel training (torchrun, gloo on CPU) against one process on the same folds.

Reference: the single-process run of the same config. Two ranks deal every
loss batch out between them; because each rank's loss spans the whole
batch (gathered outputs), the two-process run must give the one-process
predictions, to float rounding, for a classifier, for a model with an
auxiliary instance loss (CLAM) and for the Cox loss, whose risk set would
differ if each rank scored only its own bags.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch.distributed as tdist
import yaml

from mil.config import config_from_dict
from mil.train.runner import run_cv
from tests.conftest import small_config
from tests.test_survival_task import survival_config

pytestmark = pytest.mark.skipif(not tdist.is_available(), reason="torch.distributed missing")


def torchrun(cfg_path: Path, out: Path, *extra: str, ranks: int = 2, ok: bool = True) -> str:
    """``torchrun --standalone --nproc_per_node=ranks -m mil train``; returns its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "mil",
        "train",
        str(cfg_path),
        "--out",
        str(out),
        "--folds",
        "0",
        "--quiet",
        *extra,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert (res.returncode == 0) == ok, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def centred_scores(path: Path) -> dict[str, np.ndarray]:
    """Instance scores per bag minus their bag mean (a softmax ignores a shared shift, so
    the bias in front of it has no gradient and Adam moves it by rounding noise)."""
    with h5py.File(path) as f:
        return {k: f[k]["scores"][:] - f[k]["scores"][:].mean() for k in f}


@pytest.mark.parametrize("case", ["abmil", "clam_sb", "cox", "supcon"])
def test_two_ranks_match_one_process(tmp_path: Path, case: str) -> None:
    if case == "cox":
        raw = survival_config(tmp_path, "cox", epochs=4, batch_size=12, lr=2e-3, patience=None)
        raw["model"]["dropout"] = 0.0
        value_cols = ["risk"]
    else:
        raw = small_config(tmp_path, epochs=4, batch_size=6, threads=1)
        raw["model"] = {"name": case, "hidden_dim": 16, "dropout": 0.0}
        if case == "supcon":  # SC-MIL's contrastive term spans the whole batch too
            raw["model"]["name"] = "abmil"
            raw["task"]["supcon"] = {"weight": 0.5}
        raw["data"]["standardize"] = True
        value_cols = ["prob_negative", "prob_positive"]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    one = run_cv(
        config_from_dict(raw), tmp_path / "one", folds=[0], progress=False, log=print, n_boot=10
    )
    if case == "abmil":
        # a last loss batch of one bag: the second rank forwards a stand-in bag at weight zero
        n_train = pd.read_csv(Path(raw["splits"]["dir"]) / "splits_0.csv")["train"].count()
        assert n_train % 6 == 1, n_train
    out = torchrun(cfg_path, tmp_path / "two")
    a = pd.read_csv(one / "fold_0" / "predictions.csv")
    b = pd.read_csv(tmp_path / "two" / "fold_0" / "predictions.csv")
    assert a["bag_id"].tolist() == b["bag_id"].tolist()
    va, vb = a[value_cols].to_numpy(), b[value_cols].to_numpy()
    if case == "cox":  # the Cox loss ignores a shared shift of the risks (see centred_scores)
        va, vb = va - va.mean(), vb - vb.mean()
    np.testing.assert_allclose(vb, va, atol=2e-5)
    ha = pd.read_csv(one / "fold_0" / "history.csv")
    hb = pd.read_csv(tmp_path / "two" / "fold_0" / "history.csv")
    np.testing.assert_allclose(hb["train_loss"], ha["train_loss"], rtol=1e-5)
    sa, sb = (
        centred_scores(one / "fold_0" / "attention.h5"),
        centred_scores(tmp_path / "two" / "fold_0" / "attention.h5"),
    )
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], atol=2e-5)
    # rank 0 alone speaks and writes: one summary, one results line
    assert out.count("results: ") == 1
    assert (tmp_path / "two" / "summary.json").is_file()
    if case == "abmil":  # a second launch resumes: the finished fold is skipped on every rank
        again = torchrun(cfg_path, tmp_path / "two")
        assert "fold 0: done earlier, skipped" in again


def test_an_error_on_one_rank_is_one_message_per_rank(tmp_path: Path) -> None:
    """Rank 0 names the problem; the rank it leaves waiting says why it stopped, no traceback."""
    raw = small_config(tmp_path)
    raw["data"]["features"] = str(tmp_path / "no_such_folder")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = torchrun(cfg_path, tmp_path / "run", ok=False)
    assert (
        f"mil: error: data.features: feature folder not found: {tmp_path / 'no_such_folder'}" in out
    )
    assert "mil: error: process 1 of 2 stopped: another process of this run failed" in out
    assert "[rank1]: Traceback" not in out and "[rank0]: Traceback" not in out
    assert not (tmp_path / "run").exists()

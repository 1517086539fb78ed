"""Rare classes: balanced loss batches (counted by hand), ``train.batch_size: auto`` (nnMIL's rule
by hand), the focal loss (by hand, torchvision's sigmoid formula, cross-entropy at gamma 0), and
the imbalance study's smoke run (benchmarks/imbalance.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mil.config import config_from_dict
from mil.errors import ConfigError
from mil.losses.focal import focal_loss
from mil.tasks import make_task
from mil.train.optim import training_budget
from mil.train.runner import run_cv
from mil.train.sampling import auto_batch_size, balanced_batches, loss_batches
from tests.conftest import small_config

BASE = {"data": {"csv": "x.csv", "features": "f"}}
pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def quiet(*a):
    pass


def test_every_balanced_batch_holds_each_class_equally():
    groups = np.array([0] * 30 + [1] * 6 + [2] * 2)
    batches = balanced_batches(groups, 9, np.random.default_rng(0))
    assert len(batches) == math.ceil(38 / 9)  # the random sampler's number of batches
    for b in batches:  # 9 // 3 = 3 bags of every class, counted
        assert [int((groups[b] == g).sum()) for g in (0, 1, 2)] == [3, 3, 3]
    seen = np.concatenate(batches)
    # each class is a reshuffled cycle: the common class's bags at most once, the rare ones'
    # counts differ by at most one (15 draws over 2 bags: 8 and 7)
    assert np.bincount(seen[groups[seen] == 0]).max() == 1
    assert sorted(np.bincount(seen[groups[seen] == 2])[30 + 6 :].tolist()) == [7, 8]
    # a batch size that is not a multiple of the classes: batch_size // classes of each
    for b in balanced_batches(groups, 10, np.random.default_rng(1)):
        assert len(b) == 9 and set(np.bincount(groups[b]).tolist()) == {3}


def test_balanced_batches_are_repeatable_under_a_seed():
    groups = np.repeat([0, 1], [40, 5])
    a = balanced_batches(groups, 8, np.random.default_rng(7))
    b = balanced_batches(groups, 8, np.random.default_rng(7))
    c = balanced_batches(groups, 8, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([100, 100], 16),  # ceil(3 / 0.5) = 6, raised to 16
        ([100, 20], 18),  # 1:5: p = 20/120, ceil(3 * 120 / 20) = 18
        ([60, 5], 39),  # 1:12: ceil(3 * 65 / 5) = 39
        ([200, 10], 48),  # 1:20: ceil(3 * 210 / 10) = 63, clipped to 48
        ([50, 30, 7], 38),  # three classes: ceil(3 * 87 / 7) = ceil(37.3) = 38
    ],
)
def test_auto_batch_size_by_hand(counts, expected):
    assert auto_batch_size(np.repeat(np.arange(len(counts)), counts)) == expected


def test_auto_batch_size_without_groups_is_the_lower_bound():
    assert auto_batch_size(None) == 16


def test_survival_batches_balance_events_and_censored():
    cfg = config_from_dict(
        {**BASE, "task": {"type": "survival"}, "train": {"sampler": "balanced", "batch_size": 6}}
    )
    task = make_task(cfg, [])
    bags = pd.DataFrame({"event": [1] * 5 + [0] * 25, "time": np.arange(30.0)})
    batches = loss_batches(task, bags, cfg.train, np.random.default_rng(0))
    assert len(batches) == 5
    for b in batches:
        assert bags["event"].to_numpy()[b].sum() == 3 and len(b) == 6


def test_sampler_and_auto_batch_size_config():
    cfg = config_from_dict({**BASE, "train": {"batch_size": "auto", "sampler": "balanced"}})
    task = make_task(cfg, ["a", "b"])
    train = pd.DataFrame({"label": [0] * 40 + [1] * 8})
    # auto: ceil(3 * 48 / 8) = 18 bags, 9 of each class; 48 bags -> ceil(48 / 18) = 3 batches
    batches = loss_batches(task, train, cfg.train, np.random.default_rng(0))
    assert [len(b) for b in batches] == [18, 18, 18]
    assert training_budget(task, train, cfg.train).steps_per_epoch == 3
    for bad in ({"batch_size": 0}, {"batch_size": "big"}, {"sampler": "inverse"}):
        with pytest.raises(ConfigError, match="train.(batch_size|sampler)"):
            config_from_dict({**BASE, "train": bad})
    with pytest.raises(
        ConfigError, match="c.yaml: train.sampler: balanced: a regression task has no"
    ):
        config_from_dict(
            {**BASE, "task": {"type": "regression"}, "train": {"sampler": "balanced"}}, "c.yaml"
        )
    reg = config_from_dict({**BASE, "task": {"type": "regression"}})
    reg.train.sampler = "balanced"  # past the config's check, the loop refuses too
    with pytest.raises(ConfigError, match="no groups of bags to balance"):
        loss_batches(
            make_task(reg, []),
            pd.DataFrame({"label": [1.0, 2.0]}),
            reg.train,
            np.random.default_rng(0),
        )


@pytest.mark.parametrize(
    ("counts", "balanced"),
    [((40, 8), True), ((41, 9), False), ((8, 8, 40), True), ((20, 20), False)],
)
def test_the_auto_sampler_balances_a_fold_at_five_to_one(counts, balanced):
    """``train.sampler: auto`` (the default): a classification fold whose commonest class
    outnumbers its rarest 5:1 or more gets balanced batches (each class ``batch_size // G`` in
    every batch), any other shuffled ones (the task's own batches, drawn from the same rng)."""
    cfg = config_from_dict({**BASE, "train": {"batch_size": 12}})
    assert cfg.train.sampler == "auto"
    classes = [f"c{k}" for k in range(len(counts))]
    task = make_task(cfg, classes)
    train = pd.DataFrame({"label": np.repeat(np.arange(len(counts)), counts)})
    batches = loss_batches(task, train, cfg.train, np.random.default_rng(3))
    shuffled = task.batches(train, 12, np.random.default_rng(3))
    if balanced:
        each = 12 // len(counts)
        for b in batches:
            assert (np.bincount(train["label"].to_numpy()[b], minlength=len(counts)) == each).all()
    else:
        assert all(np.array_equal(a, b) for a, b in zip(batches, shuffled))
        assert len(batches) == len(shuffled)


def test_the_auto_sampler_shuffles_survival_and_regression():
    for task_type, frame in (
        ("survival", pd.DataFrame({"event": [1] * 4 + [0] * 40, "time": np.arange(44.0)})),
        ("regression", pd.DataFrame({"label": np.arange(44.0)})),
    ):
        cfg = config_from_dict({**BASE, "task": {"type": task_type}, "train": {"batch_size": 8}})
        task = make_task(cfg, [])
        got = loss_batches(task, frame, cfg.train, np.random.default_rng(0))
        want = task.batches(frame, 8, np.random.default_rng(0))
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), task_type


def test_a_run_with_balanced_batches_is_repeatable(tmp_path):
    raw = small_config(tmp_path, epochs=2, sampler="balanced")
    cfg = config_from_dict(raw)
    runs = [
        run_cv(cfg, tmp_path / f"run{i}", folds=[0], progress=False, log=quiet, n_boot=10)
        for i in range(2)
    ]
    a, b = (pd.read_csv(r / "fold_0" / "predictions.csv") for r in runs)
    pd.testing.assert_frame_equal(a, b)
    random = run_cv(
        config_from_dict(small_config(tmp_path, epochs=2)),
        tmp_path / "random",
        folds=[0],
        progress=False,
        log=quiet,
        n_boot=10,
    )
    ha, hr = (pd.read_csv(r / "fold_0" / "history.csv") for r in (runs[0], random))
    assert ha["steps"].tolist() == hr["steps"].tolist()  # the same epoch length
    assert not np.allclose(
        a.filter(like="prob_"),
        pd.read_csv(random / "fold_0" / "predictions.csv").filter(like="prob_"),
    )


# ---- focal loss ----------------------------------------------------------------------------


def focal_by_hand(
    logits: torch.Tensor, y: list[int], gamma: float, w: list[float] | None = None
) -> float:
    z = logits.double().tolist()
    num = den = 0.0
    for row, k in zip(z, y):
        p = math.exp(row[k]) / sum(math.exp(v) for v in row)
        wk = 1.0 if w is None else w[k]
        num += wk * (1 - p) ** gamma * -math.log(p)
        den += wk
    return num / den


@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
def test_focal_loss_by_hand(gamma):
    gen = torch.Generator().manual_seed(2)
    logits, y = torch.randn(7, 3, generator=gen) * 2, [0, 2, 1, 1, 0, 2, 2]
    got = focal_loss(logits, torch.tensor(y), gamma)
    assert float(got) == pytest.approx(focal_by_hand(logits, y, gamma), rel=1e-6)
    w = [0.5, 2.0, 1.0]
    got = focal_loss(logits, torch.tensor(y), gamma, weight=torch.tensor(w))
    assert float(got) == pytest.approx(focal_by_hand(logits, y, gamma, w), rel=1e-6)


def test_binary_focal_loss_is_torchvisions_sigmoid_formula():
    """torchvision.ops.sigmoid_focal_loss (alpha < 0: no alpha), written out: on the logit
    difference s = z1 - z0, p = sigmoid(s), ce = BCE(s, y), p_t = p y + (1 - p)(1 - y),
    loss = mean(ce (1 - p_t)^gamma)."""
    gen = torch.Generator().manual_seed(4)
    logits, y = torch.randn(9, 2, generator=gen) * 3, torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    s, t = logits[:, 1] - logits[:, 0], y.float()
    p = torch.sigmoid(s)
    ce = F.binary_cross_entropy_with_logits(s, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    expected = (ce * (1 - p_t) ** 2.0).mean()
    assert float(focal_loss(logits, y, 2.0)) == pytest.approx(float(expected), rel=1e-5)


def test_focal_gamma_zero_is_cross_entropy():
    gen = torch.Generator().manual_seed(5)
    logits, y = torch.randn(11, 4, generator=gen), torch.randint(0, 4, (11,), generator=gen)
    w = torch.tensor([1.0, 3.0, 0.5, 2.0])
    assert torch.allclose(focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))
    assert torch.allclose(
        focal_loss(logits, y, 0.0, weight=w), F.cross_entropy(logits, y, weight=w)
    )


def test_the_classification_task_uses_the_focal_loss_it_is_given():
    cfg = config_from_dict(
        {**BASE, "task": {"loss": "focal", "gamma": 1.5, "class_weights": [1.0, 4.0]}}
    )
    task = make_task(cfg, ["a", "b"])
    task.fit_fold(pd.DataFrame({"label": [0, 0, 1]}))
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 0, 1])
    assert float(task.loss(logits, {"label": y})) == pytest.approx(
        focal_by_hand(logits, y.tolist(), 1.5, [1.0, 4.0]), rel=1e-6
    )
    assert "focal loss (gamma 1.5)" in task.methods()
    with pytest.raises(ConfigError, match="task.gamma must be >= 0"):
        config_from_dict({**BASE, "task": {"loss": "focal", "gamma": -1}})
    with pytest.raises(ConfigError, match=r"task.loss = 'nll'; expected one of \['ce', 'focal'\]"):
        config_from_dict({**BASE, "task": {"loss": "nll"}})
    # configs saved before tasks owned their options hold survival's default loss: ignored
    assert config_from_dict({**BASE, "task": {"loss": "cox"}}).task.options.loss == "ce"


# ---- the study's smoke run ------------------------------------------------------------------


def test_imbalance_benchmark_smoke(tmp_path):
    """benchmarks/imbalance.py --smoke: the minority subsampled in the training folds only (the
    test folds untouched), each method run, the table's paired differences against CE."""
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        import imbalance
    finally:
        sys.path.remove(str(root))
    table = imbalance.main(["--smoke", "--out", str(tmp_path)])
    assert set(table["method"]) == set(imbalance.SMOKE["methods"])
    ce = table[table["method"] == "ce"]
    assert (ce["diff_auprc"] == 0).all()
    from mil.train.summary import run_task

    for _, row in table.iterrows():
        assert row["auprc_lo"] <= row["auprc"] <= row["auprc_hi"]
        run = tmp_path / "synthetic" / f"r{row['ratio']}" / f"{row['method']}_s0"
        pred = imbalance.pooled(run)  # the study's one-metric scorers agree with the task's
        for m in ("auprc", "balanced_accuracy", "f1"):
            assert row[m] == pytest.approx(run_task(run).metric_value(pred, m), abs=1e-12)
    # the test bags are every bag of the fold, at every ratio; the training minority shrinks
    counts = imbalance.fold_counts(tmp_path)
    assert counts.groupby("fold")["n_test"].nunique().eq(1).all()
    assert (counts["n_train_minority"] <= counts["n_train_majority"] / counts["ratio"] + 1).all()
    # two seeds: each metric is the mean of the seeds' own (the same test bags in both)
    table = imbalance.main(["--smoke", "--out", str(tmp_path), "--seeds", "2"])
    assert (table["seeds"] == 2).all()
    for _, row in table.iterrows():
        runs = [
            tmp_path / "synthetic" / f"r{row['ratio']}" / f"{row['method']}_s{s}" for s in (0, 1)
        ]
        for m in ("auprc", "f1"):
            own = [run_task(r).metric_value(imbalance.pooled(r), m) for r in runs]
            assert row[m] == pytest.approx(np.mean(own), abs=1e-12)

"""Seed ensembles (``train.seeds``): each fold's model is the average of N replicas trained from
different seeds, checked by hand from the replicas' own files: probabilities averaged,
instance scores averaged, Cox risks averaged on each replica's training scale and then with
the linear member, and ``mil.Run.predict`` and the refit reproducing the same average."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mil.config import config_from_dict
from mil.errors import ConfigError
from mil.run import Run
from mil.train.inference import FoldModel, bags_of
from mil.train.refit import refit
from mil.train.runner import run_cv
from tests.conftest import small_config
from tests.test_survival_task import survival_config


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    raw = small_config(root, seeds=3, faithfulness=False)
    cfg = config_from_dict(raw)
    return cfg, run_cv(cfg, root / "run", progress=False, log=quiet, n_boot=20)


def test_the_fold_prediction_is_the_mean_of_its_replicas(seeded):
    _, out = seeded
    for k in ("0", "1"):
        fold = out / f"fold_{k}"
        members = json.loads((fold / "members.json").read_text())["members"]
        assert [r["name"] for r in members[0]["replicas"]] == [
            "abmil_seed0",
            "abmil_seed1",
            "abmil_seed2",
        ]
        probs = [
            pd.read_csv(fold / "members" / f"abmil_seed{j}" / "predictions.csv").set_index(
                "bag_id"
            )["prob_positive"]
            for j in range(3)
        ]
        assert not np.allclose(probs[0], probs[1])  # the seeds made different models
        saved = pd.read_csv(fold / "predictions.csv").set_index("bag_id")
        by_hand = pd.concat(probs, axis=1).mean(axis=1).loc[saved.index]
        assert np.allclose(saved["prob_positive"], by_hand, atol=1e-12)
        assert (fold / "members" / "abmil_seed1" / "model.pt").is_file()
        assert not (fold / "members" / "abmil_seed0" / "model.pt").exists()  # it is the fold's


def test_instance_scores_are_the_mean_of_the_replicas(seeded):
    cfg, out = seeded
    run = Run(out)
    slide = run.predictions("0")["bag_id"].iloc[0]
    slides, store = bags_of([slide], run._feature_index)
    paths = [out / "fold_0" / "model.pt"] + [
        out / "fold_0" / "members" / f"abmil_seed{j}" / "model.pt" for j in (1, 2)
    ]
    each = []
    for j, path in enumerate(paths):
        model = FoldModel(path, run.config, "0")
        assert bool(model.replicas) == (j == 0)  # the fold's model.pt heads the ensemble
        model.replicas = []  # replica 0 alone
        fwd = model.forward(slides, store, keep_scores=True)
        each.append(model.instance_scores(fwd, "instance_logits", None, slide))
    saved = run.scores(slide, kind="instance_logits")["score"].to_numpy()
    assert np.allclose(saved, np.mean(each, axis=0), atol=1e-5)
    fresh = run.fold_scores(slide, folds=["0"], kind="instance_logits")["fold_0"].to_numpy()
    assert np.allclose(fresh, saved, atol=1e-5)


def test_predict_and_the_refit_use_the_replicas(seeded):
    cfg, out = seeded
    run = Run(out)
    saved = run.predictions("1")
    again = run.predict(saved["bag_id"].tolist(), folds=["1"], per_fold=True).set_index("bag_id")
    assert np.allclose(
        again.loc[saved["bag_id"], "prob_positive"], saved["prob_positive"], atol=1e-9
    )
    refit(cfg, out, progress=False, log=quiet)
    replicas = json.loads((out / "refit" / "members.json").read_text())["members"][0]["replicas"]
    assert len(replicas) == 3
    slides, store = bags_of(saved["bag_id"].tolist(), run._feature_index)
    paths = [out / "refit" / "model.pt"] + [out / "refit" / r["model"] for r in replicas[1:]]
    alone = [FoldModel(p, run.config, "refit") for p in paths]
    alone[0].replicas = []
    by_hand = np.mean([m.outputs(slides, store)["prob_positive"] for m in alone], axis=0)
    pred = run.predict(saved["bag_id"].tolist(), folds=["refit"])
    assert np.allclose(pred["prob_positive"], by_hand, atol=1e-9)


def test_survival_replicas_then_the_linear_member(tmp_path):
    """Two-stage average: the replicas on their own training scales, then the model's average
    and meanpool_linear on theirs."""
    raw = survival_config(tmp_path, seeds=2, faithfulness=False, patience=2)
    out = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet, n_boot=10)
    fold = out / "fold_0"

    def z(name: str) -> pd.Series:
        test = pd.read_csv(fold / "members" / name / "predictions.csv").set_index("bag_id")["risk"]
        train = pd.read_csv(fold / "members" / name / "predictions_train.csv")["risk"]
        return (test - train.mean()) / train.std(ddof=1), train

    reps = [z(f"abmil_seed{j}") for j in (0, 1)]
    model_test = pd.concat([r[0] for r in reps], axis=1).mean(axis=1)
    train_z = [
        (
            pd.read_csv(fold / "members" / f"abmil_seed{j}" / "predictions_train.csv")["risk"]
            - r[1].mean()
        )
        / r[1].std(ddof=1)
        for j, r in enumerate(reps)
    ]
    model_train = pd.concat(train_z, axis=1).mean(axis=1)
    linear, _ = z("meanpool_linear")
    model_z = (model_test - model_train.mean()) / model_train.std(ddof=1)
    by_hand = pd.concat([model_z, linear], axis=1).mean(axis=1)
    saved = pd.read_csv(fold / "predictions.csv").set_index("bag_id")["risk"]
    assert np.allclose(saved, by_hand.loc[saved.index], atol=1e-10)


def test_seeds_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="train.seeds"):
        config_from_dict(small_config(tmp_path, seeds=0))

"""One path from a fold's model to its scores (mil.train.scoring.score_fold): the runner's fold
outputs, ``mil evaluate`` on that fold's own test bags and ``mil.Run.predict`` agree; the
metrics are scikit-learn's; a saved fold model's deletion/insertion areas are the runner's."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from mil.config import config_from_dict
from mil.evaluate import evaluate
from mil.run import Run
from mil.train.runner import run_cv
from tests.conftest import small_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROBS = ["prob_negative", "prob_positive"]


@pytest.fixture(scope="module")
def one_fold(tmp_path_factory):
    """Fold 0 of a run whose fold ensemble holds two seed replicas and a linear member."""
    root = tmp_path_factory.mktemp("scoring")
    raw = {**small_config(root, epochs=2, seeds=2), "ensemble": ["meanpool_linear"]}
    out = run_cv(
        config_from_dict(raw), root / "run", folds=[0], progress=False, log=lambda *a: 0, n_boot=20
    )
    return root, raw, out


def test_evaluate_on_the_folds_test_bags_is_the_fold_and_run_predict(one_fold):
    root, raw, out = one_fold
    fold = pd.read_csv(out / "fold_0" / "predictions.csv").set_index("bag_id")
    cohort = pd.read_csv(raw["data"]["csv"], dtype={"slide_id": str})
    cohort[cohort["slide_id"].isin(fold.index)].to_csv(root / "test0.csv", index=False)
    data = {**raw["data"], "csv": str(root / "test0.csv")}
    (root / "test0.yaml").write_text(yaml.safe_dump({"data": data}))
    summary = evaluate(out, root / "test0.yaml", root / "eval", n_boot=20)

    ext = pd.read_csv(root / "eval" / "predictions.csv").set_index("bag_id").loc[fold.index]
    run = Run(out)
    alone = run.predict(fold.index.tolist(), folds=[0]).set_index("bag_id").loc[fold.index]
    for other in (ext, alone):
        assert np.allclose(other[PROBS], fold[PROBS], atol=1e-6, rtol=0)
        assert (other["pred"] == fold["pred"]).all()
    assert (ext["pred_op"] == fold["pred_op"]).all()  # the fold's threshold
    assert (ext["n_folds"] == 1).all()

    # one predictor on the same bags: the evaluation's value is the fold's metric, as sklearn has it
    by_sklearn = roc_auc_score(fold["label_index"], fold["prob_positive"])
    fold_metrics = json.loads((out / "fold_0" / "metrics.json").read_text())["metrics"]
    assert summary["metrics"]["auc"]["value"] == pytest.approx(by_sklearn, abs=1e-9)
    assert fold_metrics["auc"] == pytest.approx(by_sklearn, abs=1e-9)
    assert summary["metrics"]["brier"]["value"] == pytest.approx(fold_metrics["brier"], abs=1e-6)


def test_the_two_summaries_share_their_keys_with_one_meaning(one_fold):
    root, _, out = one_fold
    if not (root / "eval" / "summary.json").is_file():
        pytest.skip("needs the evaluation of the test above")
    run_summary = json.loads((out / "summary.json").read_text())
    ext_summary = json.loads((root / "eval" / "summary.json").read_text())
    head = ("name", "task", "model", "folds", "n_boot", "n_bags", "n_patients", "metrics")
    assert all(k in run_summary and k in ext_summary for k in head)
    assert run_summary["folds"] == ext_summary["folds"] == ["0"]
    assert run_summary["n_bags"] == ext_summary["n_bags"]  # fold 0's test bags, each once
    for entry in run_summary["metrics"].values():
        assert "mean" in entry and "value" not in entry
    for entry in ext_summary["metrics"].values():
        assert "value" in entry and "mean" not in entry
    # one fold, the same rows: the pooled CI of a run and of an evaluation are the same CI
    assert ext_summary["metrics"]["auc"]["ci95_pooled"] == pytest.approx(
        run_summary["metrics"]["auc"]["ci95_pooled"]
    )


def test_a_saved_fold_models_faithfulness_is_the_runners(one_fold):
    """Run.faithfulness re-predicts the test bags with the saved model (its replicas' scores
    averaged, the fold's preprocessing applied to the raw features): the runner's areas."""
    _, _, out = one_fold
    saved = json.loads((out / "fold_0" / "metrics.json").read_text())["metrics"]
    areas = Run(out).faithfulness(0)
    keys = [k for k in saved if k.startswith(("deletion_", "insertion_"))]
    assert {"deletion_main", "insertion_random"} <= set(keys)
    assert sorted(areas) == sorted(keys)
    for k in keys:
        assert areas[k] == pytest.approx(saved[k], abs=1e-5), k
    extra = Run(out).faithfulness(0, kinds=["instance_logits", "contribution"])
    assert {"deletion_instance_logits", "deletion_contribution"} <= set(extra)

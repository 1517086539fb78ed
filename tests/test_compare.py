"""`mil compare`: several models through the same folds, one table."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from mil.cli import main
from mil.compare import entries, paired_differences, run_compare
from mil.config import config_from_dict
from mil.errors import ConfigError, DataError
from mil.models import available, create


def quiet(*a):
    pass


def test_compare_runs_each_model_on_the_same_splits_and_tabulates(tmp_path, small_cohort):
    raw = {
        **small_cohort,
        "compare": [
            {"model": {"name": "mean"}},
            {
                "model": {"name": "abmil", "hidden_dim": 8},
                "train": {"epochs": 2},
                "label": "abmil8",
            },
        ],
    }
    cfg = config_from_dict(raw)
    table = run_compare(cfg, tmp_path / "cmp", progress=False, log=quiet)
    assert table["model"].tolist() == ["mean", "abmil8"]
    for label in ("mean", "abmil8"):
        run = tmp_path / "cmp" / label
        # every model saw exactly the same split files
        for k in range(3):
            a = pd.read_csv(run / "splits" / f"splits_{k}.csv")
            b = pd.read_csv(tmp_path / "cmp" / "mean" / "splits" / f"splits_{k}.csv")
            pd.testing.assert_frame_equal(a, b)
        # table figures are those of the run's own summary
        s = json.loads((run / "summary.json").read_text())
        row = table.set_index("model").loc[label]
        assert np.isclose(row["auc_mean"], s["metrics"]["auc"]["mean"])
        assert np.isclose(row["auc_sd"], s["metrics"]["auc"]["sd"])
        assert np.isclose(row["seconds_per_epoch"], s["metrics"]["seconds_per_epoch"]["mean"])
    # per-entry train overrides reach that run only
    assert (
        yaml.safe_load((tmp_path / "cmp" / "abmil8" / "config.yaml").read_text())["train"]["epochs"]
        == 2
    )
    assert (
        yaml.safe_load((tmp_path / "cmp" / "mean" / "config.yaml").read_text())["train"]["epochs"]
        == 3
    )
    # parameter counts equal those of the models built independently (cohort dim 16, 2 classes)
    params = table.set_index("model")["params"]
    expect = create("abmil", in_dim=16, n_out=2, hidden_dim=8)
    assert params["abmil8"] == sum(p.numel() for p in expect.parameters())
    assert params["mean"] == sum(p.numel() for p in create("mean", in_dim=16, n_out=2).parameters())
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| abmil8 |" in md and "auc (mean ± sd)" in md
    assert len(pd.read_csv(tmp_path / "cmp" / "comparison.csv")) == 2
    # pairwise: against the run with the best mean AUC, on the pooled out-of-fold predictions
    t = table.set_index("model")
    ref = t["auc_mean"].idxmax()
    other = "mean" if ref == "abmil8" else "abmil8"
    assert (t["reference"] == ref).all() and t.loc[ref, "delta"] == 0

    def pooled_auc(label):
        pred = pd.concat(
            pd.read_csv(tmp_path / "cmp" / label / f"fold_{k}" / "predictions.csv")
            for k in range(3)
        )
        return roc_auc_score(pred["label_index"], pred["prob_positive"])

    assert t.loc[other, "auc_pooled"] == pytest.approx(pooled_auc(other))
    assert t.loc[other, "delta"] == pytest.approx(pooled_auc(other) - pooled_auc(ref))
    assert t.loc[other, "delta_ci_low"] <= t.loc[other, "delta"] <= t.loc[other, "delta_ci_high"]
    assert 0 < t.loc[other, "delta_p"] <= 1
    assert (
        f"auc pooled: Δ vs {ref} [95% CI], p" in md and f"{pooled_auc(ref):.3f} (reference)" in md
    )
    # a chosen reference; and one that is not among the runs is refused before anything runs
    again = run_compare(
        cfg, tmp_path / "cmp", progress=False, log=quiet, reference=other, n_boot=50
    )
    assert (again["reference"] == other).all()
    assert again.set_index("model").loc[ref, "delta"] == pytest.approx(-t.loc[other, "delta"])
    with pytest.raises(ConfigError, match="--reference gat: not one of the compared runs"):
        run_compare(cfg, tmp_path / "cmp", progress=False, log=quiet, reference="gat")


def test_runs_on_different_folds_are_not_compared_pairwise(tmp_path, small_cohort):
    raw = {**small_cohort, "compare": [{"model": {"name": "mean"}}, {"model": {"name": "max"}}]}
    cfg = config_from_dict(raw)
    run_compare(cfg, tmp_path / "cmp", models=["mean"], folds=[0, 1], progress=False, log=quiet)
    said = []
    table = run_compare(cfg, tmp_path / "cmp", folds=[0], progress=False, log=said.append)
    # the table is still written, without the pairwise columns, and the log says why
    assert "delta" not in table.columns and table["folds"].tolist() == [2, 1]
    assert (tmp_path / "cmp" / "comparison.md").is_file()
    msg = [m for m in said if m.startswith("pairwise differences left out")]
    assert msg and "not on the same folds and bags" in msg[0]
    assert any(str(tmp_path / "cmp" / m) in msg[0] for m in ("mean", "max"))
    with pytest.raises(DataError, match="not on the same folds and bags"):
        paired_differences(
            {"mean": tmp_path / "cmp" / "mean", "max": tmp_path / "cmp" / "max"}, "mean"
        )


def test_compare_model_selection(small_cohort):
    cfg = config_from_dict(
        {**small_cohort, "compare": [{"model": {"name": "abmil"}, "label": "a"}]}
    )
    assert [e["label"] for e in entries(cfg)] == ["a"]
    # by label, by model name, and a registered model without an entry (its defaults)
    assert [e["label"] for e in entries(cfg, ["a"])] == ["a"]
    assert [e["label"] for e in entries(cfg, ["abmil"])] == ["a"]
    assert entries(cfg, ["max"]) == [{"label": "max", "model": {"name": "max"}}]
    # no compare section: every registered model
    plain = config_from_dict(small_cohort)
    assert [e["label"] for e in entries(plain)] == available()
    with pytest.raises(ConfigError, match="nosuch"):
        entries(cfg, ["nosuch"])


@pytest.mark.parametrize(
    "compare, needle",
    [
        ([{"model": {"name": "abmil"}, "lr": 1}], "unknown key 'lr'"),
        ([{"model": {"name": "abmil", "bogus": 1}}], "model.bogus"),
        ([{"model": {"name": "abmil"}, "train": {"epochz": 1}}], "train.epochz"),
        ([{"model": {"name": "mean"}}, {"model": {"name": "mean"}}], "used twice"),
        ([{"name": "mean"}], "'model' mapping"),
    ],
)
def test_bad_compare_entries_are_named_before_anything_runs(
    tmp_path, small_cohort, capsys, compare, needle
):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump({**small_cohort, "compare": compare}))
    assert main(["compare", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_set_model_is_refused_in_compare(tmp_path, small_cohort, capsys):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump({**small_cohort, "compare": [{"model": {"name": "mean"}}]}))
    code = main(["compare", str(path), "--set", "model.hidden_dim=8", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "model.hidden_dim" in err and "compare: entry" in err
    assert not (tmp_path / "o").exists()


def test_unreadable_predictions_of_a_finished_fold_are_named(tmp_path, small_cohort):
    from mil.train.summary import run_predictions

    cfg = config_from_dict({**small_cohort, "compare": [{"model": {"name": "mean"}}]})
    run_compare(cfg, tmp_path / "cmp", folds=[0], progress=False, log=quiet)
    bad = tmp_path / "cmp" / "mean" / "fold_0" / "predictions.csv"
    bad.write_text("")
    with pytest.raises(DataError, match=r"fold_0/predictions.csv: cannot read .*delete fold_0"):
        run_predictions(tmp_path / "cmp" / "mean")

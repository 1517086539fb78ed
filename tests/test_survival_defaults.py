"""Survival defaults (issue 40): early stopping keeps the epoch of the highest validation
C-index (checked against scikit-survival, and unchanged by the risks' scale), a diagnostic
names a warm-up epoch kept against the metric, and each fold averages the model with
``meanpool_linear`` (checked by hand from the members' own prediction files), the same
average that ``mil.Run.predict``, the refit and ``mil evaluate`` use."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sksurv.metrics import concordance_index_censored

from mil.config import config_from_dict, dump_config
from mil.errors import ConfigError
from mil.run import Run
from mil.schema import TrainConfig
from mil.tasks import make_task
from mil.train.diagnostics import diagnose
from mil.train.inference import FoldModel
from mil.train.runner import run_cv
from tests.test_survival_task import survival_config


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def survival_run(tmp_path_factory):
    """The survival defaults on a tiny cohort (no ensemble: or stop_on: keys)."""
    root = tmp_path_factory.mktemp("surv_defaults")
    raw = survival_config(root, patience=3, faithfulness=False)
    raw["train"]["epochs"] = 8
    cfg = config_from_dict(raw)
    out = run_cv(cfg, root / "run", progress=False, log=quiet, n_boot=50)
    bags = pd.read_csv(root / "cohort.csv").groupby("case_id")["slide_id"].apply(list).to_dict()
    return root, raw, cfg, out, bags


def c_index(frame: pd.DataFrame, risk: np.ndarray | None = None) -> float:
    risk = frame["risk"].to_numpy(float) if risk is None else risk
    return concordance_index_censored(frame["event"].astype(bool), frame["time"], risk)[0]


def test_the_defaults_resolve_per_task_and_model(tmp_path):
    raw = survival_config(tmp_path)
    raw["model"] = {"name": "abmil"}
    cfg = config_from_dict(raw)
    assert (
        cfg.ensemble == "auto"
        and cfg.members == ["meanpool_linear"]
        and cfg.train.stop_on == "auto"
    )
    assert make_task(cfg, []).stop_criterion(cfg.train.stop_on) == ("val_c_index", 1)
    assert config_from_dict({**raw, "ensemble": []}).members == []
    assert (
        config_from_dict({**raw, "model": {"name": "bow_linear"}}).members == []
    )  # baselines run alone
    fusion = config_from_dict(
        {**raw, "model": {"name": "survpath"}, "data": {**raw["data"], "tabular": []}}
    )
    assert fusion.members == []
    # "auto" stays in the saved config: a compare entry or a baseline resolves it for its own model
    assert "ensemble: auto" in dump_config(cfg)
    classification = config_from_dict({"data": {"csv": "a", "features": "b"}})
    assert classification.members == []
    assert make_task(classification, ["a", "b"]).stop_criterion("auto") == ("val_loss", -1)
    for bad in (
        {"ensemble": ["abmil"]},
        {"ensemble": ["meanpool_linear", "meanpool_linear"]},
        {"train": {**raw["train"], "stop_on": "ibs"}},
    ):
        with pytest.raises(ConfigError):
            config_from_dict({**raw, **bad})


def test_the_kept_epoch_has_the_highest_validation_c_index(survival_run):
    """history.csv's val_c_index is scikit-survival's C of the kept model on the validation
    patients; the kept epoch is the first of its highest value."""
    root, _, cfg, out, bags = survival_run
    run = Run(out)
    for k in ("0", "1", "2"):
        h = pd.read_csv(out / f"fold_{k}" / "history.csv")
        kept = int(np.flatnonzero(h["best"])[0])
        assert kept == int(h["val_c_index"].to_numpy().argmax())
        val_ids = pd.read_csv(out / "splits" / f"splits_{k}.csv")["val"].dropna()
        patients = sorted({s.split("-")[0] for s in val_ids})
        model = FoldModel(out / f"fold_{k}" / "model.pt", run.config, k)  # the model alone
        cohort = pd.read_csv(root / "cohort.csv").drop_duplicates("case_id").set_index("case_id")
        fwd_bags = {p: bags[p] for p in patients}
        from mil.train.inference import bags_of

        slides, store = bags_of(fwd_bags, run._feature_index)
        risk = model.forward(slides, store).logits[:, 0].numpy()
        frame = pd.DataFrame(
            {
                "time": cohort.loc[patients, "survival_months"].to_numpy(float),
                "event": 1 - cohort.loc[patients, "censorship"].to_numpy(int),
            }
        )
        assert h["val_c_index"].iloc[kept] == pytest.approx(c_index(frame, risk), abs=1e-9)
        assert c_index(frame, 3.7 * risk) == pytest.approx(c_index(frame, risk))  # scale-free


def test_each_fold_averages_the_model_and_meanpool_linear_by_hand(survival_run):
    _, _, _, out, _ = survival_run
    for k in ("0", "1", "2"):
        fold = out / f"fold_{k}"
        members = json.loads((fold / "members.json").read_text())["members"]
        assert [m["name"] for m in members] == ["abmil", "meanpool_linear"]
        z = []
        for m in members:
            own = pd.read_csv(fold / "members" / m["name"] / "predictions.csv").set_index("bag_id")
            train = pd.read_csv(fold / "members" / m["name"] / "predictions_train.csv")["risk"]
            assert m["scale"] == pytest.approx(
                {"risk_mean": train.mean(), "risk_sd": train.std(ddof=1)}
            )
            z.append((own["risk"] - train.mean()) / train.std(ddof=1))
        saved = pd.read_csv(fold / "predictions.csv").set_index("bag_id")
        by_hand = pd.concat(z, axis=1).mean(axis=1).loc[saved.index]
        assert np.allclose(saved["risk"], by_hand, atol=1e-12)
        record = json.loads((fold / "metrics.json").read_text())
        assert record["metrics"]["c_index"] == pytest.approx(c_index(saved.reset_index()))
        own_c = c_index(pd.read_csv(fold / "members" / "meanpool_linear" / "predictions.csv"))
        assert record["members"]["meanpool_linear"] == pytest.approx(own_c)
    ensemble = json.loads((out / "summary.json").read_text())["ensemble"]
    assert set(ensemble["members"]) == {"abmil", "meanpool_linear"}
    report = (out / "report.md").read_text()
    assert "## Ensemble" in report and "averaged with `meanpool_linear`" in report
    assert "early stopping on the validation c_index" in report


def test_predict_refit_and_evaluate_use_the_same_average(survival_run, tmp_path):
    root, raw, cfg, out, bags = survival_run
    run = Run(out)
    saved = run.predictions("1")
    again = run.predict({b: bags[b] for b in saved["bag_id"]}, folds=["1"], per_fold=True)
    again = again.set_index("bag_id").loc[saved["bag_id"]]
    assert np.allclose(again["risk"], saved["risk"], atol=1e-9)
    from mil.evaluate import evaluate
    from mil.train.refit import refit

    refit(cfg, out, progress=False, log=quiet)
    assert (
        json.loads((out / "refit" / "members.json").read_text())["members"][1]["name"]
        == "meanpool_linear"
    )
    penalty = json.loads((out / "refit" / "refit.json").read_text())["member_penalty"][
        "meanpool_linear"
    ]
    chosen = [
        float(
            pd.read_csv(out / f"fold_{k}" / "members" / "meanpool_linear" / "history.csv")
            .query("best")["alpha"]
            .iloc[0]
        )
        for k in range(3)
    ]
    assert penalty == pytest.approx(np.exp(np.median(np.log(chosen))))
    cohort = tmp_path / "ext.yaml"
    cohort.write_text(yaml.safe_dump({"data": raw["data"]}))
    for refitted in (False, True):
        ev = tmp_path / f"ev_{refitted}"
        evaluate(out, cohort, ev, n_boot=10, refit=refitted)
        pred = pd.read_csv(ev / "predictions.csv")
        folds = ["refit"] if refitted else None
        mine = run.predict({b: bags[b] for b in pred["bag_id"]}, folds=folds).set_index("bag_id")
        assert np.allclose(mine.loc[pred["bag_id"], "risk"], pred["risk"], atol=1e-9)


def test_ensemble_empty_is_the_model_alone(tmp_path):
    raw = {**survival_config(tmp_path, faithfulness=False), "ensemble": []}
    raw["train"]["epochs"] = 3
    out = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet, n_boot=10)
    assert (
        not (out / "fold_0" / "members.json").exists() and not (out / "fold_0" / "members").exists()
    )
    assert "ensemble" not in json.loads((out / "summary.json").read_text())


# ---- the diagnostic ------------------------------------------------------------------------------


def history(val_c: list[float], kept: int, steps: int = 20) -> pd.DataFrame:
    n = len(val_c)
    return pd.DataFrame(
        {
            "epoch": range(n),
            "train_loss": np.linspace(3.0, 2.0, n),
            "constant_loss": 3.2,
            "steps": steps,
            "val_loss": np.linspace(3.0, 4.0, n),
            "val_c_index": val_c,
            "best": [e == kept for e in range(n)],
        }
    )


def test_a_warm_up_epoch_kept_against_the_metric_is_named():
    cfg = TrainConfig(warmup_steps=50, stop_on="loss")
    stop = ("val_loss", -1)
    planted = history([0.60, 0.62, 0.55, 0.71, 0.70, 0.69], kept=1)  # epoch 2 ends at step 40 < 50
    found = {f["kind"]: f["message"] for f in diagnose(planted, cfg, None, "0", 6, "c_index", stop)}
    assert "warm-up epoch kept" in found
    assert (
        "epoch 2, inside the 50-step" in found["warm-up epoch kept"]
        and "0.710" in found["warm-up epoch kept"]
    )
    close = history([0.60, 0.705, 0.55, 0.71, 0.70, 0.69], kept=1)  # within 0.01 of the best
    assert not diagnose(close, cfg, None, "0", 6, "c_index", stop)
    late = history([0.60, 0.62, 0.55, 0.65, 0.75, 0.69], kept=3)  # after the warm-up, 0.10 below
    kinds = [f["kind"] for f in diagnose(late, cfg, None, "0", 6, "c_index", stop)]
    assert kinds == ["kept below best"]
    fixed = TrainConfig(warmup_steps=50, patience=None)  # fixed epochs keep the last, as asked
    assert not diagnose(
        history([0.60, 0.62, 0.55, 0.65, 0.75, 0.69], kept=5), fixed, None, "0", 6, "c_index", stop
    )
    # the survival default keeps the best validation C: nothing to say
    best = history([0.60, 0.62, 0.55, 0.71, 0.70, 0.69], kept=3)
    assert not diagnose(best, TrainConfig(), None, "0", 6, "c_index", ("val_c_index", 1))

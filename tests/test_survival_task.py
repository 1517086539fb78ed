"""Survival task end to end: metrics vs scikit-survival / lifelines, Cox batches, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines.statistics import logrank_test
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from mil.cli import main
from mil.config import config_from_dict, load_config
from mil.data.synthetic import demo_config, write_synthetic_cohort
from mil.errors import DataError
from mil.tasks import make_task
from mil.tasks.survival import SurvivalWarning, _fold_stratified_c_index, cox_batches
from mil.train.runner import run_cv

REPO = Path(__file__).resolve().parents[1]


def quiet(*a):
    pass


def survival_config(root: Path, loss: str = "cox", **train) -> dict:
    """A tiny survival cohort (30 patients, 8-d features, 10-30 tiles per slide) and its config."""
    csv, feats = root / "cohort.csv", root / "features"
    if not csv.exists():
        write_synthetic_cohort(
            "survival",
            csv,
            feats,
            n_patients=30,
            n_two_slides=4,
            dim=8,
            min_tiles=10,
            max_tiles=30,
            shift_norm=6.0,
        )
    return {
        "name": f"tiny_{loss}",
        "task": {"type": "survival", "loss": loss, "bins": 3},
        "data": {
            "csv": str(csv),
            "features": str(feats),
            "patient_col": "case_id",
            "time_col": "survival_months",
            "event_col": "censorship",
            "censored_value": 1,
            "bag_level": "patient",
        },
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.2, "seed": 0},
        "model": {"name": "abmil", "hidden_dim": 8},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-3, "patience": 2, "seed": 0, **train},
    }


@pytest.fixture(scope="module", params=["cox", "nll"])
def finished_run(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(f"surv_{request.param}")
    cfg = config_from_dict(survival_config(root, request.param))
    return request.param, run_cv(cfg, root / "run", progress=False, log=quiet)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"bag_id": str, "patient_id": str})


def _censor_after(time: np.ndarray, event: np.ndarray, tau: float):
    # what mil.metrics.survival does for test times beyond the training follow-up
    # (leaves every metric unchanged; scikit-survival would raise on them)
    late = time >= tau
    return np.where(late, tau, time), event & ~late


def test_reported_metrics_equal_sksurv_on_saved_predictions(finished_run):
    loss, run = finished_run
    for fold_dir in sorted(run.glob("fold_*")):
        m = json.loads((fold_dir / "metrics.json").read_text())["metrics"]
        pred, train = _read(fold_dir / "predictions.csv"), _read(fold_dir / "predictions_train.csv")
        t, e, r = pred["time"].to_numpy(), pred["event"].to_numpy(bool), pred["risk"].to_numpy()
        tt, te, tr = (
            train["time"].to_numpy(),
            train["event"].to_numpy(bool),
            train["risk"].to_numpy(),
        )
        y_train = Surv.from_arrays(te, tt)

        assert m["c_index"] == pytest.approx(concordance_index_censored(e, t, r)[0], abs=1e-12)

        tau = m["c_index_uno_tau"]
        assert tau == tt.max()  # the training fold's last follow-up
        uno = concordance_index_ipcw(y_train, Surv.from_arrays(e, t), r, tau=tau)[0]
        assert m["c_index_uno"] == pytest.approx(uno, abs=1e-12)

        t_c, e_c = _censor_after(t, e, tau)
        y_test = Surv.from_arrays(e_c, t_c)
        times = np.asarray(m["td_auc_times"])
        usable = t[e & (t < min(tau, t.max()))]
        np.testing.assert_allclose(times, np.unique(np.quantile(usable, [0.25, 0.5, 0.75])))
        auc = cumulative_dynamic_auc(y_train, y_test, r, times)[1]
        assert m["td_auc"] == pytest.approx(auc, abs=1e-12)

        grid = np.asarray(m["ibs_times"])
        if loss == "cox":
            breslow = BreslowEstimator().fit(tr, te, tt)
            surv = np.stack([fn(grid) for fn in breslow.get_survival_function(r)])
            # scikit-survival's step functions hold their first value below the first
            # training time; the baseline hazard is 0 there, so S = 1
            surv[:, grid < breslow.cum_baseline_hazard_.x[0]] = 1.0
        else:
            # bins from the training fold's event times only
            cuts = np.quantile(tt[te], [1 / 3, 2 / 3])
            np.testing.assert_allclose(m["bin_cuts"], cuts)
            edges = np.concatenate([[0.0], cuts, [np.inf]])
            s = pred[["surv_0", "surv_1", "surv_2"]].to_numpy()
            padded = np.concatenate([np.ones((len(s), 1)), s], 1)  # S = 1 within the first bin
            surv = padded[:, np.searchsorted(edges, grid, side="right") - 1]
        assert m["ibs"] == pytest.approx(
            integrated_brier_score(y_train, y_test, surv, grid), abs=1e-12
        )

        high = r > np.median(tr)
        lr = logrank_test(t[high], t[~high], event_observed_A=e[high], event_observed_B=e[~high])
        assert m["logrank_p"] == pytest.approx(lr.p_value, rel=1e-9)
        assert (fold_dir / "km.png").stat().st_size > 1000
        groups = _read(fold_dir / "risk_groups.csv")
        assert (groups["group"] == "high").tolist() == high.tolist()


def test_pooled_km_and_logrank_in_summary(finished_run):
    _, run = finished_run
    summary = json.loads((run / "summary.json").read_text())
    pooled = _read(run / "risk_groups.csv")
    assert len(pooled) == 30  # every patient once, out of fold
    # standardised within its fold at the training median: the pooled cut at 0 is each fold's cut
    assert ((pooled["risk_std"] > 0) == (pooled["group"] == "high")).all()
    hi, lo = pooled[pooled["group"] == "high"], pooled[pooled["group"] == "low"]
    p = logrank_test(
        hi["time"], lo["time"], event_observed_A=hi["event"], event_observed_B=lo["event"]
    ).p_value
    assert summary["logrank_p_pooled"] == pytest.approx(p, rel=1e-9)
    assert (run / "km.png").stat().st_size > 1000
    lo_ci, hi_ci = summary["metrics"]["c_index"]["ci95_pooled"]
    assert 0 <= lo_ci <= hi_ci <= 1


def test_format_summary_does_not_average_p_values(finished_run):
    from mil.train.summary import format_summary

    _, run = finished_run
    summary = json.loads((run / "summary.json").read_text())
    ps = np.array(summary["metrics"]["logrank_p"]["folds"], float)
    text = format_summary(summary)
    line = next(x for x in text.splitlines() if x.strip().startswith("logrank_p "))
    assert f"median {np.median(ps):.2g}" in line
    assert f"pooled over folds {summary['logrank_p_pooled']:.2g}" in line
    assert f"{ps.mean():.3f} ±" not in line  # no mean ± sd of p-values
    tau = next(x for x in text.splitlines() if x.strip().startswith("c_index_uno_tau"))
    assert "±" not in tau and "time horizon" in tau
    c = next(x for x in text.splitlines() if x.strip().startswith("c_index "))
    assert f"{summary['metrics']['c_index']['mean']:.3f} ±" in c


def test_pooled_c_index_compares_pairs_within_folds_only():
    rng = np.random.default_rng(0)
    time, event, risk = rng.exponential(10, 60), rng.uniform(size=60) < 0.7, rng.normal(size=60)
    fold = np.repeat(["0", "1", "2"], 20)
    one = _fold_stratified_c_index(time, event, risk, np.zeros(60))
    assert one == pytest.approx(concordance_index_censored(event, time, risk)[0])
    shifted = risk + np.repeat([0.0, 100.0, -50.0], 20)  # a Cox risk is defined up to a shift
    assert _fold_stratified_c_index(time, event, shifted, fold) == pytest.approx(
        _fold_stratified_c_index(time, event, risk, fold)
    )


def test_cox_batches_hold_two_events_each_over_random_cohorts():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 300))
        event = rng.uniform(size=n) < rng.uniform(0.02, 1.0)
        batch_size = int(rng.integers(1, 65))
        n_events = int(event.sum())
        if n_events < 2:
            with pytest.raises(DataError, match="at least 2"):
                cox_batches(event, batch_size, rng)
            continue
        batches = cox_batches(event, batch_size, rng)
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))  # a partition
        assert len(batches) == min(math.ceil(n / batch_size), n_events // 2)
        assert min(int(event[b].sum()) for b in batches) >= 2
        sizes = [len(b) for b in batches]
        assert max(sizes) - min(sizes) <= 1
        if n_events >= 2 * math.ceil(n / batch_size):
            assert max(sizes) <= batch_size


def test_cox_batches_name_the_fold_when_impossible():
    with pytest.raises(DataError, match="fold 3: the training bags hold 1 event"):
        cox_batches(np.array([0, 0, 1, 0]), 2, np.random.default_rng(0), where="fold 3")


def test_test_fold_without_events_warns_and_gives_nan(tmp_path):
    task = make_task(config_from_dict(survival_config(tmp_path)), [])
    task.fold_name = "2"
    bags = pd.DataFrame(
        {
            "bag_id": list("abcd"),
            "patient_id": list("abcd"),
            "time": [1.0, 2, 3, 4],
            "event": [1, 0, 1, 1],
        }
    )
    train = task.predictions(bags, np.array([[0.5], [0.1], [0.2], [0.3]]))
    test = task.predictions(bags.assign(event=0), np.zeros((4, 1)))
    with pytest.warns(
        SurvivalWarning, match=r"fold 2: the test partition \(4 bags\) has no events"
    ):
        m = task.metrics(test, train)
    assert math.isnan(m["c_index"]) and math.isnan(m["ibs"])
    # one warning per problem, and a metric undefined for another reason is NaN too
    with pytest.warns(SurvivalWarning) as caught:
        m = task.metrics(train.assign(time=[5.0, 6, 7, 8]), train)  # events after tau = 4
    assert math.isnan(m["td_auc"]) and np.isfinite(m["c_index"])
    # (other libraries' deprecation warnings, e.g. from a newer pandas, are not counted)
    messages = [str(w.message) for w in caught if issubclass(w.category, SurvivalWarning)]
    assert any(msg.startswith("fold 2: td_auc is undefined") for msg in messages)
    assert len(messages) == len(set(messages))


# ---- splits written by hand: a fold whose partitions lack events ---------------------------


def _write_split(raw: dict, train: list[str], val: list[str], test: list[str], folds: int = 2):
    """The same hand-made split as every fold file (the run then uses only fold 0)."""
    split_dir = Path(raw["splits"]["dir"])
    split_dir.mkdir(parents=True, exist_ok=True)
    cols = {
        p: pd.Series(ids, dtype=object)
        for p, ids in (("train", train), ("val", val), ("test", test))
    }
    for k in range(folds):
        pd.DataFrame(cols).to_csv(split_dir / f"splits_{k}.csv", index=False)
    raw["splits"]["folds"] = folds


def _slides(raw: dict) -> pd.DataFrame:
    df = pd.read_csv(raw["data"]["csv"])
    df["event"] = 1 - df["censorship"]
    return df


def _ids(df: pd.DataFrame, patients) -> list[str]:
    return df.loc[df["case_id"].isin(patients), "slide_id"].tolist()


def test_validation_without_events_warns_and_trains_fixed_epochs(tmp_path):
    raw = survival_config(tmp_path, epochs=4, patience=1)
    df = _slides(raw)
    per_patient = df.groupby("case_id")["event"].first()
    censored, events = per_patient.index[per_patient == 0], per_patient.index[per_patient == 1]
    val = list(censored[:3])
    test = list(events[:4]) + list(censored[3:5])
    train = [p for p in per_patient.index if p not in val + test]
    _write_split(raw, _ids(df, train), _ids(df, val), _ids(df, test))
    with pytest.warns(SurvivalWarning, match="fold 0: the validation partition .* has no events"):
        run = run_cv(config_from_dict(raw), tmp_path / "run", folds=[0], progress=False, log=quiet)
    history = pd.read_csv(run / "fold_0" / "history.csv")
    assert "val_loss" not in history and len(history) == 4  # no early stopping


def _one_event_split(raw: dict) -> None:
    df = _slides(raw)
    per_patient = df.groupby("case_id")["event"].first()
    censored, events = per_patient.index[per_patient == 0], per_patient.index[per_patient == 1]
    train = list(censored[:5]) + list(events[:1])
    val = list(events[1:3])
    test = list(events[3:8]) + list(censored[5:7])
    _write_split(raw, _ids(df, train), _ids(df, val), _ids(df, test))


def test_cox_training_fold_with_one_event_names_the_fold(tmp_path):
    raw = survival_config(tmp_path)
    _one_event_split(raw)
    with pytest.raises(DataError, match="fold 0: the training partition has 1 event"):
        run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet)


# ---- bad cohort CSVs through the CLI: exit code 2, one message, no traceback ---------------


def _break(raw: dict, how: str) -> None:
    df = pd.read_csv(raw["data"]["csv"])
    if how == "negative time":
        df.loc[3, "survival_months"] = -1.0
    elif how == "missing time":
        df.loc[3, "survival_months"] = np.nan
    elif how == "event outside 0/1":
        raw["data"]["censored_value"] = None
        df.loc[3, "censorship"] = 2
    elif how == "censored_value mismatch":
        raw["data"]["censored_value"] = 2  # the column codes 0/1
    elif how == "all censored":
        df["censorship"] = 1
    df.to_csv(raw["data"]["csv"], index=False)


@pytest.mark.parametrize(
    "how, needles",
    [
        ("negative time", ["'survival_months'", "non-negative"]),
        ("missing time", ["'survival_months'", "no value"]),
        ("event outside 0/1", ["'censorship'", "0/1"]),
        ("censored_value mismatch", ["'censorship'", "censored_value = 2"]),
        ("all censored", ["'censorship'", "every patient is censored"]),
        ("one training event", ["fold 0", "1 event"]),
    ],
)
def test_bad_survival_input_is_one_clear_cli_error(tmp_path, capsys, how, needles):
    raw = survival_config(tmp_path)
    if how == "one training event":
        _one_event_split(raw)
    else:
        _break(raw, how)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code = main(["train", str(cfg), "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mil: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in err


def test_shipped_survival_configs_load_and_match_the_demo():
    demo = load_config(REPO / "experiments" / "demo_survival.yaml").to_dict()
    expected = config_from_dict(demo_config("survival", "results/demo", "cox")).to_dict()
    for section in ("task", "data", "model", "train"):
        assert demo[section] == expected[section], section
    template = load_config(REPO / "experiments" / "template_tcga_survival.yaml")
    assert template.task.type == "survival" and template.data.censored_value == 1
    assert template.data.bag_level == "patient"

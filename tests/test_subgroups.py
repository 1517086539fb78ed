"""Subgroup and per-site metrics: pooled out-of-fold values against scikit-learn / a pair count."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn import metrics as skm

from mil.cli import main
from mil.config import config_from_dict
from mil.data.cohort import Cohort
from mil.errors import ConfigError, DataError, SplitError
from mil.tasks import make_task
from mil.train.runner import run_cv
from mil.train.summary import format_summary, subgroup_metrics
from tests.conftest import small_config


def quiet(*a):
    pass


def with_groups(raw: dict, tmp_path, edit) -> dict:
    """``raw`` with its cohort CSV copied and changed by ``edit(df)``."""
    df = pd.read_csv(raw["data"]["csv"])
    edit(df)
    path = tmp_path / "groups.csv"
    df.to_csv(path, index=False)
    raw["data"]["csv"] = str(path)
    return raw


def plant_groups(df: pd.DataFrame) -> None:
    patients = df["case_id"].drop_duplicates().tolist()
    site = {p: "ABC"[i % 3] for i, p in enumerate(patients)}
    df["site"] = df["case_id"].map(site)
    # sex "F" only on negative patients: its AUC is undefined (one class)
    neg = df.groupby("case_id")["label"].first() == "negative"
    f_patients = set(neg[neg].index[:4])
    df["sex"] = np.where(df["case_id"].isin(f_patients), "F", "M")
    df.loc[df["case_id"] == patients[1], "sex"] = np.nan  # unknown: its own group


def test_subgroup_metrics_equal_sklearn_on_pooled_predictions(tmp_path):
    raw = with_groups(small_config(tmp_path), tmp_path, plant_groups)
    raw["data"].update(site_col="site", subgroup_cols=["sex"])
    run = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet, n_boot=200)
    pred = pd.concat(
        pd.read_csv(run / f"fold_{k}" / "predictions.csv", dtype={"sex": str}) for k in range(3)
    )
    cohort = pd.read_csv(raw["data"]["csv"]).set_index("slide_id")
    # predictions carry each bag's site and subgroup, as in the cohort CSV
    assert (pred["site"].to_numpy() == cohort.loc[pred["bag_id"], "site"].to_numpy()).all()
    table = pd.read_csv(run / "subgroups.csv", dtype={"value": str})
    expected = (
        [("all", "all")]
        + [("site", s) for s in "ABC"]
        + [("sex", v) for v in ("F", "M", "missing")]
    )
    assert list(zip(table["column"], table["value"])) == expected
    for _, row in table.iterrows():
        if row["column"] == "all":
            sub = pred
        else:
            sub = pred[pred[row["column"]].fillna("missing").astype(str) == row["value"]]
        assert row["n_bags"] == len(sub) and row["n_patients"] == sub["patient_id"].nunique()
        assert row["n_positive"] == (sub["label"] == "positive").sum()
        y, p = sub["label_index"].to_numpy(), sub["prob_positive"].to_numpy()
        if len(np.unique(y)) < 2:
            assert np.isnan(row["auc"])
        else:
            assert row["auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
            assert 0 <= row["auc_ci_low"] <= row["auc_ci_high"] <= 1
        assert row["balanced_accuracy"] == pytest.approx(
            skm.balanced_accuracy_score(y, (p >= 0.5).astype(int)), abs=1e-12
        )
    assert (table["value"] == "F").any() and np.isnan(table.loc[table["value"] == "F", "auc"]).all()
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["subgroups"]) == len(table)
    f_row = next(r for r in summary["subgroups"] if r["value"] == "F")
    assert f_row["auc"] is None  # strict JSON: no NaN
    text = format_summary(summary)
    a = table[table["value"] == "A"].iloc[0]
    assert "site=A" in text and f"{a['auc']:.3f} [{a['auc_ci_low']:.3f}" in text
    assert next(x for x in text.splitlines() if "sex=F" in x).endswith("patients   –")


def brute_c_index(time, event, risk, fold) -> float:
    """Harrell's C by counting every ordered pair within a fold (no tied times)."""
    conc = comp = 0.0
    for i, j in itertools.permutations(range(len(time)), 2):
        if fold[i] == fold[j] and event[i] and time[i] < time[j]:
            comp += 1
            conc += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return conc / comp


def test_survival_subgroup_c_index_is_a_within_fold_pair_count(tmp_path):
    rng = np.random.default_rng(3)
    n = 90
    pred = pd.DataFrame(
        {
            "bag_id": [f"s{i}" for i in range(n)],
            "patient_id": [f"p{i}" for i in range(n)],
            "fold": np.repeat(["0", "1", "2"], n // 3),
            "time": rng.permutation(n) + rng.uniform(0, 0.5, n),
            "event": (rng.uniform(size=n) < 0.6).astype(int),
            "site": rng.choice(["X", "Y"], n),
        }
    )
    # planted: risk follows time on site X (C near 1 there), noise on site Y;
    # fold shifts that a pooled (not within-fold) C would be fooled by
    pred["risk"] = np.where(pred["site"] == "X", -pred["time"], rng.normal(size=n))
    pred["risk"] += pred["fold"].map({"0": 0.0, "1": 50.0, "2": -50.0})
    cfg = config_from_dict(
        {"task": {"type": "survival"}, "data": {"csv": "x.csv", "features": "f"}}
    )
    task = make_task(cfg, [])
    table = subgroup_metrics(task, pred, ["site"], n_boot=200).set_index("value")
    for value in ("X", "Y"):
        sub = pred[pred["site"] == value]
        ref = brute_c_index(*(sub[c].to_numpy() for c in ("time", "event", "risk", "fold")))
        assert table.loc[value, "c_index"] == pytest.approx(ref, abs=1e-12)
        assert table.loc[value, "n_events"] == sub["event"].sum()
    assert table.loc["X", "c_index"] == 1.0 and table.loc["Y", "c_index"] < 0.8


def test_bad_group_columns_are_named(tmp_path, capsys):
    raw = small_config(tmp_path)
    raw["data"]["subgroup_cols"] = ["stage"]
    with pytest.raises(DataError, match=r"'stage' \(data\.subgroup_cols\[0\]\) not in the CSV"):
        Cohort.from_config(config_from_dict(raw))
    raw["data"]["subgroup_cols"] = ["label"]
    with pytest.raises(DataError, match="names a column that predictions.csv already has"):
        Cohort.from_config(config_from_dict(raw))
    raw["data"]["subgroup_cols"] = []
    with pytest.raises(ConfigError, match="splits.by_site needs data.site_col"):
        config_from_dict({**raw, "splits": {**raw["splits"], "by_site": True}})

    def two_sites(df):
        df["site"] = "A"
        twice = df["case_id"][df["case_id"].duplicated()].iloc[0]
        df.loc[(df["case_id"] == twice).to_numpy().nonzero()[0][0], "site"] = "B"

    raw = with_groups(small_config(tmp_path), tmp_path, two_sites)
    twice = pd.read_csv(raw["data"]["csv"]).pipe(lambda d: d[d["site"] == "B"]["case_id"].iloc[0])
    raw["data"].update(site_col="site", bag_level="patient")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["check", str(path)])
    out = capsys.readouterr()
    assert code == 1 and f"patient {twice} has slides with different 'site' values" in out.out
    assert "Traceback" not in out.out + out.err
    code = main(["train", str(path), "--out", str(tmp_path / "run")])  # same line, nothing written
    err = capsys.readouterr().err
    assert code != 0 and f"patient {twice} has slides with different 'site' values" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_report_states_the_protocol_and_the_summary_numbers(tmp_path):
    import re

    from mil.run import Run
    from mil.train.report import write_report

    raw = with_groups(small_config(tmp_path), tmp_path, plant_groups)
    raw["data"].update(site_col="site", standardize=True)
    raw["splits"].update(by_site=True, dir=str(tmp_path / "site_splits"))
    run = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet, n_boot=200)
    slide = Run(run).top_slides(1)[0]
    Run(run).save_heatmap(slide, run / "heatmaps" / f"{slide}.png", dpi=50)
    text = write_report(run).read_text()
    summary = json.loads((run / "summary.json").read_text())
    methods = text.split("## Methods")[1].split("##")[0]
    n_bags = sum(len(pd.read_csv(run / f"fold_{k}" / "predictions.csv")) for k in range(3))
    assert f"{n_bags} slides from 30 patients" in methods
    assert "3-fold cross-validation with site-preserved folds" in methods and "`site`" in methods
    assert "fixed 3 epochs" in methods and "standardised" in methods
    assert "`abmil` (hidden_dim 16)" in methods and "learning rate 0.001" in methods
    for k, m in summary["metrics"].items():
        not_scores = ("train_seconds", "seconds_per_epoch", "threshold")
        if k in not_scores or k.endswith(("_p", "_tau")):
            assert f"| {k} |" not in text  # not a score: no mean ± sd, no CI
            continue
        ci = (
            f"[{m['ci95_pooled'][0]:.3f}, {m['ci95_pooled'][1]:.3f}]" if "ci95_pooled" in m else "–"
        )
        assert f"| {k} | {m['mean']:.3f} ± {m['sd']:.3f} | {ci} |" in text
    for k in range(3):
        fm = json.loads((run / f"fold_{k}" / "metrics.json").read_text())
        row = f"| {k} | {fm['n_train']} | {fm['n_val']} | {fm['n_test']} | {fm['metrics']['epochs']} |"
        assert row in text
    a = next(r for r in summary["subgroups"] if r["value"] == "A")
    assert f"| site = A | {a['n_bags']} | {a['n_patients']} |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "roc.png" in links and f"heatmaps/{slide}.png" in links
    assert all((run / link).is_file() for link in links)


def test_site_preserved_folds_expose_a_planted_site_confound(tmp_path):
    """Label follows the site and the features carry only a site signature: patient-level
    folds reward learning the site; site-preserved folds, which test on unseen sites, do not."""
    from mil.data.synthetic import write_slide

    rng = np.random.default_rng(0)
    feats = tmp_path / "features"
    feats.mkdir()
    rows = []
    for site in range(16):  # 10 patients per site; odd sites 8/10 positive, even sites 2/10
        offset = rng.normal(size=16)
        offset *= 4.0 / np.linalg.norm(offset)
        positive = rng.permutation(np.arange(10) < (8 if site % 2 else 2))
        for i, pos in enumerate(positive):
            sid = f"S{site}-P{i}"
            x = (rng.normal(size=(30, 16)) + offset).astype(np.float32)
            coords = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 256
            write_slide(feats / f"{sid}.h5", x, coords, np.zeros(30, np.int8))
            rows.append(
                {
                    "case_id": sid,
                    "slide_id": sid,
                    "site": f"site{site}",
                    "label": "positive" if pos else "negative",
                }
            )
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    aucs = {}
    for by_site in (False, True):
        raw = {
            "name": "confound",
            "data": {
                "csv": str(tmp_path / "cohort.csv"),
                "features": str(feats),
                "site_col": "site",
            },
            "splits": {
                "dir": str(tmp_path / f"splits_{by_site}"),
                "folds": 4,
                "val_fraction": 0.0,
                "by_site": by_site,
            },
            "model": {"name": "abmil", "hidden_dim": 16},
            "train": {"epochs": 20, "batch_size": 8, "lr": 3e-3, "patience": None, "seed": 0},
        }
        cfg = config_from_dict(raw)
        run = run_cv(cfg, tmp_path / f"run_{by_site}", progress=False, log=quiet, n_boot=20)
        pred = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions.csv") for k in range(4))
        aucs[by_site] = skm.roc_auc_score(pred["label_index"], pred["prob_positive"])
    # the site-level ceiling is 0.8 (4/5 vs 1/5 positives per site); chance is 0.5
    # (seeds 0-2 of this design gave 0.735-0.763 and 0.487-0.525)
    assert aucs[False] > 0.68, aucs
    assert aucs[True] < 0.62, aucs


def test_group_columns_added_to_a_finished_run_are_joined_without_retraining(tmp_path):
    raw = with_groups(small_config(tmp_path), tmp_path, plant_groups)
    run = run_cv(config_from_dict(raw), tmp_path / "run", progress=False, log=quiet, n_boot=50)
    assert not (run / "subgroups.csv").exists()
    stamps = {k: (run / f"fold_{k}" / "metrics.json").stat().st_mtime_ns for k in range(3)}
    raw["data"].update(site_col="site", subgroup_cols=["sex"])
    said = []
    run_cv(config_from_dict(raw), run, progress=False, log=said.append, n_boot=50)
    assert sum("done earlier, skipped" in s for s in said) == 3
    assert stamps == {k: (run / f"fold_{k}" / "metrics.json").stat().st_mtime_ns for k in range(3)}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["site_col"] == "site" and saved["data"]["subgroup_cols"] == ["sex"]
    # the joined groups: sklearn on the predictions matched to the CSV by hand
    pred = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions.csv") for k in range(3))
    csv = pd.read_csv(raw["data"]["csv"]).set_index("slide_id")
    pred["site"] = csv.loc[pred["bag_id"], "site"].to_numpy()
    table = pd.read_csv(run / "subgroups.csv", dtype={"value": str}).set_index("value")
    for site in "ABC":
        sub = pred[pred["site"] == site]
        assert table.loc[site, "n_bags"] == len(sub)
        assert table.loc[site, "auc"] == pytest.approx(
            skm.roc_auc_score(sub["label_index"], sub["prob_positive"]), abs=1e-12
        )
    assert table.loc["missing", "n_bags"] == (csv["sex"].isna()).sum()
    # a site column that decides the folds is part of the run: still refused
    raw["splits"]["by_site"] = True
    with pytest.raises(SplitError, match="site-preserved"):  # the patient-level split folder
        run_cv(config_from_dict(raw), run, progress=False, log=quiet)
    raw["splits"]["dir"] = str(tmp_path / "site_splits")
    with pytest.raises(ConfigError, match="different config"):  # the run folder
        run_cv(config_from_dict(raw), run, progress=False, log=quiet)
    assert stamps == {k: (run / f"fold_{k}" / "metrics.json").stat().st_mtime_ns for k in range(3)}


def site_predictions(rng, informative: dict[str, float], n: int = 40) -> pd.DataFrame:
    """Pooled predictions of ``n`` patients per site; a site's positives score
    ``informative[site]`` higher on average (0 = chance)."""
    rows = []
    for site, shift in informative.items():
        y = rng.permutation(np.arange(n) % 2)
        score = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + shift * y)))
        for i in range(n):
            rows.append(
                {
                    "bag_id": f"{site}{i}",
                    "patient_id": f"{site}{i}",
                    "label_index": int(y[i]),
                    "label": ["negative", "positive"][y[i]],
                    "prob_negative": 1 - score[i],
                    "prob_positive": score[i],
                    "site": site,
                }
            )
    return pd.DataFrame(rows)


def test_group_difference_test_finds_a_planted_difference_and_holds_its_level(tmp_path):
    from mil.tasks import make_task
    from mil.train.summary import group_difference_test

    task = make_task(config_from_dict(small_config(tmp_path)), ["negative", "positive"])
    rng = np.random.default_rng(0)
    planted = site_predictions(rng, {"A": 2.5, "B": 2.5, "C": 0.0})
    t = group_difference_test(task, planted, "site", n_perm=199)
    aucs = [
        skm.roc_auc_score(g["label_index"], g["prob_positive"]) for _, g in planted.groupby("site")
    ]
    assert t["range"] == pytest.approx(max(aucs) - min(aucs), abs=1e-12)
    assert t["groups"] == 3 and t["p"] < 0.02
    # no difference: over 20 cohorts the p-values look uniform (level 0.05 kept)
    ps = [
        group_difference_test(
            task, site_predictions(rng, {"A": 1.5, "B": 1.5, "C": 1.5}), "site", n_perm=19, seed=s
        )["p"]
        for s in range(20)
    ]
    assert np.mean(np.array(ps) <= 0.05) <= 0.15
    assert 0.35 <= np.mean(ps) <= 0.65

"""Every benchmark of ``benchmarks/`` on a tiny cohort (seconds each), so that none rots unseen.

Each test runs a benchmark's ``--smoke`` preset (its ``SMOKE``) through the functions its
command line calls, and checks what comes out against the run folders it wrote or an
independent computation (scikit-learn, the runner's own metrics). The figures of a smoke run
mean nothing; the code paths are the full runs'.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
CLASSIC = ROOT.parent / "shared" / "datasets" / "classic_mil"
# two epochs on a few bags are meant to be under-trained: the runner's diagnostics say so
pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def bench(name: str):
    """A benchmark module; benchmarks/ goes on the path, as for a script (they import each other)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def fold_frames(run: Path, name: str = "predictions.csv") -> list[pd.DataFrame]:
    return [pd.read_csv(p) for p in sorted(run.glob(f"fold_*/{name}"))]


def fold_metrics(run: Path) -> list[dict]:
    return [json.loads(p.read_text())["metrics"] for p in sorted(run.glob("fold_*/metrics.json"))]


def harrell(frames: list[pd.DataFrame]) -> float:
    """Harrell's C by hand over the folds' frames, pairs within a fold: a pair is comparable
    if the earlier time is an event (no tied times), ties of risk count a half."""
    good = pairs = 0.0
    for p in frames:
        t, e, r = p["time"].to_numpy(), p["event"].to_numpy(bool), p["risk"].to_numpy()
        earlier = (t[:, None] < t[None, :]) & e[:, None]
        good += ((r[:, None] > r[None, :]) & earlier).sum()
        good += 0.5 * ((r[:, None] == r[None, :]) & earlier).sum()
        pairs += earlier.sum()
    return good / pairs


def test_every_benchmark_has_a_smoke_test():
    """Each module of benchmarks/ (the job helper aside) has a smoke test: a ``test_<name>``
    here, or a test file of tests/ that names it; each script (a ``__main__`` block) has a
    ``--smoke`` flag."""
    modules = [p for p in sorted(BENCHMARKS.glob("*.py")) if p.stem != "jobs"]
    assert len(modules) >= 9
    here = Path(__file__)
    tests = {n.name for n in ast.parse(here.read_text()).body if isinstance(n, ast.FunctionDef)}
    others = "\n".join(p.read_text() for p in sorted(here.parent.glob("test_*.py")) if p != here)
    for p in modules:
        named = re.search(rf"\b{p.stem}\b", others) is not None
        assert f"test_{p.stem}" in tests or named, f"benchmarks/{p.name} has no smoke test"
        text = p.read_text()
        if 'if __name__ == "__main__"' in text:
            assert "--smoke" in text, f"benchmarks/{p.name} has no --smoke flag"


def test_localization(tmp_path):
    """Both tables, the acceptance and the deletion / insertion pass on 40 bags; the pass that
    re-predicts from the saved fold models reproduces the runner's own areas."""
    loc = bench("localization")
    loc.main(["--smoke", "--out", str(tmp_path)])
    frame = pd.read_csv(tmp_path / "localization.csv")
    models = loc.SMOKE["models"]
    assert set(frame["model"]) == {*models, "instance_lr"}
    for m in models:
        kinds = set(frame.loc[frame["model"] == m, "kind"])
        assert {"main", "instance_logits", "contribution"} <= kinds
    assert frame["within"].between(0, 1).all()
    assert frame.loc[frame["model"] != "instance_lr", "bag_auc"].between(0, 1).all()
    accept = pd.read_csv(tmp_path / "acceptance.csv").set_index("model")
    assert list(accept.index) == list(models)
    assert (accept["kind"] == "instance_logits").all()  # the default heatmap score
    assert np.isfinite(
        accept.loc["abmil_additive", ["within_delta", "pooled_delta", "bag_delta"]].astype(float)
    ).all()

    faith = pd.read_csv(tmp_path / "faithfulness.csv")
    for m in models:
        got = faith[faith["model"] == m].set_index("kind")
        assert {"main", "contribution", "instance_logits", "random"} <= set(got.index)
        assert got[["deletion", "insertion"]].stack().between(0, 1).all()
        # each fold's metrics.json holds the runner's areas of the same test bags and model
        folds = fold_metrics(tmp_path / "runs" / "distractors" / m)
        assert len(folds) == loc.SMOKE["folds"]
        for kind in ("main", "instance_logits", "random"):
            for mode in ("deletion", "insertion"):
                runner = np.mean([f[f"{mode}_{kind}"] for f in folds])
                assert got.loc[kind, mode] == pytest.approx(runner, abs=1e-4), (m, kind, mode)


def test_localization_stats():
    """The paired witness statistics against scikit-learn: each ranker's within-bag and pooled
    AUC, and a ranker against itself differs by exactly 0."""
    stats = bench("localization_stats")
    rng = np.random.default_rng(0)
    labels, a, b = {}, {}, {}
    for f in ("fold_0", "fold_1"):
        a[f], b[f] = {}, {}
        for i in range(8):
            bag = f"{f}_B{i}"
            n = int(rng.integers(6, 20))
            labels[bag] = np.zeros(n, int)
            if i % 2:
                labels[bag][rng.choice(n, 2, replace=False)] = 1
            a[f][bag] = labels[bag] + rng.normal(size=n)
            b[f][bag] = rng.normal(size=n)
    out = stats.paired_witness(a, b, labels, n_boot=50)
    within = np.mean(
        [
            np.mean([roc_auc_score(labels[k], v) for k, v in a[f].items() if labels[k].any()])
            for f in a
        ]
    )
    pooled = np.mean(
        [
            roc_auc_score(
                np.concatenate([labels[k] for k in a[f]]), np.concatenate(list(a[f].values()))
            )
            for f in a
        ]
    )
    assert out["within_a"] == pytest.approx(within) and out["pooled_a"] == pytest.approx(pooled)
    assert out["within_delta"] == pytest.approx(out["within_a"] - out["within_b"])
    assert out["within_low"] <= out["within_delta"] <= out["within_high"]
    same = stats.paired_witness(a, a, labels, n_boot=20)
    assert same["within_delta"] == same["within_low"] == same["within_high"] == 0.0


def test_cohort_zoo(tmp_path):
    """Every run of the zoo on a classification and a survival cohort; the run folders are
    shared by identical configs and the mean-pool baseline is the reference of its table."""
    zoo = bench("cohort_zoo")
    zoo.main(["--smoke", "--out", str(tmp_path)])
    frame = pd.read_csv(tmp_path / "zoo.csv")
    runs = ["defaults", "meanpool_linear", "bow_linear", list(zoo.GRID)[-1]]
    metric = {"smoke-digits": "auc", "smoke-presence": "c_index", "smoke-label-noise": "auc"}
    assert set(frame["cohort"]) == set(metric)
    role = {"smoke-digits": "selection", "smoke-presence": "selection"}
    assert (frame["role"] == frame["cohort"].map(role).fillna("confirmation")).all()
    # zoo.md: the selection table, then the confirmation table, each with its cohorts only
    text = (tmp_path / "zoo.md").read_text()
    sel, conf = text.split(zoo.ROLE_HEADINGS["confirmation"])
    assert zoo.ROLE_HEADINGS["selection"] in sel
    assert "| smoke-digits |" in sel and "| smoke-presence |" in sel
    assert "smoke-label-noise" not in sel
    assert "| smoke-label-noise |" in conf and "smoke-digits" not in conf
    for cohort, part in frame.groupby("cohort"):
        assert list(part["run"]) == runs
        assert set(part["metric"]) == {metric[cohort]}
        assert part[["mean", "pooled"]].stack().between(0, 1).all()
        assert part["undertrained_folds"].between(0, 2).all()
        base = part.set_index("run").loc["meanpool_linear"]
        assert base["delta_vs_meanpool"] == 0.0
        # in a smoke run the defaults and the grid point are one config: one run folder
        assert part["folder"].nunique() == 3
    # the table's pooled AUC is the out-of-fold AUC of the run's predictions (scikit-learn)
    row = frame[(frame["cohort"] == "smoke-digits") & (frame["run"] == "meanpool_linear")].iloc[0]
    pred = pd.concat(fold_frames(tmp_path / row["folder"]))
    auc = roc_auc_score(pred["label"] == "positive", pred["prob_positive"])
    assert row["pooled"] == pytest.approx(auc, abs=1e-9)
    # --role confirmation: the confirmation cohorts alone (their run folders reused)
    zoo.main(["--smoke", "--role", "confirmation", "--out", str(tmp_path)])
    only = pd.read_csv(tmp_path / "zoo.csv")
    assert set(only["cohort"]) == {"smoke-label-noise"} and set(only["role"]) == {"confirmation"}
    assert zoo.ROLE_HEADINGS["selection"] not in (tmp_path / "zoo.md").read_text()
    with pytest.raises(SystemExit):
        zoo.main(["--smoke", "--role", "confirmation", "--only", "smoke-digits"])


def test_zoo_cohorts(tmp_path):
    """The confirmation cohorts' generators, each against a count made here: whole patients
    flip (15% of them, the planted witnesses still telling the true label), every patient of
    ``two-slides`` has two slides of one label, and pixel-like features lie in [0, 1] with a
    quarter of the dimensions near-constant."""
    import h5py

    gen = bench("zoo_cohorts")
    gen.label_noise_cohort(
        tmp_path / "noise", 40, 3, n_two_slides=10, dim=8, min_tiles=20, max_tiles=30
    )
    frame = pd.read_csv(tmp_path / "noise" / "cohort.csv")
    flipped = frame["label"] != frame["true_label"]
    per_patient = flipped.groupby(frame["case_id"]).agg(["min", "max"])
    assert (per_patient["min"] == per_patient["max"]).all()  # all of a patient's slides or none
    assert per_patient["max"].sum() == round(0.15 * 40) == 6
    assert frame.groupby("case_id").size().max() == 2  # the two-slide patients flip whole
    for r in frame.itertuples():  # witnesses planted in the true positives only
        with h5py.File(tmp_path / "noise" / "features" / f"{r.slide_id}.h5", "r") as f:
            assert (f["instance_label"][:].sum() > 0) == (r.true_label == "positive")
    write = gen.synthetic(
        "classification", seed=1, n_patients=12, n_two_slides=12, dim=8, min_tiles=10, max_tiles=20
    )
    write(tmp_path / "two")
    two = pd.read_csv(tmp_path / "two" / "cohort.csv")
    assert (two.groupby("case_id")["slide_id"].nunique() == 2).all()
    assert (two.groupby("case_id")["label"].nunique() == 1).all()
    gen.pixel_like_cohort(tmp_path / "pix", 10, 4, dim=16, min_tiles=30, max_tiles=40)
    x = []
    for path in sorted((tmp_path / "pix" / "features").glob("*.h5")):
        with h5py.File(path, "r") as f:
            x.append(f["features"][:].astype(np.float64))
    x = np.concatenate(x)
    assert x.min() >= 0.0 and x.max() <= 1.0
    sd = x.std(0)
    assert (sd < 2 * gen.NEAR_CONSTANT_SD).sum() == 16 // 4  # float16 storage adds ~1e-4
    assert (sd[sd >= 2 * gen.NEAR_CONSTANT_SD] > 0.05).all()


def test_survival_stopping(tmp_path):
    """The traced survival run and its analysis: every criterion at every epoch, and the traced
    test risks of the last epoch are the run's own predictions."""
    stop = bench("survival_stopping")
    stop.main(["--smoke", "--out", str(tmp_path)])
    table = pd.read_csv(tmp_path / "stopping.csv")
    assert {"last", "oracle (test)", "meanpool_linear"} <= set(table["rule"])
    assert {f"{c} (smooth 1)" for c in stop.CRITERIA} <= set(table["rule"])
    assert table["c_mil"].between(0, 1).all()
    epochs = stop.SMOKE["train"]["epochs"]
    run = tmp_path / "full" / "surv-smoke"
    for hist, pred, npz in zip(
        fold_frames(run, "history.csv"),
        fold_frames(run),
        sorted(run.glob("fold_*/epoch_risks.npz")),
    ):
        assert len(hist) == epochs
        assert np.isfinite(hist[[*stop.CRITERIA, "test_c_index"]].to_numpy()).all()
        # the loss at the best scale of the risks is at most that at their z-scored scale
        assert (hist["val_loss_best_scale"] <= hist["val_loss_z"] + 1e-6).all()
        traced = np.load(npz)
        assert traced["test"].shape == (epochs, len(pred))
        risk = pred.set_index("bag_id").loc[[str(i) for i in traced["test_ids"]], "risk"]
        np.testing.assert_allclose(traced["test"][-1], risk.to_numpy(), rtol=1e-5, atol=1e-6)


def test_site_shift(tmp_path):
    """``mil generalize`` on the site-confounded cohort: internal, site-preserved and external
    rows, and the internal AUC is the out-of-fold AUC of the run's predictions."""
    ss = bench("site_shift")
    table, text = ss.site_shift(tmp_path, **ss.SMOKE)
    assert set(table["model"]) == set(ss.SMOKE["models"])
    assert set(table["setting"]) == {"internal CV", "site-preserved CV", "external"}
    assert set(table["metric"]) == {"auc", "balanced_accuracy"}
    assert table["value"].between(0, 1).all()
    assert np.isfinite(table.loc[table["setting"] != "internal CV", "delta"]).all()
    ext = table[table["setting"] == "external"]
    assert (ext["n_patients"] == ss.SMOKE["patients"] // 2).all()
    cohort = pd.read_csv(tmp_path / "internal.csv")
    assert set(cohort["site"]) == set(ss.SITES)
    assert set(pd.read_csv(tmp_path / "external.csv")["site"]) == {"E"}
    pred = pd.concat(fold_frames(tmp_path / "generalize" / "abmil" / "internal"))
    internal = table[(table["setting"] == "internal CV") & (table["metric"] == "auc")].iloc[0]
    auc = roc_auc_score(pred["label"] == "positive", pred["prob_positive"])
    assert internal["value"] == pytest.approx(auc, abs=1e-9)
    assert "## abmil" in text and "external: site_E" in text


@pytest.mark.skipif(not (CLASSIC / "musk1.csv.gz").is_file(), reason=f"needs {CLASSIC} (real data)")
def test_classic_mil(tmp_path, monkeypatch):
    """MUSK1's two configs on two folds: the table's accuracy is that of the fold predictions."""
    classic = bench("classic_mil")
    monkeypatch.chdir(ROOT)  # the configs name ../shared/datasets from the repository root
    classic.main(["--smoke", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "classic_mil.json").read_text())
    assert set(results) == {"musk1_attention", "musk1_gated_attention"}
    for name, r in results.items():
        assert r["n_folds"] == classic.SMOKE["folds"]
        folds = fold_frames(tmp_path / name)
        acc = [accuracy_score(f["label"].astype(str), f["pred"].astype(str)) for f in folds]
        assert r["mean"] == pytest.approx(np.mean(acc), abs=1e-9)
    text = (tmp_path / "classic_mil.md").read_text()
    assert "| MUSK1 | ABMIL |" in text and "| MUSK1 | gated ABMIL |" in text


def test_train_throughput():
    """Every configuration on both bag sizes; the packed path computes the plain loop's model."""
    tt = bench("train_throughput")
    frame = tt.throughput(**tt.SMOKE)
    assert len(frame) == len(tt.SMOKE["cohorts"]) * len(tt.CONFIGS)
    assert (np.isfinite(frame["instances_per_s"]) & (frame["instances_per_s"] > 0)).all()
    assert (frame.loc[frame["method"] == "one bag at a time", "vs_loop"] == 1.0).all()
    # both loops train the same modules: their outputs agree on the same bags
    bags, _ = tt.random_bags(6, 5, 40, 32, seed=0)
    model = tt.create(
        "abmil", in_dim=32, n_out=2, hidden_dim=16, attn_dim=16, gated=True, dropout=0.0
    )
    model.eval()
    with torch.no_grad():
        packed = tt.forward_bags(model, bags, 8192, torch.device("cpu")).logits
        plain = torch.stack([tt.plain_forward(model, b.x) for b in bags])
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_transmil_memory():
    """One TransMIL training step: times and peak memory measured, every parameter trained."""
    tm = bench("transmil_memory")
    m = tm.measure(**tm.SMOKE)
    assert 0 < m["forward_s"] <= m["total_s"]
    assert 0 < m["rss_before_gib"] <= m["peak_rss_gib"]
    assert m["with_grad"] == m["parameters"] > 0


def test_mean_pooling_ceiling(tmp_path):
    """The oracle ceiling on a small-lesion cohort: the planted witness direction separates the
    tiles, and a thresholded unit separates the slides better than the linear mean."""
    mpc = bench("mean_pooling_ceiling")
    cohort = tmp_path / "cohort_classification"
    mpc.main(["--smoke", "--root", str(tmp_path)])  # generates the cohort
    c = mpc.ceiling(cohort)
    assert c["slides"] == len(pd.read_csv(cohort / "cohort.csv")) == mpc.SMOKE["n_patients"]
    assert 0 < c["witness_tiles"] < c["tiles"]
    assert c["tile_auc"] > 0.95
    assert all(0 <= c[k] <= 1 for k in c if k.endswith("_auc") or "_auc_" in k)
    assert max(c[f"relu_auc_{t:.0f}"] for t in mpc.THRESHOLDS) > c["linear_auc"]


def test_seed_ensembles(tmp_path):
    """Each single run's figure is its own pooled AUC; an ensemble's is the AUC of its runs'
    averaged probabilities (scikit-learn on the saved predictions)."""
    seeds = bench("seed_ensembles")
    table = seeds.main(["--smoke", "--out", str(tmp_path)])
    assert sorted(table["size"].value_counts().items()) == [(1, 4), (2, 2)]

    def frames(run: str) -> pd.DataFrame:
        return pd.concat(fold_frames(tmp_path / run), ignore_index=True).sort_values("bag_id")

    for r in table.itertuples():
        runs = [frames(name) for name in r.runs.split(",")]
        prob = np.mean([f["prob_positive"].to_numpy() for f in runs], axis=0)
        assert r.value == pytest.approx(roc_auc_score(runs[0]["label_index"], prob))


def test_inner_selection(tmp_path):
    """The table's figures are Harrell's C over pairs within a fold (the pooled statistic),
    counted by hand on the saved predictions: the selection's ``predictions.csv`` and each
    candidate's own ``members/<name>/``; every fold names its choice."""
    sel = bench("inner_selection")
    row = sel.main(["--smoke", "--out", str(tmp_path), "--rules"]).iloc[0]
    run = tmp_path / "surv-smoke"

    assert row["selection"] == pytest.approx(harrell(fold_frames(run)), abs=1e-4)
    for name in ("abmil", "abmil_raw", "meanpool_linear", "bow_linear"):
        frames = fold_frames(run, f"members/{name}/predictions.csv")
        assert row[name] == pytest.approx(harrell(frames), abs=1e-4)
    records = sorted(run.glob("fold_*/metrics.json"))
    chosen = [json.loads(p.read_text())["selection"]["chosen"] for p in records]
    assert row["chosen"].split(", ") == chosen
    # --rules: the library's rule, re-applied to the recorded inner scores, is the run's own
    text = (tmp_path / "rules.md").read_text().splitlines()
    own = next(line for line in text if "| 1 SE |" in line).split(" | ")
    assert own[-1].rstrip(" |").split(", ") == chosen
    assert float(own[3]) == pytest.approx(row["selection"], abs=1e-4)


def test_multitarget_vs_single(tmp_path):
    """Per target, each run's figure is scikit-learn's metric of its pooled out-of-fold
    predictions on the bags with the label (msi AUC, tmb R², grade QWK), and the two runs
    predicted the same bags in every fold (the single runs' split files are the multi-target
    run's restricted to the labelled bags)."""
    from sklearn.metrics import cohen_kappa_score, r2_score

    mt = bench("multitarget_vs_single")
    table = mt.main(["--smoke", "--out", str(tmp_path)]).set_index("target")
    assert list(table.index) == ["msi", "tmb", "grade"]

    def pooled(run: str) -> pd.DataFrame:
        frames = fold_frames(tmp_path / "runs" / run)
        return pd.concat([p.assign(fold=k) for k, p in enumerate(frames)], ignore_index=True)

    multi = pooled("multi_s0")

    def score(name: str, p: pd.DataFrame) -> float:
        if name == "msi":
            return roc_auc_score(p["label_index"].astype(int), p["prob_MSI"])
        if name == "tmb":
            return r2_score(p["target"], p["prediction"])
        kw = {"weights": "quadratic", "labels": [0, 1, 2]}
        return cohen_kappa_score(p["label_index"].astype(int), p["pred"].astype(int) - 1, **kw)

    outcome = {"msi": "label_index", "tmb": "target", "grade": "label_index"}
    for name, r in table.iterrows():
        own = multi.filter(like=f"{name}/").rename(columns=lambda c: c.split("/", 1)[1])
        own = pd.concat([multi[["bag_id", "fold"]], own], axis=1)
        own = own[own[outcome[name]].notna()]
        single = pooled(f"{name}_s0")
        pairs = lambda p: sorted(zip(p["fold"], p["bag_id"]))  # noqa: E731
        assert pairs(own) == pairs(single) and r["bags"] == len(single)
        assert r["multi"] == pytest.approx(score(name, own), abs=1e-9)
        assert r["single"] == pytest.approx(score(name, single), abs=1e-9)
        assert r["delta"] == pytest.approx(r["multi"] - r["single"], abs=1e-9)
        lo, hi = r["delta_ci"]
        assert lo <= hi


def test_fusion_defaults(tmp_path, monkeypatch):
    """The linear fusion baseline averages its members as the run averages its own members:
    re-averaging all three members of ``slides+tables`` gives that run's ``predictions.csv``;
    each row's C is Harrell's over pairs within a fold, counted by hand."""
    fus = bench("fusion_defaults")
    table = fus.main(["--smoke", "--out", str(tmp_path)]).set_index("run")
    assert {"slides", "clinical_linear", "linear_fusion", "late_fusion@demo"} <= set(table.index)
    from mil.train.summary import run_task

    both = tmp_path / "demo" / "slides_tables"
    task = run_task(both)
    monkeypatch.setattr(fus, "LINEAR_FUSION", ("abmil_additive", *fus.LINEAR_FUSION))
    three = fus.linear_fusion(both, task).sort_values(["fold_dir", "bag_id"])
    own = pd.concat(
        [p.assign(fold_dir=f"fold_{k}") for k, p in enumerate(fold_frames(both))]
    ).sort_values(["fold_dir", "bag_id"])
    np.testing.assert_allclose(three["risk"], own["risk"], atol=1e-9)

    lin = fold_frames(tmp_path / "demo" / "clinical_linear")
    assert table.loc["clinical_linear", "c_index"] == pytest.approx(harrell(lin), abs=1e-4)


def test_gpu_feed(capsys):
    """The GPU feed benchmark's smoke run (CPU); its two host paths train the same weights from
    the same seed and order (the staged chunks are the synchronous ones, cast later)."""
    gf = bench("gpu_feed")
    gf.main(["--smoke"])
    out = capsys.readouterr().out
    assert "streamed" in out and "synchronous" in out
    frame, bandwidth = gf.feed(**{**gf.SMOKE, "precisions": ("fp32",)})
    assert set(frame["path"]) == {"streamed", "synchronous"} and np.isnan(bandwidth)
    assert (frame["instances_per_s"] > 0).all()
    np.testing.assert_allclose(frame["seconds_per_10M"], 1e7 / frame["instances_per_s"])
    dev = torch.device("cpu")
    bags = gf.host_bags(600, 50, 8, dev)
    labels = torch.as_tensor(np.arange(len(bags)) % 2)
    weights = []
    for stager in (
        gf.Stager(dev, torch.float32),
        gf.ComputeDtypeStager(dev, torch.float32, copies=gf.SameStreamCopies(dev, torch.float32)),
    ):
        torch.manual_seed(0)
        model = gf.create("abmil_additive", in_dim=8, n_out=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rng = np.random.default_rng(0)
        gf.epoch(model, opt, bags, labels, dev, "fp32", stager, 128, rng)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert sum(len(b) for b in bags) == 600 and all(b.x.dtype == torch.float16 for b in bags)


def test_survival_recipe(tmp_path):
    """The recipe study's smoke run: the default prediction it derives from the members is the
    run's own (``ensemble: [meanpool_linear]``, the same folds), and every C is Harrell's C by
    hand on the pooled folds where each fold's pairs are its own."""
    from mil.config import config_from_dict
    from mil.train.runner import run_cv

    sr = bench("survival_recipe")
    table = sr.main(["--smoke", "--out", str(tmp_path)])
    assert set(table["variant"]) == set(sr.SMOKE["variants"])
    folder = tmp_path / "runs" / "surv-smoke" / "defaults"
    preds = sr.predictors(folder)
    raw = sr.config("surv-smoke", "defaults", tmp_path, smoke=True)
    raw["ensemble"] = ["meanpool_linear"]
    alone = run_cv(config_from_dict(raw), tmp_path / "own", progress=False, log=lambda *a: None)
    own = pd.concat(fold_frames(alone)).sort_values("bag_id")
    mine = preds["default"].sort_values("bag_id")
    np.testing.assert_allclose(mine["risk"].to_numpy(), own["risk"].to_numpy(), atol=1e-5)
    row = table[table["variant"] == "defaults"].iloc[0]
    for key in ("model", "default", "bow_linear"):
        frames = [g for _, g in preds[key].groupby("fold_dir")]
        assert len(frames) == 2
        assert row[key] == pytest.approx(harrell(frames), abs=1e-4)

"""A multi-target run's linear baselines (``--baseline``) and per-target instance scores
(``mil heatmap --target``). References: each target's single-target task's ``fit_linear`` on
its labelled bags and scikit-learn (logistic regression, ridge regression), a poisoning test
(the masked labels set to anything fit the same head), scikit-learn's metrics of the saved
baseline predictions for ``baselines.csv``, and the saved score kinds' columns selected by hand
for the per-target scores."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import cohen_kappa_score, r2_score, roc_auc_score

from mil.cli import main
from mil.compare import paired_differences
from mil.config import config_from_dict
from mil.results import MODEL
from mil.results.checkpoint import read_checkpoint
from mil.run import Run
from mil.tasks import make_task
from mil.train.runner import run_cv
from tests.conftest import small_config
from tests.test_multitarget import _bags, _task, cohort, config, poison_masked_targets

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning", "ignore::UserWarning")


def _single(kind: str, classes: list[str]):
    cfg = config_from_dict({"data": {"csv": "x.csv", "features": "f"}, "task": {"type": kind}})
    return make_task(cfg, classes)


def _own(bags: pd.DataFrame, col: str) -> pd.DataFrame:
    """The bags with label ``col`` under the single-target task's column name."""
    own = col.split(".")[1]
    part = bags[bags[col].notna()].rename(columns={col: own})
    return part.assign(label=part["label"].astype(int)) if own == "label" else part


def test_each_targets_linear_block_is_its_own_tasks_fit():
    rng = np.random.default_rng(3)
    bags = _bags(rng, n=80)
    z = rng.normal(size=(len(bags), 6))
    z[:, 0] += 1.5 * bags["msi.label"].fillna(0).to_numpy()  # some signal to fit
    task = _task()
    task.fit_fold(bags)
    singles = {
        "msi": (_single("classification", ["MSS", "MSI"]), "msi.label"),
        "tmb": (_single("regression", []), "tmb.target"),
        "grade": (_single("ordinal", ["1", "2", "3"]), "grade.label"),
    }
    for C in (0.01, 1.0):
        w, b, delta = task.fit_linear(z, bags, C, 0)
        assert delta is None and w.shape == (4, 6) and b.shape == (4,)
        for name, (single, col) in singles.items():
            have = bags[col].notna().to_numpy()
            part = _own(bags, col)
            single.fit_fold(part)
            own_c = 1.0 / C if name == "tmb" else C  # ridge alpha = 1 / C
            ws, bs, _ = single.fit_linear(z[have], part, own_c, 0)
            block = task.blocks[name]
            np.testing.assert_allclose(w[block], ws, atol=1e-6)
            np.testing.assert_allclose(b[block], bs, atol=1e-6)
        # scikit-learn directly, on the labelled bags only
        have = bags["msi.label"].notna().to_numpy()
        lr = LogisticRegression(C=C, max_iter=5000).fit(z[have], bags["msi.label"][have])
        np.testing.assert_allclose(w[1] - w[0], lr.coef_[0], atol=1e-6)
        np.testing.assert_allclose(b[1] - b[0], lr.intercept_[0], atol=1e-6)
        have = bags["tmb.target"].notna().to_numpy()
        y = bags["tmb.target"][have].to_numpy()
        ridge = Ridge(alpha=1.0 / C).fit(z[have], (y - y.mean()) / y.std())
        np.testing.assert_allclose(w[2], ridge.coef_, atol=1e-6)
        np.testing.assert_allclose(b[2], ridge.intercept_, atol=1e-6)
    # a bag without a target's label changes nothing of that target's block, whatever its
    # vector and its other labels hold
    w, b, _ = task.fit_linear(z, bags, 1.0, 0)
    for name, (_, col) in singles.items():
        masked = bags[col].isna().to_numpy()
        z2, bags2 = z.copy(), bags.copy()
        z2[masked] = rng.normal(0, 100, size=(int(masked.sum()), z.shape[1]))
        for other in {"msi.label", "tmb.target", "grade.label"} - {col}:
            bags2.loc[masked, other] = bags2[other].dropna().iloc[0]
        task.fit_fold(bags2)
        w2, b2, _ = task.fit_linear(z2, bags2, 1.0, 0)
        block = task.blocks[name]
        np.testing.assert_allclose(w2[block], w[block], atol=1e-8)
        np.testing.assert_allclose(b2[block], b[block], atol=1e-8)


def test_a_linear_baseline_with_masked_labels_poisoned_fits_the_same_head(tmp_path, monkeypatch):
    """Poisoning, in the closed-form fit: the targets of every masked cell replaced by random
    values (the validation loss that picks the penalty reads them) give the same head."""
    raw = config(tmp_path, cohort(tmp_path, "c", 5, n_patients=30))
    raw["model"] = {"name": "meanpool_linear"}
    raw["train"]["faithfulness"] = False
    quiet = dict(folds=[0], progress=False, log=lambda *a: None, n_boot=10)
    clean = run_cv(config_from_dict(raw), tmp_path / "clean", **quiet)
    poison_masked_targets(monkeypatch)
    bad = run_cv(config_from_dict(raw), tmp_path / "bad", **quiet)
    a = read_checkpoint(Run(clean).folder.fold_file(0, MODEL))["state_dict"]
    b = read_checkpoint(Run(bad).folder.fold_file(0, MODEL))["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    hist = [pd.read_csv(r / "fold_0" / "history.csv") for r in (clean, bad)]
    pd.testing.assert_frame_equal(hist[0], hist[1])
    assert hist[0]["C"].tolist() == sorted(hist[0]["C"]) and len(hist[0]) == 7


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory):
    """A tiny multi-target run (fold 0) with both linear baselines."""
    root = tmp_path_factory.mktemp("mt_review")
    raw = config(root, cohort(root, "internal", 4, n_patients=36))
    raw["train"].update(epochs=2, faithfulness=False)
    (root / "mt.yaml").write_text(yaml.safe_dump(raw))
    run_dir = root / "run"
    args = ["train", str(root / "mt.yaml"), "--out", str(run_dir), "--quiet", "--folds", "0"]
    fast = {"n_boot": 20}  # the bootstrap CIs are most of the time; their values are not tested
    with pytest.MonkeyPatch.context() as mp:
        for module, fn in (("mil.train.runner", run_cv), ("mil.compare", paired_differences)):
            mp.setattr(f"{module}.{fn.__name__}", lambda *a, _fn=fn, **k: _fn(*a, **{**k, **fast}))
        assert main([*args, "--baseline", "meanpool_linear,bow_linear"]) == 0
    return root, run_dir


def _headline(pred: pd.DataFrame) -> float:
    """mean_headline by scikit-learn: msi AUC, tmb R², grade QWK on each's labelled bags."""
    msi = pred[pred["msi/label_index"].notna()]
    tmb = pred[pred["tmb/target"].notna()]
    g = pred[pred["grade/label_index"].notna()]
    return float(
        np.mean(
            [
                roc_auc_score(msi["msi/label_index"].astype(int), msi["msi/prob_MSI"]),
                r2_score(tmb["tmb/target"], tmb["tmb/prediction"]),
                cohen_kappa_score(
                    g["grade/label_index"].astype(int),
                    g["grade/pred"].astype(int) - 1,
                    weights="quadratic",
                    labels=[0, 1, 2],
                ),
            ]
        )
    )


def test_baselines_of_a_multitarget_run(mt_run):
    _, run_dir = mt_run
    table = pd.read_csv(run_dir / "baselines.csv").set_index("baseline")
    assert list(table.index) == ["meanpool_linear", "bow_linear"]
    assert (table["metric"] == "mean_headline").all()
    for name in table.index:
        pred = Run(run_dir / "baselines" / name).predictions()
        assert table.loc[name, "baseline_value"] == pytest.approx(_headline(pred), abs=1e-9)
        assert pred["msi/prob_MSI"].notna().all()  # every bag predicted, labelled or not
    model = _headline(Run(run_dir).predictions())
    assert table["model_value"].iloc[0] == pytest.approx(model, abs=1e-9)
    report = (run_dir / "report.md").read_text()
    assert "meanpool_linear" in report


def _saved(run: Run, slide: str, kind: str) -> np.ndarray:
    fold = run.test_fold(slide)
    with h5py.File(run.fold_dir(fold) / "attention.h5", "r") as f:
        for g in f.values():
            if slide in [str(s) for s in g.attrs["slides"]]:
                v = g[f"scores_{kind}"][()].astype(np.float64)
                ptr = list(g.attrs["slide_ptr"])
                i = [str(s) for s in g.attrs["slides"]].index(slide)
                return v[ptr[i] : ptr[i + 1]]
    raise AssertionError(slide)


def test_per_target_scores_are_the_targets_columns(mt_run):
    _, run_dir = mt_run
    run = Run(run_dir)
    slide = run.top_slides(1)[0]
    logits, contrib = _saved(run, slide, "instance_logits"), _saved(run, slide, "contribution")
    assert logits.shape[1] == 4  # msi MSS, msi MSI, tmb, grade
    half = (logits[:, 1] - logits[:, 0]) / 2  # centred over msi's two classes
    expected = {
        ("msi", "default"): (half, "instance_logits[msi/MSI]"),
        ("msi/MSS", "default"): (-half, "instance_logits[msi/MSS]"),
        ("msi/0", "default"): (-half, "instance_logits[msi/MSS]"),
        ("tmb", "default"): (contrib[:, 2], "contribution[tmb]"),
        ("grade", "default"): (contrib[:, 3], "contribution[grade]"),
        ("tmb", "instance_logits"): (logits[:, 2], "instance_logits[tmb]"),
    }
    for (cls, kind), (values, label) in expected.items():
        s = run.scores(slide, kind=kind, cls=cls)
        np.testing.assert_allclose(s["score"], values, rtol=1e-6, atol=1e-7)
        assert s.attrs["kind"] == label
    # a head output's index still reads that column as saved
    np.testing.assert_allclose(
        run.scores(slide, kind="contribution", cls=2)["score"], contrib[:, 2]
    )


def test_heatmap_and_topk_with_target(mt_run, capsys):
    root, run_dir = mt_run
    run = Run(run_dir)
    slide = run.top_slides(1)[0]
    out = root / "maps"
    base = ["heatmap", str(run_dir), "--slide", slide, "--out", str(out)]
    assert main([*base, "--target", "tmb"]) == 0
    assert (out / f"{slide}.png").stat().st_size > 0
    csv = root / "top.csv"
    topk = ["topk", str(run_dir), "--slide", slide, "--k", "5", "--out", str(csv)]
    assert main([*topk, "--target", "grade"]) == 0
    top = pd.read_csv(csv)
    grade = _saved(run, slide, "contribution")[:, 3]
    np.testing.assert_allclose(top["score"], np.sort(grade)[::-1][:5], rtol=1e-6)
    # --top-n ranks the bags by the named target's prediction
    capsys.readouterr()
    for target, col in (("tmb", "tmb/prediction"), ("msi", "msi/prob_MSI")):
        args = ["heatmap", str(run_dir), "--top-n", "1", "--target", target, "--out", str(out)]
        assert main(args) == 0
        pred = run.predictions().sort_values([col, "bag_id"], ascending=[False, True])
        drawn = capsys.readouterr().out.split()[0]
        assert drawn.split("/")[-1].startswith(f"{pred['bag_id'].iloc[0]}-S")
    # errors name the targets
    assert main([*base, "--target", "kras"]) == 2
    err = capsys.readouterr().err
    assert "--target 'kras': not a target" in err and "msi, tmb, grade" in err
    assert main(base) == 2
    assert "multi-target run: name the target with --target" in capsys.readouterr().err
    assert main([*base, "--target", "tmb", "--cls", "MSI"]) == 2
    assert "target 'tmb' has one score per tile" in capsys.readouterr().err
    assert main([*base, "--target", "msi", "--cls", "MSX"]) == 2
    assert "not a class of target 'msi'" in capsys.readouterr().err


def test_target_on_a_single_target_run_is_refused(tmp_path, capsys):
    raw = small_config(tmp_path)
    raw["model"] = {"name": "meanpool_linear"}
    raw["train"]["faithfulness"] = False
    quiet = dict(folds=[0], progress=False, log=lambda *a: None, n_boot=10)
    run_dir = run_cv(config_from_dict(raw), tmp_path / "run", **quiet)
    slide = Run(run_dir).top_slides(1)[0]
    args = ["heatmap", str(run_dir), "--slide", slide, "--target", "msi"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is a single-target run (task 'classification'); leave --target out" in err


def test_linear_ensemble_members_of_a_multitarget_model(tmp_path):
    """``ensemble: [meanpool_linear]``: each target's outputs averaged as its own task averages
    them (a regression's predictions, a classifier's probabilities); ``auto`` takes none."""
    raw = config(tmp_path, cohort(tmp_path, "c", 4, n_patients=30))
    raw["train"].update(epochs=2, faithfulness=False)
    assert config_from_dict(raw).members == []  # ensemble: auto
    raw["ensemble"] = ["meanpool_linear"]
    quiet = dict(folds=[0], progress=False, log=lambda *a: None, n_boot=10)
    fold = run_cv(config_from_dict(raw), tmp_path / "run", **quiet) / "fold_0"
    both = pd.read_csv(fold / "predictions.csv")
    model = pd.read_csv(fold / "members" / "abmil_additive" / "predictions.csv")
    linear = pd.read_csv(fold / "members" / "meanpool_linear" / "predictions.csv")
    for col in ("tmb/prediction", "msi/prob_MSI"):
        np.testing.assert_allclose(both[col], (model[col] + linear[col]) / 2, rtol=1e-6)
    assert linear["tmb/prediction"].std() > 0 and not np.allclose(linear[col], model[col])

"""Several targets of one bag (``task.type: multitarget``). References: scikit-learn on each
target's labelled rows of the saved predictions (a single-target evaluation of the same
predictions), the loss by hand (each target's own task on its labelled bags; the geometric
mean for ``uncertainty``), a poisoning test (the masked labels set to anything give the same
model), and ``mil evaluate`` (with and without ``--refit``) and ``Run.predict``, on a synthetic
cohort with about 30% of each target's labels missing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import cohen_kappa_score, r2_score, roc_auc_score

from mil.check import check_cohort
from mil.cli import main
from mil.config import config_from_dict
from mil.data.cohort import Cohort
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import ConfigError, DataError
from mil.results import MODEL
from mil.results.checkpoint import read_checkpoint
from mil.run import Run
from mil.splits import read_splits
from mil.tasks import MultiTargetTask, get, make_task
from mil.tasks.multitarget import MultiTargetOptions
from mil.train.runner import run_cv
from tests.conftest import assert_predict_reproduces, evaluate_both_ways

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning", "ignore::UserWarning")

TARGETS = [
    {"name": "msi", "label_col": "msi_status", "classes": ["MSS", "MSI"]},
    {"name": "tmb", "label_col": "tmb", "type": "regression"},
    {"name": "grade", "label_col": "grade", "type": "ordinal"},
]


def cohort(root, name: str, seed: int, n_patients: int = 45) -> dict:
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    write_synthetic_cohort(
        "multitarget",
        csv,
        feats,
        seed=seed,
        n_patients=n_patients,
        n_two_slides=6,
        dim=12,
        min_tiles=15,
        max_tiles=40,
        shift_norm=6.0,
    )
    return {
        "csv": str(csv),
        "features": str(feats),
        "patient_col": "case_id",
        "bag_level": "patient",
    }


def config(root, data: dict, **task) -> dict:
    return {
        "name": "mt",
        "task": {"type": "multitarget", "targets": TARGETS, **task},
        "data": data,
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.25, "seed": 0},
        "model": {"name": "abmil_additive", "hidden_dim": 16},
        "train": {
            "epochs": 4,
            "batch_size": 8,
            "lr": 3e-3,
            "patience": None,
            "seed": 0,
            "threads": 1,
        },
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitarget")
    raw = config(root, cohort(root, "internal", 4))
    (root / "mt.yaml").write_text(yaml.safe_dump(raw))
    run_dir = root / "run"
    assert main(["train", str(root / "mt.yaml"), "--out", str(run_dir), "--quiet", "--refit"]) == 0
    return root, run_dir


def _task(weights: str = "equal") -> MultiTargetTask:
    cfg = config_from_dict(
        {
            "data": {"csv": "x.csv", "features": "f"},
            "task": {"type": "multitarget", "targets": TARGETS, "weights": weights},
        }
    )
    return make_task(cfg, ["msi/MSS", "msi/MSI", "grade/1", "grade/2", "grade/3"])


def _bags(rng, n: int = 12) -> pd.DataFrame:
    bags = pd.DataFrame(
        {"bag_id": [f"B{i}" for i in range(n)], "patient_id": [f"P{i}" for i in range(n)]}
    )
    bags["msi.label"] = rng.integers(0, 2, n).astype(float)
    bags["tmb.target"] = rng.uniform(5, 25, n)
    bags["grade.label"] = rng.integers(0, 3, n).astype(float)
    for col in ("msi.label", "tmb.target", "grade.label"):
        bags.loc[rng.uniform(size=n) < 0.3, col] = np.nan
    return bags


def poison_masked_targets(monkeypatch, seed: int = 7) -> None:
    """Every masked (missing) label's target replaced by random values (0 or 1000) wherever
    the multi-target task builds its targets: a loss or fit that read them would change."""
    original = MultiTargetTask.targets
    rng = np.random.default_rng(seed)

    def poisoned(self, bags):
        out = original(self, bags)
        for name in self.subs:
            masked = ~out[f"{name}/mask"]
            for k, v in out.items():
                if k.startswith(f"{name}/") and k != f"{name}/mask" and masked.any():
                    values = rng.integers(0, 2, int(masked.sum())) * 1e3
                    v[masked] = torch.as_tensor(values).to(v.dtype)
        return out

    monkeypatch.setattr(MultiTargetTask, "targets", poisoned)


def test_the_loss_is_each_targets_own_on_its_labelled_bags():
    rng = np.random.default_rng(0)
    bags = _bags(rng)
    for weights in ("equal", "uncertainty"):
        task = _task(weights)
        assert task.n_out == 4 and [str(task.blocks[n]) for n in ("msi", "tmb", "grade")] == [
            "slice(0, 2, None)",
            "slice(2, 3, None)",
            "slice(3, 4, None)",
        ]
        task.fit_fold(bags)
        logits = torch.tensor(rng.normal(size=(len(bags), 4)))
        losses = []
        for name, col in (("msi", "msi.label"), ("tmb", "tmb.target"), ("grade", "grade.label")):
            sub, keep = task.subs[name], bags[col].notna().to_numpy()
            own = col.split(".")[1]
            part = bags[keep].rename(columns={col: own})
            if own == "label":
                part[own] = part[own].astype(int)
            losses.append(float(sub.loss(logits[keep][:, task.blocks[name]], sub.targets(part))))
        # the regression target's scaler: the labelled training bags' mean and sd only
        labelled = bags["tmb.target"].dropna().to_numpy()
        assert task.subs["tmb"].state()["center"] == pytest.approx(labelled.mean())
        expected = sum(losses) if weights == "equal" else float(np.exp(np.mean(np.log(losses))))
        assert float(task.loss(logits, task.targets(bags))) == pytest.approx(expected, rel=1e-10)


def test_masked_labels_change_nothing():
    """Poisoning, in the loss: whatever the masked cells' targets hold, the loss and its
    gradient are the same."""
    rng = np.random.default_rng(1)
    bags = _bags(rng)
    task = _task("uncertainty")
    task.fit_fold(bags)
    logits = torch.tensor(rng.normal(size=(len(bags), 4)), requires_grad=True)
    clean = task.targets(bags)
    poisoned = {k: v.clone() for k, v in clean.items()}
    for name in task.subs:
        masked = ~clean[f"{name}/mask"]
        for k, v in poisoned.items():
            if k.startswith(f"{name}/") and k != f"{name}/mask":
                n = int(masked.sum())
                v[masked] = (
                    torch.randint(1, 3, (n,))
                    if v.dtype == torch.long
                    else torch.full((n,), 1e6, dtype=v.dtype)
                )
    grads = []
    for targets in (clean, poisoned):
        logits.grad = None
        value = task.loss(logits, targets)
        value.backward()
        grads.append((float(value), logits.grad.clone()))
    assert grads[0][0] == grads[1][0]
    assert torch.equal(grads[0][1], grads[1][1])


def test_a_run_with_masked_labels_poisoned_trains_the_same_model(tmp_path, monkeypatch):
    """Poisoning, in training: the targets of every masked cell replaced by random values in
    every batch give the same fold model, weight for weight."""
    data = cohort(tmp_path, "c", 5, n_patients=30)
    raw = config(tmp_path, data)
    raw["train"].update(epochs=2, faithfulness=False)
    clean = run_cv(
        config_from_dict(raw),
        tmp_path / "clean",
        folds=[0],
        progress=False,
        log=lambda *a: None,
        n_boot=10,
    )
    poison_masked_targets(monkeypatch)
    bad = run_cv(
        config_from_dict(raw),
        tmp_path / "bad",
        folds=[0],
        progress=False,
        log=lambda *a: None,
        n_boot=10,
    )
    a = read_checkpoint(Run(clean).folder.fold_file(0, MODEL))
    b = read_checkpoint(Run(bad).folder.fold_file(0, MODEL))
    assert a["task_state"] == b["task_state"]
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-6, atol=1e-7)


def test_each_targets_metrics_are_a_single_target_evaluation(study):
    _, run_dir = study
    run = Run(run_dir)
    raw = pd.read_csv(run.config.data.csv)
    assert (
        raw[["msi_status", "tmb", "grade"]].isna().mean().between(0.15, 0.45).all()
    )  # ~30% missing
    for fold in run.folds:
        pred = run.predictions(fold)
        m = run.metrics(fold)["metrics"]
        msi = pred[pred["msi/label_index"].notna()]
        assert m["msi/auc"] == pytest.approx(
            roc_auc_score(msi["msi/label_index"].astype(int), msi["msi/prob_MSI"])
        )
        tmb = pred[pred["tmb/target"].notna()]
        assert m["tmb/r2"] == pytest.approx(r2_score(tmb["tmb/target"], tmb["tmb/prediction"]))
        g = pred[pred["grade/label_index"].notna()]
        p = g["grade/pred"].astype(int) - 1
        assert m["grade/qwk"] == pytest.approx(
            cohen_kappa_score(
                g["grade/label_index"].astype(int), p, weights="quadratic", labels=[0, 1, 2]
            ),
            nan_ok=True,
        )
        assert m["mean_headline"] == pytest.approx(
            np.mean([m["msi/auc"], m["tmb/r2"], m["grade/qwk"]]), nan_ok=True
        )
        # every bag is predicted, labelled or not
        assert pred["msi/prob_MSI"].notna().all() and pred["tmb/prediction"].notna().all()
    summary = run.folder.summary()
    assert summary["task"] == "multitarget"
    for name in ("msi/auc", "tmb/r2", "grade/qwk", "grade/mae"):
        lo, hi = summary["metrics"][name]["ci95_pooled"]
        assert lo <= hi
    assert "3 targets" in (run_dir / "report.md").read_text()


def test_folds_are_patient_grouped_and_stratified_on_all_targets(study):
    _, run_dir = study
    run = Run(run_dir)
    coh = Cohort.from_config(run.config)
    slides = coh.slides.set_index("slide_id")
    for split in read_splits(run.folder.splits_dir, coh, 3):
        parts = [set(slides.loc[split.part(p), "patient_id"]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[2] or parts[1] & parts[2] or parts[0] & parts[1])
        test = slides.loc[split.test]
        assert set(test["msi.label"].dropna()) == {0, 1}


def test_predict_evaluate_and_refit(study, tmp_path):
    root, run_dir = study
    run = Run(run_dir)
    saved = run.predictions(0)
    coh = Cohort.from_config(run.config)
    bags = {b: coh.bag_slides[b] for b in saved["bag_id"]}
    columns = ["msi/prob_MSI", "tmb/prediction", "grade/score"]
    assert_predict_reproduces(run, 0, columns, bags, rtol=1e-4, atol=1e-5)
    external = cohort(tmp_path, "external", 12, n_patients=20)
    for ev, metrics in evaluate_both_ways(run_dir, external, tmp_path / "ev"):
        assert len(ev) == 20 and ev["tmb/prediction"].notna().all()
        assert {"msi/auc", "tmb/r2", "grade/qwk"} <= set(metrics)
    # instance scores: a column per head output, named by the task
    scores = run.scores(run.top_slides(1)[0], kind="contribution", cls=2)
    assert len(scores) and run.task.score_columns()[2] == "tmb/prediction"


def test_targets_are_checked(tmp_path):
    base = {"data": {"csv": "x.csv", "features": "f"}}
    bad = [
        ({"targets": None}, "task.targets must list the targets"),
        ({"targets": [{"label_col": "a"}]}, r"task.targets\[0\].name must be given"),
        (
            {"targets": [{"name": "a", "label_col": "a", "type": "survival"}]},
            r"task.targets\[0\].type = 'survival'",
        ),
        (
            {"targets": [{"name": "a", "label_col": "a", "type": "regression", "loss": "cox"}]},
            r"task.targets\[0\].loss = 'cox'; expected one of",
        ),
        (
            {"targets": [{"name": "a", "label_col": "a"}, {"name": "a", "label_col": "b"}]},
            "used by another target",
        ),
        ({"targets": [{"name": "a/b", "label_col": "a"}]}, "letters, digits"),
    ]
    for task, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            config_from_dict({**base, "task": {"type": "multitarget", **task}})
    cfg = config_from_dict({**base, "task": {"type": "multitarget", "targets": TARGETS}})
    assert cfg.to_dict()["task"] == {"type": "multitarget", "targets": TARGETS, "weights": "equal"}
    assert get("multitarget").headline() == "mean_headline"
    assert MultiTargetOptions(targets=TARGETS).specs[2].options == get("ordinal").Options()
    # mil check: missing labels are counted, not refused
    data = cohort(tmp_path, "c", 6, n_patients=12)
    problems, _ = check_cohort(config_from_dict(config(tmp_path, data)))
    assert not [p for p in problems if p.severity == "error"]
    assert any("have no 'tmb'" in p.what for p in problems if p.severity == "warning")
    # a target column without any value is refused, naming it
    df = pd.read_csv(data["csv"])
    df["tmb"] = np.nan
    df.to_csv(data["csv"], index=False)
    with pytest.raises(DataError, match="'tmb' .target 'tmb'. has no value"):
        Cohort.from_config(config_from_dict(config(tmp_path, data)))

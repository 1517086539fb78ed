"""``mil.Run``: a finished run folder read back, checked against the files and the models directly."""

from __future__ import annotations

import shutil

import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

import mil
from mil.config import config_from_dict
from mil.data.batch import Bag, collate_bags
from mil.data.readers import read_features
from mil.errors import MilError
from mil.models import create
from mil.run import Run
from mil.train.runner import run_cv
from tests.conftest import small_config

matplotlib.use("Agg")


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("runapi")


@pytest.fixture(scope="module")
def run_dir(root):
    raw = small_config(root)
    raw["data"]["standardize"] = True  # predict must apply each fold's own statistics
    return run_cv(config_from_dict(raw), root / "run", progress=False, log=quiet, n_boot=50)


@pytest.fixture(scope="module")
def patient_run_dir(root):
    raw = small_config(root, epochs=1)
    raw["data"]["bag_level"] = "patient"
    raw["splits"]["dir"] = str(root / "splits_patient")
    return run_cv(config_from_dict(raw), root / "run_patient", progress=False, log=quiet, n_boot=20)


def test_run_is_exported_lazily(run_dir):
    assert mil.Run is Run
    run = Run(run_dir)
    assert run.folds == ["0", "1", "2"]
    assert run.config.model_name == "abmil" and run.classes == ["negative", "positive"]
    assert run.summary["fold"].tolist() == ["0", "1", "2", "mean", "sd"]
    model = run.model(1)
    assert not model.training
    state = torch.load(run_dir / "fold_1" / "model.pt", weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_predictions_out_of_fold_cover_each_bag_once(run_dir, root):
    run = Run(run_dir)
    pred = run.predictions()
    cohort = pd.read_csv(root / "cohort.csv", dtype=str)
    assert pred["bag_id"].is_unique
    assert set(pred["bag_id"]) == set(cohort["slide_id"])
    for k in range(3):
        test = set(pd.read_csv(run_dir / "splits" / f"splits_{k}.csv", dtype=str)["test"].dropna())
        assert set(pred.loc[pred["fold"] == str(k), "bag_id"]) == test
        one = run.predictions(fold=k)
        saved = pd.read_csv(run_dir / f"fold_{k}" / "predictions.csv", dtype={"bag_id": str})
        np.testing.assert_array_equal(one["prob_positive"], saved["prob_positive"])
    patients = run.predictions(level="patient")
    assert patients["patient_id"].is_unique and set(patients["patient_id"]) == set(
        cohort["case_id"]
    )


def test_scores_equal_the_h5_datasets(run_dir):
    run = Run(run_dir)
    for k in range(3):
        with h5py.File(run_dir / f"fold_{k}" / "attention.h5", "r") as f:
            for name, g in f.items():
                df = run.scores(name, kind=None)  # the model's main score (attention)
                assert df.attrs["fold"] == str(k) and df.attrs["bag_id"] == name
                np.testing.assert_array_equal(df["score"], g["scores"][()].astype(np.float64))
                np.testing.assert_array_equal(df[["x", "y"]].to_numpy(), g["coords"][()])
    with pytest.raises(MilError, match=r"not in the test set of fold 1"):
        run.scores(run.predictions(fold=0)["bag_id"].iloc[0], fold=1)


def test_patient_bags_select_the_slides_rows(patient_run_dir, root):
    run = Run(patient_run_dir)
    cohort = pd.read_csv(root / "cohort.csv", dtype=str)
    multi = cohort.groupby("case_id")["slide_id"].apply(list)
    multi = multi[multi.map(len) > 1]
    checked = 0
    for patient, slides in multi.items():
        k = run.test_fold(slides[0])
        with h5py.File(patient_run_dir / f"fold_{k}" / "attention.h5", "r") as f:
            g = f[patient]
            assert list(g.attrs["slides"]) == slides
            ptr = list(g.attrs["slide_ptr"])
            scores = g["scores"][()]
        for i, slide in enumerate(slides):
            df = run.scores(slide, kind=None)
            np.testing.assert_array_equal(df["score"], scores[ptr[i] : ptr[i + 1]])
            # independent: the slide's own feature file
            own = read_features(root / "features" / f"{slide}.h5").coords
            np.testing.assert_array_equal(df[["x", "y"]].to_numpy(), own)
            assert df["index"].tolist() == list(range(len(own)))
        whole = run.scores(patient)
        assert whole["slide_id"].tolist() == np.repeat(slides, np.diff(ptr)).tolist()
        with pytest.raises(MilError, match="several slides"):
            run.heatmap(patient)
        fig = run.heatmap(slides[1], top_k=4)
        assert isinstance(fig, matplotlib.figure.Figure)
        checked += 1
    assert checked == len(multi) > 0


def direct_probabilities(run_dir, fold: int, path) -> np.ndarray:
    """A fold model's class probabilities for one feature file, computed without mil.Run."""
    payload = torch.load(run_dir / f"fold_{fold}" / "model.pt", weights_only=True)
    model = create(
        payload["model"], in_dim=payload["in_dim"], n_out=payload["n_out"], **payload["hparams"]
    )
    model.load_state_dict(payload["state_dict"])
    model.eval()
    sf = read_features(path)
    x = torch.from_numpy(sf.features.astype(np.float32))
    norm = payload["standardize"]
    x = (x - norm["mean"]) / norm["std"]
    with torch.no_grad():
        logits = model(collate_bags([Bag(bag_id="b", x=x)])).logits.double()
    return torch.softmax(logits, 1)[0].numpy()


def test_predict_with_the_fold_ensemble_equals_mean_of_fold_models(run_dir, root):
    run = Run(run_dir)
    slides = ["P000-S1", "P005-S1", "P011-S1"]
    slides = [s for s in slides if (root / "features" / f"{s}.h5").is_file()] or sorted(
        run.predictions()["bag_id"]
    )[:3]
    paths = [root / "features" / f"{s}.h5" for s in slides]
    got = run.predict(paths)
    assert got["bag_id"].tolist() == slides and (got["n_folds"] == 3).all()
    for s, p in zip(slides, paths):
        expected = np.mean([direct_probabilities(run_dir, k, p) for k in range(3)], 0)
        row = got.set_index("bag_id").loc[s]
        np.testing.assert_allclose(
            row[["prob_negative", "prob_positive"]].to_numpy(float), expected, atol=1e-6
        )
        assert row["pred"] == ["negative", "positive"][int(expected.argmax())]
    by_id = run.predict(slides)
    pd.testing.assert_frame_equal(by_id, got)
    per_fold = run.predict(paths, per_fold=True)
    assert len(per_fold) == 9 and set(per_fold["fold"]) == {"0", "1", "2"}


def test_predict_with_the_testing_fold_reproduces_saved_predictions(run_dir):
    run = Run(run_dir)
    for k in range(3):
        saved = run.predictions(fold=k)
        again = run.predict(saved["bag_id"].tolist(), folds=[k])
        np.testing.assert_allclose(again["prob_positive"], saved["prob_positive"], atol=1e-5)


def test_fold_scores_of_the_testing_fold_equal_the_saved_scores(run_dir):
    run = Run(run_dir)
    slide = run.predictions(fold=2)["bag_id"].iloc[0]
    fs = run.fold_scores(slide)
    assert [c for c in fs.columns if c.startswith("fold_")] == ["fold_0", "fold_1", "fold_2"]
    saved = run.scores(slide)
    np.testing.assert_allclose(fs["fold_2"], saved["score"], atol=1e-5)
    np.testing.assert_array_equal(fs[["x", "y"]].to_numpy(), saved[["x", "y"]].to_numpy())


def test_score_kinds_and_classes(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with h5py.File(copy / "fold_0" / "attention.h5", "a") as f:
        for g in f.values():
            n = g["scores"].shape[0]
            g.create_dataset("scores_attention", data=np.stack([-np.arange(n), np.arange(n)], 1))
        name = sorted(f)[0]
    run = Run(copy)
    pos = run.scores(name, kind="attention", cls="positive")
    np.testing.assert_array_equal(pos["score"], np.arange(len(pos)))
    neg = run.scores(name, kind="attention", cls=0)
    np.testing.assert_array_equal(neg["score"], -np.arange(len(neg)))
    assert pos.attrs["kind"] == "attention[positive]"
    with pytest.raises(MilError, match="cls="):
        run.scores(name, kind="attention")
    with pytest.raises(MilError, match="kinds: .*attention"):
        run.scores(name, kind="instance_classifier")  # CLAM only
    with pytest.raises(MilError, match="not one of"):
        run.scores(name, kind="attention", cls="tumour")


def test_heatmap_figure_has_colour_bar_and_top_k_outlines(run_dir):
    run = Run(run_dir)
    slide = run.top_slides(1)[0]
    fig = run.heatmap(slide, top_k=5)
    ax = fig.axes[0]
    assert ax.images[0].colorbar is not None
    assert len(ax.collections) == 1 and len(ax.collections[0].get_paths()) == 5
    assert slide in ax.get_title()
    top = run.top_tiles(slide, 5)
    s = run.scores(slide)
    assert set(top["score"]) == set(s["score"].nlargest(5))


def test_bad_run_folders_are_named(tmp_path):
    with pytest.raises(MilError, match="not found"):
        Run(tmp_path / "nope")
    with pytest.raises(MilError, match="config.yaml"):
        Run(tmp_path)

"""Slide embeddings as input: one vector per slide (TRIDENT ``slide_features_<enc>``, STAMP
slide/patient encodings) is read as a bag of one instance; ``linear`` learns a planted
linear signal and ``meanpool_linear`` is a direct scikit-learn linear probe on the same
split files."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from test_baselines import split, standardised

from mil.config import config_from_dict
from mil.data.batch import Bag, collate_bags
from mil.data.dataset import FeatureStore
from mil.data.readers import index_feature_dir, read_features
from mil.errors import DataError
from mil.models import create
from mil.train.closed_form import C_GRID
from mil.train.runner import run_cv

N_SLIDES, DIM, ENCODER = 60, 32, "titan"


def write_embedding(path: Path, vector: np.ndarray, n_tiles: int = 0, dataset: str = "features"):
    """One slide embedding as TRIDENT writes it: ``features (D,)`` and the tiles' ``coords``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(dataset, data=vector)
        if n_tiles:
            c = f.create_dataset("coords", data=np.arange(2 * n_tiles).reshape(n_tiles, 2) * 256)
            c.attrs.update(
                {
                    "patch_size": 256,
                    "patch_size_level0": 512,
                    "level0_magnification": 40,
                    "target_magnification": 20,
                }
            )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A TRIDENT job folder of float16 slide embeddings whose class shifts a few dimensions."""
    root = tmp_path_factory.mktemp("emb")
    job = root / "20x_256px_0px_overlap"
    rng = np.random.default_rng(0)
    y = np.arange(N_SLIDES) % 2
    x = rng.normal(size=(N_SLIDES, DIM))
    x[:, :4] += 1.5 * (2 * y[:, None] - 1)  # a linear signal in four dimensions
    rows = []
    for i in range(N_SLIDES):
        sid = f"TCGA-{i:02d}-slide"
        write_embedding(
            job / f"slide_features_{ENCODER}" / f"{sid}.h5",
            x[i].astype(np.float16),
            n_tiles=int(rng.integers(5, 40)),
        )
        rows.append(
            {"slide_id": sid, "case_id": f"P{i:02d}", "label": ["negative", "positive"][y[i]]}
        )
    (job / f"_config_slide_features_{ENCODER}.json").write_text("{}")
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return root


def config(root: Path, model: str) -> dict:
    return {
        "name": model,
        "task": {"type": "classification"},
        "data": {
            "csv": str(root / "cohort.csv"),
            "features": str(root / "20x_256px_0px_overlap"),
            "patient_col": "case_id",
        },
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.2, "seed": 0},
        "model": {"name": model},
        # the default budget (500 steps at lr 1e-3) takes ~40 s here (AUC 0.95); 150 larger
        # steps train linear in a few seconds (closed-form models ignore train:)
        "train": {"epochs": 30, "lr": 1e-2, "batch_size": 8, "seed": 0},
    }


def run(raw: dict, out: Path) -> Path:
    return run_cv(config_from_dict(raw), out, progress=False, log=lambda *a: None, n_boot=20)


def predictions(out: Path) -> pd.DataFrame:
    return pd.concat(pd.read_csv(out / f"fold_{k}" / "predictions.csv") for k in range(3))


def test_trident_slide_features_folder_is_detected(cohort):
    index, description = index_feature_dir(cohort / "20x_256px_0px_overlap")
    assert "TRIDENT slide embeddings" in description and len(index) == N_SLIDES
    sf = read_features(index["TCGA-07-slide"])
    assert sf.features.shape == (1, DIM) and sf.features.dtype == np.float16
    assert sf.embedding and sf.coords is None  # the tiles' coords describe no instance


def test_linear_learns_the_planted_signal(cohort, tmp_path):
    out = run(config(cohort, "linear"), tmp_path / "linear")
    pred = predictions(out)
    assert len(pred) == N_SLIDES
    auc = roc_auc_score(pred["label"] == "positive", pred["prob_positive"])
    assert auc > 0.8, auc


def test_meanpool_linear_is_a_sklearn_linear_probe(cohort, tmp_path):
    out = run(config(cohort, "meanpool_linear"), tmp_path / "probe")
    labels = pd.read_csv(cohort / "cohort.csv").set_index("slide_id")["label"]
    folder = cohort / "20x_256px_0px_overlap" / f"slide_features_{ENCODER}"
    vectors = {}
    for b in labels.index:
        with h5py.File(folder / f"{b}.h5", "r") as f:
            vectors[b] = f["features"][:].astype(np.float64)
    for fold in range(3):
        ids = split(out, fold)
        z = standardised(vectors, ids)
        y = {p: np.array([int(labels[b] == "positive") for b in ids[p]]) for p in ids}
        fits = [LogisticRegression(C=c, max_iter=5000).fit(z["train"], y["train"]) for c in C_GRID]
        val = [log_loss(y["val"], m.predict_proba(z["val"]), labels=[0, 1]) for m in fits]
        best = fits[int(np.argmin(val))]
        pred = pd.read_csv(out / f"fold_{fold}" / "predictions.csv").set_index("bag_id")
        np.testing.assert_allclose(
            pred.loc[ids["test"], "prob_positive"], best.predict_proba(z["test"])[:, 1], atol=2e-4
        )


@pytest.mark.parametrize("preload", [True, False])
def test_a_cohort_mixing_embeddings_and_tiles_is_refused(cohort, tmp_path, preload):
    folder = tmp_path / f"slide_features_{ENCODER}"
    shutil.copytree(cohort / "20x_256px_0px_overlap" / folder.name, folder)
    tiles = folder / "TCGA-03-slide.h5"
    tiles.unlink()
    write_embedding(tiles, np.ones((5, DIM), np.float16))
    store = FeatureStore.from_dir(tmp_path)
    ids = sorted(store.index)
    with pytest.raises(DataError, match="mixes slide/patient embeddings") as err:
        if preload:
            store.preload(ids, progress=False)
        else:
            for s in ids:
                store.get(s)
    assert str(tiles) in str(err.value) and "TCGA-00-slide.h5" in str(err.value)


def _npy(p, v):
    np.save(p.with_suffix(".npy"), v)


def _pt(p, v):
    torch.save(torch.from_numpy(v), p.with_suffix(".pt"))


def _pt_dict(p, v):
    torch.save({"features": torch.from_numpy(v)}, p.with_suffix(".pt"))


def _stamp(p, v):
    with h5py.File(p.with_suffix(".h5"), "w") as f:
        f["feats"] = v
        f.attrs.update({"encoder": "titan", "feat_type": "slide"})


@pytest.mark.parametrize("write", [_npy, _pt, _pt_dict, _stamp])
def test_one_vector_reads_as_a_bag_of_one(tmp_path, write):
    v = np.random.default_rng(1).normal(size=DIM).astype(np.float32)
    write(tmp_path / "s", v)
    (path,) = tmp_path.iterdir()
    sf = read_features(path)
    assert sf.features.shape == (1, DIM) and sf.features.dtype == np.float32 and sf.embedding
    np.testing.assert_array_equal(sf.features[0], v)
    assert sf.coords is None and sf.layout.endswith("embedding")


@pytest.mark.parametrize(
    "vector, match",
    [
        (np.zeros(0, np.float32), "empty slide embedding"),
        (np.array([1.0, np.nan, 2.0], np.float32), "NaN"),
    ],
)
def test_bad_embeddings_name_the_file(tmp_path, vector, match):
    path = tmp_path / "bad.h5"
    write_embedding(path, vector)
    with pytest.raises(DataError, match=match) as err:
        read_features(path)
    assert str(path) in str(err.value)


def test_a_job_folder_with_tile_and_slide_features_asks_which(tmp_path):
    write_embedding(tmp_path / f"slide_features_{ENCODER}" / "s.h5", np.ones(DIM, np.float32))
    write_embedding(tmp_path / "features_conch_v15" / "s.h5", np.ones((3, DIM), np.float32))
    with pytest.raises(DataError, match="several TRIDENT encoders"):
        index_feature_dir(tmp_path)


def test_linear_scores_are_each_instances_share_of_the_logit():
    torch.manual_seed(0)
    model = create("linear", in_dim=DIM, n_out=3).eval()
    bags = [Bag("a", torch.randn(1, DIM)), Bag("b", torch.randn(6, DIM))]
    batch = collate_bags(bags)
    with torch.no_grad():
        out = model(batch)
    w, c = model.head.weight.detach(), model.head.bias.detach()
    for i, bag in enumerate(bags):
        torch.testing.assert_close(out.logits[i], bag.x.mean(0) @ w.T + c)
        scores = out.scores[batch.ptr[i] : batch.ptr[i + 1]]
        torch.testing.assert_close(scores, bag.x @ w[-1])
        torch.testing.assert_close(scores.mean(), out.logits[i, -1] - c[-1])

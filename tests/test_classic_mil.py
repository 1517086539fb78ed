"""Instance tables, fold-assignment files and training-fold standardisation (classic MIL protocol)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mil.config import config_from_dict
from mil.data.instances import load_instances
from mil.errors import DataError, SplitError
from mil.splits import load_or_make_splits, read_assignment
from mil.train.runner import run_cv

# bags written out of order and interleaved: b2's rows come first, b1's are split in two
TABLE = pd.DataFrame(
    {
        "bag_id": ["b2", "b1", "b2", "b1", "b3", "b1"],
        "bag_label": [1, 0, 1, 0, 1, 0],
        "instance_id": [0, 0, 1, 1, 0, 2],
        "f0": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "f1": [-1.5, 0.0, 2.5, 7.0, 1.0, 3.0],
        "x": [0, 10, 20, 30, 40, 50],
        "y": [5, 15, 25, 35, 45, 55],
        "extra": [9, 8, 7, 6, 5, 4],  # any other numeric column is a feature
    }
)


def table_config(path, **data) -> dict:
    return {
        "name": "table",
        "data": {"instances": str(path), "bag_col": "bag_id", "label_col": "bag_label", **data},
        "splits": {"folds": 2, "val_fraction": 0.0},
        "model": {"name": "abmil", "hidden_dim": 4},
        "train": {"epochs": 1, "patience": None, "batch_size": 4},
    }


def write_table(tmp_path, df: pd.DataFrame, name: str = "bags.csv.gz"):
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def test_instance_table_reads_bags_exactly_as_written(tmp_path):
    cfg = config_from_dict(table_config(write_table(tmp_path, TABLE)))
    cohort, store = load_instances(cfg)
    # one bag (and one patient) per bag id, in order of first appearance
    assert cohort.bag_ids == ["b2", "b1", "b3"]
    assert cohort.bags["patient_id"].tolist() == ["b2", "b1", "b3"]
    assert cohort.classes == ["0", "1"]
    assert cohort.bags["label"].tolist() == [1, 0, 1]
    assert store.dim == 3
    for bag in ("b1", "b2", "b3"):
        rows = TABLE[TABLE["bag_id"] == bag]
        x, coords, _ = store.get(bag)
        np.testing.assert_array_equal(x.numpy(), rows[["f0", "f1", "extra"]].to_numpy(np.float32))
        np.testing.assert_array_equal(coords.numpy(), rows[["x", "y"]].to_numpy(np.float32))


def test_instance_table_patient_column_groups_bags(tmp_path):
    df = TABLE.assign(case_id=["p1", "p1", "p1", "p1", "p2", "p1"]).drop(columns=["x", "y"])
    cohort, store = load_instances(config_from_dict(table_config(write_table(tmp_path, df))))
    assert dict(zip(cohort.bags["bag_id"], cohort.bags["patient_id"])) == {
        "b2": "p1",
        "b1": "p1",
        "b3": "p2",
    }
    assert store.dim == 3 and store.get("b1")[1] is None


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: d.assign(bag_label=[1, 0, 0, 0, 1, 0]),
            "bag b2 has several values in column 'bag_label'",
        ),
        (lambda d: d.drop(columns="bag_label"), "column 'bag_label' (data.label_col)"),
        (lambda d: d.assign(f1=["1", "2", "three", "4", "5", "6"]), "['f1'] are not numeric"),
        (lambda d: d.assign(f0=[1.0, np.nan, 3, 4, 5, 6]), "first: bag b1, column 'f0'"),
        (lambda d: d.drop(columns="y"), "both columns 'x' and 'y'"),
    ],
)
def test_instance_table_errors_name_the_problem(tmp_path, change, message):
    cfg = config_from_dict(table_config(write_table(tmp_path, change(TABLE.copy()))))
    with pytest.raises(DataError) as err:
        load_instances(cfg)
    assert message in str(err.value) and "bags.csv.gz" in str(err.value)


def twelve_bags(tmp_path) -> tuple[dict, pd.DataFrame]:
    """12 bags of 2-4 instances; bags 0-5 negative, 6-11 positive (shifted features)."""
    rng = np.random.default_rng(0)
    rows = []
    for b in range(12):
        for i in range(2 + b % 3):
            rows.append(
                {
                    "bag_id": b,
                    "bag_label": int(b >= 6),
                    "instance_id": i,
                    "f0": rng.normal() + 3 * (b >= 6),
                    "f1": rng.normal() * 10 + b,
                }
            )
    df = pd.DataFrame(rows)
    return table_config(write_table(tmp_path, df)), df


def assignment(folds_of: dict[int, list[int]]) -> pd.DataFrame:
    """``{repeat: [test fold of bag 0, bag 1, ...]}`` as an assignment table."""
    return pd.DataFrame(
        [
            {"repeat": r, "bag_id": b, "test_fold": k}
            for r, ks in folds_of.items()
            for b, k in enumerate(ks)
        ]
    )


GOOD = {0: [0, 1, 2] * 4, 1: [2, 2, 1, 1, 0, 0, 2, 2, 1, 1, 0, 0]}


def test_assignment_gives_the_written_test_folds_and_inner_validation(tmp_path):
    raw, _ = twelve_bags(tmp_path)
    cohort, _ = load_instances(config_from_dict(raw))
    path = tmp_path / "folds.csv"
    assignment(GOOD).to_csv(path, index=False)
    splits = read_assignment(path, cohort, folds=3, repeats=2, val_fraction=0.25, seed=0)
    assert [(s.repeat, s.fold) for s in splits] == [(r, k) for r in (0, 1) for k in range(3)]
    for sp in splits:
        assert sorted(sp.test, key=int) == [
            str(b) for b, k in enumerate(GOOD[sp.repeat]) if k == sp.fold
        ]
        assert len(sp.val) > 0
        assert set(sp.train) | set(sp.val) | set(sp.test) == set(map(str, range(12)))
        assert not set(sp.train) & set(sp.val) and not set(sp.val) & set(sp.test)
    # without val_fraction every non-test bag trains
    flat = read_assignment(path, cohort, folds=3, repeats=2)
    assert all(len(s.val) == 0 and len(s.train) + len(s.test) == 12 for s in flat)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.drop(index=13), "repeat 1 gives no test fold to 1 bag(s): 1"),
        (
            lambda d: pd.concat([d, pd.DataFrame([{"repeat": 0, "bag_id": 4, "test_fold": 0}])]),
            "bag '4' appears more than once in repeat 0",
        ),
        (
            lambda d: d.replace({"bag_id": {11: 12}}),
            "bag '12' (column 'bag_id') is not in the cohort",
        ),
        (lambda d: d.assign(test_fold=d["test_fold"].replace(2, 3)), "repeat 0 has test_fold 3"),
        (lambda d: d[d["repeat"] == 0], "repeats [0] in the file; splits.repeats = 2"),
    ],
)
def test_assignment_rejects_files_that_do_not_cover_every_bag_once(tmp_path, edit, message):
    raw, _ = twelve_bags(tmp_path)
    cohort, _ = load_instances(config_from_dict(raw))
    path = tmp_path / "bad_folds.csv"
    edit(assignment(GOOD)).to_csv(path, index=False)
    with pytest.raises(SplitError) as err:
        read_assignment(path, cohort, folds=3, repeats=2)
    assert message in str(err.value) and "bad_folds.csv" in str(err.value)


def test_existing_split_folder_must_agree_with_the_assignment(tmp_path):
    raw, _ = twelve_bags(tmp_path)
    cohort, _ = load_instances(config_from_dict(raw))
    path = tmp_path / "folds.csv"
    assignment(GOOD).to_csv(path, index=False)
    splits, made = load_or_make_splits(tmp_path / "sp", cohort, 3, 0.0, 0, 2, assignment=path)
    assert made
    again, made = load_or_make_splits(tmp_path / "sp", cohort, 3, 0.0, 0, 2, assignment=path)
    assert not made and [s.test for s in again] == [s.test for s in splits]
    other = {0: GOOD[1], 1: GOOD[0]}
    assignment(other).to_csv(path, index=False)
    with pytest.raises(SplitError, match="differs from"):
        load_or_make_splits(tmp_path / "sp", cohort, 3, 0.0, 0, 2, assignment=path)


def test_standardisation_statistics_come_from_the_training_bags_only(tmp_path):
    raw, df = twelve_bags(tmp_path)
    # test fold 0 holds bags 0, 10 and 11, whose f1 values are far from the rest; every test
    # fold holds both classes
    folds = {0: [0, 1, 1, 1, 2, 2, 1, 1, 2, 2, 0, 0], 1: [0, 1, 2] * 4}
    path = tmp_path / "folds.csv"
    assignment(folds).to_csv(path, index=False)
    raw["data"]["standardize"] = True
    raw["splits"].update({"folds": 3, "repeats": 2, "assignment": str(path)})
    run = run_cv(
        config_from_dict(raw), tmp_path / "run", progress=False, log=lambda *a: None, n_boot=10
    )
    for name, repeat, fold in (("fold_0", 0, 0), ("fold_r1_2", 1, 2)):
        payload = torch.load(run / name / "model.pt", weights_only=True)
        train_bags = [b for b, k in enumerate(folds[repeat]) if k != fold]
        x = df[df["bag_id"].isin(train_bags)][["f0", "f1"]].to_numpy(np.float64)
        everything = df[["f0", "f1"]].to_numpy(np.float64)
        mean, std = payload["standardize"]["mean"].numpy(), payload["standardize"]["std"].numpy()
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
        np.testing.assert_allclose(std, x.std(0), rtol=1e-4)  # population sd over instances
        assert np.abs(mean - everything.mean(0)).max() > 0.1
        test = pd.read_csv(run / name / "predictions.csv")
        assert sorted(test["bag_id"]) == [b for b, k in enumerate(folds[repeat]) if k == fold]


def test_whitening_is_the_ledoit_wolf_covariance_of_the_training_instances(tmp_path):
    """``data.standardize: whiten``: the saved matrix is the inverse square root of
    scikit-learn's shrunk covariance of the training fold's instances (never the test
    fold's) with the Ledoit-Wolf shrinkage (at least WHITEN_MIN_SHRINKAGE), and the saved
    preprocessing reproduces the fold's test predictions."""
    from scipy.linalg import sqrtm
    from sklearn.covariance import LedoitWolf, ShrunkCovariance

    from mil.data.batch import Bag, collate_bags
    from mil.data.transforms import WHITEN_MIN_SHRINKAGE, Standardizer
    from mil.models.registry import create

    rng = np.random.default_rng(1)
    rows = []
    for b in range(20):
        z = rng.normal(size=(3 + b % 4, 2))
        x = np.c_[z[:, 0] * 10, z[:, 0] * 10 + z[:, 1], rng.normal(size=len(z)) * 0.1] + 2 * (
            b >= 10
        )
        rows += [
            {
                "bag_id": b,
                "bag_label": int(b >= 10),
                "instance_id": i,
                **{f"f{j}": v for j, v in enumerate(r)},
            }
            for i, r in enumerate(x)
        ]
    df = pd.DataFrame(rows)
    raw = table_config(write_table(tmp_path, df), standardize="whiten")
    run = run_cv(
        config_from_dict(raw), tmp_path / "run", progress=False, log=lambda *a: None, n_boot=10
    )
    for fold in (0, 1):
        payload = torch.load(run / f"fold_{fold}" / "model.pt", weights_only=True)
        test = pd.read_csv(run / f"fold_{fold}" / "predictions.csv")
        train_x = df[~df["bag_id"].isin(test["bag_id"])][["f0", "f1", "f2"]].to_numpy(np.float64)
        a = max(WHITEN_MIN_SHRINKAGE, LedoitWolf().fit(train_x).shrinkage_)
        lw = ShrunkCovariance(shrinkage=a).fit(train_x)
        state = payload["standardize"]
        np.testing.assert_allclose(state["mean"].numpy(), train_x.mean(0), rtol=1e-5)
        assert float(state["shrinkage"]) == pytest.approx(a, rel=1e-6)
        expected = np.real(np.linalg.inv(sqrtm(lw.covariance_)))
        np.testing.assert_allclose(state["whiten"].numpy(), expected, rtol=1e-3, atol=1e-5)
        # whitened training instances have the identity covariance under the shrunk estimate
        w = state["whiten"].double().numpy()
        np.testing.assert_allclose(w @ lw.covariance_ @ w, np.eye(3), atol=1e-4)
        model = create(payload["model"], in_dim=3, n_out=payload["n_out"], **payload["hparams"])
        model.load_state_dict(payload["state_dict"])
        model.eval()
        norm = Standardizer.from_state(state)
        for bag_id, prob in zip(test["bag_id"], test["prob_1"]):
            x = torch.tensor(df[df["bag_id"] == bag_id][["f0", "f1", "f2"]].to_numpy(np.float32))
            with torch.no_grad():
                logits = model(collate_bags([Bag(bag_id=str(bag_id), x=norm.apply(x))])).logits
            assert float(torch.softmax(logits.double(), 1)[0, 1]) == pytest.approx(prob, abs=1e-5)

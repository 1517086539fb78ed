"""Cohort reading and patient-level splits."""

import numpy as np
import pandas as pd
import pytest

from mil.config import config_from_dict
from mil.data.cohort import Cohort
from mil.errors import DataError, SplitError
from mil.splits import load_or_make_splits, make_splits, read_splits


def cfg(**data):
    return config_from_dict({"data": {"csv": "x.csv", "features": "f", **data}})


def test_labels_map_to_stable_classes():
    df = pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "label": ["LUSC", "LUAD", "LUSC", "LUAD"]})
    c = Cohort.from_frame(df, cfg())
    assert c.classes == ["LUAD", "LUSC"]
    assert c.bags["label"].tolist() == [1, 0, 1, 0]
    # integers sort numerically, not as strings
    df2 = pd.DataFrame({"slide_id": list("abc"), "label": [10, 2, 2]})
    assert Cohort.from_frame(df2, cfg()).classes == ["2", "10"]
    # an explicit order wins
    c3 = Cohort.from_frame(df, cfg(classes=["LUSC", "LUAD"]))
    assert c3.bags["label"].tolist() == [0, 1, 0, 1]


def test_patient_defaults_to_slide_and_patient_bags_concatenate():
    df = pd.DataFrame({"slide_id": ["a", "b", "c"], "case_id": ["p1", "p1", "p2"], "label": [1, 1, 0]})
    c = Cohort.from_frame(df, cfg(bag_level="patient"))
    assert c.bag_ids == ["p1", "p2"] and c.bag_slides["p1"] == ["a", "b"]
    c2 = Cohort.from_frame(df.drop(columns="case_id"), cfg())
    assert c2.slides["patient_id"].tolist() == ["a", "b", "c"]


@pytest.mark.parametrize(
    "df, match",
    [
        (pd.DataFrame({"slide_id": ["a", "b"], "y": [0, 1]}), "column 'label'"),
        (pd.DataFrame({"slide_id": ["a", "a", "b"], "label": [0, 0, 1]}), "more than once"),
        (pd.DataFrame({"slide_id": ["a", "b", "c"], "label": [0, None, 1]}), "no value in column 'label'"),
        (pd.DataFrame({"slide_id": ["a", "b", "c"], "case_id": ["p", "p", "q"], "label": [0, 1, 1]}),
         "different 'label'"),
    ],
)
def test_bad_cohorts(df, match):
    with pytest.raises(DataError, match=match):
        Cohort.from_frame(df, cfg(bag_level="patient"))


def big_cohort(seed=0, n_patients=120):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = ["A", "B", "C"][rng.choice(3, p=[0.5, 0.3, 0.2])]
        for s in range(rng.integers(1, 4)):
            rows.append({"slide_id": f"p{p}_s{s}", "case_id": f"p{p}", "label": label})
    return Cohort.from_frame(pd.DataFrame(rows), cfg())


def test_splits_are_patient_level_disjoint_and_stratified():
    cohort = big_cohort()
    s = cohort.slides.set_index("slide_id")
    overall = s["label"].value_counts(normalize=True)
    splits = make_splits(cohort, folds=5, val_fraction=0.15, seed=3)
    tests = []
    for sp in splits:
        parts = {p: set(s.loc[sp.part(p), "case_id"]) for p in ("train", "val", "test")}
        assert not parts["train"] & parts["val"]
        assert not parts["train"] & parts["test"]
        assert not parts["val"] & parts["test"]
        assert len(sp.train) + len(sp.val) + len(sp.test) == len(s)
        props = s.loc[sp.test, "label"].value_counts(normalize=True).reindex(overall.index, fill_value=0)
        assert (props - overall).abs().max() <= 0.05
        tests += sp.test
    assert sorted(tests) == sorted(s.index)  # test folds partition the cohort
    assert 0.10 < np.mean([len(sp.val) / (len(sp.train) + len(sp.val)) for sp in splits]) < 0.20


def test_split_folder_read_not_overwritten(tmp_path):
    cohort = big_cohort()
    a, made = load_or_make_splits(tmp_path, cohort, 5, 0.15, seed=0)
    assert made
    csv = pd.read_csv(tmp_path / "splits_0.csv")
    assert list(csv.columns) == ["train", "val", "test"]
    desc = pd.read_csv(tmp_path / "splits_0_descriptor.csv", index_col=0)
    assert desc.loc["A"].sum() == (cohort.slides["label"] == 0).sum()
    b, made = load_or_make_splits(tmp_path, cohort, 5, 0.15, seed=99)
    assert not made and [x.test for x in a] == [x.test for x in b]
    c, made = load_or_make_splits(tmp_path, cohort, 5, 0.15, seed=99, force=True)
    assert made and [x.test for x in a] != [x.test for x in c]


def test_user_split_with_patient_in_two_partitions(tmp_path):
    cohort = big_cohort()
    sp = make_splits(cohort, folds=2, val_fraction=0.0, seed=0)
    from mil.splits import write_splits

    write_splits(tmp_path, sp, cohort)
    df = pd.read_csv(tmp_path / "splits_1.csv")
    pid = cohort.slides.groupby("patient_id")["slide_id"].apply(list)
    multi = pid[pid.apply(len) > 1].iloc[0]
    # move one of that patient's slides from wherever it is to the other partition
    train = [x for x in df["train"].dropna() if x != multi[0]]
    test = [x for x in df["test"].dropna() if x != multi[0]]
    if multi[0] in set(df["train"].dropna()):
        test.append(multi[0])
    else:
        train.append(multi[0])
    pd.DataFrame({"train": pd.Series(train), "val": pd.Series([], dtype=object), "test": pd.Series(test)}).to_csv(
        tmp_path / "splits_1.csv", index=False
    )
    with pytest.raises(SplitError, match=r"patient 'p\d+' is in both") as exc:
        read_splits(tmp_path, cohort, folds=2)
    assert "splits_1.csv" in str(exc.value)


def test_clam_style_split_file_with_index_column(tmp_path):
    cohort = big_cohort(n_patients=20)
    sp = make_splits(cohort, folds=2, val_fraction=0.0, seed=0)
    for s in sp:
        pd.DataFrame({"train": pd.Series(s.train), "val": pd.Series(s.val, dtype=object),
                      "test": pd.Series(s.test)}).to_csv(tmp_path / f"splits_{s.fold}.csv")  # with index
    back = read_splits(tmp_path, cohort, folds=2)
    assert [b.test for b in back] == [s.test for s in sp]

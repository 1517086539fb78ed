"""MCAT / Patch-GCN / PORPOISE / SurvPath split files (``splits_<k>.csv`` with ``train,val``
columns of case ids and no test column) read as test fold = ``val``, with the inner
validation carved from ``train``."""

from __future__ import annotations

import pandas as pd
import pytest

from mil.config import config_from_dict
from mil.data.sources import load_cohort
from mil.errors import SplitError
from mil.splits import load_or_make_splits, read_splits


@pytest.fixture
def cohort(small_cohort):
    return load_cohort(config_from_dict(small_cohort))[0]


def write_mcat(tmp_path, cohort, folds=3, slide_ids=False):
    patients = list(dict.fromkeys(cohort.slides["patient_id"]))
    for k in range(folds):
        test = patients[k::folds]
        train = [p for p in patients if p not in test]
        if slide_ids:
            s = cohort.slides
            test = s.loc[s["patient_id"].isin(test), "slide_id"].tolist()
            train = s.loc[s["patient_id"].isin(train), "slide_id"].tolist()
        # MCAT writes the pandas index as an unnamed first column and pads the shorter column
        df = pd.DataFrame({"train": pd.Series(train), "val": pd.Series(test)})
        df.to_csv(tmp_path / f"splits_{k}.csv")
    return patients


@pytest.mark.parametrize("slide_ids", [False, True])
def test_val_is_the_test_fold_and_validation_comes_from_train(tmp_path, cohort, slide_ids):
    patients = write_mcat(tmp_path, cohort, slide_ids=slide_ids)
    splits = read_splits(tmp_path, cohort, folds=3, val_fraction=0.25, seed=0)
    s = cohort.slides
    of = dict(zip(s["slide_id"], s["patient_id"]))
    for k, sp in enumerate(splits):
        test_patients = set(patients[k::3])
        assert {of[x] for x in sp.test} == test_patients
        # every slide of those patients (case ids expand to all their slides)
        assert set(sp.test) == set(s.loc[s["patient_id"].isin(test_patients), "slide_id"])
        inner = {of[x] for x in sp.val}
        assert inner and not inner & test_patients
        assert not inner & {of[x] for x in sp.train}
        assert {of[x] for x in sp.train} | inner == set(patients) - test_patients
        assert abs(len(inner) / (len(patients) - len(test_patients)) - 0.25) < 0.1


def test_load_or_make_reads_them_without_writing(tmp_path, cohort):
    write_mcat(tmp_path, cohort)
    before = sorted(p.name for p in tmp_path.iterdir())
    splits, made = load_or_make_splits(tmp_path, cohort, 3, 0.2, 0)
    assert not made and len(splits) == 3 and all(sp.val for sp in splits)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unknown_case_and_shared_patient_are_named(tmp_path, cohort):
    patients = write_mcat(tmp_path, cohort)
    df = pd.read_csv(tmp_path / "splits_1.csv", index_col=0)
    df.loc[0, "val"] = "TCGA-XX-0000"
    df.to_csv(tmp_path / "splits_1.csv")
    with pytest.raises(
        SplitError, match=r"splits_1\.csv: 'TCGA-XX-0000' in 'val' is neither a case"
    ):
        read_splits(tmp_path, cohort, folds=3)
    write_mcat(tmp_path, cohort)
    df = pd.read_csv(tmp_path / "splits_2.csv", index_col=0)
    df.loc[0, "val"] = df.loc[0, "train"]
    df.to_csv(tmp_path / "splits_2.csv")
    with pytest.raises(
        SplitError, match=rf"splits_2\.csv: patient '{df.loc[0, 'train']}' is in both"
    ):
        read_splits(tmp_path, cohort, folds=3)
    assert patients

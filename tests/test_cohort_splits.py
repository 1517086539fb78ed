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
    df = pd.DataFrame(
        {"slide_id": ["a", "b", "c"], "case_id": ["p1", "p1", "p2"], "label": [1, 1, 0]}
    )
    c = Cohort.from_frame(df, cfg(bag_level="patient"))
    assert c.bag_ids == ["p1", "p2"] and c.bag_slides["p1"] == ["a", "b"]
    c2 = Cohort.from_frame(df.drop(columns="case_id"), cfg())
    assert c2.slides["patient_id"].tolist() == ["a", "b", "c"]


@pytest.mark.parametrize(
    "df, match",
    [
        (pd.DataFrame({"slide_id": ["a", "b"], "y": [0, 1]}), "column 'label'"),
        (pd.DataFrame({"slide_id": ["a", "a", "b"], "label": [0, 0, 1]}), "more than once"),
        (
            pd.DataFrame({"slide_id": ["a", "b", "c"], "label": [0, None, 1]}),
            "no value in column 'label'",
        ),
        (
            pd.DataFrame(
                {"slide_id": ["a", "b", "c"], "case_id": ["p", "p", "q"], "label": [0, 1, 1]}
            ),
            "different 'label'",
        ),
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
        props = (
            s.loc[sp.test, "label"]
            .value_counts(normalize=True)
            .reindex(overall.index, fill_value=0)
        )
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
    pd.DataFrame(
        {"train": pd.Series(train), "val": pd.Series([], dtype=object), "test": pd.Series(test)}
    ).to_csv(tmp_path / "splits_1.csv", index=False)
    with pytest.raises(SplitError, match=r"patient 'p\d+' is in both") as exc:
        read_splits(tmp_path, cohort, folds=2)
    assert "splits_1.csv" in str(exc.value)


def test_clam_style_split_file_with_index_column(tmp_path):
    cohort = big_cohort(n_patients=20)
    sp = make_splits(cohort, folds=2, val_fraction=0.0, seed=0)
    for s in sp:
        pd.DataFrame(
            {
                "train": pd.Series(s.train),
                "val": pd.Series(s.val, dtype=object),
                "test": pd.Series(s.test),
            }
        ).to_csv(tmp_path / f"splits_{s.fold}.csv")  # with index
    back = read_splits(tmp_path, cohort, folds=2)
    assert [b.test for b in back] == [s.test for s in sp]


# --- site-preserved folds (splits.by_site) ---


def site_cfg(folds=5, val_fraction=0.15, **data):
    return config_from_dict(
        {
            "data": {"csv": "x.csv", "features": "f", "site_col": "site", **data},
            "splits": {"by_site": True, "folds": folds, "val_fraction": val_fraction},
        }
    )


def site_frame(n_patients=60, n_sites=7, seed=0):
    """Patients spread unevenly over sites, one or two slides each, two classes."""
    rng = np.random.default_rng(seed)
    site_p = rng.dirichlet(np.full(n_sites, 3.0))
    rows = []
    for p in range(n_patients):
        site = f"S{rng.choice(n_sites, p=site_p)}" if p >= n_sites else f"S{p}"
        label = ["neg", "pos"][int(rng.random() < 0.4)]
        for s in range(rng.integers(1, 3)):
            rows.append(
                {"slide_id": f"p{p}_s{s}", "case_id": f"p{p}", "label": label, "site": site}
            )
    return pd.DataFrame(rows)


def site_violations(splits, cohort):
    """Independent check of site-preserved folds: a list of what is wrong (empty when fine)."""
    s = cohort.slides.set_index("slide_id")
    bad = []
    test_fold = {}  # (repeat, site) -> folds whose test partition holds that site
    for sp in splits:
        for site in s.loc[sp.test, "site"]:
            test_fold.setdefault((sp.repeat, site), set()).add(sp.fold)
    bad += [f"site {k} tested in folds {v}" for k, v in test_fold.items() if len(v) > 1]
    for sp in splits:
        # every slide of a site tested in this fold is in this fold's test partition
        sites = {site for (r, site), f in test_fold.items() if r == sp.repeat and sp.fold in f}
        if set(s.index[s["site"].isin(sites)]) != set(sp.test):
            bad.append(f"fold {sp.name}: test is not exactly the slides of sites {sorted(sites)}")
        for p in ("train", "val"):
            if sites & set(s.loc[sp.part(p), "site"]):
                bad.append(f"fold {sp.name}: a test site is in {p}")
    return bad


def test_site_preserved_folds_hold_out_whole_sites():
    cohort = Cohort.from_frame(site_frame(), site_cfg())
    s = cohort.slides.set_index("slide_id")
    assert s["site"].nunique() == 7 and s.groupby("case_id").size().max() == 2
    splits = make_splits(cohort, folds=5, val_fraction=0.15, seed=1, repeats=2, site_col="site")
    assert len(splits) == 10 and site_violations(splits, cohort) == []
    for r in (0, 1):
        tested = [x for sp in splits if sp.repeat == r for x in sp.test]
        assert sorted(tested) == sorted(s.index)  # every slide tested exactly once per repeat
    for sp in splits:
        parts = {p: set(sp.part(p)) for p in ("train", "val", "test")}
        assert set().union(*parts.values()) == set(s.index)
        assert sum(len(v) for v in parts.values()) == len(s)  # disjoint slides
        patients = {p: set(s.loc[list(v), "case_id"]) for p, v in parts.items()}
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]
        assert not patients["val"] & patients["test"]
        assert sp.test and sp.val  # patient-level validation from the training sites
    # the check can fail: patient-level folds of the same cohort mix sites across test folds
    assert site_violations(make_splits(cohort, folds=5, val_fraction=0.15, seed=1), cohort)


def test_site_preserved_folds_need_enough_sites_and_one_site_per_patient():
    df = site_frame(n_patients=30, n_sites=3)
    cohort = Cohort.from_frame(df, site_cfg())
    with pytest.raises(SplitError, match=r"3 sites cannot fill 5 folds \(splits.folds\)") as exc:
        make_splits(cohort, folds=5, site_col="site")
    assert "<frame>" in str(exc.value) and "'site'" in str(exc.value)
    df = site_frame()
    two = df.index[df["case_id"] == df["case_id"][df["case_id"].duplicated()].iloc[0]]
    df.loc[two[0], "site"], df.loc[two[1], "site"] = "S1", "S2"
    pid = df.loc[two[0], "case_id"]
    cohort = Cohort.from_frame(df, site_cfg())  # slide-level bags: the cohort accepts it
    with pytest.raises(SplitError, match=rf"patient '{pid}' has slides from two sites") as exc:
        make_splits(cohort, folds=5, site_col="site")
    assert "'S1'" in str(exc.value) and "'S2'" in str(exc.value)


def test_existing_patient_level_folder_is_refused_for_site_folds(tmp_path):
    cohort = Cohort.from_frame(site_frame(), site_cfg())
    load_or_make_splits(tmp_path, cohort, 5, 0.15, seed=0)  # patient-level, no site_col
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(SplitError, match=r"site 'S\d+'") as exc:
        load_or_make_splits(tmp_path, cohort, 5, 0.15, seed=0, site_col="site")
    msg = str(exc.value)
    assert msg.count("splits_") == 2 and "mil splits --force" in msg and "splits.dir" in msg
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    # a site-preserved folder is accepted and read back as written
    made, _ = load_or_make_splits(tmp_path / "site", cohort, 5, 0.15, seed=0, site_col="site")
    back, was_made = load_or_make_splits(
        tmp_path / "site", cohort, 5, 0.15, seed=7, site_col="site"
    )
    assert not was_made and [b.test for b in back] == [m.test for m in made]


def test_existing_folder_training_on_its_test_site_is_refused(tmp_path):
    cohort = Cohort.from_frame(site_frame(), site_cfg())
    splits, _ = load_or_make_splits(tmp_path, cohort, 5, 0.0, seed=0, site_col="site")
    s = cohort.slides.set_index("slide_id")
    sp = splits[0]
    # move one test patient of a multi-patient test site into training: no site tested twice
    test_patients = s.loc[sp.test].groupby("site")["case_id"].unique()
    site = next(k for k, v in test_patients.items() if len(v) > 1)
    moved = list(s.index[s["case_id"] == test_patients[site][0]])
    pd.DataFrame(
        {
            "train": pd.Series(sp.train + moved),
            "val": pd.Series([], dtype=object),
            "test": pd.Series([x for x in sp.test if x not in moved]),
        }
    ).to_csv(tmp_path / "splits_0.csv", index=False)
    with pytest.raises(
        SplitError, match=rf"splits_0.csv: site '{site}' .* both 'train' and 'test'"
    ):
        load_or_make_splits(tmp_path, cohort, 5, 0.0, seed=0, site_col="site")


def test_site_folds_through_the_config(tmp_path):
    df = site_frame(n_patients=24, n_sites=4, seed=3)
    c = site_cfg(folds=3, val_fraction=0.25, bag_level="patient")
    assert c.data.site_col == "site" and c.splits.by_site
    cohort = Cohort.from_frame(df, c)
    assert (
        cohort.bags["site"].tolist() == df.groupby("case_id", sort=False)["site"].first().tolist()
    )
    site_col = c.data.site_col if c.splits.by_site else None
    splits, made = load_or_make_splits(
        tmp_path,
        cohort,
        c.splits.folds,
        c.splits.val_fraction,
        c.splits.seed,
        c.splits.repeats,
        site_col=site_col,
    )
    assert made and sorted(f.name for f in tmp_path.glob("splits_?.csv")) == [
        "splits_0.csv",
        "splits_1.csv",
        "splits_2.csv",
    ]
    back = read_splits(tmp_path, cohort, c.splits.folds, c.splits.repeats)
    assert [(b.train, b.val, b.test) for b in back] == [(x.train, x.val, x.test) for x in splits]
    assert site_violations(back, cohort) == []

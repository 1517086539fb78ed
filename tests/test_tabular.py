"""Tabular modalities joined by patient (mil.data.tabular): groups, encoding, errors, the
training-fold scaler (against scikit-learn), its place in model.pt, and the packed batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from mil.config import config_from_dict
from mil.data.batch import collate_bags
from mil.data.sources import load_cohort
from mil.data.synthetic_multimodal import multimodal_tabular, write_multimodal_cohort
from mil.data.tabular import TabularSpec, join_modality, parse_tabular
from mil.data.transforms import Standardizer, fold_preprocessing
from mil.errors import ConfigError, DataError
from mil.results.checkpoint import read_checkpoint


def write(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def test_signature_genes_join_their_group_with_every_suffix(tmp_path):
    table = pd.DataFrame(
        {
            "case_id": ["a", "b"],
            "TP53_mut": [1, 0],
            "TP53_cnv": [-1, 2],
            "TP53_rnaseq": [0.5, 1.5],
            "EGFR_rnaseq": [3.0, 4.0],
            "KRAS_cnv": [0, 1],
            "MYC_rnaseq": [1.0, 1.0],
        }
    )
    sig = pd.DataFrame({"Tumor Suppressor": ["TP53", None], "Oncogenes": ["EGFR", "KRAS"]})
    spec = TabularSpec(
        "rna", write(tmp_path / "rna.csv", table), groups=write(tmp_path / "sig.csv", sig)
    )
    mod = join_modality(spec, ["a", "b", "c"])
    named = [[mod.features[i] for i in g] for g in mod.groups]
    assert mod.group_names == ["Tumor Suppressor", "Oncogenes"]
    assert sorted(named[0]) == ["TP53_cnv", "TP53_mut", "TP53_rnaseq"]
    assert sorted(named[1]) == ["EGFR_rnaseq", "KRAS_cnv"]  # MYC is in no group
    assert mod.present.tolist() == [True, True, False]
    assert np.isnan(mod.values[2]).all()


def test_composition_matrix_groups_may_overlap(tmp_path):
    table = pd.DataFrame({"case_id": ["a"], "g1": [1.0], "g2": [2.0], "g3": [3.0]})
    comp = pd.DataFrame({"feature": ["g1", "g2", "g3"], "p1": [1, 1, 0], "p2": [0, 1, 1]})
    spec = TabularSpec(
        "rna", write(tmp_path / "rna.csv", table), groups=write(tmp_path / "c.csv", comp)
    )
    mod = join_modality(spec, ["a"])
    assert mod.group_names == ["p1", "p2"] and mod.groups == [[0, 1], [1, 2]]


def test_categorical_one_hot_with_a_missing_level(tmp_path):
    table = pd.DataFrame(
        {"pid": ["a", "b", "c"], "stage": ["II", None, "I"], "age": [50, 60, np.nan]}
    )
    spec = TabularSpec(
        "clin", write(tmp_path / "c.csv", table), id_col="pid", categorical=("stage",)
    )
    mod = join_modality(spec, ["a", "b", "c"])
    assert mod.features == ["stage=I", "stage=II", "stage=missing", "age"]
    np.testing.assert_array_equal(mod.values[:, :3], [[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    assert mod.scaled.tolist() == [False, False, False, True]


@pytest.mark.parametrize(
    "case, match",
    [
        (
            "non_numeric",
            r"t\.csv: column 'stage' \(modality m\) is not numeric: 'II' for patient a",
        ),
        ("empty_group", r"sig\.csv: group 'fam' has none of its columns in .*t\.csv"),
        ("required", r"t\.csv: patient c \(1 in all\) is not in column 'case_id'"),
        ("no_patient", r"t\.csv: no patient of the cohort is in column 'case_id'"),
        ("no_column", r"t\.csv: no column 'nope' \(data\.tabular m\.columns\)"),
        ("no_id", r"t\.csv: no column 'pid' \(data\.tabular m\.id_col\)"),
    ],
)
def test_bad_tables_name_the_file_and_column(tmp_path, case, match):
    table = pd.DataFrame({"case_id": ["a", "b"], "x": [1.0, 2.0], "stage": ["II", "I"]})
    csv = write(tmp_path / "t.csv", table)
    spec = {"name": "m", "csv": csv, "columns": ["x"]}
    patients = ["a", "b"]
    if case == "non_numeric":
        spec["columns"] = ["x", "stage"]
    elif case == "empty_group":
        spec["groups"] = write(tmp_path / "sig.csv", pd.DataFrame({"fam": ["BRCA1"]}))
    elif case == "required":
        spec["required"], patients = True, ["a", "b", "c"]
    elif case == "no_patient":
        patients = ["z"]
    elif case == "no_column":
        spec["columns"] = ["nope"]
    else:
        spec["id_col"] = "pid"
    with pytest.raises(DataError, match=match):
        join_modality(parse_tabular([spec], "cfg.yaml")[0], patients)


def test_config_entries_are_checked():
    with pytest.raises(ConfigError, match=r"unknown key 'data\.tabular\[0\]\.colums'"):
        parse_tabular([{"name": "rna", "csv": "x.csv", "colums": ["a"]}], "cfg.yaml")
    with pytest.raises(ConfigError, match=r"data\.tabular\[1\]\.name = 'rna'"):
        parse_tabular([{"name": "rna", "csv": "a"}, {"name": "rna", "csv": "b"}], "cfg.yaml")
    with pytest.raises(ConfigError, match=r"scaling = 'log'"):
        parse_tabular([{"name": "rna", "csv": "a", "scaling": "log"}], "cfg.yaml")


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mm")
    write_multimodal_cohort(
        root, n_patients=36, genes_per_family=2, dim=8, min_tiles=10, max_tiles=20
    )
    return root


def mm_config(root: Path, model: str = "snn", **data) -> dict:
    return {
        "name": "mm",
        "task": {"type": "survival"},
        "data": {
            "csv": str(root / "cohort.csv"),
            "features": str(root / "features"),
            "patient_col": "case_id",
            "time_col": "survival_months",
            "event_col": "censorship",
            "censored_value": 1,
            "standardize": False,
            "tabular": multimodal_tabular(root),
            **data,
        },
        "splits": {"dir": str(root / "splits"), "folds": 3, "val_fraction": 0.2, "seed": 0},
        "model": {"name": model, "hidden_dim": [8] if model == "snn" else 8},
        "train": {"epochs": 1, "batch_size": 8, "patience": None, "seed": 0},
    }


@pytest.mark.parametrize("scaling", ["standard", "minmax"])
def test_scaler_is_fitted_on_training_patients_only(cohort_root, scaling):
    raw = mm_config(cohort_root)
    for t in raw["data"]["tabular"]:
        t["scaling"] = scaling
    cohort, store = load_cohort(config_from_dict(raw))
    train = cohort.bag_ids[:20]
    norm = fold_preprocessing(None, train, False, cohort.tabular)
    rna = pd.read_csv(cohort_root / "rna.csv").set_index("case_id")
    seen = rna.loc[rna.index.intersection(cohort.bags.set_index("bag_id").loc[train, "patient_id"])]
    ref = (StandardScaler() if scaling == "standard" else MinMaxScaler()).fit(seen.to_numpy(float))
    dim = rna.shape[1]
    center = ref.mean_ if scaling == "standard" else ref.data_min_
    scale = ref.scale_ if scaling == "standard" else 1 / ref.scale_
    np.testing.assert_allclose(norm.tabular.center[:dim].numpy(), center, rtol=1e-5)
    np.testing.assert_allclose(norm.tabular.scale[:dim].numpy(), scale, rtol=1e-5)
    # a held-out patient with omics, scaled by the training statistics; one without: zeros
    b = cohort.bags
    out = b[~b["bag_id"].isin(train)]
    has = out[out["modalities"].str.contains("rna")].iloc[0]
    lacks = out[~out["modalities"].str.contains("rna")].iloc[0]
    values, mask = norm.tabular_of(has["bag_id"])
    expected = ref.transform(rna.loc[[has["patient_id"]]].to_numpy(float))[0]
    np.testing.assert_allclose(values[:dim].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert mask.tolist() == [1.0, 1.0]
    values, mask = norm.tabular_of(lacks["bag_id"])
    assert mask.tolist() == [0.0, 1.0] and not values[:dim].any()


@pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")
def test_poisoned_test_values_leave_the_saved_scaler_unchanged(cohort_root, tmp_path):
    """Scalers never see the test fold: fold 0's model.pt keeps the same tabular statistics
    when the test patients' omics and clinical values are replaced by huge numbers."""
    from mil.train.runner import run_cv

    raw = mm_config(cohort_root)
    run_cv(
        config_from_dict(raw), tmp_path / "clean", folds=[0], progress=False, log=lambda *a: None
    )
    test_ids = set(pd.read_csv(tmp_path / "clean" / "splits" / "splits_0.csv")["test"].dropna())
    test_patients = {s.rsplit("-", 1)[0] for s in test_ids}
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for t in raw["data"]["tabular"]:
        df = pd.read_csv(t["csv"])
        hit = df["case_id"].isin(test_patients)
        assert hit.any()
        num = [c for c in df.columns if c != "case_id" and pd.api.types.is_numeric_dtype(df[c])]
        df.loc[hit, num] = 1e6
        t["csv"] = write(poisoned / Path(t["csv"]).name, df)
    run_cv(
        config_from_dict(raw), tmp_path / "dirty", folds=[0], progress=False, log=lambda *a: None
    )
    clean = read_checkpoint(tmp_path / "clean" / "fold_0" / "model.pt")["standardize"]["tabular"]
    dirty = read_checkpoint(tmp_path / "dirty" / "fold_0" / "model.pt")["standardize"]["tabular"]
    assert clean.keys() == {"center", "scale"}
    for key in clean:
        assert torch.equal(clean[key], dirty[key]), key
    # while a scaler fitted on all patients would have moved
    cohort, _ = load_cohort(config_from_dict(raw))
    everyone = fold_preprocessing(None, cohort.bag_ids, False, cohort.tabular).tabular
    assert not torch.allclose(everyone.center, clean["center"])
    assert Standardizer.from_state({"tabular": clean}).features is None


def test_batches_carry_values_and_mask_and_subgroups_name_the_pattern(cohort_root):
    cfg = config_from_dict(mm_config(cohort_root))
    assert cfg.data.subgroup_cols == ["modalities"]
    cohort, store = load_cohort(cfg)
    assert set(cohort.bags["modalities"]) == {"slides+rna+clinical", "slides+clinical"}
    from mil.data.dataset import BagDataset

    norm = fold_preprocessing(None, cohort.bag_ids, False, cohort.tabular)
    data = BagDataset(cohort.bag_slides, store).with_transform(norm)
    ids = cohort.bag_ids[:5]
    batch = collate_bags([data[b] for b in ids])
    rna = cohort.tabular.modalities[0]
    assert batch.tabular.shape == (5, sum(len(m.features) for m in cohort.tabular.modalities))
    expected = [float("rna" in p) for p in cohort.bags["modalities"][:5]]
    assert batch.tabular_mask[:, 0].tolist() == expected
    assert batch.x.shape[0] == int(batch.ptr[-1])  # the features still one packed tensor
    assert len(rna.groups) == 6


@pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")
def test_ablation_reports_each_availability_pattern(cohort_root, tmp_path):
    """Slides only against omics only, per availability pattern (what `mil compare` writes to
    comparison_patterns.csv): the omics-only model gives every patient without omics the same
    risk, so its C-index there is exactly 0.5."""
    from mil.compare import entry_config, format_patterns, pattern_differences
    from mil.train.runner import run_cv

    cfg = config_from_dict(mm_config(cohort_root))
    entries = {
        "slides": {"label": "slides", "model": {"name": "abmil", "hidden_dim": 8}},
        "rna": {"label": "rna", "model": {"name": "snn", "modalities": ["rna"], "hidden_dim": [8]}},
    }
    dirs = {k: tmp_path / k for k in entries}
    for k, e in entries.items():
        run_cv(
            entry_config(cfg, e),
            dirs[k],
            folds=[0, 1],
            progress=False,
            log=lambda *a: None,
            n_boot=20,
        )
    table = pattern_differences(dirs, "slides", n_boot=20)
    pat = table.set_index(["modalities", "model"])
    assert pat.loc[("slides+clinical", "rna"), "value"] == pytest.approx(0.5)
    assert pat.loc[("slides+clinical", "slides"), "delta"] == 0.0
    cases = pd.read_csv(cohort_root / "cohort.csv")["case_id"]
    has_rna = cases.isin(pd.read_csv(cohort_root / "rna.csv")["case_id"])
    tested = pd.concat(pd.read_csv(dirs["rna"] / f"fold_{k}" / "predictions.csv") for k in (0, 1))
    expected = tested["patient_id"].isin(cases[has_rna]).sum()
    assert pat.loc[("slides+rna+clinical", "rna"), "n_patients"] == expected
    assert "| slides+clinical |" in format_patterns(table)


def test_multimodal_configs_are_valid():
    from mil.compare import entries, entry_config
    from mil.config import load_config

    repo = Path(__file__).resolve().parents[1] / "experiments"
    for name in ("demo_multimodal.yaml", "template_tcga_multimodal.yaml"):
        cfg = load_config(repo / name)
        assert [t["name"] for t in cfg.data.tabular][0] == "rna"
        labels = [entry_config(cfg, e).model_name for e in entries(cfg)]
        assert {"abmil", "snn", "late_fusion", "mcat", "survpath"} <= set(labels)

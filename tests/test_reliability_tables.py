"""What tables (``data.tabular``) and ``mil check`` promise on damaged input (issue 29; rows
M3-M8, EM3, T1-T5, S1-S2 and Mchk of the second reliability probe).

* Values: a numeric cell is a finite number or blank; a table has feature columns; a column
  without any value is named in a warning.
* Categorical levels: a code reads as the same level however pandas spelt it (``4.0``, ``4``);
  an external patient whose level the run never saw is read as the ``missing`` level, with a
  warning (never as an all-zero encoding the models never met).
* Groups: genes a signatures file lists but the table lacks are counted in a warning; a
  composition matrix with a cell other than 0/1 is named as such, cell and all.
* Patients: a partial overlap that looks like misspelt ids is counted in a warning; patients
  that simply have no row are a missing modality, silently (by design).
* Feature files: a zero-width array is refused by the reader (check, train and evaluate
  alike); a folder mixing slide embeddings and tile features is reported by ``mil check``.
* ``mil check`` reports what ``mil train`` refuses in tables with the same message, warns
  when the model reads no table, and neither verb prints a traceback.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mil.check import check_cohort, has_errors
from mil.cli import main
from mil.config import config_from_dict
from mil.data.readers import read_features
from mil.data.synthetic import write_synthetic_cohort
from mil.data.synthetic_multimodal import multimodal_tabular, write_multimodal_cohort
from mil.data.tabular import TabularSpec, join_modality, join_tabular, level_name, parse_tabular
from mil.errors import ConfigError, DataError, MilWarning


def write(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def mm_root(tmp_path_factory) -> Path:
    """A small multimodal survival cohort: rna.csv (30% of patients absent) with MCAT
    signatures, and clinical.csv with age, stage and sex."""
    root = tmp_path_factory.mktemp("mm")
    write_multimodal_cohort(
        root, n_patients=30, genes_per_family=2, dim=8, min_tiles=5, max_tiles=10
    )
    return root


def mm_config(root: Path, tables: list[dict], model: str = "late_fusion") -> dict:
    return {
        "name": "mm",
        "task": {"type": "survival", "loss": "cox"},
        "data": {
            "csv": str(root / "cohort.csv"),
            "features": str(root / "features"),
            "patient_col": "case_id",
            "time_col": "survival_months",
            "event_col": "censorship",
            "censored_value": 1,
            "tabular": tables,
        },
        "splits": {"folds": 3, "val_fraction": 0.2, "seed": 0},
        "model": {"name": model},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "patience": None,
            "threads": 1,
            "faithfulness": False,
        },
    }


def damaged_tables(
    root: Path, out: Path, table: str = "clinical", edit=None, **entry
) -> list[dict]:
    """The cohort's ``data.tabular`` with its tables copied under ``out``, ``table`` passed
    through ``edit`` and its entry updated with ``entry``."""
    out.mkdir(parents=True, exist_ok=True)
    tables = multimodal_tabular(root)
    for t in tables:
        df = pd.read_csv(t["csv"])
        if t["name"] == table:
            df = edit(df) if edit else df
            t.update(entry)
        t["csv"] = write(out / Path(t["csv"]).name, df)
    return tables


# -- values -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.inf, -np.inf, 1e39])
def test_a_non_finite_number_is_refused_naming_file_column_and_patient(tmp_path, value):
    """M6: ``inf`` parses as a number, so it used to reach the scaler (risks of 1e34); so
    does a number beyond float32's range, which is infinite once the model reads it."""
    table = pd.DataFrame({"case_id": ["a", "b", "c"], "age": [50.0, value, 70.0]})
    spec = TabularSpec("clin", write(tmp_path / "clin.csv", table))
    shown = {np.inf: "inf", -np.inf: "-inf", 1e39: "1e+39"}[value]
    assert shown in (tmp_path / "clin.csv").read_text()  # the CSV really spells it out
    with pytest.raises(
        DataError,
        match=rf"clin\.csv: column 'age' \(modality clin\) holds a value that is not finite: {re.escape(shown)} for patient b",
    ):
        join_modality(spec, ["a", "b", "c"])


def test_a_table_without_feature_columns_is_an_error_not_a_traceback(tmp_path):
    """T4/T5: a table with only its id column, and ``columns: []``."""
    csv = write(tmp_path / "tab.csv", pd.DataFrame({"case_id": ["P000", "P001"]}))
    with pytest.raises(
        DataError,
        match=r"tab\.csv: the table of modality omics has no feature columns besides its id column 'case_id'",
    ):
        join_modality(TabularSpec("omics", csv), ["P000", "P001"])
    with pytest.raises(ConfigError, match=r"cfg\.yaml: data\.tabular\[0\]\.columns is empty"):
        parse_tabular([{"name": "omics", "csv": csv, "columns": []}], "cfg.yaml")


def test_a_column_without_any_value_warns_naming_it(tmp_path):
    """M3: an all-blank column is a column of zeros for the model."""
    table = pd.DataFrame({"case_id": ["a", "b"], "age": [np.nan, np.nan], "x": [1.0, 2.0]})
    spec = TabularSpec("clin", write(tmp_path / "clin.csv", table))
    with pytest.warns(
        MilWarning, match=r"clin\.csv: column 'age' \(modality clin\) has no value in any row"
    ) as caught:
        join_modality(spec, ["a", "b"])
    assert not any("'x'" in str(w.message) for w in caught)


def test_a_categorical_name_that_is_no_column_is_refused_also_without_columns(tmp_path):
    table = pd.DataFrame({"case_id": ["a"], "stage": ["I"]})
    spec = TabularSpec("clin", write(tmp_path / "clin.csv", table), categorical=("stge",))
    with pytest.raises(
        DataError, match=r"categorical names 'stge', which is not among its columns"
    ):
        join_modality(spec, ["a"])


# -- categorical levels --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, level",
    [
        ("4", "4"),
        ("4.0", "4"),
        (" 4.00 ", "4"),
        ("+4.", "4"),
        ("4.5", "4.5"),
        ("IV", "IV"),
        ("12345678901234567890.0", "12345678901234567890"),
    ],
)
def test_level_names_read_integral_numbers_as_integers(text, level):
    assert level_name(text) == level


def test_numeric_codes_give_the_same_levels_with_or_without_a_blank_cell(tmp_path):
    """T1: a blank cell makes pandas write a code column as floats (``4.0``); a table without
    one writes ``4``. Both must give the levels of the codes, one-hot as written by hand."""
    codes = [1, 4, 2, 4, 3]
    blank = pd.DataFrame({"case_id": list("abcde") + ["f"], "stage": [*codes, None]})
    full = pd.DataFrame({"case_id": list("abcde"), "stage": codes})
    specs = [
        TabularSpec("clin", write(tmp_path / f"{n}.csv", t), categorical=("stage",))
        for n, t in (("blank", blank), ("full", full))
    ]
    assert (
        "4.0" in (tmp_path / "blank.csv").read_text()
        and "4.0" not in (tmp_path / "full.csv").read_text()
    )
    a, b = (join_modality(s, list("abcde")) for s in specs)
    levels = ["stage=1", "stage=2", "stage=3", "stage=4", "stage=missing"]
    assert a.features == b.features == levels
    expected = np.array([[float(c == int(lv[6:])) for lv in levels[:4]] + [0.0] for c in codes])
    np.testing.assert_array_equal(a.values, expected)
    np.testing.assert_array_equal(b.values, expected)


def test_a_blank_or_missing_cell_is_the_missing_level_once(tmp_path):
    """A cell of spaces or the word ``missing`` is the ``missing`` level, not a second
    column of the same name."""
    table = pd.DataFrame({"case_id": list("abcd"), "stage": ["I", "missing", "  ", None]})
    spec = TabularSpec("clin", write(tmp_path / "clin.csv", table), categorical=("stage",))
    mod = join_modality(spec, list("abcd"))
    assert mod.features == ["stage=I", "stage=missing"]
    np.testing.assert_array_equal(mod.values, [[1, 0], [0, 1], [0, 1], [0, 1]])


def _bags(patients: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"bag_id": patients, "patient_id": patients})


def test_an_unseen_external_level_is_read_as_missing_with_a_warning(tmp_path):
    """EM3 (and T1 for runs trained before level names were normalised): an external patient
    whose stage the run never saw gets the run's ``stage=missing``, the state its models
    know for 'no stage'; a run whose layout says ``stage=1.0`` matches the cohort's ``1``."""
    train = pd.DataFrame(
        {"case_id": list("abcd"), "stage": [1.0, 2.0, None, 3.0], "age": [50, 60, 70, 80]}
    )
    ext = pd.DataFrame({"case_id": list("pqrs"), "stage": [2, 5, 1, 5], "age": [55, 65, 75, 85]})
    spec = {"name": "clin", "categorical": ["stage"]}
    run = join_tabular(
        parse_tabular([{**spec, "csv": write(tmp_path / "train.csv", train)}], "cfg"),
        _bags(list("abcd")),
    )
    cohort = join_tabular(
        parse_tabular([{**spec, "csv": write(tmp_path / "ext.csv", ext)}], "cfg"),
        _bags(list("pqrs")),
    )
    layout = run.layout()
    assert layout[0]["features"] == ["stage=1", "stage=2", "stage=3", "stage=missing", "age"]
    expected = np.array(
        [
            [0, 1, 0, 0, 55],
            [0, 0, 0, 1, 65],
            [1, 0, 0, 0, 75],
            [0, 0, 0, 1, 85],
        ],
        dtype=float,
    )
    with pytest.warns(
        MilWarning,
        match=r"ext: table 'clin', column 'stage': 2 patient\(s\) \(e\.g\. q\) have a level the run's models never saw \('5'\); they are read as stage=missing",
    ):
        got = cohort.aligned(layout, "ext").modalities[0].values
    np.testing.assert_array_equal(got, expected)
    # the layout of a run trained before: levels spelt as floats
    old = [
        {**layout[0], "features": ["stage=1.0", "stage=2.0", "stage=3.0", "stage=missing", "age"]}
    ]
    with pytest.warns(MilWarning, match="never saw"):
        np.testing.assert_array_equal(cohort.aligned(old, "ext").modalities[0].values, expected)


# -- groups --------------------------------------------------------------------------------


def test_signature_genes_the_table_lacks_are_counted(tmp_path):
    """M4: 1 of the 5 genes (TUM9) has no column; the groups keep the others."""
    table = pd.DataFrame(
        {
            "case_id": ["a"],
            "TUM1_rnaseq": [1.0],
            "TUM1_cnv": [0.0],
            "TUM2_rnaseq": [2.0],
            "ONC1_rnaseq": [3.0],
            "ONC2_rnaseq": [4.0],
        }
    )
    sig = pd.DataFrame({"tumor": ["TUM1", "TUM9", "TUM2"], "onc": ["ONC1", "ONC2", None]})
    spec = TabularSpec(
        "rna", write(tmp_path / "rna.csv", table), groups=write(tmp_path / "sig.csv", sig)
    )
    with pytest.warns(
        MilWarning,
        match=r"sig\.csv: 1 of 5 genes are not columns of .*rna\.csv \(modality rna\) and are left out of their groups \(tumor: 1 of 3, e\.g\. 'TUM9'\)",
    ):
        mod = join_modality(spec, ["a"])
    assert [[mod.features[i] for i in g] for g in mod.groups] == [
        ["TUM1_rnaseq", "TUM1_cnv", "TUM2_rnaseq"],
        ["ONC1_rnaseq", "ONC2_rnaseq"],
    ]


@pytest.mark.parametrize("cell, shown", [(None, "a blank cell"), (2, "2"), ("x", "'x'")])
def test_a_composition_matrix_names_its_bad_cell(tmp_path, cell, shown):
    """M4e: one non-0/1 cell used to make the matrix read as MCAT signatures, and the error
    blamed a group that had its columns."""
    feats = [f"g{i}" for i in range(6)]
    table = pd.DataFrame({"case_id": ["a"], **{f: [float(i)] for i, f in enumerate(feats)}})
    comp = pd.DataFrame(
        {"feature": feats, "pathA": [1, 1, 1, 0, 0, 0], "pathB": [0, 0, 0, 1, 1, 1]}, dtype=object
    )
    comp.loc[4, "pathB"] = cell
    spec = TabularSpec(
        "rna", write(tmp_path / "rna.csv", table), groups=write(tmp_path / "comp.csv", comp)
    )
    with pytest.raises(
        DataError,
        match=rf"comp\.csv: a composition matrix .* must hold 0 or 1 in every cell; row 'g4' \(line 6\), column 'pathB' holds {shown}",
    ):
        join_modality(spec, ["a"])


def test_composition_features_the_table_lacks_are_counted(tmp_path):
    table = pd.DataFrame({"case_id": ["a"], "g1": [1.0], "g2": [2.0]})
    comp = pd.DataFrame({"feature": ["g1", "g2", "g3"], "p1": [1, 1, 0], "p2": [0, 1, 1]})
    spec = TabularSpec(
        "rna", write(tmp_path / "rna.csv", table), groups=write(tmp_path / "c.csv", comp)
    )
    with pytest.warns(
        MilWarning,
        match=r"1 of 3 features of the composition matrix are not columns .* \(p2: 1 of 2, e\.g\. 'g3'\)",
    ):
        mod = join_modality(spec, ["a"])
    assert mod.groups == [[0, 1], [1]]


# -- patients ------------------------------------------------------------------------------


def test_a_partial_overlap_with_stray_rows_is_counted(tmp_path):
    """M7c: 2 of 5 ids spelt in lower case: 2 patients without a row, 2 rows of no patient."""
    patients = [f"P{i}" for i in range(5)]
    table = pd.DataFrame({"case_id": ["p0", "p1", "P2", "P3", "P4"], "x": [1.0, 2, 3, 4, 5]})
    spec = TabularSpec("rna", write(tmp_path / "rna.csv", table))
    with pytest.warns(
        MilWarning,
        match=r"rna\.csv: 2 of 5 patients of the cohort \(e\.g\. 'P0'\) have no row .* treated as missing modality rna, while 2 of its rows \(e\.g\. 'p0'\) match no patient",
    ):
        mod = join_modality(spec, patients)
    assert mod.present.tolist() == [False, False, True, True, True]


def test_patients_without_a_row_alone_are_a_silent_missing_modality(tmp_path):
    table = pd.DataFrame({"case_id": ["P2", "P3"], "x": [1.0, 2.0]})
    spec = TabularSpec("rna", write(tmp_path / "rna.csv", table))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MilWarning)
        mod = join_modality(spec, ["P0", "P1", "P2", "P3"])
    assert mod.present.tolist() == [False, False, True, True]


# -- feature files -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 0), (7, 0)])
@pytest.mark.parametrize("suffix", [".h5", ".npy", ".pt"])
def test_zero_width_features_are_refused_naming_the_file(tmp_path, shape, suffix):
    """S2b/S2d: ``[1, 0]`` and ``[N, 0]`` used to pass ``mil check``'s ``dim > 0`` filter."""
    path = tmp_path / f"s1{suffix}"
    x = np.zeros(shape, np.float32)
    if suffix == ".h5":
        with h5py.File(path, "w") as f:
            f["features"] = x
    elif suffix == ".npy":
        np.save(path, x)
    else:
        torch.save(torch.from_numpy(x), path)
    with pytest.raises(
        DataError, match=rf"s1\{suffix}: features of dimension 0 \(shape \({shape[0]}, 0\)\)"
    ):
        read_features(path)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    """A cohort of slide embeddings ``[D]`` (CSV and a TRIDENT ``slide_features_`` folder)."""
    root = tmp_path_factory.mktemp("emb")
    df = write_synthetic_cohort(
        "classification",
        root / "cohort.csv",
        root / "tiles",
        n_patients=24,
        n_two_slides=0,
        dim=8,
        min_tiles=5,
        max_tiles=10,
    )
    rng = np.random.default_rng(0)
    (root / "slide_features_titan").mkdir()
    for sid in df["slide_id"]:
        with h5py.File(root / "slide_features_titan" / f"{sid}.h5", "w") as f:
            f["features"] = rng.normal(size=8).astype(np.float32)
    return root


def emb_config(root: Path, features: Path) -> dict:
    return {
        "name": "emb",
        "task": {"type": "classification"},
        "data": {
            "csv": str(root / "cohort.csv"),
            "features": str(features),
            "patient_col": "case_id",
        },
        "splits": {"folds": 2, "val_fraction": 0.2, "seed": 0},
        "model": {"name": "linear"},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "patience": None,
            "threads": 1,
            "faithfulness": False,
        },
    }


def odd_file(embeddings: Path, tmp_path: Path, array: np.ndarray | None) -> tuple[Path, Path]:
    """A copy of the embeddings folder with its fourth file replaced by ``array``."""
    folder = tmp_path / "slide_features_titan"
    shutil.copytree(embeddings / "slide_features_titan", folder)
    odd = sorted(folder.iterdir())[3]
    if array is not None:
        with h5py.File(odd, "w") as f:
            f["features"] = array
    return folder, odd


@pytest.mark.parametrize("shape", [None, (6, 8), (1, 8)])
def test_check_reports_a_folder_mixing_embeddings_and_tile_features(embeddings, tmp_path, shape):
    """S1/S1b: one ``[N, D]`` (or ``[1, D]``) file among ``[D]`` vectors is an error of
    ``mil check`` naming that file; a folder of one kind has none (control)."""
    array = None if shape is None else np.ones(shape, np.float32)
    folder, odd = odd_file(embeddings, tmp_path, array)
    problems, table = check_cohort(config_from_dict(emb_config(embeddings, folder)))
    errors = [p for p in problems if p.severity == "error"]
    if shape is None:
        assert errors == [] and set(table["status"]) == {"ok"}
        return
    assert len(errors) == 1 and errors[0].where == odd.stem
    assert (
        f"{odd} holds tile features [{shape[0]}, 8], while 23 files hold one vector [D]"
        in errors[0].what
    )
    assert ("a [1, D] array is a bag of one tile" in errors[0].what) == (shape[0] == 1)


# -- mil check reads data.tabular ----------------------------------------------------------


def test_check_counts_each_tables_patients(mm_root, capsys):
    cfg = config_from_dict(mm_config(mm_root, multimodal_tabular(mm_root)))
    problems, table = check_cohort(cfg)
    assert not has_errors(problems)
    cases = set(pd.read_csv(mm_root / "cohort.csv")["case_id"])
    n = len(cases & set(pd.read_csv(mm_root / "rna.csv")["case_id"]))
    assert 0 < n < len(cases)  # the cohort leaves some patients without omics
    lines = table.attrs["tables"]
    assert lines[0].startswith(
        f"table rna ({mm_root / 'rna.csv'}): {n} of {len(cases)} patients have a row ({len(cases) - n} treated as missing rna)"
    )
    assert lines[1].startswith(
        f"table clinical ({mm_root / 'clinical.csv'}): {len(cases)} of {len(cases)} patients have a row;"
    )


@pytest.mark.parametrize(
    "model, compare, warned",
    [
        ("abmil", [], True),
        ("late_fusion", [], False),
        ("abmil", [{"model": {"name": "snn"}}], False),
    ],
)
def test_check_warns_when_no_model_reads_the_tables(mm_root, model, compare, warned):
    """T2: with ``model: abmil`` the tables only name the availability subgroups."""
    raw = mm_config(mm_root, multimodal_tabular(mm_root), model=model)
    raw["compare"] = compare
    problems, _ = check_cohort(config_from_dict(raw))
    found = [p for p in problems if p.where == "data.tabular"]
    assert bool(found) == warned
    if warned:
        assert found[0].severity == "warning"
        assert (
            "model 'abmil' reads no tables, so the tables of data.tabular (rna, clinical)"
            in found[0].what
        )
        assert "late_fusion" in found[0].what


def _dup(df):  # M1
    return pd.concat([df, df.iloc[[0]].assign(age=1.0)])


def _junk(df):  # M2
    df["age"] = df["age"].astype(object)
    df.loc[2, "age"] = "n/a?"
    return df


def _inf(df):  # M6
    df.loc[df["case_id"] == df["case_id"].iloc[2], "age"] = np.inf
    return df


def _other_ids(df):  # M7
    df["case_id"] = df["case_id"].str.replace("MM", "XX")
    return df


DAMAGED = {
    "M1-duplicate-ids": dict(
        edit=_dup, match=r"clinical\.csv: patient MM000 has rows with different values"
    ),
    "M2-junk-value": dict(
        edit=_junk,
        match=r"clinical\.csv: column 'age' \(modality clinical\) is not numeric: 'n/a\?'",
    ),
    "M5-no-id-column": dict(
        edit=lambda df: df.rename(columns={"case_id": "patient"}),
        match=r"clinical\.csv: no column 'case_id'",
    ),
    "M6-inf": dict(
        edit=_inf,
        match=r"clinical\.csv: column 'age' \(modality clinical\) holds a value that is not finite: inf",
    ),
    "M7-no-overlap": dict(
        edit=_other_ids, match=r"clinical\.csv: no patient of the cohort is in column 'case_id'"
    ),
    "M8-required": dict(
        table="rna",
        required=True,
        match=r"rna\.csv: patient MM\d+ \(\d+ in all\) is not in column 'case_id' \(modality rna is required\)",
    ),
    "M4b-unknown-family": dict(
        table="rna",
        groups="bogus",
        match=r"sig\.csv: group 'bogus' has none of its columns in .*rna\.csv",
    ),
    "M4e-composition-cell": dict(
        table="rna",
        groups="composition",
        match=r"comp\.csv: a composition matrix .* column 'pathB' holds a blank cell",
    ),
    "T4-only-id-column": dict(
        edit=lambda df: df[["case_id"]],
        match=r"clinical\.csv: the table of modality clinical has no feature columns",
    ),
}


def _groups_file(kind: str, root: Path, out: Path) -> str:
    if kind == "bogus":
        return write(out / "sig.csv", pd.DataFrame({"tumor": ["TUM1"], "bogus": ["XXX1"]}))
    feats = [c for c in pd.read_csv(root / "rna.csv").columns if c != "case_id"]
    half = len(feats) // 2
    comp = pd.DataFrame(
        {
            "feature": feats,
            "pathA": [1] * half + [0] * (len(feats) - half),
            "pathB": [0] * half + [1] * (len(feats) - half),
        },
        dtype=object,
    )
    comp.loc[len(feats) - 1, "pathB"] = None
    return write(out / "comp.csv", comp)


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_check_and_train_refuse_a_damaged_table_with_one_message(mm_root, tmp_path, capsys, case):
    """Mchk: ``mil check`` used to pass every damaged table with "0 errors". Now it reports
    the error ``mil train`` stops with (the same text, naming the file), ``mil train``
    prints it as one ``mil: error:`` line before writing anything, and neither prints a
    traceback."""
    spec = dict(DAMAGED[case])
    match, table = spec.pop("match"), spec.pop("table", "clinical")
    if "groups" in spec:
        spec["groups"] = _groups_file(spec["groups"], mm_root, tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(mm_config(mm_root, damaged_tables(mm_root, tmp_path / "t", table, **spec)))
    )
    assert main(["check", str(cfg)]) == 1
    checked = capsys.readouterr()
    assert "Traceback" not in checked.err
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 2
    trained = capsys.readouterr()
    err = [line for line in trained.err.splitlines() if not line.startswith("mil: warning:")]
    assert len(err) == 1 and err[0].startswith("mil: error: ") and "Traceback" not in trained.err
    message = err[0].removeprefix("mil: error: ")
    assert pd.Series([message]).str.contains(match).all(), message
    assert message in checked.out  # check reports what train refuses, word for word
    assert not out.exists()


def test_check_and_train_refuse_an_empty_columns_list_alike(mm_root, tmp_path, capsys):
    """T5: ``columns: []`` is a config error, for both verbs."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(mm_config(mm_root, damaged_tables(mm_root, tmp_path / "t", columns=[])))
    )
    for verb in (["check"], ["train", "--out", str(tmp_path / "run"), "--quiet"]):
        assert main([verb[0], str(cfg), *verb[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mil: error: ") and err.count("\n") == 1
        assert "data.tabular[1].columns is empty" in err and "Traceback" not in err


@pytest.mark.parametrize("array", [np.ones((6, 8), np.float32), np.zeros((1, 0), np.float32)])
def test_check_and_train_refuse_mixed_or_zero_width_feature_files(
    embeddings, tmp_path, capsys, array
):
    """S1/S2b through the CLI: both verbs fail and name the odd file."""
    folder, odd = odd_file(embeddings, tmp_path, array)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(emb_config(embeddings, folder)))
    assert main(["check", str(cfg)]) == 1
    checked = capsys.readouterr().out
    assert f"error     {odd.stem}" in checked and str(odd) in checked
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("mil: warning:")]
    assert len(err) == 1 and err[0].startswith("mil: error: ") and str(odd) in err[0]

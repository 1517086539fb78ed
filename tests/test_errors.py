"""Bad input gives one clear error naming the file, slide or key; no traceback; nothing lost."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from mil.cli import main
from tests.conftest import small_config


def write_cfg(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args)])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def cohort(tmp_path):
    raw = small_config(tmp_path)
    raw["train"]["epochs"] = 1
    return raw, write_cfg(tmp_path / "cfg.yaml", raw)


def break_slide(raw: dict, how: str) -> str:
    feats = Path(raw["data"]["features"])
    sid = sorted(p.stem for p in feats.glob("*.h5"))[3]
    path = feats / f"{sid}.h5"
    if how == "missing":
        path.unlink()
    elif how == "corrupt":
        path.write_bytes(path.read_bytes()[:200])
    else:
        with h5py.File(path, "r") as f:
            x = f["features"][()]
        if how == "nan":
            x = x.astype(np.float32)
            x[2, 1] = np.nan
        elif how == "dim":
            x = x[:, :-1]
        elif how == "empty":
            x = x[:0]
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=x)
    return sid


@pytest.mark.parametrize(
    "how, needle",
    [
        ("missing", "no feature file"),
        ("corrupt", "cannot read"),
        ("nan", "NaN"),
        ("dim", "dimension 15"),
        ("empty", "empty bag"),
    ],
)
def test_bad_feature_files(tmp_path, cohort, capsys, how, needle):
    raw, cfg = cohort
    # a finished run that must survive the failing re-run
    code, _ = run_cli(capsys, "train", cfg, "--out", tmp_path / "run", "--folds", "0", "--quiet")
    assert code == 0
    before = sorted(p.name for p in (tmp_path / "run" / "fold_0").iterdir())
    sid = break_slide(raw, how)
    code, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "run", "--quiet")
    assert code != 0
    assert needle in err and sid in err
    assert "Traceback" not in err and err.count("\n") <= 2
    assert sorted(p.name for p in (tmp_path / "run" / "fold_0").iterdir()) == before
    # mil check reports the same problem in its table
    code = main(["check", str(cfg)])
    out = capsys.readouterr().out
    assert code == 1 and sid in out


def test_unknown_config_key(tmp_path, cohort, capsys):
    raw, _ = cohort
    raw["train"]["learning_rate"] = 1e-3
    cfg = write_cfg(tmp_path / "bad.yaml", raw)
    code, err = run_cli(capsys, "train", cfg)
    assert code == 2 and "train.learning_rate" in err and "bad.yaml" in err
    code, err = run_cli(capsys, "train", tmp_path / "cfg.yaml", "--set", "model.widht=3")
    assert code == 2 and "model.widht" in err


def test_label_column_absent(tmp_path, cohort, capsys):
    raw, _ = cohort
    raw["data"]["label_col"] = "subtype"
    cfg = write_cfg(tmp_path / "bad.yaml", raw)
    code, err = run_cli(capsys, "train", cfg)
    assert code == 2 and "'subtype'" in err and "cohort.csv" in err


def test_patient_in_two_partitions_of_user_split(tmp_path, cohort, capsys):
    raw, cfg = cohort
    assert main(["splits", str(cfg)]) == 0
    capsys.readouterr()
    csv = pd.read_csv(raw["data"]["csv"])
    pid = csv["case_id"].value_counts().index[0]  # a patient with two slides
    s1, s2 = csv.loc[csv["case_id"] == pid, "slide_id"]
    split = Path(raw["splits"]["dir"]) / "splits_0.csv"
    df = pd.read_csv(split)
    parts = {c: [x for x in df[c].dropna() if x not in (s1, s2)] for c in df.columns}
    parts["train"].append(s1)
    parts["test"].append(s2)
    pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in parts.items()}).to_csv(
        split, index=False
    )
    code, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "run")
    assert code == 2 and pid in err and "splits_0.csv" in err and "Traceback" not in err


def test_console_script_prints_no_traceback(tmp_path):
    cfg = write_cfg(
        tmp_path / "c.yaml", {"data": {"csv": str(tmp_path / "nope.csv"), "features": "x"}}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mil.cli", "train", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "nope.csv" in proc.stderr and "Traceback" not in proc.stderr

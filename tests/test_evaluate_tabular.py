"""``mil evaluate`` of a run whose models read tables: the external cohort's own tables, matched
to the run's columns by name and scaled by each fold's saved scaler. Reference: the fold models
run by hand on values scaled with numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mil.config import config_from_dict
from mil.data.batch import Bag, collate_bags
from mil.errors import DataError, MilWarning
from mil.evaluate import evaluate
from mil.models import create
from mil.train.runner import run_cv
from tests.conftest import small_config

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def omics_table(csv, path, seed, order=("g1", "g2"), extra=False):
    cases = pd.read_csv(csv).drop_duplicates("case_id")
    rng = np.random.default_rng(seed)
    y = (cases["label"] == "positive").to_numpy(float)
    df = pd.DataFrame(
        {
            "case_id": cases["case_id"],
            "g1": 2 * y + rng.normal(0, 0.5, len(y)),
            "g2": rng.normal(5, 2, len(y)),
        }
    )
    df = df[rng.uniform(size=len(y)) > 0.25][["case_id", *order]]
    if extra:
        df["unused"] = 1.0
    df.to_csv(path, index=False)
    return df.set_index("case_id")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evtab")
    raw = small_config(root / "train")
    omics_table(raw["data"]["csv"], root / "omics.csv", 0)
    raw["data"]["tabular"] = [
        {"name": "omics", "csv": str(root / "omics.csv"), "columns": ["g1", "g2"]}
    ]
    raw["model"] = {"name": "snn", "hidden_dim": [8]}
    raw["train"].update(epochs=5, lr=3e-3)
    out = run_cv(
        config_from_dict(raw), root / "run", progress=False, log=lambda *a: None, n_boot=10
    )
    ext = small_config(
        root / "ext"
    )  # another cohort (its own files), its table's columns reordered
    ext_csv = root / "ext" / "cohort.csv"
    df = pd.read_csv(ext_csv)
    df["case_id"] = "X" + df["case_id"].astype(str)
    df.to_csv(ext_csv, index=False)
    table = omics_table(ext_csv, root / "ext_omics.csv", 1, order=("g2", "g1"), extra=True)
    return root, out, ext["data"], table


def by_hand(run_dir, fold, values, present) -> float:
    payload = torch.load(run_dir / f"fold_{fold}" / "model.pt", weights_only=True)
    model = create(
        payload["model"], in_dim=payload["in_dim"], n_out=payload["n_out"], **payload["hparams"]
    )
    model.load_state_dict(payload["state_dict"])
    model.eval()
    sc = payload["standardize"]["tabular"]
    v = (torch.tensor(values, dtype=torch.float32) - sc["center"]) / sc["scale"]
    v = torch.nan_to_num(v) * float(present)
    bag = Bag(
        "b",
        torch.zeros(3, payload["in_dim"]),
        tabular=v,
        tabular_mask=torch.tensor([float(present)]),
    )
    with torch.no_grad():
        return float(torch.softmax(model(collate_bags([bag])).logits.double(), 1)[0, 1])


def test_external_tables_are_matched_by_column_name_and_scaled_by_each_fold(run, tmp_path):
    root, run_dir, data, table = run
    cfg = tmp_path / "ext.yaml"
    tab = [{"name": "omics", "csv": str(root / "ext_omics.csv"), "columns": ["g2", "g1", "unused"]}]
    cfg.write_text(yaml.safe_dump({"data": {**data, "tabular": tab}}))
    evaluate(run_dir, cfg, tmp_path / "eval", n_boot=10)
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv", dtype={"patient_id": str})
    assert set(pred["modalities"]) == {"slides", "slides+omics"}
    for r in pred.head(8).itertuples():
        present = r.patient_id in table.index
        values = table.loc[r.patient_id, ["g1", "g2"]].to_numpy(float) if present else np.zeros(2)
        hand = np.mean([by_hand(run_dir, k, values, present) for k in range(3)])
        assert r.prob_positive == pytest.approx(hand, abs=1e-5)


def test_an_external_cohort_without_tables_is_warned_and_a_missing_column_refused(run, tmp_path):
    root, run_dir, data, _ = run
    cfg = tmp_path / "none.yaml"
    cfg.write_text(yaml.safe_dump({"data": data}))
    with pytest.warns(
        MilWarning, match="lists no data.tabular; every patient is treated as missing"
    ):
        evaluate(run_dir, cfg, tmp_path / "none", n_boot=10)
    pred = pd.read_csv(tmp_path / "none" / "predictions.csv")
    assert pred["prob_positive"].round(6).nunique() == 1  # snn: nothing to tell patients apart
    bad = tmp_path / "bad.yaml"
    tab = [{"name": "omics", "csv": str(root / "ext_omics.csv"), "columns": ["g2", "unused"]}]
    bad.write_text(yaml.safe_dump({"data": {**data, "tabular": tab}}))
    with pytest.raises(DataError, match="table 'omics' has no column 'g1'"):
        evaluate(run_dir, bad, tmp_path / "bad", n_boot=10)
    assert not (tmp_path / "bad").exists()

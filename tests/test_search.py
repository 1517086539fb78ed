"""Nested hyper-parameter selection (``search:``): per outer fold the point with the lowest
validation loss, checked against each point's history.csv; test labels cannot move it; bad keys
are named; a finished search resumes without writing."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import yaml

from mil.config import config_from_dict, dump_config, load_config, point_config, search_grid
from mil.errors import ConfigError
from mil.results.checkpoint import read_checkpoint
from mil.results.search import search_section
from mil.run import Run
from mil.train.search import grid_points, run_search
from tests.conftest import small_config

GRID = {"train.lr": [1.0e-3, 1.0e-2], "model.hidden_dim": [8, 16]}
BEST_FROM = 1


def quiet(*a):
    pass


def search_raw(root, csv=None, splits_dir=None) -> dict:
    """The small cohort's config with the search grid; the split files are the run's own
    (made once in OUT/splits) unless ``splits_dir`` names fixed ones."""
    # early stopping on (patience), so the kept weights are those of the lowest validation loss
    # from epoch BEST_FROM on; 3 epochs never trigger the stop
    raw = small_config(root, patience=5, best_from_epoch=BEST_FROM)
    raw["splits"]["dir"] = None if splits_dir is None else str(splits_dir)
    if csv is not None:
        raw["data"]["csv"] = str(csv)
    return {**raw, "search": GRID}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    cfg = config_from_dict(search_raw(root), source="search.yaml")
    out = run_search(cfg, root / "out", progress=False, log=quiet, n_boot=20)
    return root, cfg, out


def reference_losses(out, fold: str) -> dict[str, float]:
    """Each point's lowest history.csv val_loss from epoch BEST_FROM on, read here by hand."""
    losses = {}
    for d in sorted((out / "search").iterdir()):
        h = pd.read_csv(d / f"fold_{fold}" / "history.csv")
        losses[d.name] = float(h.loc[h["epoch"] >= BEST_FROM, "val_loss"].min())
    return losses


def test_grid_is_the_cartesian_product_in_a_fixed_order(tmp_path):
    cfg = config_from_dict(search_raw(tmp_path))
    points = grid_points(cfg)
    assert [p.values for p in points] == [
        {"train.lr": 1e-3, "model.hidden_dim": 8},
        {"train.lr": 1e-3, "model.hidden_dim": 16},
        {"train.lr": 1e-2, "model.hidden_dim": 8},
        {"train.lr": 1e-2, "model.hidden_dim": 16},
    ]
    assert points[2].label == "p2-lr=0.01-hidden_dim=8"
    assert points[2].cfg.train.lr == 1e-2 and points[2].cfg.model["hidden_dim"] == 8
    assert not points[2].cfg.search and "search" not in dump_config(points[2].cfg)


def test_each_fold_selects_the_lowest_validation_loss_and_reports_its_test_fold(searched):
    root, cfg, out = searched
    table = pd.read_csv(out / "search.csv", dtype={"fold": str})
    assert list(table.columns) == [
        "fold",
        "point",
        "train.lr",
        "model.hidden_dim",
        "val_loss",
        "selected",
    ]
    chosen = []
    for k in ("0", "1", "2"):
        ref = reference_losses(out, k)
        rows = table[table["fold"] == k].set_index("point")
        assert np.allclose(rows.loc[list(ref), "val_loss"], list(ref.values()), rtol=0, atol=1e-6)
        best = min(ref, key=ref.get)
        assert rows.index[rows["selected"]].tolist() == [best]
        chosen.append(best)
        # the run's fold is the selected point's fold, file for file
        for name in ("predictions.csv", "metrics.json", "history.csv"):
            assert (out / f"fold_{k}" / name).read_bytes() == (
                out / "search" / best / f"fold_{k}" / name
            ).read_bytes()
        # model.pt rebuilds the selected point's model, whatever the config's model: says
        ckpt = read_checkpoint(out / f"fold_{k}" / "model.pt")
        assert ckpt["hparams"]["hidden_dim"] == int(rows.loc[best, "model.hidden_dim"])
    # every point ran on the run's split files, made once in OUT/splits
    for d in (out / "search").iterdir():
        for k in range(3):
            name = f"splits_{k}.csv"
            assert (d / "splits" / name).read_bytes() == (out / "splits" / name).read_bytes()
    # the run is summarised from the selected folds' test metrics only
    summary = Run(out).folder.summary()
    assert summary["folds"] == ["0", "1", "2"]
    aucs = [
        pd.read_json(out / "search" / b / f"fold_{k}" / "metrics.json", typ="series")["metrics"][
            "auc"
        ]
        for k, b in enumerate(chosen)
    ]
    assert np.allclose(summary["metrics"]["auc"]["folds"], aucs)


def test_the_search_run_works_as_any_run(searched):
    _, _, out = searched
    run = Run(out)
    for k in ("0", "1"):
        saved = run.predictions(k)
        again = run.predict(saved["bag_id"].tolist(), folds=[k], per_fold=True)
        again = again.set_index("bag_id").loc[saved["bag_id"]]
        assert np.allclose(again["prob_positive"], saved["prob_positive"], atol=1e-5)
    from mil.compare import comparison_table

    row = comparison_table({"search": out}).iloc[0]
    assert row["folds"] == 3 and row["params"] > 0
    section = "\n".join(search_section(out))
    assert "## Hyper-parameter search" in section and "`train.lr`" in section
    selected = pd.read_csv(out / "search.csv", dtype={"fold": str}).query("selected")
    for r in selected.itertuples():
        assert f"| {r.fold} | `{r.point}` |" in section
    assert (out / "report.md").is_file()


def test_a_finished_search_writes_nothing_when_rerun(searched):
    _, cfg, out = searched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    messages = []
    run_search(cfg, out, progress=False, log=messages.append, n_boot=20)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert any("fold 2: done earlier" in m for m in messages)


def test_test_labels_cannot_move_the_selection(searched, tmp_path, capsys, monkeypatch):
    """Poison fold 0's test bags (flip their labels): fold 0's validation losses and selection
    stay, while its test AUCs flip, so a selection by test AUC would have moved."""
    root, _, clean = searched
    cohort = pd.read_csv(root / "cohort.csv")
    test0 = set(pd.read_csv(clean / "splits" / "splits_0.csv")["test"].dropna())
    flip = cohort["slide_id"].isin(test0)
    cohort.loc[flip, "label"] = cohort.loc[flip, "label"].map(
        {"positive": "negative", "negative": "positive"}
    )
    cohort.to_csv(tmp_path / "poisoned.csv", index=False)
    cfg_path = tmp_path / "poisoned.yaml"
    # the clean run's split files, fixed (new ones would be stratified by the poisoned labels)
    raw = search_raw(root, tmp_path / "poisoned.csv", splits_dir=clean / "splits")
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "out"
    # two jobs, as on a cluster: points 0 and 1 first (fold 0 not selected yet), then the rest
    from mil.cli import main
    from mil.train import search

    monkeypatch.setattr(search, "run_search", functools.partial(run_search, n_boot=20))

    args = ["train", str(cfg_path), "--out", str(out), "--folds", "0", "--quiet"]
    assert main([*args, "--points", "0,1"]) == 0
    assert "fold 0: not selected until every point has finished it; pending points 2,3" in (
        capsys.readouterr().out
    )
    assert not (out / "fold_0").exists() and not (out / "search.csv").exists()
    assert main(args) == 0
    poisoned = pd.read_csv(out / "search.csv", dtype={"fold": str})
    assert set(poisoned["fold"]) == {"0"}
    ref = pd.read_csv(clean / "search.csv", dtype={"fold": str}).query("fold == '0'")
    assert poisoned["point"].tolist() == ref["point"].tolist()
    assert np.allclose(poisoned["val_loss"], ref["val_loss"], rtol=0, atol=1e-7)
    assert poisoned["selected"].tolist() == ref["selected"].tolist()

    def test_aucs(run_dir):
        return np.array(
            [
                pd.read_json(run_dir / "search" / p / "fold_0" / "metrics.json", typ="series")[
                    "metrics"
                ]["auc"]
                for p in ref["point"]
            ]
        )

    clean_auc, poisoned_auc = test_aucs(clean), test_aucs(out)
    assert np.allclose(poisoned_auc, 1 - clean_auc)  # the poison reached the test fold
    assert clean_auc.argmax() != poisoned_auc.argmax()  # ... enough to move a test-AUC choice


@pytest.mark.parametrize(
    "search, key",
    [
        ({"task.loss": ["nll"]}, "task.loss"),
        ({"splits.folds": [3]}, "splits.folds"),
        ({"train.nope": [1]}, "train.nope"),
        ({"model.nope": [1]}, "model.nope"),
        ({"train.lr": []}, "train.lr"),
        ({"train.lr": 1e-3}, "train.lr"),
        ({"train.optimizer": ["adamw", "lion"]}, "train.optimizer"),
        ({"data.csv": ["other.csv"]}, "data.csv"),
        ({"data.standardize": [False, "pca"]}, "data.standardize"),
    ],
)
def test_bad_search_keys_name_the_key_and_the_file(tmp_path, search, key):
    raw = {**small_config(tmp_path), "search": search}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_the_preprocessing_can_be_searched(tmp_path):
    cfg = config_from_dict(
        {**small_config(tmp_path), "search": {"data.standardize": [False, True, "whiten"]}}
    )
    points = [point_config(cfg, p) for p in search_grid(cfg)]
    assert [p.data.standardize for p in points] == [False, True, "whiten"]
    assert all(p.data.csv == cfg.data.csv and not p.search for p in points)


def test_search_needs_a_validation_split_and_plain_configs_stay_as_they_were(tmp_path):
    raw = small_config(tmp_path)
    raw["splits"]["val_fraction"] = 0
    with pytest.raises(ConfigError, match="search needs a validation split"):
        config_from_dict({**raw, "search": {"train.lr": [1e-3]}})
    plain = config_from_dict(small_config(tmp_path))
    assert plain.search == {} and "search" not in yaml.safe_load(dump_config(plain))
    from mil.cli import main

    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(small_config(tmp_path)))
    assert main(["train", str(path), "--out", str(tmp_path / "o"), "--points", "0"]) == 2

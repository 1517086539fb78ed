"""The packed feature store (``mil cache``, ``data.store: packed``) and the spill of a fold's
preprocessed view: the same results as the in-RAM path, and never a stale read."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mil.cli import main
from mil.config import config_from_dict
from mil.data.readers import index_feature_dir, read_features
from mil.data.sources import load_cohort, pack_cohort
from mil.data.spill import SpillFile
from mil.data.store import MANIFEST, PackedFeatures, open_store
from mil.errors import DataError, MilWarning
from mil.train.runner import run_cv

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def with_data(raw: dict, **data) -> dict:
    return {
        **raw,
        "data": {**raw["data"], **data},
        "train": {**raw["train"], "faithfulness": False},
    }


def fold_outputs(raw: dict, run) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = run_cv(
        config_from_dict(raw), run, folds=[0], progress=False, log=lambda *a: None, n_boot=10
    )
    return pd.read_csv(out / "fold_0" / "predictions.csv"), pd.read_csv(
        out / "fold_0" / "history.csv"
    )


def test_packed_store_and_tiny_budget_train_as_in_ram(tmp_path, small_cohort):
    """A fold trained from the packed store with a budget that holds nothing (its whitened view
    spilled to disk), and one from the files with the same tiny budget (LRU misses, read
    ahead), predict exactly as the in-RAM run, with the same losses."""
    ram = fold_outputs(with_data(small_cohort), tmp_path / "ram")
    packed = fold_outputs(with_data(small_cohort, store="packed", cache_gb=1e-6), tmp_path / "p")
    files = fold_outputs(with_data(small_cohort, cache_gb=1e-6), tmp_path / "f")
    for pred, hist in (packed, files):
        pd.testing.assert_frame_equal(pred, ram[0])
        assert hist["train_loss"].tolist() == ram[1]["train_loss"].tolist()
        assert hist["val_loss"].tolist() == ram[1]["val_loss"].tolist()


def test_bags_are_slices_of_the_map_equal_to_the_files(tmp_path, small_cohort):
    """Every slide read from the store equals its file (features, coords, instance labels,
    attributes); the features are views into the one memory-mapped file."""
    cfg = config_from_dict(with_data(small_cohort, store="packed"))
    cohort, store = load_cohort(cfg)
    packed = store.packed
    assert isinstance(packed.features, np.memmap)
    assert packed.manifest["rows"] == sum(
        len(read_features(store.index[s]).features) for s in cohort.slides["slide_id"]
    )
    for slide in cohort.slides["slide_id"]:
        sf, mine = read_features(store.index[slide]), packed.get(slide)
        assert np.array_equal(mine.features, sf.features) and mine.features.dtype == np.float16
        assert np.shares_memory(mine.features, packed.features)
        assert np.array_equal(mine.coords, sf.coords)
        assert np.array_equal(mine.instance_label, sf.instance_label)
        assert mine.attrs == sf.attrs
        x, coords, _ = store.get(slide)
        assert torch.equal(x, torch.from_numpy(sf.features).float())


def test_a_touched_or_changed_source_is_never_read_stale(tmp_path, small_cohort):
    """Touching a source file makes the store stale: `mil cache --check` and a non-rebuilding
    open refuse it naming the slide; a run rebuilds it (with a warning) and then reads the
    file's new content."""
    raw = with_data(small_cohort, store="packed")
    cfg = config_from_dict(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["cache", str(path), "--quiet"]) == 0
    assert main(["cache", str(path), "--check", "--quiet"]) == 0
    index, _ = index_feature_dir(cfg.data.features)
    slide = sorted(index)[3]
    build = json.loads((tmp_path / "features" / ".mil_store" / MANIFEST).read_text())["build"]
    with h5py.File(index[slide], "a") as f:  # new content, same shape and size
        f["features"][0] = np.float16(7.0)
    st = index[slide].stat()
    os.utime(index[slide], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert main(["cache", str(path), "--check", "--quiet"]) == 2
    with pytest.raises(DataError, match=f"slide {slide}: .* changed"):
        pack_cohort(cfg, rebuild=False, progress=False)
    with pytest.warns(MilWarning, match="rebuilt"):
        _, store = load_cohort(cfg)
    assert store.packed.manifest["build"] != build
    assert float(store.get(slide)[0][0, 0]) == 7.0
    # the old build's files are gone; only the current one is left
    names = sorted(p.name for p in store.packed.root.iterdir())
    assert all(build not in n for n in names) and MANIFEST in names


def test_an_added_slide_or_another_encoder_is_refused(tmp_path, small_cohort):
    cfg = config_from_dict(with_data(small_cohort))
    _, store = load_cohort(cfg)
    root = tmp_path / "store"
    ids = sorted(store.index)[:5]
    open_store(root, store.index, ids, store.read, progress=False)
    with pytest.raises(DataError, match=f"slide {sorted(store.index)[5]}: not in the store"):
        open_store(root, store.index, sorted(store.index)[:6], store.read, rebuild=False)
    store.dim = 999  # features of another width expected: refused, not mixed
    with pytest.raises(DataError, match="dimension 16, expected 999"):
        store.attach(PackedFeatures.open(root))


def test_a_damaged_store_is_rebuilt_not_read(tmp_path, small_cohort):
    """A features file cut short (a disk filled mid-copy, say) is named as damaged, and a
    rebuilding open packs the files again."""
    _, store = load_cohort(config_from_dict(with_data(small_cohort)))
    root, ids = tmp_path / "store", sorted(store.index)
    packed, done = open_store(root, store.index, ids, store.read, progress=False)
    assert done == "built"
    data = root / f"features-{packed.manifest['build']}.bin"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(DataError, match="damaged"):
        open_store(root, store.index, ids, store.read, rebuild=False)
    packed, done = open_store(root, store.index, ids, store.read, progress=False)
    assert done.startswith("rebuilt") and "damaged" in done
    for s in ids[:3]:
        assert np.array_equal(packed.get(s).features, read_features(store.index[s]).features)


def test_float32_beyond_float16_range_is_refused(tmp_path):
    feats = tmp_path / "f"
    feats.mkdir()
    np.save(feats / "a.npy", np.full((3, 4), 1e6, dtype=np.float32))
    index, _ = index_feature_dir(feats)
    with pytest.raises(DataError, match="a: .* beyond float16's range"):
        open_store(tmp_path / "s", index, ["a"], lambda s: read_features(index[s]), progress=False)


def test_spill_file_maps_back_what_was_written():
    spill = SpillFile()
    a, b, c = torch.randn(5, 3), torch.randn(1, 7, dtype=torch.float64), torch.randn(2, 2)
    spill.put("a", a)
    spill.put("b", b)
    assert torch.equal(spill.get("a"), a) and torch.equal(spill.get("b"), b)
    spill.put("c", c)  # written after the file was mapped: mapped again, the rest unchanged
    assert torch.equal(spill.get("c"), c) and torch.equal(spill.get("a"), a)
    assert spill.nbytes == 15 * 4 + 7 * 8 + 4 * 4 and "b" in spill and len(spill) == 3


def test_throughput_e2e_smoke(tmp_path, capsys):
    """benchmarks/throughput_e2e.py --smoke: each setting's rate is the median of its run's
    history.csv after the first epoch; the runs in RAM, at 3x the budget from the files and
    from the packed store predict alike; the read rate counts every instance of the cohort."""
    import importlib
    import statistics
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        mod = importlib.import_module("throughput_e2e")
    finally:
        sys.path.remove(str(bench))
    frame = mod.main(["--smoke", "--out", str(tmp_path)])
    assert list(frame["setting"]) == [label for label, _ in mod.SETTINGS]
    runs = sorted((tmp_path / "runs").iterdir())
    preds = []
    for run in runs:
        rates = pd.read_csv(run / "fold_0" / "history.csv")["instances_per_s"].tolist()
        label = next(
            lab
            for lab in frame["setting"]
            if run.name.endswith(lab.replace(" ", "_").replace(",", ""))
        )
        row = frame[frame["setting"] == label].iloc[0]
        assert row["mil_inst_per_s"] == pytest.approx(statistics.median(rates[1:]))
        preds.append(pd.read_csv(run / "fold_0" / "predictions.csv"))
    for p in preds[1:]:
        pd.testing.assert_frame_equal(p, preds[0])
    assert frame.loc[frame["setting"] == "in RAM", "vs_ram"].tolist() == [1.0]
    cohort = sum(len(read_features(p).features) for p in (tmp_path / "features").glob("*.h5"))
    assert f"raw reads of {cohort:,} instances" in capsys.readouterr().out


def test_device_resident_view_trains_as_the_host_path(tmp_path, small_cohort):
    """A fold's view held "on the device" (here the CPU, through the same code: bags resident
    as one tensor each, batches packed where they live, nothing read again) trains bit for bit
    as the host path in float32, and within float16 rounding in float16."""
    from mil.train.experiment import Experiment
    from mil.train.loop import fit

    cfg = config_from_dict(with_data(small_cohort))
    exp = Experiment(cfg, tmp_path / "run", progress=False)
    exp.store.preload(exp.cohort.slides["slide_id"].tolist(), progress=False)
    task = exp.task()
    train, val = (exp.fold_bags(exp.splits[0], p) for p in ("train", "val"))
    ids = [*train["bag_id"], *val["bag_id"]]
    out = {}
    for kind in ("host", torch.float32, torch.float16):
        torch.manual_seed(0)
        model, _, view = exp.fold_setup(task, train["bag_id"].tolist())
        if kind != "host":
            view = view.resident(ids, torch.device("cpu"), kind)
            assert view[ids[0]].x.dtype == kind and view.read_ahead == 0
        out[kind] = fit(
            model, task, view, train, val, cfg.train, torch.device("cpu"), progress=False
        )
    host, exact, half = out["host"], out[torch.float32], out[torch.float16]
    assert host[0]["train_loss"].tolist() == exact[0]["train_loss"].tolist()
    assert all(torch.equal(host[1][k], exact[1][k]) for k in host[1])
    np.testing.assert_allclose(half[0]["val_loss"], host[0]["val_loss"], rtol=1e-2)
    assert not all(torch.equal(host[1][k], half[1][k]) for k in host[1])  # really float16


def test_throughput_e2e_precision_table_smoke(capsys):
    """--precision-table --smoke: one row per model and bag size, bf16's ratio its two rates'."""
    import importlib
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        mod = importlib.import_module("throughput_e2e")
    finally:
        sys.path.remove(str(bench))
    table = mod.main(["--precision-table", "--smoke"])
    assert len(table) == 2 * len(mod.BAG_SIZES)
    assert set(table["model"]) == {"abmil_additive", "abmil"}
    np.testing.assert_allclose(table["bf16_vs_fp32"], table["bf16"] / table["fp32"])
    assert (table[["fp32", "bf16"]] > 0).all().all()

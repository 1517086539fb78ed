"""Feature provenance (encoder, magnification, tile size, dtype) read from TRIDENT, STAMP and
our attributes; ``mil check`` naming a mix and collapsed features; ``mil evaluate`` warning
when an external cohort was made differently from the run's training cohort."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from scipy.stats import f_oneway

from mil.check import check_cohort
from mil.cli import main
from mil.config import config_from_dict
from mil.data.collapse import FeatureSpread
from mil.data.provenance import Provenance, provenance_differences, read_provenance
from mil.data.readers import read_features
from mil.data.synthetic import write_synthetic_cohort
from mil.errors import DataError, MilWarning
from mil.evaluate import evaluate
from mil.train.runner import run_cv

pytestmark = pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")


def cohort(root: Path, name: str = "cohort", seed: int = 0) -> dict:
    """A small synthetic classification cohort (20 patients, 20-40 tiles of 16 dims)."""
    csv, feats = root / f"{name}.csv", root / f"{name}_features"
    write_synthetic_cohort(
        "classification",
        csv,
        feats,
        seed=seed,
        n_patients=20,
        n_two_slides=0,
        dim=16,
        min_tiles=20,
        max_tiles=40,
        shift_norm=6.0,
    )
    return {
        "name": name,
        "task": {"type": "classification"},
        "data": {"csv": str(csv), "features": str(feats), "patient_col": "case_id"},
        "splits": {"dir": str(root / f"splits_{name}"), "folds": 3, "val_fraction": 0.2},
        "model": {"name": "abmil", "hidden_dim": 8},
        "train": {"epochs": 2, "batch_size": 8, "patience": None, "seed": 0},
    }


def files(raw: dict) -> list[Path]:
    return sorted(Path(raw["data"]["features"]).glob("*.h5"))


def set_attr(paths, key, value) -> None:
    for path in paths:
        with h5py.File(path, "r+") as f:
            f.attrs[key] = value


def rewrite_features(paths, make) -> None:
    """Replace each file's features by ``make(i, features)`` (stored as float16)."""
    for i, path in enumerate(paths):
        with h5py.File(path, "r+") as f:
            x = make(i, f["features"][()].astype(np.float32))
            del f["features"]
            f.create_dataset("features", data=x.astype(np.float16))


def warnings_of(raw: dict) -> list:
    problems, _ = check_cohort(config_from_dict(raw))
    assert not [p for p in problems if p.severity == "error"]
    return [p for p in problems if p.severity == "warning"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("provenance")


@pytest.fixture(scope="module")
def train(root):
    return cohort(root, "train", seed=0)


# ---- attributes -----------------------------------------------------------------------------


def write_h5(path: Path, dataset="features", root_attrs=None, coord_attrs=None, dtype=np.float16):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(dataset, data=np.random.default_rng(0).normal(size=(5, 12)).astype(dtype))
        c = f.create_dataset("coords", data=np.zeros((5, 2), dtype=np.float32))
        for k, v in (coord_attrs or {}).items():
            c.attrs[k] = v
        for k, v in (root_attrs or {}).items():
            f.attrs[k] = v
    return path


def both_ways(path: Path) -> dict:
    """The provenance from the attributes alone, checked equal to that of the file read."""
    fields = read_provenance(path).fields
    assert Provenance.of_features(path, read_features(path)).fields == fields
    assert read_provenance(path).dim == 12
    return fields


def test_trident_attributes(tmp_path):
    # TRIDENT: no encoder attribute (the folder says it), geometry on coords; `name` is the slide
    path = write_h5(
        tmp_path / "job/20x_256px_0px_overlap/features_uni_v1/s1.h5",
        coord_attrs={
            "patch_size": 256,
            "patch_size_level0": 512,
            "level0_magnification": 40,
            "target_magnification": 20,
            "overlap": 0,
            "name": "s1",
        },
    )
    assert both_ways(path) == {
        "encoder": "uni_v1",
        "magnification": "20",
        "tile size (px)": "256",
        "dtype": "float16",
    }


def test_stamp_attributes(tmp_path):
    path = write_h5(
        tmp_path / "stamp/s1.h5",
        dataset="feats",
        root_attrs={
            "extractor": "ctranspath",
            "unit": "um",
            "tile_size_um": 256.0,
            "tile_size_px": 224,
            "stamp_version": "2.2.0",
            "feat_type": "tile",
        },
    )
    assert both_ways(path) == {
        "encoder": "ctranspath",
        "mpp": "1.1",
        "tile size (px)": "224",
        "tile size (µm)": "256",
        "dtype": "float16",
    }  # 256 µm / 224 px = 1.14 µm per pixel
    old = write_h5(tmp_path / "stamp/old.h5", dataset="feats", root_attrs={"tile_size": 256.0})
    assert both_ways(old) == {"tile size (µm)": "256", "dtype": "float16"}  # before STAMP 2.1


def test_our_attributes_and_missing_ones(tmp_path):
    ours = write_h5(
        tmp_path / "ours/s1.h5",
        dtype=np.float32,
        root_attrs={
            "encoder": b"uni",
            "magnification": 40.0,
            "patch_size_level0": 512,
            "mpp": 0.2513,
        },
    )
    assert both_ways(ours) == {
        "encoder": "uni",
        "magnification": "40",
        "mpp": "0.25",
        "tile size (px at level 0)": "512",
        "dtype": "float32",
    }
    clam = write_h5(tmp_path / "clam/h5_files/s1.h5", dtype=np.float32)
    assert both_ways(clam) == {"dtype": "float32"}  # nothing recorded: unknown, not an error
    assert read_provenance(tmp_path / "nowhere.h5").fields == {}


def test_differences_compare_only_known_values_of_one_unit():
    def prov(name, **fields):
        return Provenance(Path(name), {k.replace("_", " "): v for k, v in fields.items()})

    train = [prov("a.h5", magnification="20", encoder="uni"), prov("b.h5", magnification="40")]
    assert provenance_differences(train, [prov("x.h5", magnification="40"), prov("y.h5")]) == []
    (msg,) = provenance_differences(train, [prov("x.h5", encoder="conch")])
    assert "encoder" in msg and "conch in 1 file (e.g. x.h5)" in msg
    assert "uni in 1 file (e.g. a.h5), not recorded in 1" in msg


# ---- mil check ------------------------------------------------------------------------------


def test_check_names_a_magnification_mix_and_a_normal_cohort_is_quiet(train, tmp_path, capsys):
    assert warnings_of(train) == []  # one provenance, healthy features
    raw = cohort(tmp_path)
    paths = files(raw)
    set_attr(paths[3:7], "magnification", 40)
    (w,) = warnings_of(raw)
    assert w.where == "magnification"
    assert f"20 in {len(paths) - 4} files (e.g. {paths[0].name})" in w.what
    assert f"40 in 4 files (e.g. {paths[3].name})" in w.what
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["check", str(config)]) == 0
    out = capsys.readouterr().out
    assert "mixed magnification" in out and f"40 in 4 files (e.g. {paths[3].name})" in out


def test_check_names_mixed_encoders_and_dtypes(tmp_path):
    raw = cohort(tmp_path)
    paths = files(raw)
    set_attr(paths[:2], "encoder", "conch_v15")
    rewrite_features(paths[:1], lambda i, x: x)
    with h5py.File(paths[0], "r+") as f:  # stored as float32
        x = f["features"][()]
        del f["features"]
        f.create_dataset("features", data=x.astype(np.float32))
    found = {w.where: w.what for w in warnings_of(raw)}
    assert set(found) == {"encoder", "dtype"}
    assert f"conch_v15 in 2 files (e.g. {paths[0].name})" in found["encoder"]
    assert f"float32 in 1 file (e.g. {paths[0].name})" in found["dtype"]


def test_check_reports_features_that_are_one_vector(tmp_path):
    raw = cohort(tmp_path)
    v = np.random.default_rng(1).normal(size=16)
    rng = np.random.default_rng(2)
    rewrite_features(files(raw), lambda i, x: v + 1e-4 * rng.normal(size=x.shape))
    (w,) = warnings_of(raw)
    assert w.where == "features" and "collapsed features" in w.what and "blank" in w.what


def test_check_reports_slides_no_more_different_than_their_tiles(tmp_path):
    """Tiles shuffled between files: every bag a sample of one pool (F ≈ 1)."""
    raw = cohort(tmp_path)
    paths = files(raw)
    bags = [read_features(p).features.astype(np.float32) for p in paths]
    pool = np.concatenate(bags)
    np.random.default_rng(0).shuffle(pool)
    parts = np.split(pool, np.cumsum([len(b) for b in bags])[:-1])
    rewrite_features(paths, lambda i, x: parts[i])
    (w,) = warnings_of(raw)
    assert "collapsed features" in w.what and "shuffled" in w.what


def test_check_names_copied_files(tmp_path):
    raw = cohort(tmp_path)
    paths = files(raw)
    for p in paths[1:]:
        shutil.copyfile(paths[0], p)
    (w,) = warnings_of(raw)  # one distinct bag is left: nothing else to measure
    assert f"{len(paths)} feature files hold features identical" in w.what
    assert f"{paths[0].name} = {paths[1].name}" in w.what


def test_collapse_statistics_against_numpy_and_scipy():
    """With one dimension and equal bag sizes, F is the one-way ANOVA F (scipy); the spread
    is the RMS distance of tiles from the mean of bag means over their RMS length."""
    rng = np.random.default_rng(0)
    bags = [rng.normal(loc, 1.0, size=(30, 1)) for loc in rng.normal(0, 0.5, 8)]
    spread = FeatureSpread()
    for i, b in enumerate(bags):
        spread.add(f"b{i}.h5", b)
    stats = spread.statistics()
    assert stats["f"] == pytest.approx(f_oneway(*[b[:, 0] for b in bags]).statistic, rel=1e-9)
    centre = np.mean([b.mean(0) for b in bags], 0)
    between = np.mean([((b.mean(0) - centre) ** 2).sum() for b in bags])
    within = np.mean([b.var(0, ddof=1).sum() for b in bags])
    length2 = np.mean([(b**2).sum(1).mean() for b in bags])
    assert stats["spread"] == pytest.approx(np.sqrt((between + within) / length2), rel=1e-9)


# ---- mil evaluate ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(root, train):
    return run_cv(
        config_from_dict(train), root / "run", progress=False, log=lambda *a: None, n_boot=10
    )


def test_evaluate_warns_when_the_external_cohort_has_another_magnification(root, run):
    external = cohort(root, "external", seed=5)
    set_attr(files(external), "magnification", 40)
    config = root / "external.yaml"
    config.write_text(yaml.safe_dump({"data": external["data"]}))
    out = root / "eval"
    with pytest.warns(MilWarning, match="differs from the run's training cohort in magnif") as got:
        code = main(
            ["evaluate", str(run), str(config), "--out", str(out), "--n-boot", "10", "--quiet"]
        )
    assert code == 0  # warned, not refused
    (msg,) = [str(w.message) for w in got if "provenance" in str(w.message)]
    train_files, ext_files = sorted((root / "train_features").glob("*.h5")), files(external)
    assert f"external cohort has 40 in {len(ext_files)} files (e.g. {ext_files[0].name})" in msg
    assert f"has 20 in {len(train_files)} files (e.g. {train_files[0].name})" in msg
    provenance = json.loads((out / "summary.json").read_text())["provenance"]
    assert provenance["run"]["magnification"] == {"20": 20}
    assert provenance["cohort"]["magnification"] == {"40": 20}
    assert provenance["cohort"]["encoder"] == {"synthetic": 20}


def test_evaluate_is_quiet_on_a_cohort_made_as_the_training_one(root, run, recwarn):
    external = cohort(root, "same", seed=6)
    config = root / "same.yaml"
    config.write_text(yaml.safe_dump({"data": external["data"]}))
    evaluate(run, config, root / "eval_same", n_boot=10)
    assert not [
        w for w in recwarn if issubclass(w.category, MilWarning) and "provenance" in str(w.message)
    ]


def test_evaluate_refuses_another_encoder_unless_told(root, run):
    external = cohort(root, "conch", seed=7)
    set_attr(files(external), "encoder", "conch_v15")
    config = root / "conch.yaml"
    config.write_text(yaml.safe_dump({"data": external["data"]}))
    out = root / "eval_conch"
    with pytest.raises(
        DataError, match=r"made by encoder conch_v15, the run's training features by synthetic"
    ):
        evaluate(run, config, out, n_boot=10)
    assert not out.exists()  # refused before anything was written
    with pytest.warns(MilWarning, match="differs from the run's training cohort in encoder"):
        evaluate(run, config, out, n_boot=10, any_encoder=True)
    assert (out / "summary.json").is_file()

"""Every supported feature layout reads to the same arrays."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mil.data.readers import index_feature_dir, read_features
from mil.errors import DataError

RNG = np.random.default_rng(0)
# float16-representable values, so float16 and float32 layouts compare exactly
FEATS = RNG.normal(size=(37, 12)).astype(np.float16).astype(np.float32)
COORDS = (RNG.integers(0, 50, size=(37, 2)) * 256).astype(np.int32)


def write_h5(
    path: Path, dataset="features", feats=FEATS, coords=COORDS, root_attrs=None, coord_attrs=None
):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(dataset, data=feats)
        if coords is not None:
            d = f.create_dataset("coords", data=coords)
            for k, v in (coord_attrs or {}).items():
                d.attrs[k] = v
        for k, v in (root_attrs or {}).items():
            f.attrs[k] = v


def test_all_layouts_read_to_same_arrays(tmp_path):
    # CLAM: h5_files (features + int coords, no attrs) and pt_files (tensor only)
    write_h5(tmp_path / "clam/h5_files/s1.h5")
    (tmp_path / "clam/pt_files").mkdir(parents=True)
    torch.save(torch.from_numpy(FEATS), tmp_path / "clam/pt_files/s1.pt")
    # TRIDENT: features_<encoder>/, float16 features, coords attrs
    write_h5(
        tmp_path / "trident/features_uni_v1/s1.h5",
        feats=FEATS.astype(np.float16),
        coord_attrs={
            "patch_size": 256,
            "patch_size_level0": 512,
            "level0_magnification": 40,
            "target_magnification": 20,
        },
    )
    # STAMP: feats float16 + coords in micrometres
    mpp = 0.5
    write_h5(
        tmp_path / "stamp/s1.h5",
        dataset="feats",
        feats=FEATS.astype(np.float16),
        coords=(COORDS * mpp).astype(np.float32),
        root_attrs={"unit": "um", "tile_size_um": 256 * mpp, "tile_size_px": 224},
    )
    # ours
    write_h5(tmp_path / "ours/s1.h5", root_attrs={"patch_size_level0": 256, "encoder": "x"})
    # .pt dict and .npy
    (tmp_path / "ptdict").mkdir()
    torch.save(
        {"features": torch.from_numpy(FEATS), "coords": torch.from_numpy(COORDS)},
        tmp_path / "ptdict/s1.pt",
    )
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy/s1.npy", FEATS)

    results = {}
    for name in ("clam", "trident", "stamp", "ours", "ptdict", "npy"):
        index, _ = index_feature_dir(tmp_path / name)
        assert list(index) == ["s1"], name
        results[name] = read_features(index["s1"])
    for name, sf in results.items():
        np.testing.assert_array_equal(sf.features.astype(np.float32), FEATS, err_msg=name)
    # CLAM's h5 wins over its pt (it has coordinates)
    assert results["clam"].layout == "h5"
    np.testing.assert_array_equal(results["clam"].coords, COORDS)
    np.testing.assert_array_equal(results["trident"].coords, COORDS)
    assert results["trident"].attrs["tile_size"] == 512
    assert results["ours"].attrs["tile_size"] == 256
    np.testing.assert_allclose(results["stamp"].coords / mpp, COORDS)
    assert results["stamp"].attrs["tile_size"] == pytest.approx(128.0)
    assert results["stamp"].layout == "stamp"
    np.testing.assert_array_equal(results["ptdict"].coords, COORDS)
    assert results["npy"].coords is None and results["clam"].features.dtype == np.float32
    assert results["trident"].features.dtype == np.float16  # kept; the cache decides


def test_clam_pt_only(tmp_path):
    (tmp_path / "pt_files").mkdir()
    torch.save(torch.from_numpy(FEATS), tmp_path / "pt_files/a.pt")
    index, desc = index_feature_dir(tmp_path)
    assert "CLAM" in desc and index["a"].suffix == ".pt"


def test_trident_several_encoders_is_an_error(tmp_path):
    write_h5(tmp_path / "features_a/s.h5")
    write_h5(tmp_path / "features_b/s.h5")
    with pytest.raises(DataError, match="several TRIDENT encoders"):
        index_feature_dir(tmp_path)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(b"not an h5 file at all"), "cannot read"),
        (lambda p: write_h5(p, feats=np.full((4, 3), np.nan, np.float32), coords=None), "NaN"),
        (lambda p: write_h5(p, feats=np.zeros((0, 3), np.float32), coords=None), "empty bag"),
        (lambda p: write_h5(p, dataset="other"), "no 'features'"),
        (
            lambda p: write_h5(p, feats=np.zeros((4, 3), np.float32), coords=np.zeros((5, 2))),
            "coords",
        ),
    ],
)
def test_bad_files_name_the_file(tmp_path, make, match):
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(DataError, match=match) as exc:
        read_features(path)
    assert str(path) in str(exc.value)


def test_pt_is_loaded_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"features": Evil()}, path)
    with pytest.raises(DataError, match="cannot read"):
        read_features(path)

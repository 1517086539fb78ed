"""The synthetic cohort's witness region: its size follows ``witness_fraction``."""

import numpy as np
import pandas as pd
import pytest

from mil.data.readers import read_features
from mil.data.synthetic import SMALL_LESION_WITNESS_FRACTION, write_synthetic_cohort


@pytest.mark.parametrize("fraction", [SMALL_LESION_WITNESS_FRACTION, (0.30, 0.40)])
def test_witness_region_size_and_contiguity(tmp_path, fraction):
    csv, feats = tmp_path / "cohort.csv", tmp_path / "features"
    write_synthetic_cohort(
        "classification",
        csv,
        feats,
        n_patients=12,
        n_two_slides=0,
        dim=8,
        min_tiles=300,
        max_tiles=600,
        witness_fraction=fraction,
    )
    df = pd.read_csv(csv)
    lo, hi = fraction
    for sid, label in zip(df["slide_id"], df["label"]):
        bag = read_features(feats / f"{sid}.h5")
        w = np.asarray(bag.instance_label).astype(bool)
        n = len(w)
        if label != "positive":
            assert not w.any(), sid
            continue
        # round(frac * n) witness tiles with frac drawn from [lo, hi]
        assert round(lo * n) <= w.sum() <= round(hi * n), (sid, w.sum(), n)
        # one clustered region: some tile is a centre that has every witness
        # at least as close as every other tile (brute force over all centres)
        xy = bag.coords.astype(float)
        dist = ((xy[:, None, :] - xy[None]) ** 2).sum(-1)
        assert (dist[:, w].max(1) <= dist[:, ~w].min(1)).any(), sid


def test_bad_witness_fraction_is_refused(tmp_path):
    for bad in [(0.2, 0.1), (0.0, 0.1), (0.5, 1.0)]:
        with pytest.raises(ValueError, match="witness_fraction"):
            write_synthetic_cohort(
                "classification", tmp_path / "c.csv", tmp_path / "f", witness_fraction=bad
            )
    assert not (tmp_path / "c.csv").exists()

"""`mil heatmap` over the real slide for every registered model's default score.

One fold of a tiny run per model (fusion models on the multimodal survival cohort, the rest
on a classification cohort; both on tests/data's slide). The drawing is checked pixel by
pixel against a hand computation from the saved scores: each tile's rectangle shows the
colour of its percentile (signed kinds: of |score|, sign kept, on ``RdBu_r``).
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from mil.cli import main
from mil.config import config_from_dict
from mil.explain.heatmap import signed_kind
from mil.models import available, get, hyperparameters
from mil.run import Run
from mil.train.runner import run_cv
from tests.slide_data import SLIDE_MPP, SLIDE_SIZE, TILE, slide_cohort

matplotlib.use("Agg")
VIS = ["--vis-mpp", str(4 * SLIDE_MPP), "--alpha", "1"]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    return {kind: slide_cohort(root / kind, kind) for kind in ("classification", "multimodal")}


def expected_colours(run: Run, slide: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, [N, 3] colour)`` of each tile by hand: its percentile within the slide (signed
    kinds: sign(s) x percentile of |s|), through viridis on [0, 1] or RdBu_r on [-1, 1]."""
    s = run.scores(slide)
    v = s["score"].to_numpy(np.float64)
    if signed_kind(s.attrs["kind"]):
        pct = [
            np.sign(a) * stats.percentileofscore(np.abs(v), abs(a), kind="rank") / 100 for a in v
        ]
        rgb = matplotlib.colormaps["RdBu_r"]((np.array(pct) + 1) / 2, bytes=True)
    else:
        pct = [stats.percentileofscore(v, a, kind="rank") / 100 for a in v]
        rgb = matplotlib.colormaps["viridis"](np.array(pct), bytes=True)
    return s["x"].to_numpy(), s["y"].to_numpy(), rgb[:, :3]


@pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")
@pytest.mark.parametrize("name", available())
def test_heatmap_of_every_model_over_the_slide(name, cohorts, tmp_path, capsys):
    model = get(name)
    raw = cohorts["multimodal" if model.uses_tabular else "classification"]
    raw = {**raw, "model": {"name": name}}
    if "hidden_dim" in hyperparameters(name):
        raw["model"]["hidden_dim"] = 8
    run_dir = run_cv(
        config_from_dict(raw),
        tmp_path / "run",
        folds=[0],
        progress=False,
        log=lambda *a: None,
        n_boot=10,
    )
    run = Run(run_dir)
    slide = run.predictions(fold=0)["bag_id"].iloc[0]
    argv = ["heatmap", str(run_dir), "--slide", slide, "--out", str(tmp_path / "png"), *VIS]
    code = main(argv)
    err = capsys.readouterr().err
    if not model.uses_instances:  # snn reads the tables alone: nothing to place on the slide
        assert code == 2 and "no instance scores" in err and slide in err
        return
    assert code == 0, err
    drawing = np.asarray(Image.open(tmp_path / "png" / f"{slide}_overlay.png").convert("RGB"))
    assert drawing.shape == (742, 555, 3)  # the slide at 4 x 0.499 µm/px
    sx, sy = 555 / SLIDE_SIZE[0], 742 / SLIDE_SIZE[1]
    xs, ys, colours = expected_colours(run, slide)
    for x, y, rgb in zip(xs, ys, colours):
        r0, r1 = round(y * sy), round((y + TILE) * sy)
        c0, c1 = round(x * sx), round((x + TILE) * sx)
        block = drawing[r0:r1, c0:c1].reshape(-1, 3)
        np.testing.assert_array_equal(block, np.broadcast_to(rgb, block.shape), err_msg=name)
    assert (tmp_path / "png" / f"{slide}.png").stat().st_size > 10_000

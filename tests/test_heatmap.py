"""Heatmap rendering and the `mil heatmap` / `mil topk` commands."""

from __future__ import annotations

import shutil
import warnings

import h5py
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import stats

from mil.cli import main
from mil.config import config_from_dict
from mil.errors import MilError, TrainingWarning
from mil.explain.heatmap import (
    infer_tile_size,
    normalize_scores,
    plot_heatmap,
    score_raster,
    tile_size_from_h5,
    top_k_tiles,
)
from mil.explain.slides import SlideWarning, open_slide
from mil.models.base import DEFAULT_SCORE_KIND
from mil.run import Run
from mil.train.runner import run_cv
from tests.conftest import small_config
from tests.slide_data import SLIDE, SLIDE_MPP, SLIDE_SIZE, TILE, slide_cohort, write_pyramid

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("heatmap")
    cfg = config_from_dict(small_config(root))
    return run_cv(cfg, root / "run", progress=False, log=lambda *a: None, n_boot=50)


def blob(rng: np.random.Generator, n: int, tile: int = 256) -> np.ndarray:
    """``n`` distinct tile corners on a ``tile`` grid with holes, shuffled."""
    side = int(np.ceil(np.sqrt(2 * n)))
    cells = rng.choice(side * side, n, replace=False)
    return np.stack([cells % side, cells // side], 1).astype(np.float64) * tile + 1000


def pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return img


def test_rank_normalisation_matches_percentileofscore():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=200), 1)  # with ties
    expected = np.array([stats.percentileofscore(s, v, kind="rank") / 100 for v in s])
    np.testing.assert_allclose(normalize_scores(s, "rank"), expected)
    mm = normalize_scores(s, "minmax")
    np.testing.assert_allclose(mm, (s - s.min()) / (s.max() - s.min()))
    np.testing.assert_array_equal(normalize_scores(s, "raw"), s)
    with pytest.raises(MilError, match="normalize"):
        normalize_scores(s, "zscore")


def test_rendering_is_independent_of_instance_order():
    rng = np.random.default_rng(1)
    coords = blob(rng, 300)
    scores = rng.normal(size=300)
    perm = rng.permutation(300)
    for normalize, smooth in (("rank", 0.0), ("minmax", 1.5), ("raw", 0.0)):
        a = score_raster(coords, scores, 256, normalize, smooth)
        b = score_raster(coords[perm], scores[perm], 256, normalize, smooth)
        np.testing.assert_array_equal(a.grid, b.grid)
        assert a.origin == b.origin and a.cell == b.cell
    pd.testing.assert_frame_equal(
        top_k_tiles(coords, scores, 10).drop(columns="index"),
        top_k_tiles(coords[perm], scores[perm], 10).drop(columns="index"),
    )
    img_a = pixels(plot_heatmap(coords, scores, 256, top_k=10, title="t"))
    img_b = pixels(plot_heatmap(coords[perm], scores[perm], 256, top_k=10, title="t"))
    np.testing.assert_array_equal(img_a, img_b)


def test_tile_size_read_from_h5_attributes_else_inferred(tmp_path, run_dir):
    rng = np.random.default_rng(2)
    coords = blob(rng, 50, tile=256)
    assert infer_tile_size(coords) == 256
    # micrometre coordinates with float jitter (STAMP): still the grid step
    um = coords / 256 * 112.0 + rng.normal(0, 1e-4, coords.shape)
    assert infer_tile_size(um) == pytest.approx(112.0, abs=1e-3)
    # overlapping 512-px tiles at a 256-px stride: only the attribute knows the tile size
    ours = tmp_path / "ours.h5"
    with h5py.File(ours, "w") as f:
        f.create_dataset("features", data=np.zeros((50, 4), np.float32))
        f.create_dataset("coords", data=coords.astype(np.int32))
        f.attrs["patch_size_level0"] = 512
    trident = tmp_path / "trident.h5"
    with h5py.File(trident, "w") as f:
        f.create_dataset("features", data=np.zeros((50, 4), np.float16))
        f.create_dataset("coords", data=coords.astype(np.int64)).attrs["patch_size_level0"] = 512
    bare = tmp_path / "clam.h5"
    with h5py.File(bare, "w") as f:
        f.create_dataset("features", data=np.zeros((50, 4), np.float32))
        f.create_dataset("coords", data=coords.astype(np.int32))
    assert tile_size_from_h5(ours) == 512
    assert tile_size_from_h5(trident) == 512
    assert tile_size_from_h5(bare) is None
    # the Run reads it from the run's feature files (the demo writes patch_size_level0 = 256)
    run = Run(run_dir)
    slide = run.predictions()["bag_id"].iloc[0]
    assert run.scores(slide).attrs["tile_size"] == 256
    r = score_raster(coords, np.arange(50.0), 512)
    assert r.cell == 512


def test_single_tile_and_all_equal_scores_render():
    one = score_raster(np.array([[512.0, 768.0]]), np.array([3.0]), None, "rank")
    assert one.grid.shape == (1, 1) and one.grid[0, 0] == 1.0
    pixels(plot_heatmap(np.array([[512.0, 768.0]]), np.array([3.0]), top_k=16))
    rng = np.random.default_rng(3)
    coords = blob(rng, 40)
    flat = np.full(40, 0.25)
    for normalize in ("rank", "minmax", "raw"):
        r = score_raster(coords, flat, 256, normalize, smooth=1.0)
        vals = r.grid[np.isfinite(r.grid)]
        assert len(vals) == 40 and np.allclose(vals, vals[0])
        pixels(plot_heatmap(coords, flat, 256, normalize=normalize, top_k=5))
    assert np.allclose(score_raster(coords, flat, 256, "rank").values, 41 / 80)


def test_raster_equals_saved_scores_after_normalisation(run_dir):
    run = Run(run_dir)
    with h5py.File(run_dir / "fold_1" / "attention.h5", "r") as f:
        name = sorted(f)[0]
        # the default heatmap score, read at the positive class
        coords = f[name]["coords"][()]
        saved = f[name][f"scores_{DEFAULT_SCORE_KIND}"][()][:, -1]
    df = run.scores(name)
    assert df.attrs["kind"] == f"{DEFAULT_SCORE_KIND}[positive]"
    assert df.attrs["fold"] == "1"
    raster = score_raster(df[["x", "y"]].to_numpy(), df["score"].to_numpy(), df.attrs["tile_size"])
    # cell of each tile by hand: 256-px tiles from the slide's top-left tile
    col = ((coords[:, 0] - coords[:, 0].min()) // 256).astype(int)
    row = ((coords[:, 1] - coords[:, 1].min()) // 256).astype(int)
    expected = np.array([stats.percentileofscore(saved, v, kind="rank") / 100 for v in saved])
    np.testing.assert_allclose(raster.grid[row, col], expected, rtol=1e-12)
    assert np.isfinite(raster.grid).sum() == len(saved)  # nothing else is painted
    mm = score_raster(coords, saved, 256, "minmax").grid[row, col]
    np.testing.assert_allclose(mm, (saved - saved.min()) / (saved.max() - saved.min()), rtol=1e-6)


def test_smoothing_stays_inside_tissue():
    rng = np.random.default_rng(4)
    coords = blob(rng, 200)
    r0 = score_raster(coords, rng.normal(size=200), 256, "rank")
    r1 = score_raster(coords, rng.normal(size=200), 256, "rank", smooth=2.0)
    np.testing.assert_array_equal(np.isfinite(r0.grid), np.isfinite(r1.grid))
    inside = r1.grid[np.isfinite(r1.grid)]
    assert inside.min() >= 0 and inside.max() <= 1 and inside.std() < r0.values.std()


def test_large_slide_grid_is_one_cell_per_tile():
    rng = np.random.default_rng(5)
    coords = blob(rng, 20_000)
    r = score_raster(coords, rng.normal(size=20_000), 256)
    assert r.grid.size < 3 * 20_000 and np.isfinite(r.grid).sum() == 20_000


def test_cli_heatmap_and_topk_write_files(run_dir, tmp_path, capsys):
    run = Run(run_dir)
    top = run.top_slides(2)
    pred = run.predictions()
    best = pred.sort_values("prob_positive", ascending=False)["bag_id"].iloc[0]
    assert top[0] == best  # slide-level bags: the top slide is the top bag
    assert main(["heatmap", str(run_dir), "--top-n", "2", "--out", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == sorted(
        f"{s}.png" for s in top
    )
    out = tmp_path / "top.csv"
    assert main(["topk", str(run_dir), "--slide", best, "--k", "5", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    saved = run.scores(best)
    expected = saved.sort_values("score", ascending=False).head(5)
    np.testing.assert_allclose(table["score"], expected["score"])
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), expected[["x", "y"]].to_numpy())
    assert table["rank"].tolist() == [1, 2, 3, 4, 5]


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    return err


def test_cli_heatmap_missing_attention_names_slide_and_fold(run_dir, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    slide = Run(broken).predictions(fold=2)["bag_id"].iloc[0]
    (broken / "fold_2" / "attention.h5").unlink()
    err = _error(capsys, ["heatmap", str(broken), "--slide", slide])
    assert slide in err and "fold 2" in err and "attention" in err


def test_cli_heatmap_model_without_scores_names_slide_and_fold(run_dir, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    slide = Run(broken).predictions(fold=0)["bag_id"].iloc[0]
    with h5py.File(broken / "fold_0" / "attention.h5", "a") as f:
        f.attrs["has_scores"] = False
        f.attrs["model"] = "transmil"
        for g in f.values():
            del g["scores"]
    err = _error(capsys, ["heatmap", str(broken), "--slide", slide])
    assert slide in err and "fold 0" in err and "no instance scores" in err
    err = _error(capsys, ["topk", str(broken), "--slide", slide])
    assert slide in err and "fold 0" in err


def test_cli_unknown_slide_is_named(run_dir, capsys):
    err = _error(capsys, ["heatmap", str(run_dir), "--slide", "no-such-slide"])
    assert "no-such-slide" in err


# ---- over the real slide (tests/data/CMU-1-Small-Region.svs) ------------------------------


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    """A classification run whose cohort CSV names the real slide for every slide."""
    root = tmp_path_factory.mktemp("slide_run")
    cfg = config_from_dict(slide_cohort(root, "classification"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        return run_cv(cfg, root / "run", progress=False, log=lambda *a: None, n_boot=20)


@pytest.fixture(scope="module")
def level0() -> np.ndarray:
    with tifffile.TiffFile(SLIDE) as tif:
        return tif.pages[0].asarray()


def block(y: float, x: float, sy: float, sx: float) -> tuple[slice, slice]:
    """A 128-px tile's rectangle in a drawing of ``sx``, ``sy`` drawn px per level-0 px."""
    return (
        slice(round(y * sy), round((y + TILE) * sy)),
        slice(round(x * sx), round((x + TILE) * sx)),
    )


def test_cli_heatmap_over_the_real_slide(slide_run, tmp_path, capsys):
    """The cohort CSV's slide_path puts the slide underneath; at 4 x 0.499 µm/px and opacity 1
    the top tile's rectangle, and nothing else, has the top colour; the rest is the slide."""
    run = Run(slide_run)
    slide = run.predictions()["bag_id"].iloc[0]
    out = tmp_path / "png"
    argv = [
        "heatmap",
        str(slide_run),
        "--slide",
        slide,
        "--out",
        str(out),
        "--vis-mpp",
        str(4 * SLIDE_MPP),
        "--alpha",
        "1",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.split() == [
        str(out / f"{slide}.png"),
        str(out / f"{slide}_overlay.png"),
    ]
    drawing = np.asarray(Image.open(out / f"{slide}_overlay.png").convert("RGB"))
    assert drawing.shape == (742, 555, 3)
    s = run.scores(slide)
    x, y = s[["x", "y"]].to_numpy()[np.argmax(s["score"].to_numpy())]
    hot = np.zeros(drawing.shape[:2], dtype=bool)
    hot[block(y, x, 742 / SLIDE_SIZE[1], 555 / SLIDE_SIZE[0])] = True
    top = np.all(drawing == matplotlib.colormaps["viridis"](1.0, bytes=True)[:3], axis=2)
    np.testing.assert_array_equal(top, hot)
    with open_slide(SLIDE) as wsi:
        image = wsi.image(4.0)
    bare = np.ones(drawing.shape[:2], dtype=bool)
    for x, y in s[["x", "y"]].to_numpy():
        bare[block(y, x, 742 / SLIDE_SIZE[1], 555 / SLIDE_SIZE[0])] = False
    np.testing.assert_array_equal(drawing[bare], image[bare])
    fig = run.heatmap(slide, wsi=SLIDE, vis_mpp=4 * SLIDE_MPP)
    texts = " ".join(" ".join(t.get_text().split()) for t in fig.axes[0].texts)
    assert f"{len(s)} tiles of 128 px at level 0 (from patch_size_level0)" in texts
    assert "percentile" in fig.axes[0].child_axes[0].get_ylabel()  # the colour bar
    plt.close(fig)


def test_cli_heatmap_slides_dir_and_missing_slide(slide_run, tmp_path, capsys):
    run = Run(slide_run)
    first, second = run.predictions()["bag_id"].iloc[:2]
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / f"{first}.svs").symlink_to(SLIDE)
    out = tmp_path / "png"
    base = ["heatmap", str(slide_run), "--slides-dir", str(slides), "--out", str(out)]
    assert main([*base, "--slide", first, "--tissue"]) == 0
    assert (out / f"{first}_overlay.png").is_file()
    err = _error(capsys, [*base, "--slide", second])
    assert err.startswith("mil: error:") and err.count("\n") == 1
    assert second in err and str(slides) in err and "slide_path" in err


def test_cli_heatmap_coordinates_outside_the_slide(slide_run, tmp_path, capsys):
    slide = Run(slide_run).predictions()["bag_id"].iloc[0]
    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid(slides / f"{slide}.tif", (1000, 800), mpp=SLIDE_MPP, levels=1)  # too small
    err = _error(capsys, ["heatmap", str(slide_run), "--slide", slide, "--slides-dir", str(slides)])
    assert err.startswith("mil: error:") and err.count("\n") == 1
    assert slide in err and "outside" in err and "1000 x 800" in err


def test_cli_heatmap_warns_of_mixed_magnifications(slide_run, tmp_path, capsys):
    """Two slides whose 128-px tiles lie on a 20x scan and on a 40x one (same pixels): the
    tiles cover 64 µm on one and 32 µm on the other."""
    first, second = Run(slide_run).predictions()["bag_id"].iloc[:2]
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / f"{first}.svs").symlink_to(SLIDE)
    write_pyramid(slides / f"{second}.tif", SLIDE_SIZE, mpp=0.25, levels=2)
    argv = [
        "heatmap",
        str(slide_run),
        "--slide",
        first,
        "--slide",
        second,
        "--slides-dir",
        str(slides),
        "--out",
        str(tmp_path / "png"),
    ]
    with pytest.warns(SlideWarning, match="different magnifications") as rec:  # mil: warning:
        assert main(argv) == 0
    text = " ".join(str(r.message) for r in rec)
    assert first in text and second in text and "64 µm" in text and "32 µm" in text


def test_cli_topk_crops_tiles_from_the_slide(slide_run, tmp_path, level0, capsys):
    run = Run(slide_run)
    slide = run.predictions()["bag_id"].iloc[0]
    crops = tmp_path / "crops"
    argv = [
        "topk",
        str(slide_run),
        "--slide",
        slide,
        "--k",
        "3",
        "--out",
        str(tmp_path / "t.csv"),
        "--crops",
        str(crops),
    ]
    assert main(argv) == 0
    tiles = pd.read_csv(crops / slide / "tiles.csv")
    s = run.scores(slide).sort_values("score", ascending=False)
    assert tiles["side"].tolist() == ["top"] * 3 + ["bottom"] * 3
    np.testing.assert_allclose(tiles["score"][:3], s["score"][:3])
    np.testing.assert_allclose(tiles["score"][3:], s["score"][::-1][:3])
    for row in tiles.itertuples():
        crop = np.asarray(Image.open(crops / slide / row.file).convert("RGB"))
        x, y = int(row.x), int(row.y)
        np.testing.assert_array_equal(crop, level0[y : y + TILE, x : x + TILE])
    assert (crops / slide / "contact_sheet.png").stat().st_size > 10_000


def test_cli_topk_crops_need_the_slide(run_dir, tmp_path, capsys):
    slide = Run(run_dir).predictions()["bag_id"].iloc[0]
    argv = [
        "topk",
        str(run_dir),
        "--slide",
        slide,
        "--out",
        str(tmp_path / "t.csv"),
        "--crops",
        str(tmp_path / "c"),
    ]
    err = _error(capsys, argv)
    assert slide in err and "--slides-dir" in err


@pytest.mark.filterwarnings("ignore::mil.errors.TrainingWarning")
@pytest.mark.parametrize("kind", ["survival", "regression"])
def test_signed_heatmap_is_centred_over_the_slide(kind, tmp_path, capsys):
    """Survival and regression: the default kind (contribution, the tile's share of the risk or
    of the prediction) keeps its sign: each tile is drawn at sign(s) x the percentile of |s| on
    RdBu_r over [-1, 1]."""
    raw = slide_cohort(tmp_path, kind)
    run_dir = run_cv(
        config_from_dict(raw), tmp_path / "run", progress=False, log=lambda *a: None, n_boot=10
    )
    run = Run(run_dir)
    assert main(["heatmap", str(run_dir), "--top-n", "2", "--out", str(tmp_path / "png")]) == 0
    assert len(list((tmp_path / "png").glob("*_overlay.png"))) == 2
    slide = run.top_slides(1)[0]
    s = run.scores(slide)
    assert s.attrs["kind"] == "contribution"
    ov = run.overlay(slide, SLIDE, vis_mpp=4 * SLIDE_MPP)
    assert ov.cmap == "RdBu_r" and (ov.vmin, ov.vmax) == (-1.0, 1.0)
    v = s["score"].to_numpy()
    assert (v > 0).any() and (v < 0).any()
    sy, sx = 742 / SLIDE_SIZE[1], 555 / SLIDE_SIZE[0]
    for (x, y), score in zip(s[["x", "y"]].to_numpy(), v):
        want = np.sign(score) * stats.percentileofscore(np.abs(v), abs(score), kind="rank") / 100
        np.testing.assert_allclose(ov.values[block(y, x, sy, sx)], want, atol=1e-12)


def test_run_heatmap_warns_of_a_tile_size_the_grid_disputes(slide_run, tmp_path):
    """A feature file whose patch_size_level0 (64) is half its coordinate grid's step (128):
    Run.heatmap over the slide warns naming the slide, and draws 64-px rectangles."""
    run = Run(slide_run)
    slide = run.predictions()["bag_id"].iloc[0]
    wrong = tmp_path / f"{slide}.h5"
    shutil.copy(run._feature_index[slide], wrong)
    with h5py.File(wrong, "a") as f:
        f.attrs["patch_size_level0"] = 64
    run.__dict__["_feature_index"] = {**run._feature_index, slide: wrong}
    with pytest.warns(SlideWarning, match="gaps") as rec:
        ov = run.overlay(slide, SLIDE, vis_level=0)
    assert slide in str(rec[0].message) and "128 px" in str(rec[0].message)
    x, y = run.scores(slide)[["x", "y"]].to_numpy()[0].astype(int)
    assert ov.count[y : y + 64, x : x + 64].min() == 1 and ov.count[y + 64, x + 64] == 0

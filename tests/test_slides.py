"""The slide reader and the overlay, on OpenSlide's real Aperio slide (tests/data): pixels
checked against the slide's own JPEG tiles (tifffile) and hand computations of each tile's
rectangle at the drawing's scale."""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
import tifffile
from scipy import stats

from mil.errors import MilError
from mil.explain.heatmap import normalize_scores
from mil.explain.overlay import average_tiles, render_overlay, tissue_mask
from mil.explain.placement import check_mixed_scales, check_placement, tile_geometry
from mil.explain.slides import SlideError, SlideWarning, find_slide_file, open_slide
from tests.slide_data import SLIDE, SLIDE_MPP, SLIDE_SIZE, TILE, tissue_cells

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def level0() -> np.ndarray:
    """The slide's level 0 decoded by tifffile: the reference for the reader's pixels."""
    with tifffile.TiffFile(SLIDE) as tif:
        return tif.pages[0].asarray()


@pytest.fixture(scope="module")
def slide():
    with open_slide(SLIDE) as s:
        yield s


def colour(cmap: str, value: float) -> np.ndarray:
    return np.asarray(matplotlib.colormaps[cmap](value, bytes=True)[:3], dtype=np.float64)


def test_reader_reads_what_the_file_says(slide, level0):
    assert slide.backend == "tiffslide"
    assert slide.dimensions == SLIDE_SIZE and slide.level_downsamples == [1.0]
    assert slide.mpp == pytest.approx(SLIDE_MPP) and slide.objective_power == 20
    np.testing.assert_array_equal(
        slide.read_region((1000, 1200), 0, (64, 48)), level0[1200:1248, 1000:1064]
    )
    # the whole slide at 4x: PIL's box filter, i.e. the mean of the level-0 pixels it covers
    small = slide.image(4.0)
    assert small.shape == (742, 555, 3)  # round(2967 / 4), 2220 / 4
    block = level0[: 4 * 741, :, :].reshape(741, 4, 555, 4, 3)[:200].mean(axis=(1, 3))
    # rows 0-199 of 742 come from 4.0013 source rows each: within one grey level of 4x4 means
    assert np.abs(small[:200].astype(float) - block).mean() < 3.0


def test_openslide_backend_agrees_where_installed(level0):
    pytest.importorskip("openslide")
    with open_slide(SLIDE, backend="openslide") as s:
        assert s.backend == "openslide" and s.dimensions == SLIDE_SIZE
        assert s.mpp == pytest.approx(SLIDE_MPP) and s.objective_power == 20
        region = s.read_region((1000, 1200), 0, (64, 48)).astype(float)
    assert np.abs(region - level0[1200:1248, 1000:1064]).mean() < 2.0  # another JPEG decoder


def test_find_slide_file_matches_ids_with_slide_endings(tmp_path):
    for name in ("S1.svs", "S1.h5", "S10.tiff", "a.b.ome.tiff", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert find_slide_file(tmp_path, "S1").name == "S1.svs"
    assert find_slide_file(tmp_path, "a.b").name == "a.b.ome.tiff"
    for missing in ("S2", "../S1", "S*", "notes"):
        with pytest.raises(SlideError, match="no slide file") as err:
            find_slide_file(tmp_path, missing)
        assert missing in str(err.value) and str(tmp_path) in str(err.value)
    (tmp_path / "S10.SVS").write_bytes(b"")
    with pytest.warns(SlideWarning, match="2 files"):
        assert find_slide_file(tmp_path, "S10").name == "S10.SVS"


def test_unreadable_or_missing_slides_are_named(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "gone.svs")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(SlideError, match="empty.svs") as err:
        open_slide(tmp_path / "empty.svs")
    assert "cannot open" in str(err.value)
    with pytest.raises(MilError, match="slide reader"):
        open_slide(SLIDE, backend="vips")


def test_overlapping_tiles_average_by_hand():
    """Two 8-px tiles overlapping by half, one apart: each pixel is the mean of its tiles,
    as a brute-force loop over the tiles computes it."""
    rng = np.random.default_rng(0)
    coords = np.array([[0, 0], [4, 0], [4, 4], [16, 8], [2, 14]], dtype=float)
    values = np.array([0.2, 1.0, 0.6, -0.5, 0.3])
    mean, count = average_tiles(coords, values, 8, (1.0, 1.0), (20, 24))
    total, n = np.zeros((20, 24)), np.zeros((20, 24), dtype=int)
    for (x, y), v in zip(coords.astype(int), values):
        total[y : y + 8, x : x + 8] += v
        n[y : y + 8, x : x + 8] += 1
    np.testing.assert_array_equal(count, n)
    expected = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-12)
    assert mean[5, 5] == pytest.approx((0.2 + 1.0 + 0.6) / 3)  # three tiles overlap here
    assert np.isnan(mean[0, 23])  # no tile
    # order of the tiles does not matter; at half scale, boxes are round(x / 2)..round((x + 8) / 2)
    perm = rng.permutation(len(values))
    half, _ = average_tiles(coords[perm], values[perm], 8, (0.5, 0.5), (10, 12))
    np.testing.assert_allclose(half[2, 2], (0.2 + 1.0 + 0.6) / 3)
    np.testing.assert_allclose(half[0, 0], 0.2)


def test_overlapping_tiles_average_on_the_real_slide(slide):
    """256-px tiles at a 128-px stride (TRIDENT's overlap): each 128-px quarter shows the mean
    of the four tiles covering it, never their maximum."""
    xs, ys = np.meshgrid(np.arange(6) * 128 + 640, np.arange(6) * 128 + 1280)
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
    scores = np.random.default_rng(1).normal(size=len(coords))
    ov = render_overlay(slide, coords, scores, 256, vis_level=0)
    ranks = stats.rankdata(scores) / len(scores)
    for i, j in [(1, 1), (3, 2), (5, 5)]:  # quarter (i, j): covered by tiles (i-1..i, j-1..j)
        near = [(a, b) for a in (i - 1, i) for b in (j - 1, j) if 0 <= a < 6 and 0 <= b < 6]
        want = np.mean([ranks[a * 6 + b] for a, b in near])
        y, x = 1280 + i * 128 + 64, 640 + j * 128 + 64
        assert ov.values[y, x] == pytest.approx(want) and ov.count[y, x] == len(near)


def _on_tissue(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cells = tissue_cells()
    coords = cells[rng.choice(len(cells), n, replace=False)].astype(float)
    return coords, rng.normal(size=n)


@pytest.mark.parametrize("vis", [{"vis_level": 0}, {"vis_mpp": 4 * SLIDE_MPP}, {}])
def test_hottest_block_lies_over_the_top_tile(slide, vis):
    """At level 0, at 4x and at the default 2048-px drawing: the pixels of the top score's
    colour are exactly the top tile's rectangle at the drawing's scale, blended over the slide."""
    coords, scores = _on_tissue(40)
    ov = render_overlay(slide, coords, scores, TILE, alpha=0.5, **vis)
    h, w = ov.values.shape
    sx, sy = w / SLIDE_SIZE[0], h / SLIDE_SIZE[1]
    if "vis_level" in vis:
        assert (w, h) == SLIDE_SIZE
    elif "vis_mpp" in vis:
        assert (w, h) == (555, 742) and ov.mpp == pytest.approx(4 * SLIDE_MPP, rel=1e-3)
    else:
        assert max(w, h) == 2048
    x, y = coords[np.argmax(scores)]
    rows = slice(int(round(y * sy)), int(round((y + TILE) * sy)))
    cols = slice(int(round(x * sx)), int(round((x + TILE) * sx)))
    hottest = np.zeros((h, w), dtype=bool)
    hottest[rows, cols] = True
    np.testing.assert_array_equal(ov.values == ov.values[np.isfinite(ov.values)].max(), hottest)
    assert np.all(ov.values[hottest] == 1.0)  # the top rank
    expected = np.rint(0.5 * ov.slide[hottest] + 0.5 * colour("viridis", 1.0))
    np.testing.assert_array_equal(ov.rgb[hottest], expected)
    scan = slide.image(None, 0) if "vis_level" in vis else slide.image(4.0 if vis else 2967 / 2048)
    np.testing.assert_array_equal(ov.slide, scan)  # the slide underneath, as the reader gives it
    untouched = ~np.isfinite(ov.values)
    np.testing.assert_array_equal(ov.rgb[untouched], ov.slide[untouched])
    opaque = render_overlay(slide, coords, scores, TILE, alpha=1.0, **vis)
    top = np.all(opaque.rgb == colour("viridis", 1.0).astype(np.uint8), axis=2)
    assert top[hottest].all() and top.sum() == hottest.sum()


def test_rank_map_is_invariant_to_monotone_transforms(slide):
    coords, s = _on_tissue(50, seed=2)
    base = render_overlay(slide, coords, s, TILE, vis_mpp=4 * SLIDE_MPP)
    for f in (lambda v: np.exp(3 * v) + 7, lambda v: v**3, np.arctan, lambda v: 1e6 * v - 4):
        other = render_overlay(slide, coords, f(s), TILE, vis_mpp=4 * SLIDE_MPP)
        np.testing.assert_array_equal(other.values, base.values)
        np.testing.assert_array_equal(other.rgb, base.rgb)
    raw = render_overlay(slide, coords, np.exp(3 * s), TILE, normalize="raw", vis_mpp=4 * SLIDE_MPP)
    assert not np.array_equal(raw.rgb, base.rgb)
    # signed kinds: the sign is kept, so the map is invariant to odd increasing transforms
    signed = render_overlay(slide, coords, s, TILE, signed=True, vis_mpp=4 * SLIDE_MPP)
    for f in (lambda v: v**3, np.sinh, lambda v: 0.01 * v):
        other = render_overlay(slide, coords, f(s), TILE, signed=True, vis_mpp=4 * SLIDE_MPP)
        np.testing.assert_array_equal(other.rgb, signed.rgb)
    assert signed.cmap == "RdBu_r" and (signed.vmin, signed.vmax) == (-1.0, 1.0)


def test_signed_rank_by_hand():
    s = np.array([-3.0, -0.5, 0.0, 0.2, 1.0, 4.0, -0.5])
    want = [np.sign(v) * stats.percentileofscore(np.abs(s), abs(v), kind="rank") / 100 for v in s]
    np.testing.assert_allclose(normalize_scores(s, "rank", signed=True), want)
    np.testing.assert_allclose(normalize_scores(s, "minmax", signed=True), s / 4.0)


def test_tissue_mask_keeps_colours_on_tissue(slide):
    coords, scores = _on_tissue(30)
    glass = np.array([[1920.0, 0.0], [0.0, 2816.0]])  # tiles of bare glass
    ov = render_overlay(
        slide,
        np.vstack([coords, glass]),
        np.r_[scores, 9.0, 9.0],
        TILE,
        vis_mpp=4 * SLIDE_MPP,
        tissue=True,
    )
    assert ov.tissue is not None and not ov.tissue[:32, 480:512].any()
    assert not ov.tissue[704:736, :32].any() and np.isfinite(ov.values[704:736, :32]).all()
    off = ~ov.tissue
    np.testing.assert_array_equal(ov.rgb[off], ov.slide[off])  # glass keeps its own pixels
    assert tissue_mask(ov.slide).mean() == pytest.approx(ov.tissue.mean())
    y, x = (coords[0] / 4 + 16).astype(int)[::-1]
    assert ov.tissue[y, x] and not np.array_equal(ov.rgb[y, x], ov.slide[y, x])


def test_coordinates_outside_the_slide_are_an_error_naming_it(slide):
    coords = np.array([[0, 0], [2176, 2900], [2300, 100]], dtype=float)
    geom = tile_geometry("CMU-1", coords, {"patch_size_level0": 64}, slide)
    with pytest.raises(SlideError) as err:
        check_placement(geom, slide)
    msg = str(err.value)
    assert "CMU-1" in msg and "outside" in msg and "2220 x 2967" in msg and "(2300, 100)" in msg


def test_tile_size_that_disagrees_warns_naming_the_slide(slide):
    coords = tissue_cells()[:20].astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a consistent slide warns nothing
        check_placement(tile_geometry("ok", coords, {"patch_size_level0": TILE}, slide), slide)
    with pytest.warns(SlideWarning, match="gaps") as rec:  # 64-px tiles on a 128-px grid
        check_placement(tile_geometry("S-gap", coords, {"patch_size_level0": 64}, slide), slide)
    assert "S-gap" in str(rec[0].message)
    # TRIDENT: 256 px at 20x on a 20x scan is 256 px at level 0, not the 512 recorded
    trident = {
        "coords.patch_size": 256,
        "coords.target_magnification": 20,
        "coords.patch_size_level0": 512,
        "coords.level0_magnification": 40,
    }
    geom = tile_geometry("S-40x", coords * 4, trident, slide)
    geom.coords = coords  # inside the slide: only the sizes disagree
    with pytest.warns(SlideWarning) as rec:
        check_placement(geom, slide)
    text = " ".join(str(r.message) for r in rec)
    assert "S-40x" in text and "cover 256 px" in text and "512" in text and "40x scan" in text


def test_micrometre_coordinates_become_level0_pixels(slide):
    um = np.array([[100.0, 200.0], [164.0, 200.0]])
    geom = tile_geometry("stamp", um, {"unit": b"um", "tile_size_um": 64.0}, slide)
    np.testing.assert_allclose(geom.coords, um / SLIDE_MPP)
    assert geom.tile_size == pytest.approx(64.0 / SLIDE_MPP)


def test_mixed_magnifications_warn_with_both_slides():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_mixed_scales([("A", 256, 0.5), ("B", 512, 0.25), ("C", 256, None)])
    with pytest.warns(SlideWarning, match="different magnifications") as rec:
        check_mixed_scales([("A", 256, 0.5), ("B", 256, 0.25)])
    assert "A" in str(rec[0].message) and "B" in str(rec[0].message)


def test_pyramidal_tiff_levels_and_mpp(tmp_path):
    """A pyramid written by tifffile: levels, downsamples and mpp read from the file; a level
    drawn as it is, a scale read from the coarsest level fine enough."""
    from tests.slide_data import write_pyramid

    path = write_pyramid(tmp_path / "p.tif", (4096, 2048), mpp=0.25, levels=3)
    with open_slide(path) as s:
        assert s.level_dimensions == [(4096, 2048), (1024, 512), (256, 128)]
        assert s.level_downsamples == [1.0, 4.0, 16.0] and s.mpp == pytest.approx(0.25)
        assert s.magnification == pytest.approx(40.0)
        assert s.best_level(8.0) == 1 and s.best_level(16.0) == 2 and s.best_level(2.0) == 0
        assert s.image(None, 2).shape == (128, 256, 3)
        ov = render_overlay(s, np.array([[0.0, 0.0]]), np.array([1.0]), 512, vis_level=1)
        assert (
            ov.values.shape == (512, 1024)
            and ov.level == 1
            and np.isfinite(ov.values).sum() == 128 * 128
        )


def test_heatmap_speed_benchmark_smoke():
    """benchmarks/heatmap_speed.py on its --smoke preset: a 3200-px pyramid (25 x 25 tiles of
    128 px), drawn at the default 2048 px and at its coarsest level; the parts add up."""
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import heatmap_speed

    rows = heatmap_speed.measure(**heatmap_speed.SMOKE)
    assert [r["setting"] for r in rows] == ["default (2048 px)", "--vis-level 0"]
    side = int(np.ceil(np.sqrt(500 / 0.8))) * 128
    for row in rows:
        assert row["tiles"] == 500 and row["slide_px"] == [side, side]
        parts = row["open_and_place_s"] + row["read_rasterise_blend_s"] + row["figure_and_pngs_s"]
        assert parts == pytest.approx(row["total_s"], abs=0.01)
    assert rows[0]["drawing_px"] == [2048, 2048] and rows[1]["drawing_px"] == [side, side]

"""Instance-score heatmaps from tile coordinates: scores rasterised on the tile grid.

A slide's instance scores are placed on a grid of tile-sized cells (tile size
from the feature file's attributes, else inferred from the coordinates), so a
heatmap is one ``imshow`` of a ``[H / tile, W / tile]`` array: 100,000 tiles
render in about a second, with no slide file needed. Drawing over the slide
itself is :mod:`mil.explain.overlay`; both share the normalisations here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import pandas as pd
from scipy import ndimage, stats

from mil.errors import MilError

Normalize = Literal["rank", "minmax", "raw", "signed"]
NORMALIZATIONS: tuple[str, ...] = ("rank", "minmax", "raw", "signed")
NORMALIZE_LABELS = {
    "rank": "score percentile within the slide (0-1)",
    "minmax": "score, min-max scaled",
    "raw": "score",
    "signed": "score / max |score| (sign kept: + raises, - lowers)",
}
SIGNED_LABELS = {
    "rank": "percentile of |score| within the slide, sign kept (+ raises, - lowers)",
    "minmax": NORMALIZE_LABELS["signed"],
    "raw": "score (+ raises, - lowers; 0 at the centre)",
    "signed": NORMALIZE_LABELS["signed"],
}
#: score kinds that are a signed share of the bag's output (summed over a bag: its logit or
#: risk less the head's bias), whatever the task: their 0 means "neither raises nor lowers",
#: so they are drawn on a diverging map centred at 0. An instance logit is not among them:
#: its 0 is an arbitrary point of the output's scale (a Cox predictor's, a regression's).
SIGNED_KINDS = ("contribution", "attention_x_logit")


def signed_kind(label: str | None) -> bool:
    """Whether a score label (``contribution``, ``contribution[tumour]``...) is a signed kind."""
    return str(label or "").split("[")[0] in SIGNED_KINDS


# A raster larger than this many cells is coarsened (cells of several tiles, mean per cell):
# it protects against a wrong tile size turning into a gigapixel array.
MAX_CELLS = 16_000_000


def normalize_scores(
    scores: np.ndarray, method: Normalize | str = "rank", signed: bool = False
) -> np.ndarray:
    """Scale scores ``[N]`` for display.

    ``rank``: the percentile rank of each score among the slide's scores, as
    CLAM's ``scipy.stats.percentileofscore(scores, s)`` (kind ``rank``, ties
    get the mean rank) divided by 100 — vectorised as
    ``rankdata(scores) / N``, in ``(0, 1]``; invariant to any increasing
    transform of the scores. ``minmax``: ``(s - min) / (max - min)``
    (0.5 everywhere when all scores are equal). ``raw``: unchanged. ``signed``:
    ``s / max |s|`` in [-1, 1], so that 0 stays 0 (for a diverging colour map).

    ``signed=True`` (a signed kind, :data:`SIGNED_KINDS`) keeps 0 at 0: ``rank``
    becomes ``sign(s) rankdata(|s|) / N`` in [-1, 1] (invariant to any increasing
    transform that keeps the sign symmetric, ``f(-s) = -f(s)``), and ``minmax``
    becomes ``signed``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if signed and method == "rank":
        return np.sign(s) * stats.rankdata(np.abs(s)) / len(s) if len(s) else s
    if signed and method == "minmax":
        method = "signed"
    if method == "rank":
        return stats.rankdata(s, method="average") / max(len(s), 1) if len(s) else s
    if method == "minmax":
        if len(s) == 0:
            return s
        lo, hi = float(np.min(s)), float(np.max(s))
        if hi - lo <= 0 or not np.isfinite(hi - lo):
            return np.full_like(s, 0.5)
        return (s - lo) / (hi - lo)
    if method == "raw":
        return s
    if method == "signed":
        top = float(np.max(np.abs(s))) if len(s) else 0.0
        return s / top if top > 0 and np.isfinite(top) else np.zeros_like(s)
    raise MilError(
        f"normalize={method!r}: unknown score normalisation; use one of {', '.join(NORMALIZATIONS)}"
    )


def colour_scale(normalize: str, signed: bool, values: np.ndarray) -> tuple[float, float]:
    """The colour scale's ends for normalised ``values``: centred at 0 for a signed kind or
    ``signed``; the data's for ``raw``; else [0, 1]."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if normalize == "raw":
        if signed:
            top = float(np.max(np.abs(v))) if len(v) else 1.0
            return (-top, top) if top > 0 else (-1.0, 1.0)
        vmin, vmax = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
        return (vmin - 0.5, vmax + 0.5) if vmax <= vmin else (vmin, vmax)
    return (-1.0, 1.0) if signed or normalize == "signed" else (0.0, 1.0)


def colour_label(normalize: str, signed: bool) -> str:
    """What the colour bar shows, in words."""
    return (SIGNED_LABELS if signed else NORMALIZE_LABELS).get(str(normalize), "score")


def infer_tile_size(coords: np.ndarray) -> float:
    """Tile size from a coordinate grid: the most common positive step between sorted unique x and y.

    A slide with a single tile (no step) gives 1.0: it then renders as one cell.
    """
    c = np.asarray(coords, dtype=np.float64)
    # float coordinates (micrometres) jitter: compare them on a grid a millionth of their scale
    decimals = 6 - int(np.floor(np.log10(max(float(np.abs(c).max()) if c.size else 0.0, 1.0))))
    q = 10.0**-decimals
    c = np.round(c / q)
    d = np.concatenate([np.diff(np.unique(c[:, axis])) for axis in range(2)])
    d = d[d > 0]
    if len(d) == 0:
        return 1.0
    values, counts = np.unique(d, return_counts=True)
    return float(np.round(values[np.argmax(counts)] * q, decimals))


def tile_size_from_attrs(attrs: dict) -> float | None:
    """Tile side in coordinate units from feature-file attributes, or None if they do not say.

    ``tile_size`` (set by :func:`mil.data.readers.read_features`),
    ``patch_size_level0`` (ours, TRIDENT; root or ``coords`` attribute) or
    STAMP's ``tile_size_um`` (its coordinates are in micrometres).
    """
    for key in ("tile_size", "patch_size_level0", "coords.patch_size_level0", "tile_size_um"):
        v = attrs.get(key)
        if v is not None:
            v = float(np.asarray(v).reshape(-1)[0])
            if v > 0:
                return v
    return None


def feature_attrs(path: str | Path) -> dict:
    """An h5 feature file's root attributes and its ``coords`` dataset's (as ``coords.<name>``);
    {} for another file type or an unreadable file (features are not read)."""
    path = Path(path)
    if path.suffix.lower() != ".h5" or not path.is_file():
        return {}
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs.items())
            if "coords" in f:
                attrs.update({f"coords.{k}": v for k, v in f["coords"].attrs.items()})
    except OSError:
        return {}
    return attrs


def tile_size_from_h5(path: str | Path) -> float | None:
    """The tile size recorded in an h5 feature file's attributes (features are not read)."""
    return tile_size_from_attrs(feature_attrs(path))


@dataclass
class ScoreRaster:
    """Scores on a grid of square cells.

    Attributes:
        grid: ``[H, W]`` cell values, NaN where no tile lies (row = y, column = x).
        origin: level-0 ``(x, y)`` of the top-left corner of cell ``(0, 0)``.
        cell: cell side in coordinate units (the tile size, or a multiple when coarsened).
        rows, cols: ``[N]`` cell of each tile.
        values: ``[N]`` the (normalised) value of each tile, before any smoothing.
    """

    grid: np.ndarray
    origin: tuple[float, float]
    cell: float
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)`` for ``imshow(origin="upper")``: y grows downwards."""
        h, w = self.grid.shape
        x0, y0 = self.origin
        return (x0, x0 + w * self.cell, y0 + h * self.cell, y0)


def rasterize(
    coords: np.ndarray, values: np.ndarray, tile_size: float, max_cells: int = MAX_CELLS
) -> ScoreRaster:
    """Place ``values [N]`` at ``coords [N, 2]`` (tile top-left corners) on a tile-sized grid.

    Tiles that fall into the same cell (overlapping tiles, or a coarsened grid)
    show their mean, so the result does not depend on the tiles' order.
    """
    c = np.asarray(coords, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if c.ndim != 2 or c.shape[0] != len(v) or c.shape[1] < 2:
        raise MilError(f"coords of shape {c.shape} do not match {len(v)} scores (expected [N, 2])")
    if len(v) == 0:
        raise MilError("no tiles to draw (0 scores)")
    if not tile_size or tile_size <= 0 or not np.isfinite(tile_size):
        raise MilError(f"tile size must be a positive number, got {tile_size}")
    x0, y0 = float(c[:, 0].min()), float(c[:, 1].min())
    cell = float(tile_size)
    span_x, span_y = float(c[:, 0].max()) - x0, float(c[:, 1].max()) - y0
    cells = (span_x / cell + 1) * (span_y / cell + 1)
    if cells > max_cells:
        cell *= float(np.ceil(np.sqrt(cells / max_cells)))
    cols = np.rint((c[:, 0] - x0) / cell).astype(np.int64)
    rows = np.rint((c[:, 1] - y0) / cell).astype(np.int64)
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    flat = rows * shape[1] + cols
    total = np.bincount(flat, weights=v, minlength=shape[0] * shape[1])
    count = np.bincount(flat, minlength=shape[0] * shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(count > 0, total / count, np.nan).reshape(shape)
    return ScoreRaster(grid=grid, origin=(x0, y0), cell=cell, rows=rows, cols=cols, values=v)


def smooth_raster(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (``sigma`` in cells) of a raster with holes, staying inside the tissue.

    Normalised convolution: ``G * (v m) / G * m`` with ``m`` the tissue mask, so
    background cells neither pull values down nor get painted.
    """
    if sigma <= 0:
        return grid
    mask = np.isfinite(grid)
    filled = np.where(mask, grid, 0.0)
    num = ndimage.gaussian_filter(filled, sigma, mode="constant")
    den = ndimage.gaussian_filter(mask.astype(np.float64), sigma, mode="constant")
    out = np.full_like(grid, np.nan)
    out[mask] = num[mask] / np.maximum(den[mask], 1e-12)
    return out


def score_raster(
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size: float | None = None,
    normalize: Normalize | str = "rank",
    smooth: float = 0.0,
    signed: bool = False,
) -> ScoreRaster:
    """Normalised scores on the tile grid: the array a heatmap shows.

    ``tile_size`` None infers it from the coordinates (:func:`infer_tile_size`).
    ``smooth`` is a Gaussian sigma in cells (0 = none); ``values`` keeps the
    unsmoothed normalised scores. ``signed``: see :func:`normalize_scores`.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ts = tile_size if tile_size else infer_tile_size(np.asarray(coords))
    r = rasterize(coords, normalize_scores(scores, normalize, signed), ts)
    r.grid = smooth_raster(r.grid, smooth)
    return r


def top_k_tiles(coords: np.ndarray, scores: np.ndarray, k: int = 16) -> pd.DataFrame:
    """The ``k`` highest-scored tiles: ``rank, index, x, y, score`` (ties broken by y, then x).

    ``index`` is the tile's row in the bag's coordinate/feature arrays.
    """
    c = np.asarray(coords, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.lexsort((c[:, 0], c[:, 1], -s))[: max(int(k), 0)]
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "index": order,
            "x": c[order, 0],
            "y": c[order, 1],
            "score": s[order],
        }
    )


def plot_heatmap(
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size: float | None = None,
    normalize: Normalize | str = "rank",
    smooth: float = 0.0,
    top_k: int = 0,
    cmap: str | None = None,
    title: str | None = None,
    ax=None,
    colorbar: bool = True,
    outline: str = "red",
    signed: bool = False,
):
    """Draw a slide's scores at their tile positions (no slide image); returns the Figure.

    Args:
        coords: ``[N, 2]`` level-0 x, y of each tile's top-left corner.
        scores: ``[N]`` instance scores (e.g. attention logits).
        tile_size: tile side in coordinate units; None infers it from the grid.
        normalize: ``rank`` (percentile, as CLAM), ``minmax``, ``raw`` or ``signed``
            (``s / max |s|``, for a diverging ``cmap`` such as ``RdBu_r``).
        smooth: Gaussian sigma in tiles (0 = none).
        top_k: outline the ``k`` highest-scored tiles (0 = none).
        cmap: a matplotlib colormap; None: ``viridis``, or ``RdBu_r`` centred at 0 when signed.
        ax: draw into these axes (e.g. a panel of a notebook figure).
        colorbar: draw a colour bar beside the slide.
        outline: colour of the top-k outlines.
        signed: a signed kind (:data:`SIGNED_KINDS`): 0 stays 0, on a diverging map.

    :mod:`mil.explain.overlay` draws the same scores over the whole-slide image.
    """
    import matplotlib.pyplot as plt

    raster = score_raster(coords, scores, tile_size, normalize, smooth, signed)
    if ax is None:
        h, w = raster.grid.shape
        aspect = h / max(w, 1)
        fig, ax = plt.subplots(figsize=(7.0, float(np.clip(6.0 * aspect, 2.5, 10.0))))
    fig = ax.figure
    centred = signed or normalize == "signed"
    cmap = cmap or ("RdBu_r" if centred else "viridis")
    colormap = plt.get_cmap(cmap).with_extremes(bad=(0, 0, 0, 0))
    vmin, vmax = colour_scale(str(normalize), signed, raster.values)
    im = ax.imshow(
        raster.grid,
        extent=raster.extent,
        origin="upper",
        cmap=colormap,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
    )
    if top_k:
        outline_top_tiles(ax, coords, scores, top_k, raster.cell, outline, raster)
    left, right, bottom, topy = raster.extent
    pad = raster.cell
    ax.set_xlim(left - pad, right + pad)
    ax.set_ylim(bottom + pad, topy - pad)
    ax.set_aspect("equal")
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        label = colour_label(str(normalize), signed)
        if smooth:
            label += f", smoothed (sigma {smooth:g} tiles)"
        # an inset axes follows the slide's box (equal aspect), so the bar is as tall as the slide
        cax = ax.inset_axes([1.03, 0.0, 0.035, 1.0])
        fig.colorbar(im, cax=cax, label=label)
    return fig


def outline_top_tiles(
    ax, coords, scores, k: int, size: float, colour: str = "red", raster: ScoreRaster | None = None
) -> None:
    """Outline the ``k`` highest-scored tiles on ``ax`` (level-0 axes): ``size``-px squares at
    their corners, or at their cells of ``raster``."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    top = top_k_tiles(coords, scores, k)["index"].to_numpy()
    c = np.asarray(coords, dtype=np.float64)
    if raster is None:
        corners = c[top]
    else:
        x0, y0 = raster.origin
        corners = np.stack([x0 + raster.cols[top] * size, y0 + raster.rows[top] * size], 1)
    boxes = [Rectangle((float(x), float(y)), size, size) for x, y in corners]
    ax.add_collection(
        PatchCollection(boxes, facecolor="none", edgecolor=colour, linewidth=1.2, zorder=3)
    )


def read_target_scores(
    path, fold: str, entry, slide_id: str, kind, task, target: str, cls, predicted
):
    """One target's instance scores in a multi-target run's scores file: its block of the
    kind's columns (one per head output) read as the target's own task reads them
    (:meth:`mil.tasks.MultiTargetTask.target_scores`); ``kind="default"``: the first kind of
    that task's ``score_order`` the file has; a one-column kind (attention, the model's own
    score) is shared by the targets. Returns what :func:`mil.results.scores.read_scores` does."""
    from mil.results.scores import DEFAULT, open_scores, read_scores

    order = task.subs[target].score_order
    with open_scores(path, fold) as f:
        g = f[entry[0]]
        if kind == DEFAULT:
            kind = next((k for k in order if f"scores_{k}" in g), None)
        name = f"scores_{kind}"
        matrix = g[name][()] if kind is not None and name in g and g[name].ndim == 2 else None
    if matrix is None:  # the kind's absence is read_scores' error; one column is every target's
        return read_scores(path, fold, entry, slide_id, kind, cls, [], None, order)
    _, _, coords, bag_id, model = read_scores(path, fold, entry, slide_id, kind, 0, [], None)
    values, label = task.target_scores(matrix, kind, target, cls, predicted)
    return values, label, coords, bag_id, model

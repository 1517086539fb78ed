"""Instance scores over the whole-slide image: each tile's rectangle at the drawing's scale,
overlapping tiles averaged (never blurred unless asked), alpha-blended over the slide.

A drawing is the slide at ``d`` level-0 pixels per drawn pixel (a level's own size, or
``round(W0 / d) x round(H0 / d)``). With ``sx`` = drawn width / ``W0`` (``sy`` likewise), a
tile at level-0 ``(x, y)`` of side ``s`` covers drawn columns ``round(x sx)`` to
``round((x + s) sx)`` (exclusive; at least one) and rows likewise, so tiles that abut at
level 0 abut in the drawing. Each pixel shows the mean of the tiles covering it, summed
with two cumulative sums over corner marks: linear in tiles plus pixels, 50,000 tiles in
well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mil.explain.heatmap import (
    colour_label,
    colour_scale,
    normalize_scores,
    outline_top_tiles,
    smooth_raster,
)
from mil.explain.slides import SlideError, SlideImage

#: the default drawing's longest side in pixels (when neither a level nor an mpp is asked for)
DEFAULT_MAX_SIZE = 2048
#: the longest side of the image a figure shows (the drawing itself is saved at its own size)
FIGURE_PIXELS = 2048


@dataclass
class Overlay:
    """A slide's scores drawn over its image.

    Attributes:
        values: ``[h, w]`` mean normalised score of the tiles covering each pixel (NaN: none).
        count: ``[h, w]`` how many tiles cover each pixel.
        slide: ``[h, w, 3]`` uint8 the slide at the drawing's scale.
        rgb: ``[h, w, 3]`` uint8 the drawing: colours blended over ``slide`` with ``alpha``.
        dimensions: level-0 ``(W0, H0)`` of the slide.
        level: the level the image was read from.
        mpp: drawn microns per pixel (None when the slide records none).
        cmap, vmin, vmax, label: the colour scale and what it shows.
        tissue: ``[h, w]`` the tissue mask the colours were limited to, or None.
        smooth: the Gaussian sigma in tiles the values were smoothed with (0: none).
        tile_size, source: the tiles' side in level-0 pixels, and where it came from.
    """

    values: np.ndarray
    count: np.ndarray
    slide: np.ndarray
    rgb: np.ndarray
    dimensions: tuple[int, int]
    level: int
    mpp: float | None
    cmap: str
    vmin: float
    vmax: float
    label: str
    alpha: float
    tissue: np.ndarray | None = None
    smooth: float = 0.0
    tile_size: float = 0.0
    source: str = ""

    @property
    def scale(self) -> tuple[float, float]:
        """Drawn pixels per level-0 pixel, ``(sx, sy)``."""
        h, w = self.values.shape
        return w / self.dimensions[0], h / self.dimensions[1]

    @property
    def downsample(self) -> float:
        """Level-0 pixels per drawn pixel (along x)."""
        return 1.0 / self.scale[0]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(left, right, bottom, top)`` in level-0 pixels, for ``imshow``."""
        w0, h0 = self.dimensions
        return (0.0, float(w0), float(h0), 0.0)


def drawing_downsample(
    slide: SlideImage,
    vis_level: int | None = None,
    vis_mpp: float | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
) -> tuple[float | None, int | None]:
    """``(downsample, level)`` of a drawing: a level as it is, a microns-per-pixel, or (neither)
    the slide's longest side at ``max_size`` pixels."""
    name = slide.path.name
    if vis_level is not None and vis_mpp is not None:
        raise SlideError("give --vis-level or --vis-mpp, not both")
    if vis_level is not None:
        if not 0 <= vis_level < len(slide.level_dimensions):
            raise SlideError(
                f"{name}: --vis-level {vis_level}: the slide has levels 0..{len(slide.level_dimensions) - 1} "
                f"(downsamples {', '.join(f'{d:g}' for d in slide.level_downsamples)})"
            )
        return None, vis_level
    if vis_mpp is not None:
        if not slide.mpp:
            raise SlideError(
                f"{name} records no microns per pixel, so --vis-mpp cannot be met; use --vis-level"
            )
        if vis_mpp < slide.mpp * 0.999:
            raise SlideError(
                f"--vis-mpp {vis_mpp:g}: finer than {name}'s scan ({slide.mpp:.3g} µm/px at level 0)"
            )
        return vis_mpp / slide.mpp, None
    return max(1.0, max(slide.dimensions) / max(int(max_size), 1)), None


def tile_boxes(
    coords: np.ndarray, tile_size: float, scale: tuple[float, float], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Drawn ``(row0, row1, col0, col1)`` of each tile (end exclusive, clipped to ``shape``)."""
    c = np.asarray(coords, dtype=np.float64)
    (sx, sy), (h, w) = scale, shape

    def span(start: np.ndarray, factor: float, n: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.rint(start * factor).astype(np.int64)
        b = np.maximum(np.rint((start + tile_size) * factor).astype(np.int64), a + 1)
        return np.clip(a, 0, n), np.clip(b, 0, n)

    r0, r1 = span(c[:, 1], sy, h)
    c0, c1 = span(c[:, 0], sx, w)
    return r0, r1, c0, c1


def average_tiles(
    coords: np.ndarray,
    values: np.ndarray,
    tile_size: float,
    scale: tuple[float, float],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [h, w], count [h, w])``: the mean value of the tiles covering each pixel.

    Each tile adds its value at its box's corners (+ - - +) of a ``[h + 1, w + 1]`` array
    whose cumulative sums over rows and columns are the per-pixel sums; counts likewise.
    Values are summed as integers on a grid of ``2^-40`` of the largest ``|value|`` (a
    power-of-two scale), so the sums are exact: a pixel of one tile shows that tile's value
    (to that grid), whatever the tiles around it.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    h, w = shape
    r0, r1, c0, c1 = tile_boxes(coords, tile_size, scale, shape)
    keep = (r1 > r0) & (c1 > c0) & np.isfinite(v)
    r0, r1, c0, c1, v = r0[keep], r1[keep], c0[keep], c1[keep], v[keep]
    top = float(np.max(np.abs(v))) if len(v) else 0.0
    step = 2.0 ** (np.ceil(np.log2(top)) - 40) if top > 0 else 1.0
    units = np.rint(v / step)
    idx = np.concatenate(
        [r0 * (w + 1) + c0, r0 * (w + 1) + c1, r1 * (w + 1) + c0, r1 * (w + 1) + c1]
    )
    sign = np.repeat([1.0, -1.0, -1.0, 1.0], len(v))
    size = (h + 1) * (w + 1)

    def summed(weights: np.ndarray) -> np.ndarray:
        marks = np.bincount(idx, weights=weights, minlength=size)  # whole numbers < 2^53: exact
        return marks.astype(np.int64).reshape(h + 1, w + 1).cumsum(0).cumsum(1)[:h, :w]

    total, count = summed(sign * np.tile(units, 4)), summed(sign)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1) * step, np.nan)
    return mean, count


def tissue_mask(image: np.ndarray) -> np.ndarray:
    """``[h, w]`` True on tissue: saturation above its Otsu threshold (background glass is grey
    or white), closed and opened by a 3-pixel square to drop specks and fill small holes."""
    rgb = image.astype(np.float64)
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0.0)
    mask = sat > _otsu(sat)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    return ndimage.binary_opening(mask, structure=np.ones((3, 3)), iterations=1)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids)
    with np.errstate(invalid="ignore", divide="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    return float(mids[int(np.nanargmax(np.nan_to_num(between, nan=-1.0)))])


def blend(
    image: np.ndarray,
    values: np.ndarray,
    cmap: str,
    vmin: float,
    vmax: float,
    alpha: float,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """``rint((1 - alpha) image + alpha colour)`` where a value is drawn (finite, inside
    ``mask``), the image elsewhere; ``colour`` = ``cmap`` at ``(value - vmin) / (vmax - vmin)``
    as 8-bit RGB. (A 256 x 256 table of every colour and image level: exact and fast.)"""
    import matplotlib

    drawn = np.isfinite(values) if mask is None else np.isfinite(values) & mask
    out = image.copy()
    if not drawn.any():
        return out
    colours = matplotlib.colormaps[cmap]((values[drawn] - vmin) / (vmax - vmin), bytes=True)
    levels = np.arange(256, dtype=np.float64)
    table = np.rint((1.0 - alpha) * levels[None, :] + alpha * levels[:, None]).astype(np.uint8)
    out[drawn] = table[colours[:, :3], image[drawn]]
    return out


def render_overlay(
    slide: SlideImage,
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size: float,
    normalize: str = "rank",
    signed: bool = False,
    vis_level: int | None = None,
    vis_mpp: float | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    alpha: float = 0.5,
    cmap: str | None = None,
    tissue: bool = False,
    smooth: float = 0.0,
) -> Overlay:
    """Draw ``scores [N]`` of tiles at level-0 ``coords [N, 2]`` over ``slide``.

    ``normalize``/``signed`` as :func:`mil.explain.heatmap.normalize_scores` (rank by default;
    a signed kind stays centred at 0 on ``RdBu_r``); ``vis_level``/``vis_mpp``/``max_size`` the
    drawing's scale (:func:`drawing_downsample`); ``tissue`` limits the colours to
    :func:`tissue_mask`; ``smooth`` a Gaussian sigma in tiles (0 = none, the default).
    """
    if not 0.0 <= alpha <= 1.0:
        raise SlideError(f"alpha {alpha}: use a number from 0 (slide only) to 1 (scores only)")
    downsample, level = drawing_downsample(slide, vis_level, vis_mpp, max_size)
    image = slide.image(downsample, level)
    level = slide.best_level(downsample) if level is None else level
    w0, h0 = slide.dimensions
    scale = (image.shape[1] / w0, image.shape[0] / h0)
    v = normalize_scores(scores, normalize, signed)
    mean, count = average_tiles(coords, v, tile_size, scale, image.shape[:2])
    if smooth > 0:
        mean = smooth_raster(mean, smooth * tile_size * scale[0])
    vmin, vmax = colour_scale(normalize, signed, v)
    centred = signed or normalize == "signed"
    cmap = cmap or ("RdBu_r" if centred else "viridis")
    mask = tissue_mask(image) if tissue else None
    return Overlay(
        values=mean,
        count=count,
        slide=image,
        rgb=blend(image, mean, cmap, vmin, vmax, alpha, mask),
        dimensions=(w0, h0),
        level=level,
        mpp=slide.mpp * w0 / image.shape[1] if slide.mpp else None,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        label=colour_label(normalize, signed),
        alpha=alpha,
        tissue=mask,
        smooth=smooth,
        tile_size=float(tile_size),
    )


def plot_overlay(
    overlay: Overlay,
    coords: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    tile_size: float | None = None,
    top_k: int = 0,
    title: str | None = None,
    caption: str | None = None,
    ax=None,
    colorbar: bool = True,
):
    """A matplotlib Figure of ``overlay`` in level-0 axes, with a colour bar, the ``top_k``
    highest-scored tiles outlined (needs ``coords``, ``scores``, ``tile_size``) and a caption."""
    import textwrap

    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if ax is None:
        h, w = overlay.values.shape
        fig, ax = plt.subplots(figsize=(7.0, float(np.clip(6.0 * h / max(w, 1), 2.5, 10.0))))
    fig = ax.figure
    ax.imshow(_fit(overlay.rgb, FIGURE_PIXELS), extent=overlay.extent, interpolation="antialiased")
    if top_k and coords is not None and scores is not None and tile_size:
        colour = "black" if overlay.vmin < 0 else "red"
        outline_top_tiles(ax, coords, scores, top_k, tile_size, colour)
    ax.set_xlim(0, overlay.dimensions[0])
    ax.set_ylim(overlay.dimensions[1], 0)
    ax.set_aspect("equal")
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        mappable = ScalarMappable(Normalize(overlay.vmin, overlay.vmax), overlay.cmap)
        cax = ax.inset_axes([1.03, 0.0, 0.035, 1.0])
        fig.colorbar(mappable, cax=cax, label=overlay.label)
    if caption:
        text = "\n".join(textwrap.wrap(caption, 95))
        ax.text(0.0, -0.1, text, transform=ax.transAxes, va="top", ha="left", fontsize=7)
    return fig


def _fit(rgb: np.ndarray, size: int) -> np.ndarray:
    """``rgb`` box-filtered down to at most ``size`` px on its longest side (a figure shows no
    more; matplotlib would resample a 16-megapixel drawing at several seconds a draw)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    if max(h, w) <= size:
        return rgb
    scale = size / max(h, w)
    small = Image.fromarray(rgb).resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX
    )
    return np.asarray(small)


def overlay_caption(overlay: Overlay, kind: str, meaning: str, tiles: int) -> str:
    """What an overlay shows, in words: the score, its scale, the tiles and the drawing."""
    size, source = overlay.tile_size, overlay.source or "the feature file"
    scale = f"{overlay.mpp:.2f} µm/px" if overlay.mpp else f"{overlay.downsample:.3g}x downsampled"
    mask = ", colours on tissue only" if overlay.tissue is not None else ""
    blur = f"smoothed (sigma {overlay.smooth:g} tiles)" if overlay.smooth else "not smoothed"
    return (
        f"Colour: {kind}" + (f", {meaning}" if meaning else "") + f"; {overlay.label}. "
        f"{tiles} tiles of {size:g} px at level 0 (from {source}), drawn at {scale} (level "
        f"{overlay.level}); where tiles overlap, their mean; {blur}; opacity "
        f"{overlay.alpha:g}{mask}."
    )

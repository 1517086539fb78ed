"""Explaining runs: instance scores at tile coordinates, rendered as heatmaps on their grid or
over the whole-slide image, and the top tiles cut from the slide for review."""

from mil.explain.heatmap import (
    NORMALIZATIONS,
    ScoreRaster,
    infer_tile_size,
    normalize_scores,
    plot_heatmap,
    rasterize,
    score_raster,
    tile_size_from_attrs,
    tile_size_from_h5,
    top_k_tiles,
)
from mil.explain.overlay import Overlay, plot_overlay, render_overlay
from mil.explain.slides import SlideError, SlideImage, SlideWarning, open_slide

__all__ = [
    "NORMALIZATIONS",
    "Overlay",
    "ScoreRaster",
    "SlideError",
    "SlideImage",
    "SlideWarning",
    "infer_tile_size",
    "normalize_scores",
    "open_slide",
    "plot_heatmap",
    "plot_overlay",
    "rasterize",
    "render_overlay",
    "score_raster",
    "tile_size_from_attrs",
    "tile_size_from_h5",
    "top_k_tiles",
]

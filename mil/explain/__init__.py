"""Explaining runs: instance scores at tile coordinates, rendered as heatmaps."""

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

__all__ = [
    "NORMALIZATIONS",
    "ScoreRaster",
    "infer_tile_size",
    "normalize_scores",
    "plot_heatmap",
    "rasterize",
    "score_raster",
    "tile_size_from_attrs",
    "tile_size_from_h5",
    "top_k_tiles",
]

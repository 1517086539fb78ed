"""Seconds to draw a 50,000-tile heatmap over a whole-slide image, on CPU.

    python benchmarks/heatmap_speed.py [--tiles 50000] [--tile 256] [--repeats 3] [--smoke]

Writes a synthetic pyramidal TIFF with ``tifffile`` (JPEG tiles of 512 px, levels at
downsamples 1, 4, 16, 64, 0.5 µm/px: a 20x scan, one 256-px tile per feature tile; a
50,000-tile slide is about 57,000 x 57,000 px at level 0), puts ``--tiles`` tiles on its
grid with random scores, and times what ``mil heatmap --slides-dir`` does per slide once the
scores are read: open the slide (tiffslide), place and check the tiles, read the drawing's
level and scale it (default 2048 px on the longest side), average the tiles per pixel,
blend, draw the figure (colour bar, top-16 outlines, caption) and save both PNGs. Prints
one JSON line per setting with the median of ``--repeats`` runs and its parts.
``--smoke``: 500 tiles of 128 px, one repeat (seconds). Writing the slide is not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

#: ``--smoke``: :func:`measure`'s arguments for a run of a few seconds
SMOKE = {"tiles": 500, "tile": 128, "repeats": 1}


def write_slide(path: Path, side_tiles: int, tile: int, mpp: float = 0.5) -> tuple[int, int]:
    """A square pyramidal RGB TIFF of ``side_tiles x tile`` px (JPEG tiles of 512 px, sub-IFD
    levels downsampled 4x down to about 1,000 px); returns level 0's ``(width, height)``.

    Tiles are a few pre-encoded textures (pink and purple, like H&E), so writing a
    gigapixel level takes seconds; reading decodes every tile as a real slide's would.
    """
    import imagecodecs
    import tifffile

    size = side_tiles * tile
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:512]
    textures = []
    for base in ([230, 150, 200], [170, 90, 170], [240, 235, 240]):
        img = np.array(base) + 12 * np.sin(
            xx[..., None] / (7 + rng.uniform(0, 5)) + yy[..., None] / 9
        )
        textures.append(imagecodecs.jpeg8_encode(np.clip(img, 0, 255).astype(np.uint8), level=85))
    levels = [size]
    while levels[-1] // 4 >= 1000:
        levels.append(levels[-1] // 4)

    def stream(n: int):
        for i in range(n):
            yield textures[i % len(textures)]

    res = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, side in enumerate(levels):
            n = (-(-side // 512)) ** 2
            tif.write(
                stream(n),
                shape=(side, side, 3),
                dtype=np.uint8,
                tile=(512, 512),
                compression="jpeg",
                photometric="rgb",
                resolution=(res / 4**i, res / 4**i),
                resolutionunit="CENTIMETER",
                subifds=len(levels) - 1 if i == 0 else None,
                subfiletype=1 if i else 0,
            )
    return size, size


def draw_once(path: Path, coords: np.ndarray, scores: np.ndarray, tile: int, out: Path, **vis):
    """One slide drawn as ``mil heatmap`` draws it; returns the seconds of each part."""
    import matplotlib.pyplot as plt

    from mil.explain.overlay import overlay_caption, plot_overlay, render_overlay
    from mil.explain.placement import check_placement, tile_geometry
    from mil.explain.review import save_png
    from mil.explain.slides import open_slide

    t = {"start": time.perf_counter()}
    with open_slide(path) as slide:
        geom = tile_geometry("bench", coords, {"patch_size_level0": tile}, slide)
        check_placement(geom, slide)
        t["placed"] = time.perf_counter()
        ov = render_overlay(slide, geom.coords, scores, geom.tile_size, **vis)
        t["rendered"] = time.perf_counter()
    ov.source = geom.source
    fig = plot_overlay(
        ov,
        geom.coords,
        scores,
        geom.tile_size,
        top_k=16,
        title="bench",
        caption=overlay_caption(ov, "instance_logits", "", len(scores)),
    )
    fig.savefig(out / "bench.png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    save_png(out / "bench_overlay.png", ov.rgb)
    t["saved"] = time.perf_counter()
    return {
        "open_and_place_s": t["placed"] - t["start"],
        "read_rasterise_blend_s": t["rendered"] - t["placed"],
        "figure_and_pngs_s": t["saved"] - t["rendered"],
        "total_s": t["saved"] - t["start"],
        "drawing_px": list(ov.values.shape[::-1]),
        "level": ov.level,
    }


def measure(tiles: int = 50_000, tile: int = 256, repeats: int = 3) -> list[dict]:
    """Median seconds (and parts) of :func:`draw_once` at the default size and at level 2
    (the coarsest level, on a slide of fewer levels)."""
    import matplotlib

    matplotlib.use("Agg")
    side = int(np.ceil(np.sqrt(tiles / 0.8)))  # tissue covers ~80% of the grid
    rng = np.random.default_rng(0)
    cells = rng.choice(side * side, tiles, replace=False)
    coords = np.stack([cells % side, cells // side], 1).astype(np.float64) * tile
    scores = rng.normal(size=tiles)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tif"
        t0 = time.perf_counter()
        width, height = write_slide(path, side, tile)
        written = time.perf_counter() - t0
        from mil.explain.slides import open_slide

        with open_slide(path) as slide:
            level = min(2, len(slide.level_dimensions) - 1)
        for label, vis in (
            ("default (2048 px)", {}),
            (f"--vis-level {level}", {"vis_level": level}),
        ):
            runs = [draw_once(path, coords, scores, tile, Path(tmp), **vis) for _ in range(repeats)]
            best = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
            results.append(
                {
                    "setting": label,
                    "tiles": tiles,
                    "tile_px": tile,
                    "slide_px": [width, height],
                    "slide_written_s": round(written, 1),
                    "repeats": repeats,
                    **{k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()},
                }
            )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=50_000)
    p.add_argument("--tile", type=int, default=256, help="tile side in level-0 px")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="500 tiles of 128 px, one repeat")
    args = p.parse_args()
    kw = SMOKE if args.smoke else {"tiles": args.tiles, "tile": args.tile, "repeats": args.repeats}
    for row in measure(**kw):
        print(json.dumps(row))


if __name__ == "__main__":
    main()

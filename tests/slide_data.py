"""A real whole-slide image for the heatmap tests, and cohorts whose tile coordinates tile it.

``tests/data/CMU-1-Small-Region.svs`` is OpenSlide's Aperio test slide (2220 x 2967 px,
0.499 µm/px, 20x, JPEG; CC0 1.0: tests/data/README.md). The cohorts are the synthetic ones of
:mod:`mil.data.synthetic` with their coordinates moved onto the 128-px cells of the slide
that hold tissue, so a heatmap of any of their slides lies on real tissue.
"""

from __future__ import annotations

import functools
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from mil.data.synthetic import write_synthetic_cohort
from mil.data.synthetic_multimodal import multimodal_tabular, write_multimodal_cohort

SLIDE = Path(__file__).resolve().parent / "data" / "CMU-1-Small-Region.svs"
SLIDE_SIZE = (2220, 2967)
SLIDE_MPP = 0.499
TILE = 128


@functools.lru_cache(maxsize=1)
def tissue_cells() -> np.ndarray:
    """``[M, 2]`` level-0 corners of the slide's 128-px cells that are at least half tissue."""
    from mil.explain.overlay import tissue_mask
    from mil.explain.slides import open_slide

    with open_slide(SLIDE) as slide:
        mask = tissue_mask(slide.image(4.0))  # 32 drawn px per cell
    cells = [
        (c * TILE, r * TILE)
        for r in range(SLIDE_SIZE[1] // TILE)
        for c in range(SLIDE_SIZE[0] // TILE)
        if mask[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32].mean() >= 0.5
    ]
    return np.array(cells, dtype=np.int32)


def place_on_slide(features: Path, seed: int = 0) -> None:
    """Move every feature file's tiles onto distinct tissue cells of the slide (128-px tiles)."""
    rng = np.random.default_rng(seed)
    cells = tissue_cells()
    for path in sorted(Path(features).glob("*.h5")):
        with h5py.File(path, "a") as f:
            n = f["coords"].shape[0]
            if n > len(cells):
                raise ValueError(f"{path}: {n} tiles, but the slide has {len(cells)} tissue cells")
            coords = cells[rng.choice(len(cells), n, replace=False)]
            del f["coords"]
            f.create_dataset("coords", data=coords)
            f.attrs["patch_size_level0"] = TILE


def slide_cohort(root: Path, kind: str = "classification", slide_path: bool = True) -> dict:
    """A small cohort on the slide and a fast config over it (2 folds, 2 epochs, 1 thread).

    ``kind``: ``classification``, ``survival``, ``regression`` or ``multimodal`` (survival with omics and
    clinical tables, for the fusion models). ``slide_path``: the cohort CSV names the slide
    file of every slide (they all share the one real slide).
    """
    csv, feats = root / "cohort.csv", root / "features"
    if not csv.exists():
        if kind == "multimodal":
            write_multimodal_cohort(
                root, n_patients=24, genes_per_family=2, dim=8, min_tiles=20, max_tiles=40
            )
        else:
            write_synthetic_cohort(
                kind,
                csv,
                feats,
                n_patients=20,
                n_two_slides=0,
                dim=16,
                min_tiles=20,
                max_tiles=60,
                shift_norm=6.0,
            )
        place_on_slide(feats)
        if slide_path:
            df = pd.read_csv(csv)
            df["slide_path"] = str(SLIDE)
            df.to_csv(csv, index=False)
    data = {"csv": str(csv), "features": str(feats), "patient_col": "case_id"}
    task = {"type": "classification"}
    if kind == "regression":
        task = {"type": "regression"}
        data.update(label_col="planted_percent")
    elif kind != "classification":
        task = {"type": "survival"}
        data.update(time_col="survival_months", event_col="censorship", censored_value=1)
    if kind == "multimodal":
        data["tabular"] = multimodal_tabular(root)
    return {
        "name": f"slide_{kind}",
        "task": task,
        "data": data,
        "splits": {"dir": str(root / "splits"), "folds": 2, "val_fraction": 0.34, "seed": 0},
        "model": {"name": "abmil", "hidden_dim": 16},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "lr": 1e-3,
            "patience": None,
            "seed": 0,
            "threads": 1,
            "faithfulness": False,
        },
        "ensemble": [],
    }


def write_pyramid(path: Path, size: tuple[int, int], mpp: float, levels: int = 3) -> Path:
    """A tiled pyramidal RGB TIFF (tifffile; levels downsampled 4x each, as sub-IFDs) of
    ``size = (width, height)`` at ``mpp`` µm/px: a gradient whose pixel ``(x, y)`` at level 0
    is ``(x % 256, y % 256, 128)``."""
    import tifffile

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx % 256, yy % 256, np.full_like(xx, 128)], axis=2).astype(np.uint8)
    res = 1e4 / mpp  # pixels per centimetre
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            img = image[:: 4**level, :: 4**level]
            tif.write(
                img,
                photometric="rgb",
                tile=(128, 128),
                compression="zlib",
                resolution=(res / 4**level, res / 4**level),
                resolutionunit="CENTIMETER",
                subifds=levels - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
            )
    return path

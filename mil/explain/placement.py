"""Where a slide's tiles lie on its image, and checks that they fit: coordinates inside the
slide, the tile size against the coordinate grid and the magnifications, one scale across slides.

The tile size is the feature file's ``patch_size_level0`` (or STAMP's ``tile_size_um``),
else the step of the coordinate grid; STAMP's micrometre coordinates become level-0 pixels
with the slide's microns per pixel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from mil.explain.heatmap import infer_tile_size, tile_size_from_attrs
from mil.explain.slides import SlideError, SlideImage, SlideWarning

#: relative disagreement between two tile sizes (or two magnifications) that is reported
TOLERANCE = 0.1


@dataclass
class TileGeometry:
    """A slide's tiles in level-0 pixels, and what its feature file says of them.

    Attributes:
        slide_id: the slide.
        coords: ``[N, 2]`` level-0 x, y of each tile's top-left corner.
        tile_size: tile side in level-0 pixels.
        source: where ``tile_size`` came from (an attribute's name, or the coordinate grid).
        step: the coordinate grid's step in level-0 pixels (None for a single tile).
        patch_size: tile side in pixels at the tiles' magnification (TRIDENT ``patch_size``,
            STAMP ``tile_size_px``), if recorded.
        tile_magnification: the tiles' magnification (``magnification``, TRIDENT
            ``target_magnification``), if recorded.
        tile_mpp: microns per pixel of the tiles (``mpp``), if recorded.
        scan_magnification: the magnification of the scan the features were cut from
            (TRIDENT ``level0_magnification``), if recorded.
    """

    slide_id: str
    coords: np.ndarray
    tile_size: float
    source: str
    step: float | None
    patch_size: float | None = None
    tile_magnification: float | None = None
    tile_mpp: float | None = None
    scan_magnification: float | None = None


def _number(attrs: dict, *keys: str) -> float | None:
    for key in keys:
        if attrs.get(key) is not None:
            try:
                v = float(np.asarray(attrs[key]).reshape(-1)[0])
            except (TypeError, ValueError):
                continue
            if np.isfinite(v) and v > 0:
                return v
    return None


def _micrometres(attrs: dict) -> bool:
    unit = attrs.get("unit", attrs.get("coord_unit"))
    if isinstance(unit, bytes):
        unit = unit.decode(errors="replace")
    return str(unit).lower() in ("um", "µm", "micron", "microns", "micrometer", "micrometre")


def tile_geometry(
    slide_id: str, coords: np.ndarray, attrs: dict, slide: SlideImage | None = None
) -> TileGeometry:
    """The tiles of ``slide_id`` from its ``coords`` and feature-file ``attrs``, in level-0
    pixels (micrometre coordinates are converted with ``slide``'s microns per pixel)."""
    c = np.asarray(coords, dtype=np.float64)
    size = tile_size_from_attrs(attrs)
    source = next(
        (
            k
            for k in ("patch_size_level0", "coords.patch_size_level0", "tile_size_um", "tile_size")
            if attrs.get(k) is not None
        ),
        "patch_size_level0",
    )
    if _micrometres(attrs):
        mpp = slide.mpp if slide is not None else None
        if mpp is None:
            raise SlideError(
                f"slide {slide_id}: its tile coordinates are in micrometres (STAMP) and "
                f"{'no slide was given' if slide is None else f'{slide.path} records no microns per pixel'}; "
                f"they cannot be placed on the slide's pixels"
            )
        c = c / mpp
        size = None if size is None else size / mpp
    step = infer_tile_size(c) if len(c) > 1 else None
    if size is None:
        size, source = (step or 1.0), "the coordinate grid"
    mag = _number(attrs, "magnification", "target_magnification", "coords.target_magnification")
    return TileGeometry(
        slide_id=slide_id,
        coords=c,
        tile_size=float(size),
        source=source,
        step=step if step and step > 1 else None,
        patch_size=_number(attrs, "patch_size", "coords.patch_size", "tile_size_px"),
        tile_magnification=mag,
        tile_mpp=_number(attrs, "mpp", "microns_per_pixel", "coords.mpp"),
        scan_magnification=_number(attrs, "level0_magnification", "coords.level0_magnification"),
    )


def check_placement(geom: TileGeometry, slide: SlideImage) -> None:
    """Raise :class:`SlideError` when tile corners lie outside ``slide``; warn
    (:class:`SlideWarning`) when the tile size disagrees with the grid or the magnifications."""
    w0, h0 = slide.dimensions
    x, y = geom.coords[:, 0], geom.coords[:, 1]
    out = (x < 0) | (y < 0) | (x >= w0) | (y >= h0)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise SlideError(
            f"slide {geom.slide_id}: {int(out.sum())} of {len(out)} tile coordinates lie outside "
            f"{slide.path.name} ({w0} x {h0} px at level 0), e.g. ({x[i]:g}, {y[i]:g}); are the "
            f"features of this slide, with level-0 pixel coordinates? (the coordinates span "
            f"x {x.min():g}..{x.max():g}, y {y.min():g}..{y.max():g})"
        )
    where = f"slide {geom.slide_id}"
    if geom.step and geom.tile_size < geom.step * (1 - TOLERANCE):
        _warn(
            f"{where}: tiles of {geom.tile_size:g} px (level 0, {geom.source}) on a coordinate grid "
            f"of {geom.step:g} px leave gaps between them; is the tile size at another level or "
            f"magnification? Set patch_size_level0 in the feature files to the level-0 tile side"
        )
    _check_magnification(geom, slide, where)


def _check_magnification(geom: TileGeometry, slide: SlideImage, where: str) -> None:
    scan = slide.magnification
    if geom.scan_magnification and scan and _differ(geom.scan_magnification, scan):
        _warn(
            f"{where}: the features were cut from a {geom.scan_magnification:g}x scan, but "
            f"{slide.path.name} is {scan:g}x ({_mpp_words(slide)}); is it the same scan?"
        )
    # nominal magnifications where both are known (20x is 0.5 µm/px only roughly), else µm/px
    if geom.tile_magnification and slide.objective_power:
        ratio = slide.objective_power / geom.tile_magnification
        tiles = f"{geom.tile_magnification:g}x"
    elif geom.tile_mpp and slide.mpp:
        ratio, tiles = geom.tile_mpp / slide.mpp, f"{geom.tile_mpp:.3g} µm/px"
    else:
        return
    if not geom.patch_size:
        return
    expected = geom.patch_size * ratio
    if _differ(geom.tile_size, expected):
        _warn(
            f"{where}: tiles of {geom.patch_size:g} px at {tiles} cover {expected:.0f} px of "
            f"{slide.path.name} ({_mpp_words(slide)}), but the tile size at level 0 is "
            f"{geom.tile_size:g} px ({geom.source}); rectangles are drawn {geom.tile_size:g} px "
            f"wide. Was patch_size_level0 computed for a scan of another magnification?"
        )


def _mpp_words(slide: SlideImage) -> str:
    parts = [f"{slide.mpp:.3g} µm/px" if slide.mpp else None]
    parts.append(f"objective {slide.objective_power:g}x" if slide.objective_power else None)
    return ", ".join(p for p in parts if p) or "no microns per pixel recorded"


def check_mixed_scales(items: list[tuple[str, float, float | None]]) -> None:
    """Warn when slides drawn together have tiles of different physical sizes.

    ``items``: ``(slide_id, tile side in level-0 px, level-0 µm per px or None)``. Where
    the same level-0 tile size was used for 20x and 40x scans, the tiles of one of them
    cover half (or twice) the tissue they should (CLAM #308).
    """
    known = [(s, t, t * m) for s, t, m in items if m]
    if len(known) < 2:
        return
    lo, hi = min(known, key=lambda k: k[2]), max(known, key=lambda k: k[2])
    if _differ(lo[2], hi[2]):
        _warn(
            f"slides of different magnifications: the tiles of {lo[0]} cover {lo[2]:.0f} µm "
            f"({lo[1]:g} px at level 0) and those of {hi[0]} {hi[2]:.0f} µm ({hi[1]:g} px); "
            f"if the features were cut at one magnification, one slide's tile size at level 0 is "
            f"wrong (patch_size_level0 must follow each scan's magnification)"
        )


def _differ(a: float, b: float) -> bool:
    return abs(a - b) > TOLERANCE * max(abs(a), abs(b))


def _warn(message: str) -> None:
    warnings.warn(message, SlideWarning, stacklevel=3)

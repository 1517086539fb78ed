"""Whole-slide images behind one small reader: tiffslide by default, OpenSlide where installed.

:class:`SlideImage` gives what a heatmap needs from a slide file: the pyramid
(``level_dimensions``, ``level_downsamples``), the scan's microns per pixel and
objective power as the file records them, RGB regions at any level, and an
image of the whole slide at a chosen downsample. Both backends install from
wheels alone (``pip install 'mil-toolkit[slides]'`` for tiffslide; OpenSlide as
``openslide-python`` + ``openslide-bin``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mil.errors import DataError, MilWarning

#: file endings tried for ``<slides_dir>/<slide_id><ending>`` (lower case; matched case-blind)
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ome.tif",
    ".ome.tiff",
    ".ndpi",
    ".scn",
    ".mrxs",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".qptiff",
)
BACKENDS = ("auto", "tiffslide", "openslide")
#: the largest level image (pixels) read whole to draw a slide: 8,192 x 8,192
MAX_READ_PIXELS = 8192 * 8192


class SlideError(DataError):
    """A slide file is missing, unreadable, or does not match the tile coordinates drawn on it."""


class SlideWarning(MilWarning):
    """A slide and its features disagree in a way that may misplace or mis-size the tiles."""


@dataclass
class SlideImage:
    """An open whole-slide image (see the module's doc); close it, or use it as a context manager.

    Attributes:
        path: the slide file.
        backend: ``tiffslide`` or ``openslide``.
        level_dimensions: ``(width, height)`` of each level, level 0 first.
        level_downsamples: level-0 pixels per pixel of each level.
        mpp: level-0 microns per pixel (x) as the file records it, else None.
        objective_power: the scan's magnification (20, 40...) as recorded, else None.
    """

    path: Path
    backend: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    objective_power: float | None
    _handle: object = field(repr=False, default=None)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self.level_dimensions[0]

    @property
    def magnification(self) -> float | None:
        """The scan's magnification: the recorded objective power, else ``10 / mpp`` (0.25 µm = 40x)."""
        if self.objective_power:
            return self.objective_power
        return 10.0 / self.mpp if self.mpp else None

    def best_level(self, downsample: float) -> int:
        """The coarsest level at least as fine as ``downsample`` (level-0 px per drawn px)."""
        fine = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(fine, key=lambda i: self.level_downsamples[i]) if fine else 0

    def read_region(self, xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB ``[h, w, 3]`` uint8 of ``size = (w, h)`` pixels of ``level``, from level-0 ``xy``."""
        xy, size = (int(xy[0]), int(xy[1])), (int(size[0]), int(size[1]))
        try:
            if self.backend == "tiffslide":
                region = np.asarray(self._handle.read_region(xy, level, size, as_array=True))
            else:
                region = np.asarray(self._handle.read_region(xy, level, size).convert("RGBA"))
        except Exception as exc:  # both backends raise several types for a damaged file
            raise SlideError(
                f"{self.path}: cannot read {size[0]} x {size[1]} px at level {level} from {xy} "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return _rgb(region)

    def image(self, downsample: float | None = None, level: int | None = None) -> np.ndarray:
        """The whole slide as RGB ``[h, w, 3]``: ``level`` as it is (``downsample`` None), or at
        ``downsample`` level-0 pixels per pixel (``round(W0 / d) x round(H0 / d)``), read from
        ``level`` (default: the coarsest one at least as fine) and resized with a box filter."""
        from PIL import Image

        if downsample is None and level is None:
            raise SlideError("give a downsample or a level to draw the slide at")
        level = self.best_level(downsample) if level is None else level
        lw, lh = self.level_dimensions[level]
        if lw * lh > MAX_READ_PIXELS:
            raise SlideError(
                f"{self.path}: drawing it would read level {level} whole ({lw} x {lh} px), and "
                f"the file has no coarser level for this scale; choose a coarser --vis-level / "
                f"--vis-mpp, or save the slide as a pyramid (e.g. vips tiffsave --tile --pyramid)"
            )
        img = self.read_region((0, 0), level, (lw, lh))
        if downsample is None:
            return img
        w0, h0 = self.dimensions
        size = (max(1, round(w0 / downsample)), max(1, round(h0 / downsample)))
        if (lw, lh) == size:
            return img
        return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))

    def close(self) -> None:
        close = getattr(self._handle, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rgb(region: np.ndarray) -> np.ndarray:
    """RGB uint8 from the backends' RGB or RGBA (transparent = outside the scan: drawn white)."""
    region = np.asarray(region)
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    if region.shape[2] == 4:
        alpha = region[..., 3:4].astype(np.float32) / 255.0
        rgb = region[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8)
    return np.ascontiguousarray(region[..., :3]).astype(np.uint8, copy=False)


def open_slide(path: str | Path, backend: str = "auto") -> SlideImage:
    """Open a whole-slide image with tiffslide (``auto``: first), else OpenSlide.

    Raises :class:`SlideError` naming the file when it is missing, when no
    backend is installed, or when none can read it.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise SlideError(f"slide reader {backend!r}: use one of {', '.join(BACKENDS)}")
    if not path.is_file():
        raise SlideError(f"slide file not found: {path}")
    tried: list[str] = []
    for name in ("tiffslide", "openslide") if backend == "auto" else (backend,):
        handle = _open_with(name, path, tried)
        if handle is not None:
            return _describe(path, name, handle)
    missing = all("not installed" in t for t in tried)
    advice = (
        "install a slide reader: pip install 'mil-toolkit[slides]' (tiffslide), or "
        "pip install openslide-python openslide-bin"
        if missing
        else "is it a whole-slide image (svs, tiff, ndpi...)? OpenSlide reads a few formats that "
        "tiffslide does not (mrxs, vms, scn): pip install openslide-python openslide-bin"
    )
    raise SlideError(f"{path}: cannot open the slide ({'; '.join(tried)}); {advice}")


def _open_with(name: str, path: Path, tried: list[str]):
    try:
        if name == "tiffslide":
            import tiffslide as module

            opener = module.TiffSlide
        else:
            import openslide as module

            opener = module.OpenSlide
    except (ImportError, OSError) as exc:  # openslide-python without the OpenSlide library: OSError
        tried.append(f"{name} not installed ({type(exc).__name__}: {exc})")
        return None
    try:
        return opener(str(path))
    except Exception as exc:  # each backend raises its own types for a file it cannot read
        tried.append(f"{name}: {type(exc).__name__}: {exc}")
        return None


def _describe(path: Path, backend: str, handle) -> SlideImage:
    props = dict(handle.properties)
    mpp = _positive(props.get(f"{backend}.mpp-x", props.get("openslide.mpp-x")))
    power = _positive(
        props.get(f"{backend}.objective-power", props.get("openslide.objective-power"))
    )
    return SlideImage(
        path=path,
        backend=backend,
        level_dimensions=[(int(w), int(h)) for w, h in handle.level_dimensions],
        level_downsamples=[float(d) for d in handle.level_downsamples],
        mpp=mpp,
        objective_power=power,
        _handle=handle,
    )


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def slide_stem(path: Path) -> str | None:
    """A slide file's name without its slide ending (``a.ome.tiff`` -> ``a``); None for a file
    without one of :data:`SLIDE_EXTENSIONS` (a feature file, a CSV...)."""
    name = path.name
    low = name.lower()
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def find_slide_file(folder: str | Path, slide_id: str) -> Path:
    """``<folder>/<slide_id>.<ending>`` for one of :data:`SLIDE_EXTENSIONS` (case-blind).

    Names are compared, never globbed: a slide id holding ``../`` or ``*`` cannot reach
    other folders. Raises :class:`SlideError` naming the slide, the folder and the endings.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SlideError(f"--slides-dir {folder}: not a folder (looking for slide {slide_id})")
    hits = sorted(p for p in folder.iterdir() if p.is_file() and slide_stem(p) == slide_id)
    if not hits:
        raise SlideError(
            f"slide {slide_id}: no slide file {slide_id}.<{'|'.join(e[1:] for e in SLIDE_EXTENSIONS)}> "
            f"in {folder}; put it there, or give the cohort CSV a slide_path column"
        )
    if len(hits) > 1:
        warnings.warn(
            f"slide {slide_id}: {len(hits)} files in {folder} ({', '.join(p.name for p in hits)}); "
            f"drawing on {hits[0].name}",
            SlideWarning,
            stacklevel=2,
        )
    return hits[0]

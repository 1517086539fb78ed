"""Pictures and review lists of a finished run: top slides, top tiles, heatmaps.

:class:`ReviewMixin` is what ``mil.Run`` draws with; it asks the run for
``predictions``, ``scores``, ``task`` and the scores index, and knows nothing
of how they are stored.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mil.errors import MilError
from mil.io import atomic_path


def _sheet_title(slide_id: str, table: pd.DataFrame, k: int) -> str:
    kind = table["kind"].iloc[0] if len(table) else "score"
    return f"{slide_id}: the {k} highest and {k} lowest tiles by {kind} (level 0)"


def save_png(path: Path, rgb) -> Path:
    """An RGB ``[h, w, 3]`` uint8 array as a PNG (atomically)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="png", compress_level=1)  # 16 MP: 3 s at level 6
    return path


class ReviewMixin:
    """Top slides, top tiles and heatmaps, for a class that provides ``predictions(fold)``,
    ``scores(slide_id, kind, cls, fold)``, ``task`` and ``_bag_index(fold, bag, strict)``."""

    def top_slides(self, n: int, fold: int | str | None = None) -> list[str]:
        """The ``n`` test slides the model was most sure are positive (or highest-risk).

        Ranking: out-of-fold probability of the last class (the positive class
        of a binary task), or the predicted risk for survival; ties by slide
        id. Patient-level bags contribute all their slides.
        """
        pred = self.predictions(fold)
        col = self.task.score_column()
        if col is None:
            raise MilError(f"task {self.task.name!r} does not rank bags; name the slides instead")
        pred = pred.sort_values([col, "bag_id"], ascending=[False, True], kind="stable")
        out: list[str] = []
        for bag_id, f in zip(pred["bag_id"], pred["fold"]):
            entry = self._bag_index(f, bag_id, strict=False).get(bag_id)
            for s in entry[1] if entry and entry[1] else (bag_id,):
                if s not in out:
                    out.append(s)
            if len(out) >= n:
                break
        return out[:n]

    def top_tiles(
        self,
        slide_id: str,
        k: int = 16,
        kind: str | None = "default",
        cls: int | str | None = None,
        fold: int | str | None = None,
    ) -> pd.DataFrame:
        """The ``k`` highest-scored tiles of a test slide: ``rank, index, x, y, score`` (+ slide, fold)."""
        from mil.explain.heatmap import top_k_tiles

        s = self.scores(slide_id, kind=kind, cls=cls, fold=fold)
        if "x" not in s:
            raise MilError(f"slide {slide_id}: its feature file has no tile coordinates")
        top = top_k_tiles(s[["x", "y"]].to_numpy(), s["score"].to_numpy(), k)
        top["index"] = s["index"].to_numpy()[top["index"].to_numpy()]
        top.insert(0, "slide_id", slide_id)
        top["fold"] = s.attrs["fold"]
        return top

    def heatmap(
        self,
        slide_id: str,
        kind: str | None = "default",
        cls: int | str | None = None,
        fold: int | str | None = None,
        normalize: str | None = None,
        smooth: float = 0.0,
        top_k: int = 16,
        cmap: str | None = None,
        wsi: str | Path | None = None,
        ax=None,
        title: str | None = None,
        **draw,
    ):
        """A matplotlib Figure of the slide's instance scores at their tile positions.

        Scores come from :meth:`scores` (the fold that tested the slide); the
        tile size from the feature file's attributes, else the coordinate
        grid. ``normalize`` None: percentile rank within the slide; a signed kind
        (``contribution``, ``attention_x_logit``: a share of the output, whatever the
        task) keeps its sign on a diverging map centred at 0 (``RdBu_r``).

        ``wsi``: a whole-slide image file to draw over (:meth:`overlay`, whose options
        ``vis_level``, ``vis_mpp``, ``max_size``, ``alpha``, ``tissue``, ``backend`` and
        ``caption`` pass through ``draw``); without it, the tiles alone on their grid
        (:func:`mil.explain.heatmap.plot_heatmap`).
        """
        fig, _ = self._heatmap(
            slide_id, kind, cls, fold, normalize, smooth, top_k, cmap, wsi, ax, title, **draw
        )
        return fig

    def _heatmap(
        self,
        slide_id,
        kind="default",
        cls=None,
        fold=None,
        normalize=None,
        smooth=0.0,
        top_k=16,
        cmap=None,
        wsi=None,
        ax=None,
        title=None,
        **draw,
    ):
        """:meth:`heatmap`'s Figure, and the :class:`Overlay` it drew (None without ``wsi``)."""
        from mil.explain.heatmap import plot_heatmap, signed_kind
        from mil.explain.overlay import plot_overlay

        s = self._drawable_scores(slide_id, kind, cls, fold)
        title = self._title(slide_id, s.attrs) if title is None else title
        signed = signed_kind(s.attrs["kind"])
        normalize = normalize or "rank"
        if wsi is None:
            if draw:
                raise MilError(
                    f"{', '.join(sorted(draw))}: options of a drawing over the slide (wsi=)"
                )
            fig = plot_heatmap(
                s[["x", "y"]].to_numpy(),
                s["score"].to_numpy(),
                s.attrs["tile_size"],
                normalize,
                smooth,
                top_k,
                cmap,
                title,
                ax,
                signed=signed,
            )
            return fig, None
        caption = draw.pop("caption", True)
        ov, geom = self._overlay(s, wsi, normalize, signed, smooth, cmap, draw)
        words = self._caption(s, ov) if caption else None
        fig = plot_overlay(
            ov, geom.coords, s["score"].to_numpy(), geom.tile_size, top_k, title, words, ax
        )
        return fig, ov

    def overlay(
        self,
        slide_id: str,
        wsi: str | Path,
        kind: str | None = "default",
        cls: int | str | None = None,
        fold: int | str | None = None,
        normalize: str | None = None,
        vis_level: int | None = None,
        vis_mpp: float | None = None,
        max_size: int = 2048,
        alpha: float = 0.5,
        tissue: bool = False,
        smooth: float = 0.0,
        cmap: str | None = None,
        backend: str = "auto",
    ):
        """The slide's scores drawn over its whole-slide image ``wsi``: an
        :class:`~mil.explain.overlay.Overlay` (per-pixel mean score, the slide image and the
        blended RGB at the drawing's scale).

        The drawing: level ``vis_level`` as it is, or ``vis_mpp`` microns per pixel, or the
        slide's longest side at ``max_size`` pixels. Tile rectangles from the level-0
        coordinates and the tile size (``patch_size_level0``, else the coordinate grid),
        checked against the slide (:func:`mil.explain.placement.check_placement`: tiles
        outside the slide are an error; a tile size that disagrees with the grid or the
        magnifications a warning). Overlapping tiles are averaged; ``alpha`` is the colours'
        opacity; ``tissue`` keeps them on tissue; ``backend``: ``auto`` (tiffslide, else
        OpenSlide), ``tiffslide`` or ``openslide``.
        """
        from mil.explain.heatmap import signed_kind

        s = self._drawable_scores(slide_id, kind, cls, fold)
        draw = dict(
            vis_level=vis_level,
            vis_mpp=vis_mpp,
            max_size=max_size,
            alpha=alpha,
            tissue=tissue,
            backend=backend,
        )
        return self._overlay(
            s, wsi, normalize or "rank", signed_kind(s.attrs["kind"]), smooth, cmap, draw
        )[0]

    def _overlay(self, s: pd.DataFrame, wsi, normalize: str, signed: bool, smooth, cmap, draw):
        from mil.explain.overlay import render_overlay
        from mil.explain.slides import open_slide

        draw = dict(draw)
        with open_slide(wsi, draw.pop("backend", "auto")) as slide:
            geom = self._placed(s, slide)
            ov = render_overlay(
                slide,
                geom.coords,
                s["score"].to_numpy(),
                geom.tile_size,
                normalize,
                signed,
                smooth=smooth,
                cmap=cmap,
                **draw,
            )
        ov.source = geom.source
        return ov, geom

    def _placed(self, s: pd.DataFrame, slide):
        """The slide's tiles in level-0 pixels, checked against ``slide``."""
        from mil.explain.heatmap import feature_attrs
        from mil.explain.placement import check_placement, tile_geometry

        slide_id = s.attrs["slide_id"]
        path = getattr(self, "_feature_index", {}).get(slide_id)
        attrs = feature_attrs(path) if path is not None else {}
        geom = tile_geometry(slide_id, s[["x", "y"]].to_numpy(), attrs, slide)
        check_placement(geom, slide)
        return geom

    def tile_crops(
        self,
        slide_id: str,
        wsi: str | Path,
        k: int = 8,
        kind: str | None = "default",
        cls: int | str | None = None,
        fold: int | str | None = None,
        backend: str = "auto",
    ) -> tuple[pd.DataFrame, list]:
        """The ``k`` highest- and ``k`` lowest-scored tiles cut from ``wsi`` at level 0.

        Returns the table (``slide_id, side, rank, index, x, y, score, fold, tile_size``;
        ``index`` is the tile's row in the feature file, ``x, y`` its level-0 corner) and
        one RGB array ``[s, s, 3]`` per row.
        """
        from mil.explain.crops import cut_tiles, review_tiles
        from mil.explain.slides import open_slide

        s = self._drawable_scores(slide_id, kind, cls, fold)
        with open_slide(wsi, backend) as slide:
            geom = self._placed(s, slide)
            table = review_tiles(geom.coords, s["score"].to_numpy(), k)
            crops = cut_tiles(slide, table, geom.tile_size)
        table["index"] = s["index"].to_numpy()[table["index"].to_numpy()]
        table.insert(0, "slide_id", slide_id)
        table["fold"], table["tile_size"] = s.attrs["fold"], geom.tile_size
        table["kind"] = s.attrs["kind"]
        return table, crops

    def contact_sheet(self, slide_id: str, wsi: str | Path, k: int = 8, **options):
        """A Figure of :meth:`tile_crops` (same ``options``), each tile with its score."""
        from mil.explain.crops import contact_sheet

        table, crops = self.tile_crops(slide_id, wsi, k, **options)
        return contact_sheet(table, crops, _sheet_title(slide_id, table, k))

    def save_heatmap(self, slide_id: str, path: str | Path, dpi: int = 150, **options) -> Path:
        """Draw :meth:`heatmap` (same ``options``) and save it as a PNG at ``path`` (atomically).

        Drawn over a slide (``wsi=``), the drawing itself is saved beside it at its own
        scale, without axes: ``<path stem>_overlay.png``.
        """
        self._save_heatmap(slide_id, Path(path), dpi, **options)
        return Path(path)

    def _save_heatmap(self, slide_id: str, path: Path, dpi: int, **options):
        import matplotlib.pyplot as plt

        fig, ov = self._heatmap(slide_id, **options)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(fig)
        if ov is not None:
            save_png(path.with_name(f"{path.stem}_overlay.png"), ov.rgb)
        return ov

    def save_heatmaps(
        self,
        slide_ids: list[str],
        out: str | Path,
        slides_dir: str | Path | None = None,
        draw: dict | None = None,
        dpi: int = 150,
        **options,
    ) -> list[Path]:
        """:meth:`save_heatmap` of each slide as ``out/<slide_id>.png``, over its whole-slide
        image where :meth:`slide_file` finds one (``draw``: :meth:`overlay`'s options), plus
        ``<slide_id>_overlay.png``. Warns when the slides' tiles differ in physical size
        (:func:`mil.explain.placement.check_mixed_scales`). Returns the files written."""
        from mil.explain.placement import check_mixed_scales
        from mil.io import safe_filename

        out = Path(out)
        paths, scales = [], []
        for slide in slide_ids:
            wsi = self.slide_file(slide, slides_dir)
            extra = {"wsi": wsi, **(draw or {})} if wsi is not None else {}
            path = out / f"{safe_filename(slide)}.png"
            ov = self._save_heatmap(slide, path, dpi, **options, **extra)
            paths.append(path)
            if ov is not None:
                paths.append(path.with_name(f"{path.stem}_overlay.png"))
                scales.append((slide, ov.tile_size, ov.mpp / ov.downsample if ov.mpp else None))
        check_mixed_scales(scales)
        return paths

    def save_tile_crops(
        self, slide_id: str, wsi: str | Path, out: str | Path, k: int = 8, **options
    ) -> Path:
        """:meth:`tile_crops` (same ``options``) written to ``out/<slide_id>/``: ``top_01.png``…,
        ``bottom_01.png``…, ``tiles.csv`` (with each crop's file) and ``contact_sheet.png``."""
        import matplotlib.pyplot as plt

        from mil.explain.crops import contact_sheet
        from mil.io import safe_filename, write_csv

        table, crops = self.tile_crops(slide_id, wsi, k, **options)
        folder = Path(out) / safe_filename(slide_id)
        names = [f"{side}_{int(rank):02d}.png" for side, rank in zip(table["side"], table["rank"])]
        for name, crop in zip(names, crops):
            save_png(folder / name, crop)
        write_csv(folder / "tiles.csv", table.assign(file=names))
        fig = contact_sheet(table, crops, _sheet_title(slide_id, table, k))
        try:
            with atomic_path(folder / "contact_sheet.png") as tmp:
                fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
        finally:
            plt.close(fig)
        return folder

    def slide_file(self, slide_id: str, slides_dir: str | Path | None = None) -> Path | None:
        """The whole-slide image of ``slide_id``: ``<slides_dir>/<slide_id>.<ending>``
        (:data:`mil.explain.slides.SLIDE_EXTENSIONS`), else the cohort CSV's ``slide_path``
        (relative to the CSV's folder); None when neither names one.

        Raises :class:`~mil.explain.slides.SlideError` naming the slide when the file is missing.
        """
        from mil.explain.slides import SlideError, find_slide_file

        if slides_dir is not None:
            return find_slide_file(slides_dir, slide_id)
        csv = self.config.data.csv
        if not csv or not Path(csv).is_file():
            return None
        cohort = pd.read_csv(csv, dtype=str)
        col = self.config.data.slide_col
        if "slide_path" not in cohort or col not in cohort:
            return None
        hit = cohort.loc[cohort[col] == slide_id, "slide_path"].dropna()
        if hit.empty:
            return None
        path = Path(hit.iloc[0])
        path = path if path.is_absolute() else Path(csv).parent / path
        if not path.is_file():
            raise SlideError(
                f"slide {slide_id}: its slide_path in {csv} ({hit.iloc[0]}) is no file ({path}); "
                f"fix the path, or give --slides-dir"
            )
        return path

    def _drawable_scores(self, slide_id: str, kind, cls, fold) -> pd.DataFrame:
        s = self.scores(slide_id, kind=kind, cls=cls, fold=fold)
        if "slide_id" in s:
            raise MilError(
                f"{slide_id} is a bag of several slides ({', '.join(s['slide_id'].unique())}); "
                f"draw one slide at a time"
            )
        if "x" not in s:
            raise MilError(
                f"slide {slide_id}: its feature file has no tile coordinates, so there is "
                f"nothing to place the scores on"
            )
        return s

    def _caption(self, s: pd.DataFrame, ov) -> str:
        from mil.explain.overlay import overlay_caption
        from mil.models.base import SCORE_KINDS

        kind = str(s.attrs["kind"])
        meaning = SCORE_KINDS.get(kind.split("[")[0], "the model's main instance score")
        return overlay_caption(ov, kind, meaning.split(";")[0].split(":")[0], len(s))

    def _title(self, slide_id: str, attrs: dict) -> str:
        parts = [f"{slide_id}", f"fold {attrs['fold']}"]
        try:
            pred = self.predictions(attrs["fold"])
        except MilError:
            pred = None
        if pred is not None:
            row = pred[pred["bag_id"] == attrs["bag_id"]]
            words = self.task.describe(row.iloc[0]) if len(row) else ""
            if words:
                parts.append(words)
        if attrs.get("kind") not in (None, "score"):
            parts.append(str(attrs["kind"]))
        return " · ".join(parts)

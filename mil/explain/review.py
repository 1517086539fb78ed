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
        slide_path: str | Path | None = None,
        ax=None,
        title: str | None = None,
    ):
        """A matplotlib Figure of the slide's instance scores at their tile positions.

        Scores come from :meth:`scores` (the fold that tested the slide); the
        tile size from the feature file's attributes, else the coordinate
        grid. See :func:`mil.explain.heatmap.plot_heatmap` for the options.
        ``normalize`` and ``cmap`` None: signed scores of a survival run (a share of
        the risk: higher or lower) are drawn ``signed`` on a diverging map centred
        at 0 (``RdBu_r``); everything else by percentile rank on ``viridis``.
        """
        from mil.explain.heatmap import plot_heatmap, signed_kind

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
        if title is None:
            title = self._title(slide_id, s.attrs)
        diverging = self.task.name == "survival" and signed_kind(s.attrs["kind"])
        normalize = normalize or ("signed" if diverging else "rank")
        cmap = cmap or ("RdBu_r" if normalize == "signed" else "viridis")
        return plot_heatmap(
            s[["x", "y"]].to_numpy(),
            s["score"].to_numpy(),
            tile_size=s.attrs["tile_size"],
            normalize=normalize,
            smooth=smooth,
            top_k=top_k,
            cmap=cmap,
            title=title,
            ax=ax,
            slide_path=slide_path,
        )

    def save_heatmap(self, slide_id: str, path: str | Path, dpi: int = 150, **options) -> Path:
        """Draw :meth:`heatmap` (same ``options``) and save it as a PNG at ``path`` (atomically)."""
        import matplotlib.pyplot as plt

        fig = self.heatmap(slide_id, **options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(fig)
        return path

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

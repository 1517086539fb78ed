"""A slide's highest- and lowest-scored tiles cut from the whole-slide image at level 0, and
a contact sheet of them with their scores, for a pathologist to review."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mil.explain.heatmap import top_k_tiles
from mil.explain.slides import SlideImage


def review_tiles(coords: np.ndarray, scores: np.ndarray, k: int) -> pd.DataFrame:
    """The ``k`` highest and the ``k`` lowest-scored tiles: ``side`` (``top``/``bottom``),
    ``rank`` (1 = highest, or lowest), ``index`` (row in ``coords``), ``x, y, score``.

    A slide of fewer than ``2 k`` tiles gives each tile once: the top ones first.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    top = top_k_tiles(coords, s, k).assign(side="top")
    rest = np.setdiff1d(np.arange(len(s)), top["index"].to_numpy())
    bottom = top_k_tiles(np.asarray(coords)[rest], -s[rest], min(k, len(rest)))
    bottom["index"] = rest[bottom["index"].to_numpy()]
    bottom["score"] = -bottom["score"]
    table = pd.concat([top, bottom.assign(side="bottom")], ignore_index=True)
    return table[["side", "rank", "index", "x", "y", "score"]]


def cut_tiles(slide: SlideImage, table: pd.DataFrame, tile_size: float) -> list[np.ndarray]:
    """RGB ``[s, s, 3]`` of each row's tile (``x, y`` level-0 corner, side ``tile_size``) at level 0."""
    side = max(int(round(tile_size)), 1)
    return [
        slide.read_region((int(round(x)), int(round(y))), 0, (side, side))
        for x, y in zip(table["x"], table["y"])
    ]


def contact_sheet(
    table: pd.DataFrame, crops: list[np.ndarray], title: str | None = None, cols: int = 8
):
    """A Figure of ``crops`` in ``table``'s order, each captioned with its side, rank and score:
    the top tiles on the first rows, the bottom ones below."""
    import matplotlib.pyplot as plt

    sides = [table.index[table["side"] == side].tolist() for side in ("top", "bottom")]
    cols = max(min(cols, max(len(sides[0]), len(sides[1]))), 1)
    rows_per = [-(-len(idx) // cols) for idx in sides]
    nrows = max(sum(rows_per), 1)
    fig, axes = plt.subplots(nrows, cols, figsize=(1.6 * cols, 1.85 * nrows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    row = 0
    for idx, n in zip(sides, rows_per):
        for j, i in enumerate(idx):
            ax = axes[row + j // cols, j % cols]
            ax.imshow(crops[i], interpolation="lanczos")
            r = table.loc[i]
            ax.set_title(f"{r['side']} {int(r['rank'])}: {r['score']:.3g}", fontsize=7)
        row += n
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig

"""Collapsed features: a cohort whose bags hold (nearly) the same vectors, so that no model
can tell its patients apart (blank tiles, an encoder without its weights, one file copied
for every slide, tiles shuffled between files).

Three cheap statistics over per-bag moments (one pass over each bag, ``O(D)`` memory per
bag), each with a threshold far from what real or synthetic features give:

* **Constant features.** ``spread = sqrt(B + W) / sqrt(E||x||²)``: the root-mean-square
  distance of a tile from the cohort's mean vector (between-bag ``B`` plus within-bag ``W``
  variance, summed over dimensions), as a fraction of the tiles' root-mean-square length.
  Scale-free and unaffected by the large common offset of post-ReLU features (for which
  the cosine similarity of bag means is near 1 in healthy cohorts too). Encoders give tens
  of percent (the synthetic cohorts ~95%); one vector stored in float16 gives ~0.02%.
  Reported below ``CONSTANT_SPREAD`` = 0.1%.
* **Bags no more different than their tiles' noise.** ``F = B / (mean_i w_i / n_i)``, the
  between-bag variance of the bag means over what it would be if every bag's tiles were
  drawn from one common distribution (``w_i`` the bag's within variance, ``n_i`` its tiles).
  Tiles shuffled between files, or features that carry no slide information, give F ≈ 1;
  slides that really differ give F ≫ 1 (≈ 4-6 on the small synthetic cohorts of 20-40
  tiles per bag, ≈ 50 with 200-400; real slides, with stain and tissue differences and
  thousands of tiles, far more). Reported below ``SLIDE_F`` = 1.5, and only where the
  median bag has ``MIN_TILES`` = 16 tiles or more: F grows with the tiles per bag, and with
  5-10 tiles the synthetic cohorts' weak slide effects give F ≈ 1.1-1.4 as well. Not
  measured for slide embeddings (one vector per bag).
* **Identical files.** Bags whose tile count and mean vector agree to the last bit are
  named; the two statistics above use one bag of each such group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CONSTANT_SPREAD = 1e-3
SLIDE_F = 1.5
MIN_BAGS = 3
MIN_TILES = 16


class FeatureSpread:
    """Per-bag moments of a cohort's features, added one bag at a time, and
    :meth:`findings` about them."""

    def __init__(self) -> None:
        self._bags: list[tuple[Path, int, np.ndarray, float, float]] = []

    def add(self, path: str | Path, features: np.ndarray) -> None:
        """Record the moments of one bag's features ``[N, D]``."""
        x = np.asarray(features, dtype=np.float64)
        n, mean = len(x), x.mean(0)
        within = float(((x - mean) ** 2).sum() / (n - 1)) if n > 1 else float("nan")
        self._bags.append((Path(path), n, mean, within, float((x**2).sum(1).mean())))

    def statistics(self) -> dict:
        """``spread`` and ``f`` of the module's doc (None where undefined or not measured),
        ``n_bags`` (distinct bags of the most common dimension) and ``duplicates`` (groups of
        identical bags' paths)."""
        dims = [len(b[2]) for b in self._bags]
        dim = max(set(dims), key=dims.count) if dims else 0
        groups: dict[tuple, list] = {}
        for b in self._bags:
            if len(b[2]) == dim:
                groups.setdefault((b[1], b[2].tobytes()), []).append(b)
        unique = [g[0] for g in groups.values()]
        out = {
            "n_bags": len(unique),
            "duplicates": [[b[0] for b in g] for g in groups.values() if len(g) > 1],
            "spread": None,
            "f": None,
        }
        if len(unique) < MIN_BAGS:
            return out
        n = np.array([b[1] for b in unique], dtype=float)
        means = np.stack([b[2] for b in unique])
        within = np.array([b[3] for b in unique])
        between = float(((means - means.mean(0)) ** 2).sum(1).mean())
        length2 = float(np.mean([b[4] for b in unique]))
        tiles = n > 1
        w = float(within[tiles].mean()) if tiles.any() else 0.0
        out["spread"] = float(np.sqrt((between + w) / length2)) if length2 > 0 else 0.0
        if tiles.sum() >= MIN_BAGS and np.median(n) >= MIN_TILES:
            noise = float((within[tiles] / n[tiles]).mean()) * (1 - 1 / len(unique))
            out["f"] = between / noise if noise > 0 else float("inf")
        return out

    def findings(self) -> list[tuple[str, str]]:
        """(where, message) for identical files and collapsed features, as described in the
        module's doc; bags of the most common dimension only."""
        stats = self.statistics()
        out = _duplicates(stats["duplicates"])
        if stats["spread"] is not None and stats["spread"] < CONSTANT_SPREAD:
            out.append(("features", _constant_message(stats["n_bags"], stats["spread"])))
        elif stats["f"] is not None and stats["f"] < SLIDE_F:
            out.append(("features", _alike_message(stats["n_bags"], stats["f"])))
        return out


def _duplicates(groups: list[list[Path]]) -> list[tuple[str, str]]:
    if not groups:
        return []
    groups = sorted(groups, key=len, reverse=True)
    n_files = sum(len(g) for g in groups)
    shown = " = ".join(p.name for p in groups[0][:3]) + (" = …" if len(groups[0]) > 3 else "")
    more = f", and {len(groups) - 1} more group(s)" if len(groups) > 1 else ""
    return [
        (
            groups[0][0].name,
            f"{n_files} feature files hold features identical to another file's (e.g. {shown}"
            f"{more}): was one file copied, or one slide's features written under several names?",
        )
    ]


def _constant_message(n_bags: int, spread: float) -> str:
    return (
        f"collapsed features: across {n_bags} bags, tiles differ from the cohort's mean vector "
        f"by {100 * spread:.3g}% of their length (healthy encoders: tens of percent), so the "
        f"bags are indistinguishable. Were the tiles blank, or the encoder's weights not loaded?"
    )


def _alike_message(n_bags: int, f: float) -> str:
    return (
        f"collapsed features: the mean vectors of {n_bags} bags differ no more than their tiles' "
        f"noise predicts (between-bag variance {f:.2f}x that of bags drawn from one common pool "
        f"of tiles; slides that really differ give well above {SLIDE_F:g}). Were tiles "
        f"shuffled between files, or the same tiles encoded for every slide?"
    )

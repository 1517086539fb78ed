"""Instance graphs for graph aggregators: k-nearest-neighbour edges per bag.

Spatial graphs come from ``scipy.spatial.cKDTree`` on tile coordinates; feature
graphs from chunked float64 distances + ``topk`` (never the full N x N matrix).
torch-geometric's ``knn_graph`` is not used: it needs pyg-lib.
Every graph here has no self loops and is undirected (each edge in both
directions, once).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from mil.data.batch import Bag, BagBatch
from mil.errors import DataError

GRAPH_KINDS = ("spatial", "feature")

# Distances held at once by knn_edges_feature when ``chunk`` is not given (64 MB of float64).
_FEATURE_BLOCK_ELEMENTS = 1 << 23


def _complete_graph(n: int) -> Tensor:
    """All ordered pairs ``i != j`` of ``n`` nodes, ``[2, n(n-1)]``."""
    idx = torch.arange(n)
    src = idx.repeat_interleave(n)
    dst = idx.repeat(n)
    keep = src != dst
    return torch.stack([src[keep], dst[keep]])


def _undirected(src: Tensor, dst: Tensor, n: int) -> Tensor:
    """Both directions of every edge, deduplicated and sorted by (source, target)."""
    key = torch.cat([src * n + dst, dst * n + src]).unique()
    return torch.stack([key // n, key % n])


def knn_edges_spatial(coords: Tensor | np.ndarray, k: int = 8) -> Tensor:
    """Undirected k-nearest-neighbour graph of tile coordinates ``[N, 2]``.

    Each tile is joined to its ``k`` nearest other tiles (Euclidean, via
    ``cKDTree``), then edges are symmetrised. ``N <= k`` gives the complete
    graph; ``N = 1`` no edges. Returns ``edge_index`` ``[2, E]`` (int64).
    """
    pts = np.asarray(coords.detach().cpu() if isinstance(coords, Tensor) else coords, np.float64)
    if pts.ndim != 2:
        raise ValueError(f"coords must be [N, 2], got shape {tuple(pts.shape)}")
    n = pts.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n <= k + 1:
        return _complete_graph(n)
    _, idx = cKDTree(pts).query(pts, k=k + 1)
    nbr = torch.from_numpy(np.ascontiguousarray(idx)).long()
    return _drop_self(nbr, k)


def _drop_self(nbr: Tensor, k: int) -> Tensor:
    """From ``[N, k+1]`` neighbour lists that usually include the node itself,
    keep the ``k`` nearest others (tiles with duplicate coordinates may list
    themselves anywhere, or not at all), and symmetrise."""
    n = nbr.shape[0]
    is_self = nbr == torch.arange(n).unsqueeze(1)
    drop = is_self.clone()
    drop[:, -1] |= ~is_self.any(1)
    dst = nbr[~drop].view(n, k)
    src = torch.arange(n).repeat_interleave(k)
    return _undirected(src, dst.reshape(-1), n)


def knn_edges_feature(x: Tensor, k: int = 8, chunk: int | None = None) -> Tensor:
    r"""Undirected k-nearest-neighbour graph in feature space, ``x [N, D]`` (Euclidean).

    Squared distances :math:`|q|^2 + |x|^2 - 2 q^\top x` are computed in float64
    for ``chunk`` query rows at a time, so memory is ``chunk x N``, never
    ``N x N``; ``chunk=None`` picks rows so one block holds at most 8M
    distances. In float64 the matrix-product form's cancellation error
    (about 1e-16 of the squared norms) is far below the float32 rounding of
    the features themselves, and it runs on BLAS: about 12x faster than
    ``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")`` at
    D = 1024, with at least its accuracy. ``N <= k`` gives the complete graph;
    ``N = 1`` no edges.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = x.shape[0]
    if n <= k + 1:
        return _complete_graph(n)
    x = x.detach().to(torch.float64)
    sq = (x * x).sum(1)
    rows = chunk if chunk is not None else max(1, _FEATURE_BLOCK_ELEMENTS // n)
    nbrs = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        d2 = torch.addmm(sq[start:stop, None] + sq[None, :], x[start:stop], x.T, alpha=-2.0)
        d2[torch.arange(stop - start), torch.arange(start, stop)] = float("inf")
        nbrs.append(d2.topk(k, dim=1, largest=False).indices.cpu())
    dst = torch.cat(nbrs).reshape(-1)
    src = torch.arange(n).repeat_interleave(k)
    return _undirected(src, dst, n)


def bag_graph(bag: Bag, kind: str, k: int = 8) -> Tensor:
    """The instance graph of one bag: ``kind`` is ``"spatial"`` (tile coordinates)
    or ``"feature"`` (instance features); returns ``edge_index [2, E]`` local to the bag."""
    if kind == "spatial":
        if bag.coords is None:
            raise DataError(
                f"bag {bag.bag_id!r}: a spatial instance graph needs tile coordinates, but "
                "its feature file has none; add 'coords' to the file or use graph 'feature'"
            )
        return knn_edges_spatial(bag.coords, k)
    if kind == "feature":
        return knn_edges_feature(bag.x, k)
    raise ValueError(f"unknown graph kind {kind!r}; expected one of {', '.join(GRAPH_KINDS)}")


def batch_graph(batch: BagBatch, kind: str, k: int = 8) -> Tensor:
    """``edge_index [2, E]`` over the packed rows of ``batch``: :func:`bag_graph`
    per bag, offset by ``ptr``. For models used outside the data layer, which
    normally builds (and caches) graphs per slide into ``Bag.edge_index``."""
    ptr = batch.ptr.tolist()
    parts = []
    for i, bag_id in enumerate(batch.bag_ids):
        lo, hi = ptr[i], ptr[i + 1]
        coords = None if batch.coords is None else batch.coords[lo:hi]
        bag = Bag(bag_id=bag_id, x=batch.x[lo:hi], coords=coords)
        parts.append(bag_graph(bag, kind, k) + lo)
    return torch.cat(parts, 1).to(batch.x.device) if parts else torch.empty(2, 0, dtype=torch.long)

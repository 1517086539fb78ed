"""kNN instance graphs against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil.data.batch import Bag, collate_bags
from mil.data.graph import bag_graph, batch_graph, knn_edges_feature, knn_edges_spatial
from mil.errors import DataError


def reference_edges(points: np.ndarray, k: int) -> set[tuple[int, int]]:
    """Each point's k nearest others by a full distance matrix, both directions."""
    d = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    nbrs = np.argsort(d, axis=1, kind="stable")[:, : min(k, len(points) - 1)]
    edges = {(i, int(j)) for i in range(len(points)) for j in nbrs[i]}
    return edges | {(j, i) for i, j in edges}


def edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    assert edge_index.dtype == torch.long and edge_index.shape[0] == 2
    pairs = [tuple(p) for p in edge_index.T.tolist()]
    assert len(pairs) == len(set(pairs)), "duplicate edges"
    return set(pairs)


def assert_simple_undirected(edge_index: torch.Tensor) -> None:
    edges = edge_set(edge_index)
    assert all(i != j for i, j in edges), "self loop"
    assert all((j, i) in edges for i, j in edges), "edge without its reverse"


@pytest.mark.parametrize("k", [1, 4, 8])
def test_spatial_knn_matches_brute_force(k):
    coords = np.random.default_rng(k).uniform(0, 50_000, size=(300, 2))
    edge_index = knn_edges_spatial(torch.from_numpy(coords).float(), k)
    assert_simple_undirected(edge_index)
    assert edge_set(edge_index) == reference_edges(coords.astype(np.float32).astype(np.float64), k)


@pytest.mark.parametrize("k", [1, 8])
def test_feature_knn_matches_brute_force(k):
    x = torch.randn(250, 32, generator=torch.Generator().manual_seed(k))
    edge_index = knn_edges_feature(x, k)
    assert_simple_undirected(edge_index)
    assert edge_set(edge_index) == reference_edges(x.double().numpy(), k)


@pytest.mark.parametrize("chunk", [1, 7, 64, 249, 250, 10_000])
def test_feature_knn_is_independent_of_chunk_size(chunk):
    x = torch.randn(250, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(knn_edges_feature(x, 8, chunk=chunk), knn_edges_feature(x, 8))


def test_every_node_keeps_at_least_k_neighbours():
    coords = torch.rand(500, 2) * 10_000
    edge_index = knn_edges_spatial(coords, 8)
    out_degree = torch.bincount(edge_index[0], minlength=500)
    assert int(out_degree.min()) >= 8


def test_duplicate_coordinates_give_no_self_loops():
    coords = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 0.0], [2.0, 0.0], [5.0, 5.0], [9.0, 9.0]] * 2)
    edge_index = knn_edges_spatial(coords, 3)
    assert_simple_undirected(edge_index)
    assert int(torch.bincount(edge_index[0], minlength=len(coords)).min()) >= 3


@pytest.mark.parametrize("n", [2, 5, 8, 9])
@pytest.mark.parametrize("build", [knn_edges_spatial, knn_edges_feature])
def test_small_bags_are_complete_graphs(build, n):
    edge_index = build(torch.randn(n, 2), 8)
    assert edge_set(edge_index) == {(i, j) for i in range(n) for j in range(n) if i != j}


@pytest.mark.parametrize("build", [knn_edges_spatial, knn_edges_feature])
def test_single_instance_has_no_edges(build):
    edge_index = build(torch.randn(1, 2), 8)
    assert edge_index.shape == (2, 0) and edge_index.dtype == torch.long


def test_bag_graph_dispatches_and_names_a_bag_without_coordinates():
    x, coords = torch.randn(40, 6), torch.rand(40, 2) * 1000
    bag = Bag("slide-7", x, coords)
    assert torch.equal(bag_graph(bag, "spatial", 5), knn_edges_spatial(coords, 5))
    assert torch.equal(bag_graph(bag, "feature", 5), knn_edges_feature(x, 5))
    with pytest.raises(DataError, match="slide-7"):
        bag_graph(Bag("slide-7", x), "spatial", 5)
    with pytest.raises(ValueError, match="radius"):
        bag_graph(bag, "radius", 5)


def test_batch_graph_offsets_bags_and_never_joins_them():
    bags = [Bag(f"b{i}", torch.randn(n, 4), torch.rand(n, 2)) for i, n in enumerate((6, 1, 20))]
    batch = collate_bags(bags)
    edge_index = batch_graph(batch, "spatial", 4)
    assert torch.equal(batch.batch[edge_index[0]], batch.batch[edge_index[1]])
    expected = torch.cat(
        [bag_graph(b, "spatial", 4) + int(batch.ptr[i]) for i, b in enumerate(bags)], 1
    )
    assert edge_set(edge_index) == edge_set(expected)
    # collate_bags offsets per-bag graphs the same way.
    for b in bags:
        b.edge_index = bag_graph(b, "spatial", 4)
    assert torch.equal(collate_bags(bags).edge_index, edge_index)

import torch

from mil.data.batch import Bag, chunk_by_budget, collate_bags, unpack


def test_collate_round_trip():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 1, 7, 4]
    bags = [
        Bag(str(i), torch.randn(n, 5, generator=g), coords=torch.rand(n, 2, generator=g))
        for i, n in enumerate(sizes)
    ]
    b = collate_bags(bags)
    assert b.x.shape == (sum(sizes), 5)
    assert b.ptr.tolist() == [0, 3, 4, 11, 15]
    assert b.batch.tolist() == sum(([i] * n for i, n in enumerate(sizes)), [])
    assert b.bag_ids == ["0", "1", "2", "3"]
    for bag, x, c in zip(bags, unpack(b.x, b.ptr), unpack(b.coords, b.ptr)):
        assert torch.equal(bag.x, x) and torch.equal(bag.coords, c)
    assert b.sizes.tolist() == sizes


def test_collate_offsets_edges():
    bags = [
        Bag("a", torch.zeros(3, 2), edge_index=torch.tensor([[0, 1], [1, 2]])),
        Bag("b", torch.zeros(2, 2), edge_index=torch.tensor([[0], [1]])),
    ]
    b = collate_bags(bags)
    assert b.edge_index.tolist() == [[0, 1, 3], [1, 2, 4]]


def test_collate_float16_cast():
    b = collate_bags([Bag("a", torch.ones(2, 3, dtype=torch.float16))])
    assert b.x.dtype == torch.float32


def test_collate_casts_mixed_dtypes_bag_by_bag():
    """float16 cache and float32 bags packed into float32 or bfloat16: each bag's rows are
    the bag cast on its own (``Tensor.to``)."""
    g = torch.Generator().manual_seed(1)
    bags = [
        Bag("a", torch.randn(4, 6, generator=g).half()),
        Bag("b", torch.randn(2, 6, generator=g)),
        Bag("c", torch.randn(5, 6, generator=g).half()),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        b = collate_bags(bags, dtype=dtype)
        assert b.x.dtype == dtype and b.ptr.tolist() == [0, 4, 6, 11]
        for bag, x in zip(bags, unpack(b.x, b.ptr)):
            assert torch.equal(x, bag.x.to(dtype))


def test_chunk_by_budget_never_splits_and_respects_budget():
    sizes = [5, 5, 5, 20, 1, 1, 9]
    chunks = chunk_by_budget(sizes, 10)
    assert sum(chunks, []) == list(range(len(sizes)))
    for c in chunks:
        assert len(c) == 1 or sum(sizes[i] for i in c) <= 10
    assert [3] in chunks  # an over-budget bag forms its own chunk


def test_chunk_by_budget_runs_large_bags_alone_and_keeps_order():
    sizes = [3, 4, 12, 2, 2, 30, 5, 1]
    chunks = chunk_by_budget(sizes, 10, alone=8)
    assert sum(chunks, []) == list(range(len(sizes)))  # consecutive, in bag order
    assert chunks == [[0, 1], [2], [3, 4], [5], [6, 7]]
    assert chunk_by_budget(sizes, 100, alone=None) == [list(range(len(sizes)))]

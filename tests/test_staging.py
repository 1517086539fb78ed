"""Chunks staged ahead of use (mil.data.staging), on the CPU through the code path a GPU runs.

A recording copy engine stands in for the CUDA one: it sees every chunk in the dtype it would
cross the bus in, and logs when a copy starts, when the compute stream would wait for it and
when the model computes. The schedule must be one copy ahead (chunk k+1's copy issued before
chunk k computes, each chunk waited for before it computes), and the outputs those of the
plain CPU path, bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mil.data.batch import Bag, BagBatch, chunk_by_budget
from mil.data.staging import Stager, staged
from mil.models import create
from mil.train.loop import forward_bags

CPU = torch.device("cpu")


class RecordingCopies:
    """A copy engine that logs ("start"/"finish", bag ids) and casts to the compute dtype on
    "the device", as :class:`~mil.data.staging.CudaCopies` does after its copy."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.log: list[tuple[str, tuple[str, ...]]] = []
        self.wire: list[torch.dtype] = []

    def start(self, batch: BagBatch) -> tuple[BagBatch, Any]:
        self.log.append(("start", tuple(batch.bag_ids)))
        self.wire.append(batch.x.dtype)
        moved = BagBatch(**{**batch.__dict__, "x": batch.x.to(self.dtype)})
        return moved, tuple(batch.bag_ids)

    def finish(self, batch: BagBatch, ticket: Any) -> BagBatch:
        assert ticket == tuple(batch.bag_ids)  # the chunk waited for is the chunk handed out
        self.log.append(("finish", ticket))
        return batch


def bags_of(sizes, dim=12, dtype=torch.float16, seed=0) -> list[Bag]:
    gen = torch.Generator().manual_seed(seed)
    return [Bag(f"b{i}", torch.randn(n, dim, generator=gen).to(dtype)) for i, n in enumerate(sizes)]


def test_one_copy_ahead_schedule():
    bags = bags_of([5, 7, 3, 9, 4])
    chunks = list(chunk_by_budget([len(b) for b in bags], 12))
    assert len(chunks) >= 3
    copies = RecordingCopies(torch.float32)
    stager = Stager(CPU, torch.float32, copies=copies)
    for chunk, batch in staged(stager, bags, chunks):
        copies.log.append(("compute", tuple(batch.bag_ids)))
        assert batch.bag_ids == [bags[i].bag_id for i in chunk]
    ids = [tuple(bags[i].bag_id for i in c) for c in chunks]
    want = [("start", ids[0])]
    for k, c in enumerate(ids):
        if k + 1 < len(ids):
            want.append(("start", ids[k + 1]))  # the next copy is in flight while c computes
        want += [("finish", c), ("compute", c)]
    assert copies.log == want


@pytest.mark.parametrize(
    "source, compute, wire",
    [
        (torch.float16, torch.float32, torch.float16),  # stored half precision crosses as such
        (torch.float32, torch.bfloat16, torch.bfloat16),  # never wider than the compute dtype
        (torch.float16, torch.bfloat16, torch.float16),
        (torch.float32, torch.float32, torch.float32),
    ],
)
def test_wire_dtype(source, compute, wire):
    copies = RecordingCopies(compute)
    stager = Stager(CPU, compute, copies=copies)
    batch = stager.ready(stager.stage(bags_of([4, 6], dtype=source)))
    assert copies.wire == [wire] and batch.x.dtype == compute
    mixed = [*bags_of([3], dtype=torch.float16), *bags_of([2], dtype=torch.float32)]
    assert Stager(CPU, compute, copies=RecordingCopies(compute)).wire_dtype(mixed) == compute


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["abmil_additive", "transmil"])
def test_staged_forward_equals_plain(name, precision):
    """The staged path (pack in float16, cast after the "copy") gives what packing straight
    into the compute dtype gives, scores included, over several chunks."""
    torch.manual_seed(0)
    model = create(name, in_dim=12, n_out=2).eval()
    bags = bags_of([30, 1, 17, 64, 8, 25])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.no_grad():
        plain = forward_bags(model, bags, 40, CPU, keep_scores=True, precision=precision)
        copies = RecordingCopies(dtype)
        got = forward_bags(
            model,
            bags,
            40,
            CPU,
            keep_scores=True,
            precision=precision,
            stager=Stager(CPU, dtype, copies=copies),
        )
    assert sum(kind == "finish" for kind, _ in copies.log) > 2  # several chunks, all copied
    assert torch.equal(got.logits, plain.logits)
    assert len(got.scores) == len(bags)
    for a, b in zip(got.scores, plain.scores):
        assert torch.equal(a, b)


def test_without_copy_engine_packs_where_the_bags_are():
    bags = bags_of([3, 4], dtype=torch.float16)
    stager = Stager(CPU, torch.float32)
    assert stager.copies is None
    batch = stager.ready(stager.stage(bags))
    assert batch.x.dtype == torch.float32 and batch.x.device == CPU
    assert torch.equal(batch.x, torch.cat([b.x for b in bags]).float())

"""Packed chunks moved to the device ahead of use: the next chunk's host-to-device copy runs
on a side CUDA stream while the current chunk computes.

A loss batch is forwarded in chunks (:func:`~mil.data.batch.chunk_by_budget`). On a GPU with
the bags in host memory each chunk is packed into page-locked (pinned) memory in the bags' own
dtype (float16 features cross the bus as float16), its copy is issued on a copy stream, and the
cast to the compute dtype runs on the device; the compute stream waits for the copy's event
only when it reaches that chunk, and the device memory is marked as used by the compute stream
(``record_stream``) so the caching allocator does not hand it back early. :func:`staged` starts
the next chunk's copy *before* it hands out the current one, so the copy overlaps the current
chunk's kernels even where a model synchronises in its forward.

Everywhere else (a CPU, or bags already resident on the device) the same calls pack each chunk
where the bags are, in the compute dtype, and nothing is copied: the CPU runs this module's
code path, with the copy engine (:class:`CudaCopies`) left out.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from mil.data.batch import Bag, BagBatch, collate_bags

__all__ = ["Copies", "CudaCopies", "Stager", "staged"]


class Copies(Protocol):
    """An engine of asynchronous host-to-device copies."""

    def start(self, batch: BagBatch) -> tuple[BagBatch, Any]:
        """Issue ``batch``'s copy; returns the batch as it will be on the device and a ticket."""

    def finish(self, batch: BagBatch, ticket: Any) -> BagBatch:
        """Make the compute stream wait for the copy of ``ticket``; returns ``batch``."""


def _tensors(batch: BagBatch) -> Iterator[Tensor]:
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            yield value


@functools.cache
def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of ``device`` that chunks are copied on (one per device and process)."""
    return torch.cuda.Stream(device)


class CudaCopies:
    """Copies on one side stream of ``device``, each followed by an event the compute stream
    waits on (:meth:`finish`), the cast to ``dtype`` done on the device after the copy."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.stream = copy_stream(device)

    def start(self, batch: BagBatch) -> tuple[BagBatch, Any]:
        # no wait on the compute stream: the copy reads pinned host memory only, and device
        # blocks the compute stream used are not reused here before it is done with them
        with torch.cuda.stream(self.stream):
            moved = batch.to(self.device, non_blocking=True)
            moved.x = moved.x.to(self.dtype)
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def finish(self, batch: BagBatch, ticket: Any) -> BagBatch:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ticket)
        for t in _tensors(batch):
            t.record_stream(current)
        return batch


@dataclass
class _Staged:
    batch: BagBatch
    ticket: Any = None  # None: nothing copied, the batch is ready where it is


class Stager:
    """Packs chunks of bags for ``device`` in ``dtype``: with ``copies`` (by default
    :class:`CudaCopies` on a CUDA device) a chunk of host bags is packed pinned in the bags' own
    dtype and copied asynchronously; otherwise it is packed where the bags are, in ``dtype``
    (and moved synchronously where that is not ``device``)."""

    def __init__(
        self, device: torch.device, dtype: torch.dtype, copies: Copies | None = None
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.pin = device.type == "cuda"
        if copies is None and self.pin:
            copies = CudaCopies(device, dtype)
        self.copies = copies

    def stage(self, bags: Sequence[Bag]) -> _Staged:
        """Pack ``bags`` and (where they are in host memory and there is a copy engine) start
        their copy."""
        if self.copies is not None and bags[0].x.device.type == "cpu":
            batch = collate_bags(bags, dtype=self.wire_dtype(bags), pin_memory=self.pin)
            if self.pin and not batch.x.is_pinned():  # one bag, packed without a copy
                batch.x = batch.x.pin_memory()
            return _Staged(*self.copies.start(batch))
        batch = collate_bags(bags, dtype=self.dtype)
        if batch.x.device != self.device:
            batch = batch.to(self.device)
        return _Staged(batch)

    def wire_dtype(self, bags: Sequence[Bag]) -> torch.dtype:
        """The dtype a chunk is copied in: the bags' own where it is no wider than the compute
        dtype (float16 features cross as float16 and are cast on the device), else the compute
        dtype (float32 features for a bf16 run are cast while packing)."""
        source = {b.x.dtype for b in bags}
        if len(source) == 1:
            (own,) = source
            if own.is_floating_point and own.itemsize <= self.dtype.itemsize:
                return own
        return self.dtype

    def ready(self, staged: _Staged) -> BagBatch:
        """The staged batch, usable on the compute stream."""
        if staged.ticket is None or self.copies is None:
            return staged.batch
        return self.copies.finish(staged.batch, staged.ticket)


def staged(
    stager: Stager, bags: Sequence[Bag], chunks: Sequence[Sequence[int]]
) -> Iterator[tuple[Sequence[int], BagBatch]]:
    """``(chunk, batch)`` for each chunk of bag indices, in order, the batch ready on the
    device; the next chunk is staged before the current one is handed out (one copy ahead)."""
    if not chunks:
        return
    nxt = stager.stage([bags[i] for i in chunks[0]])
    for k, chunk in enumerate(chunks):
        current = nxt
        if k + 1 < len(chunks):
            nxt = stager.stage([bags[i] for i in chunks[k + 1]])
        yield chunk, stager.ready(current)

"""Packed bags: B bags as one ``[sum N_i, D]`` tensor with ``batch``/``ptr``.

This is the same ragged representation as a ``torch_geometric`` batch, kept in a
small class of our own so that packing costs one ``torch.cat`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class Bag:
    """One bag: instance features ``x [N, D]``, optional ``coords [N, 2]``.

    ``slide_ptr`` marks where each source slide starts when a bag concatenates a
    patient's slides (``slides[i]`` owns rows ``slide_ptr[i]:slide_ptr[i+1]``).
    ``tabular [F]`` / ``tabular_mask [M]``: the patient's scaled tabular values (modalities
    concatenated, zeros where missing) and which of the M modalities it has (1) or lacks (0).
    """

    bag_id: str
    x: Tensor
    coords: Tensor | None = None
    slides: tuple[str, ...] = ()
    slide_ptr: tuple[int, ...] = ()
    edge_index: Tensor | None = None
    tabular: Tensor | None = None
    tabular_mask: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class BagBatch:
    """B packed bags.

    Attributes:
        x: ``[sum N_i, D]`` instance features.
        batch: ``[sum N_i]`` bag index of each instance (0..B-1), sorted.
        ptr: ``[B + 1]`` start offset of each bag in ``x``; ``ptr[-1] == sum N_i``.
        coords: ``[sum N_i, 2]`` tile coordinates, or None.
        bag_ids: the B bag ids, in order.
        edge_index: ``[2, E]`` instance graph over the packed rows (never joining
            two bags), or None.
        targets: ``[B]`` class labels during training (models such as CLAM use
            them for instance-level losses), else None.
        tabular: ``[B, F]`` each bag's tabular values (:mod:`mil.data.tabular`), or None.
        tabular_mask: ``[B, M]`` 1 where the bag's patient has tabular modality m, or None.
    """

    x: Tensor
    batch: Tensor
    ptr: Tensor
    bag_ids: list[str]
    coords: Tensor | None = None
    edge_index: Tensor | None = None
    targets: Tensor | None = None
    tabular: Tensor | None = None
    tabular_mask: Tensor | None = None

    @property
    def num_bags(self) -> int:
        return len(self.bag_ids)

    @property
    def sizes(self) -> Tensor:
        """``[B]`` number of instances per bag."""
        return self.ptr[1:] - self.ptr[:-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BagBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            x=move(self.x),
            batch=move(self.batch),
            ptr=move(self.ptr),
            coords=move(self.coords),
            edge_index=move(self.edge_index),
            targets=move(self.targets),
            tabular=move(self.tabular),
            tabular_mask=move(self.tabular_mask),
        )

    def bag(self, i: int) -> Tensor:
        """Instance features of bag ``i`` (a view)."""
        return self.x[int(self.ptr[i]) : int(self.ptr[i + 1])]


def collate_bags(
    bags: Sequence[Bag], dtype: torch.dtype = torch.float32, pin_memory: bool = False
) -> BagBatch:
    """Pack ``bags`` into one :class:`BagBatch` (one copy of the features, cast to ``dtype``;
    none for a single bag already in ``dtype``). ``pin_memory`` packs into page-locked
    memory, for an asynchronous copy to a GPU."""
    if len(bags) == 0:
        raise ValueError("collate_bags needs at least one bag")
    sizes = torch.tensor([len(b) for b in bags], dtype=torch.long)
    ptr = torch.zeros(len(bags) + 1, dtype=torch.long)
    torch.cumsum(sizes, 0, out=ptr[1:])
    if len(bags) == 1 and bags[0].x.dtype == dtype:
        x = bags[0].x  # one bag: no copy
    else:
        # one pass: copy (and cast) every bag straight into its rows of the packed tensor
        # (``torch.cat(out=)`` into another dtype concatenates, then casts: ~2x slower)
        # packed where the bags are (device-resident bags: on the device, nothing to pin)
        where = bags[0].x.device
        x = torch.empty(
            (int(ptr[-1]), bags[0].x.shape[1]),
            dtype=dtype,
            device=where,
            pin_memory=pin_memory and where.type == "cpu",
        )
        if all(b.x.dtype == dtype for b in bags):
            torch.cat([b.x for b in bags], 0, out=x)
        else:
            for b, lo, hi in zip(bags, ptr[:-1].tolist(), ptr[1:].tolist()):
                x[lo:hi].copy_(b.x)
    batch = torch.repeat_interleave(torch.arange(len(bags)), sizes)
    coords = None
    if all(b.coords is not None for b in bags):
        coords = torch.cat([b.coords for b in bags], 0).to(torch.float32)
    edge_index = None
    if all(b.edge_index is not None for b in bags):
        edge_index = torch.cat([b.edge_index + int(ptr[i]) for i, b in enumerate(bags)], 1).to(
            torch.long
        )
    tabular = mask = None
    if all(b.tabular is not None for b in bags):  # a few numbers per bag: stacked apart from x
        tabular = torch.stack([b.tabular for b in bags]).to(torch.float32)
        mask = torch.stack([b.tabular_mask for b in bags]).to(torch.float32)
    return BagBatch(
        x=x,
        batch=batch,
        ptr=ptr,
        coords=coords,
        edge_index=edge_index,
        bag_ids=[b.bag_id for b in bags],
        tabular=tabular,
        tabular_mask=mask,
    )


def unpack(values: Tensor, ptr: Tensor) -> list[Tensor]:
    """Split a packed per-instance tensor ``[sum N_i, ...]`` back into B tensors."""
    return list(torch.split(values, (ptr[1:] - ptr[:-1]).tolist()))


def chunk_by_budget(
    sizes: Sequence[int], max_instances: int, alone: int | None = None
) -> list[list[int]]:
    """Group consecutive bags into compute chunks of at most ``max_instances`` rows.

    A bag is never split; a bag larger than the budget forms a chunk of its own,
    and so does, when ``alone`` is given, any bag of at least ``alone`` rows (one
    that keeps a matrix product efficient by itself: packing it would only add a
    copy). Returns lists of positions into ``sizes``.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, n in enumerate(sizes):
        if alone is not None and n >= alone:
            if current:  # chunks stay consecutive: their outputs concatenate in bag order
                chunks.append(current)
                current, total = [], 0
            chunks.append([i])
            continue
        if current and total + n > max_instances:
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += int(n)
    if current:
        chunks.append(current)
    return chunks

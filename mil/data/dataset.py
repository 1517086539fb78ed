"""Bags from feature files, read once per run into an in-memory cache."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mil.data.batch import Bag
from mil.data.readers import SlideFeatures, index_feature_dir, read_features
from mil.data.spill import SpillFile
from mil.data.store import PackedFeatures
from mil.errors import DataError


class FeatureStore:
    """Slide id -> features, read from disk once and kept in RAM within a budget.

    Features are stored as ``cache_dtype`` (float16 halves the memory; the
    model casts to float32 when packing). Beyond ``budget_gb`` the least
    recently used slides are dropped and re-read on demand. With a packed store
    attached (:meth:`attach`) its slides are slices of the memory map instead, cast
    to ``cache_dtype`` (the OS page cache does the caching; none of the budget is used).
    """

    def __init__(
        self,
        index: dict[str, Path],
        budget_gb: float = 8.0,
        cache_dtype: str = "float32",
        expected_dim: int | None = None,
    ) -> None:
        self.index = index
        self.budget = int(budget_gb * 2**30)
        self.dtype = torch.float16 if cache_dtype == "float16" else torch.float32
        self.dim = expected_dim
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None, dict]] = (
            OrderedDict()
        )
        self._bytes = 0
        self.instance_labels: dict[str, np.ndarray] = {}
        # one slide read per kind of file (True: a slide/patient embedding [D]), for the error
        self._kind_seen: dict[bool, str] = {}
        self.packed: PackedFeatures | None = None
        self._pending: dict[str, int] = {}  # slide -> position in the read plan (plan())
        self.lock = threading.RLock()

    def attach(self, packed: PackedFeatures) -> None:
        """Serve the slides of ``packed`` (checked fresh by :func:`mil.data.store.open_store`)
        from its memory map."""
        if self.dim is not None and packed.dim != self.dim:
            raise DataError(
                f"the feature store {packed.root} holds features of dimension {packed.dim}, "
                f"expected {self.dim}; point data.store_dir at this encoder's store"
            )
        self.dim = packed.dim
        self.packed = packed

    @property
    def spill_dir(self) -> Path | None:
        """Where views spill what the budget cannot hold: beside the packed store, else the
        system's temporary folder (None)."""
        return None if self.packed is None else self.packed.root

    @classmethod
    def from_dir(cls, root: str | Path, **kw) -> FeatureStore:
        index, _ = index_feature_dir(root)
        return cls(index, **kw)

    def path(self, slide_id: str) -> Path:
        if slide_id not in self.index:
            raise DataError(
                f"slide {slide_id}: no feature file (.h5/.pt/.npy) found for it in the feature folder"
            )
        return self.index[slide_id]

    def read(self, slide_id: str) -> SlideFeatures:
        sf = read_features(self.path(slide_id))
        self._check_kind(slide_id, sf)
        self._check_dim(slide_id, sf.features.shape[1])
        return sf

    def rows(self, slide_id: str) -> int | None:
        """The slide's number of instances where known without reading it, else None."""
        if self.packed is not None and slide_id in self.packed:
            return self.packed.rows(slide_id)
        hit = self._cache.get(slide_id)
        return None if hit is None else len(hit[0])

    def _check_kind(self, slide_id: str, sf: SlideFeatures) -> None:
        """Refuse a cohort that mixes tile features ``[N, D]`` and embeddings ``[D]``."""
        self._kind_seen.setdefault(sf.embedding, slide_id)
        if len(self._kind_seen) > 1:
            one, tiles = self._kind_seen[True], self._kind_seen[False]
            raise DataError(
                f"the feature folder mixes slide/patient embeddings (one vector [D], e.g. "
                f"{self.path(one)}) and tile features ([N, D], e.g. {self.path(tiles)}); "
                f"a cohort is one kind: point data.features at a folder of one encoder's output"
            )

    def _check_dim(self, slide_id: str, d: int) -> None:
        if self.dim is None:
            self.dim = d
        elif d != self.dim:
            raise DataError(
                f"slide {slide_id}: features have dimension {d}, other slides have {self.dim} "
                f"({self.path(slide_id)}); were they made by another encoder?"
            )

    def get(self, slide_id: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        if self.packed is not None and slide_id in self.packed:
            sf = self.packed.get(slide_id)
            if sf.instance_label is not None:
                self.instance_labels[slide_id] = sf.instance_label
            coords = None if sf.coords is None else torch.from_numpy(sf.coords)
            return torch.from_numpy(sf.features).to(self.dtype), coords, sf.attrs
        self._pending.pop(slide_id, None)
        hit = self._cache.get(slide_id)
        if hit is not None:
            self._cache.move_to_end(slide_id)
            return hit
        sf = self.read(slide_id)
        return self._insert(slide_id, sf)

    def _insert(
        self, slide_id: str, sf: SlideFeatures
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        x = torch.from_numpy(np.ascontiguousarray(sf.features)).to(self.dtype)
        coords = None if sf.coords is None else torch.from_numpy(sf.coords)
        if sf.instance_label is not None:
            self.instance_labels[slide_id] = sf.instance_label
        item = (x, coords, sf.attrs)
        size = x.numel() * x.element_size()
        if size <= self.budget:
            self._cache[slide_id] = item
            self._bytes += size
            while self._bytes > self.budget and self._cache:
                old = self._cache.pop(self._victim())[0]
                self._bytes -= old.numel() * old.element_size()
        return item

    def plan(self, slide_ids: Sequence[str]) -> None:
        """The slides about to be read, in order (an epoch's): until each is read, eviction
        spares it and drops a slide not needed in the plan, the least recently used of
        those (else the one needed last: Belady's rule), so that a cached slide is used
        before it is dropped. The order of the reads is unchanged."""
        self._pending = {s: i for i, s in reversed(list(enumerate(slide_ids)))}

    def _victim(self) -> str:
        pending = self._pending
        free = next((s for s in self._cache if s not in pending), None)
        return free if free is not None else max(self._cache, key=pending.__getitem__)

    def preload(self, slide_ids: Sequence[str], workers: int = 4, progress: bool = True) -> None:
        """Read ``slide_ids`` into the cache with a few threads (I/O and decompression overlap).

        Reads in groups, so memory never holds much more than the cache
        budget; stops once the cache is full (the rest is read on demand).
        """
        if self.packed is not None:
            slide_ids = [s for s in slide_ids if s not in self.packed]
        todo = [s for s in dict.fromkeys(slide_ids) if s not in self._cache]
        bar = tqdm(total=len(todo), desc="reading features", disable=not progress, leave=False)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(todo), 64):
                group = todo[start : start + 64]
                read = list(pool.map(lambda s: read_features(self.path(s)), group))
                bar.update(len(group))
                if self.dim is None:
                    # the dimension most slides share is the reference, so the odd one out is named
                    self.dim = Counter(sf.features.shape[1] for sf in read).most_common(1)[0][0]
                for slide_id, sf in zip(group, read):
                    self._check_kind(slide_id, sf)
                    self._check_dim(slide_id, sf.features.shape[1])
                for slide_id, sf in zip(group, read):
                    self._insert(slide_id, sf)
                if self._bytes >= self.budget:
                    break
        bar.close()


class BagDataset:
    """The bags of a cohort: one per slide or per patient (slides concatenated).

    ``graph_fn(bag) -> edge_index`` adds an instance graph to each bag, and
    ``transform`` maps each bag's features (a fold's standardisation). Both
    are fixed at construction: a fold gets its own view with
    :meth:`with_transform`, whose graphs and transformed features are built
    from that fold's transform and never seen by another fold.

    Transformed features are computed once per view: kept in RAM within what the
    feature store's budget leaves free, beyond it in a memory-mapped spill file
    (:class:`mil.data.spill.SpillFile`); graphs are always cached.
    ``graph_uses_features``: the graph is built from the features (a
    feature-space kNN graph), so a view with another transform needs its own;
    spatial graphs depend on coordinates alone and are shared by all views.
    """

    def __init__(
        self,
        bag_slides: dict[str, list[str]],
        store: FeatureStore,
        graph_fn: Callable[[Bag], torch.Tensor] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        graph_uses_features: bool = True,
    ) -> None:
        self.bag_slides = bag_slides
        self.store = store
        self.graph_fn = graph_fn
        self.graph_uses_features = graph_uses_features
        self._transform = transform
        self._graphs: dict[str, torch.Tensor] = {}
        self._tabular: Callable[[str], tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self._x: dict[str, torch.Tensor] = {}
        # coordinates and slide offsets of the bags whose transformed features are kept
        self._layout: dict[str, tuple[torch.Tensor | None, tuple]] = {}
        self._x_bytes = 0
        self._x_budget = max(0, store.budget - store._bytes) if transform is not None else 0
        self._spill: SpillFile | None = None
        #: loss batches read ahead on a thread while one trains (:mod:`mil.data.prefetch`)
        self.read_ahead = 2

    @classmethod
    def with_graph(
        cls,
        bag_slides: dict[str, list[str]],
        store: FeatureStore,
        graph: str | None,
        graph_k: int = 8,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> BagDataset:
        """Bags with the instance graph a model asks for (its ``graph``, ``graph_k``;
        None: no graph), built per slide by :func:`mil.data.graph.bag_graph`."""
        graph_fn = None
        if graph:
            from mil.data.graph import bag_graph

            graph_fn = partial(bag_graph, kind=graph, k=graph_k)
        return cls(bag_slides, store, graph_fn, transform, graph_uses_features=graph != "spatial")

    @property
    def transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._transform

    def with_transform(self, transform) -> BagDataset:
        """The same bags seen through ``transform`` (one fold's preprocessing), with caches
        of their own; graphs that do not depend on the features are shared.

        ``transform``: a function of the features, or a fold's preprocessing object
        (:class:`mil.data.transforms.Standardizer`) whose ``features`` is that function (or
        None) and whose ``tabular(bag_id)`` gives a bag's scaled tabular values and mask.
        """
        tabular = getattr(transform, "tabular_of", None)
        if tabular is not None:
            transform = transform.features
        view = BagDataset(
            self.bag_slides, self.store, self.graph_fn, transform, self.graph_uses_features
        )
        view._tabular = tabular
        view.read_ahead = self.read_ahead
        if not self.graph_uses_features or (transform is None and self._transform is None):
            view._graphs = self._graphs
        return view

    def resident(
        self, bag_ids: Sequence[str], device: torch.device, dtype: torch.dtype = torch.float16
    ) -> BagDataset:
        """The same view with the features of ``bag_ids`` (as this view gives them: transformed)
        held on ``device`` in ``dtype`` for good: batches are packed there, nothing is read
        or copied from the host again. Graphs, tabular values and other bags as here."""
        view = BagDataset(
            self.bag_slides, self.store, self.graph_fn, self._transform, self.graph_uses_features
        )
        view._tabular, view._graphs, view.read_ahead = self._tabular, self._graphs, 0
        for b in dict.fromkeys(bag_ids):
            bag = self[b]
            view._x[b] = bag.x.to(device=device, dtype=dtype)
            coords = None if bag.coords is None else bag.coords.to(device)
            view._layout[b] = (coords, bag.slide_ptr)
        return view

    def plan(self, bag_ids: Sequence[str]) -> None:
        """The bags about to be read, in order: the store keeps their cached slides until
        they are read (:meth:`FeatureStore.plan`)."""
        self.store.plan([s for b in bag_ids for s in self.bag_slides[b]])

    def __len__(self) -> int:
        return len(self.bag_slides)

    def __getitem__(self, bag_id: str) -> Bag:
        # one reader at a time (a read-ahead thread and the caller share the caches)
        with self.store.lock:
            return self._bag(bag_id)

    def _bag(self, bag_id: str) -> Bag:
        slides = self.bag_slides[bag_id]
        layout = self._layout.get(bag_id)
        if layout is not None:  # transformed before: the raw features need not be read again
            x, (coords, ptr) = self._kept(bag_id), layout
        else:
            x, coords, ptr = self._read(slides)
            if self._transform is not None:
                x = self._transformed(bag_id, x)
                if bag_id in self._x or (self._spill is not None and bag_id in self._spill):
                    self._layout[bag_id] = (coords, ptr)
        bag = Bag(bag_id=bag_id, x=x, coords=coords, slides=tuple(slides), slide_ptr=ptr)
        if self._tabular is not None and (tab := self._tabular(bag_id)) is not None:
            bag.tabular, bag.tabular_mask = tab
        if self.graph_fn is not None:
            if bag_id not in self._graphs:
                self._graphs[bag_id] = self._graph(bag)
            bag.edge_index = self._graphs[bag_id]
        return bag

    def _read(self, slides: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
        """A bag's raw features ``[N, D]``, coordinates and slide offsets, from the store."""
        parts = [self.store.get(s) for s in slides]
        if len(parts) == 1:
            x, coords, _ = parts[0]
        else:
            x = torch.cat([p[0] for p in parts])
            coords = (
                torch.cat([p[1] for p in parts]) if all(p[1] is not None for p in parts) else None
            )
        return x, coords, tuple(np.cumsum([0] + [len(p[0]) for p in parts]).tolist())

    def _kept(self, bag_id: str) -> torch.Tensor:
        hit = self._x.get(bag_id)
        return hit if hit is not None else self._spill.get(bag_id)

    def _transformed(self, bag_id: str, x: torch.Tensor) -> torch.Tensor:
        """The bag's transformed features, computed once per view: kept in RAM while the
        budget lasts, then in a memory-mapped spill file (never recomputed every step)."""
        out = self._transform(x)
        size = out.numel() * out.element_size()
        if self._x_bytes + size <= self._x_budget:
            self._x[bag_id] = out
            self._x_bytes += size
        elif out.dtype != torch.bfloat16:  # numpy (the map) has no bfloat16
            if self._spill is None:
                self._spill = SpillFile(self.store.spill_dir)
            self._spill.put(bag_id, out)
        return out

    def _graph(self, bag: Bag) -> torch.Tensor:
        """Instance graph built per slide, so that tiles of two slides are never joined."""
        edges = []
        for i, slide in enumerate(bag.slides):
            lo, hi = bag.slide_ptr[i], bag.slide_ptr[i + 1]
            part = Bag(
                bag_id=slide,
                x=bag.x[lo:hi],
                coords=None if bag.coords is None else bag.coords[lo:hi],
            )
            edges.append(self.graph_fn(part) + lo)
        return torch.cat(edges, 1)

    def instance_labels(self, bag_id: str) -> np.ndarray | None:
        labels = [self.store.instance_labels.get(s) for s in self.bag_slides[bag_id]]
        if any(v is None for v in labels):
            return None
        return np.concatenate(labels)


def on_device(
    data: BagDataset, bag_ids: Sequence[str], device: torch.device, share: float = 0.5
) -> BagDataset:
    """``data`` with ``bag_ids`` resident on a CUDA ``device`` in float16
    (:meth:`BagDataset.resident`) when they fit in ``share`` of its free memory and their sizes
    are known without reading (a packed store, or slides in the cache); else ``data`` itself,
    its batches packed on the host and copied from page-locked memory."""
    if device.type != "cuda" or data.store.dim is None:
        return data
    rows = [data.store.rows(s) for b in dict.fromkeys(bag_ids) for s in data.bag_slides[b]]
    if None in rows:
        return data
    free, _ = torch.cuda.mem_get_info(device)
    if sum(rows) * data.store.dim * 2 > share * free:
        return data
    return data.resident(bag_ids, device)

"""Bags from feature files, read once per run into an in-memory cache."""

from __future__ import annotations

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
from mil.errors import DataError


class FeatureStore:
    """Slide id -> features, read from disk once and kept in RAM within a budget.

    Features are stored as ``cache_dtype`` (float16 halves the memory; the
    model casts to float32 when packing). Beyond ``budget_gb`` the least
    recently used slides are dropped and re-read on demand.
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
                _, (old, _, _) = self._cache.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return item

    def preload(self, slide_ids: Sequence[str], workers: int = 4, progress: bool = True) -> None:
        """Read ``slide_ids`` into the cache with a few threads (I/O and decompression overlap).

        Reads in groups, so memory never holds much more than the cache
        budget; stops once the cache is full (the rest is read on demand).
        """
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

    Transformed features are cached within what the feature store's budget
    leaves free (else recomputed per access); graphs are always cached.
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
        self._x: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._x_bytes = 0
        self._x_budget = max(0, store.budget - store._bytes) if transform is not None else 0

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
        if not self.graph_uses_features or (transform is None and self._transform is None):
            view._graphs = self._graphs
        return view

    def __len__(self) -> int:
        return len(self.bag_slides)

    def __getitem__(self, bag_id: str) -> Bag:
        slides = self.bag_slides[bag_id]
        parts = [self.store.get(s) for s in slides]
        if len(parts) == 1:
            x, coords, _ = parts[0]
        else:
            x = torch.cat([p[0] for p in parts])
            coords = (
                torch.cat([p[1] for p in parts]) if all(p[1] is not None for p in parts) else None
            )
        if self._transform is not None:
            x = self._transformed(bag_id, x)
        ptr = tuple(np.cumsum([0] + [len(p[0]) for p in parts]).tolist())
        bag = Bag(bag_id=bag_id, x=x, coords=coords, slides=tuple(slides), slide_ptr=ptr)
        if self._tabular is not None and (tab := self._tabular(bag_id)) is not None:
            bag.tabular, bag.tabular_mask = tab
        if self.graph_fn is not None:
            if bag_id not in self._graphs:
                self._graphs[bag_id] = self._graph(bag)
            bag.edge_index = self._graphs[bag_id]
        return bag

    def _transformed(self, bag_id: str, x: torch.Tensor) -> torch.Tensor:
        hit = self._x.get(bag_id)
        if hit is not None:
            self._x.move_to_end(bag_id)
            return hit
        out = self._transform(x)
        size = out.numel() * out.element_size()
        if size <= self._x_budget:
            self._x[bag_id] = out
            self._x_bytes += size
            while self._x_bytes > self._x_budget:
                _, old = self._x.popitem(last=False)
                self._x_bytes -= old.numel() * old.element_size()
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

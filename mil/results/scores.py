"""``fold_<k>/attention.h5``: the instance scores of a fold's test bags, beside their coordinates.

One group per bag (its id, with ``/`` as ``|``; attribute ``bag_id``), holding
``coords [N, 2]`` where the features had them, ``scores [N]`` (the model's
main instance score) and ``scores_<kind> [N]`` or ``[N, C]`` for further
kinds (:data:`mil.models.base.SCORE_KINDS`, as the task reads them:
:meth:`mil.tasks.Task.instance_view`); attributes ``slides`` and
``slide_ptr`` say which rows belong to which slide of a multi-slide bag. File
attributes: ``model``, ``fold``, ``has_scores``, ``score_kinds``.

Reading, ``kind="default"`` is the first kind of the task's
:attr:`~mil.tasks.Task.score_order` the file has (else the main score); a two-column class
kind read without ``cls`` gives the last class's column (the positive class of a binary task).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from mil.errors import DataError
from mil.io import atomic_path
from mil.metrics.instances import LOGIT_KINDS
from mil.models.base import DEFAULT_SCORE_KIND

#: ``kind`` that reads the default heatmap score
DEFAULT = "default"

#: bag id or slide id -> (group name, slides of the bag, slide_ptr)
BagIndex = dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]


def write_scores(
    path: Path, bags: Sequence, scores, extra_scores: dict, model: str, fold: str
) -> None:
    """Write ``bags`` (:class:`~mil.data.batch.Bag`, in the order of ``scores``) with their
    instance scores (``[N_b]`` tensors, or None) and ``extra_scores`` (kind -> tensors)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["model"] = model
        f.attrs["fold"] = fold
        f.attrs["has_scores"] = scores is not None
        f.attrs["score_kinds"] = ",".join(extra_scores)
        for i, bag in enumerate(bags):
            g = f.create_group(bag.bag_id.replace("/", "|"))
            g.attrs["bag_id"] = bag.bag_id
            g.attrs["slides"] = list(bag.slides)
            g.attrs["slide_ptr"] = list(bag.slide_ptr)
            if bag.coords is not None:
                g.create_dataset("coords", data=bag.coords.numpy())
            if scores is not None:
                g.create_dataset("scores", data=np.asarray(scores[i], dtype=np.float32))
            for kind, vals in extra_scores.items():
                g.create_dataset(f"scores_{kind}", data=np.asarray(vals[i], dtype=np.float32))


@contextlib.contextmanager
def open_scores(path: Path, fold: str) -> Iterator[h5py.File]:
    """A fold's ``attention.h5``, opened for reading; a damaged file is a clear error."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read fold {fold}'s instance scores ({exc}); the file is damaged "
            f"(a partial copy?). Copy it again, or retrain the fold: delete "
            f"{path.parent / 'metrics.json'} and re-run `mil train` on the run folder"
        ) from None
    with f:
        yield f


def bag_index(path: Path, fold: str) -> BagIndex:
    """Every bag id and slide id of a scores file -> (group, slides, slide_ptr)."""
    index: BagIndex = {}
    with open_scores(path, fold) as f:
        for name, g in f.items():
            slides = tuple(str(s) for s in np.atleast_1d(g.attrs.get("slides", [])))
            ptr = tuple(int(p) for p in np.atleast_1d(g.attrs.get("slide_ptr", [])))
            entry = (name, slides, ptr)
            index[str(g.attrs.get("bag_id", name))] = entry
            for s in slides:
                index.setdefault(s, entry)
    return index


def read_scores(
    path: Path,
    fold: str,
    entry: tuple[str, tuple[str, ...], tuple[int, ...]],
    slide_id: str,
    kind: str | None,
    cls: int | str | None,
    classes: list[str],
    fallback_cls: int | None = None,
    score_order: Sequence[str] = (DEFAULT_SCORE_KIND, "contribution", "attention_x_logit"),
) -> tuple[np.ndarray, str, np.ndarray | None, str, str]:
    """One bag's scores of ``kind`` (column ``cls``) in the group ``entry`` of a scores file.

        ``fallback_cls``: the column of a class kind of more than two columns read without
        ``cls`` (e.g. the bag's predicted class); ``score_order``: the task's kinds ``"default"`` reads, first the one the file has
    (:attr:`mil.tasks.Task.score_order`). Returns (values, label of the kind, coords
        or None, bag id, model name).
    """
    group = entry[0]
    with open_scores(path, fold) as f:
        g = f[group]
        bag_id = str(g.attrs.get("bag_id", group))
        if kind == DEFAULT:
            kind = next((k for k in score_order if f"scores_{k}" in g), None)
        values, label = _read_kind(g, kind, cls, classes, slide_id, fold, path, fallback_cls)
        coords = g["coords"][()] if "coords" in g else None
        model = str(f.attrs.get("model", ""))
    return values, label, coords, bag_id, model


def _read_kind(g, kind, cls, classes, slide_id, fold, path, fallback_cls) -> tuple[np.ndarray, str]:
    available = ["scores", *sorted(k for k in g if k.startswith("scores_"))]
    if kind is None or (kind == "attention" and "scores_attention" not in g):
        name = "scores"
    else:
        name = f"scores_{kind}"
    if name not in g:
        kinds = ", ".join(["None (the model's instance score)", *(k[7:] for k in available[1:])])
        raise DataError(
            f"slide {slide_id}: fold {fold} has no {kind!r} scores in {path}; kinds: {kinds}"
        )
    values = g[name][()]
    if values.ndim == 1:
        if cls is not None:
            raise DataError(
                f"cls={cls!r}: the {kind or 'instance'} scores of fold {fold} have one "
                f"column; leave cls out"
            )
        return values.astype(np.float64), kind or "score"
    k = values.shape[1]
    names = classes if len(classes) == k else [str(j) for j in range(k)]
    if cls is None and kind in (*LOGIT_KINDS, "instance_classifier") and k > 1:
        # (one column, a score or an ordinal task's shared score, is read as it is)
        cls = k - 1 if k == 2 else fallback_cls
    if cls is None:
        if k == 1:
            return values[:, 0].astype(np.float64), kind
        raise DataError(
            f"slide {slide_id}: {kind!r} scores have {k} columns (one per branch/class); "
            f"choose one with cls= one of {names}"
        )
    if isinstance(cls, (int, np.integer)) and 0 <= int(cls) < k:
        j = int(cls)
    elif str(cls) in names:
        j = names.index(str(cls))
    else:
        raise DataError(f"cls={cls!r}: not one of {names} (or an index 0..{k - 1})")
    return values[:, j].astype(np.float64), f"{kind}[{names[j]}]"


def has_scores(path: Path, fold: str) -> tuple[bool, str]:
    """Whether a scores file holds the model's instance scores, and the model's name."""
    with open_scores(path, fold) as f:
        return bool(f.attrs.get("has_scores", False)), str(f.attrs.get("model", ""))


def scores_frame(
    values: np.ndarray,
    coords: np.ndarray | None,
    slides: tuple[str, ...],
    ptr: tuple[int, ...],
    slide_id: str,
) -> pd.DataFrame:
    """``index, x, y, score`` of ``slide_id``'s rows of a bag's scores (all rows, with a
    ``slide_id`` column, when ``slide_id`` names a bag of several slides)."""
    if slide_id in slides and len(slides) > 1:
        i = slides.index(slide_id)
        lo, hi = ptr[i], ptr[i + 1]
    else:
        lo, hi = 0, len(values)
    df = pd.DataFrame({"index": np.arange(hi - lo)})
    if slide_id not in slides and len(slides) > 1:  # a whole multi-slide bag
        df["index"] = np.concatenate([np.arange(ptr[j + 1] - ptr[j]) for j in range(len(slides))])
        df["slide_id"] = np.repeat(slides, np.diff(ptr))
    if coords is not None:
        df["x"] = coords[lo:hi, 0]
        df["y"] = coords[lo:hi, 1]
    df["score"] = values[lo:hi]
    return df

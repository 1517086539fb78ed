"""The packed feature store: a cohort's features in one memory-mapped float16 file.

``mil cache CONFIG`` (or ``data.store: packed``, on first read) writes under ``data.store_dir``
(default ``<data.features>/.mil_store``):

* ``features-<build>.bin``: every slide's features, float16 rows ``[sum N_i, D]`` back to back;
* ``offsets-<build>.npy``: ``[S + 1]`` int64, slide ``i`` owns rows ``offsets[i]:offsets[i+1]``;
* ``coords-<build>.bin`` (float32 ``[sum N_i, 2]``) and ``labels-<build>.bin`` (int8
  ``[sum N_i]``) when some slide has coordinates or instance labels;
* ``manifest.json``: format, build, dtype, dimension, encoder, and per slide its id, source
  file, the file's size and modification time (ns), whether it has coords / labels, its
  attributes.

The manifest is written last and atomically: it is what makes a build current; data files of
other builds are removed after it. A process that mapped an older build keeps reading it
(POSIX keeps an unlinked file until it is unmapped). A bag is a slice of the map: the OS page
cache does the caching, shared by every fold job and DDP process of a node. Before use every
slide's source file is compared with the manifest (path, size, mtime): a changed, added or
removed source makes the store stale, and a stale store is rebuilt or refused, never read.
Float32 sources are rounded to float16 (as ``data.cache_dtype: float16`` does).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mil.data.readers import SlideFeatures
from mil.errors import DataError
from mil.io import atomic_path, read_json, run_lock, write_json

FORMAT = 1
MANIFEST = "manifest.json"
#: the folder under ``data.features`` that holds the store when ``data.store_dir`` is null
DEFAULT_DIRNAME = ".mil_store"
DTYPE = np.float16


def source_stamp(path: Path) -> dict:
    """What identifies a source file's content without reading it: path, size, mtime (ns)."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class PackedFeatures:
    """One build of a store, mapped read-only (copy-on-write: tensors over it are writable
    views, never written back)."""

    root: Path
    manifest: dict
    features: np.ndarray  # [R, D] float16 memmap
    offsets: np.ndarray  # [S + 1] int64
    coords: np.ndarray | None  # [R, 2] float32 memmap
    labels: np.ndarray | None  # [R] int8 memmap

    @classmethod
    def open(cls, root: str | Path) -> PackedFeatures:
        """The store's current build; a :class:`DataError` naming the folder if absent or damaged."""
        root = Path(root)
        fix = f"rebuild it with `mil cache` (or delete {root})"
        m = read_json(root / MANIFEST, "feature store manifest", fix)
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise DataError(f"{root / MANIFEST}: not a feature store of format {FORMAT}; {fix}")
        b = m.get("build")
        try:
            rows, dim = int(m["rows"]), int(m["dim"])
            offsets = np.load(root / f"offsets-{b}.npy", allow_pickle=False)
            feats = np.memmap(root / f"features-{b}.bin", DTYPE, "c", shape=(rows, dim))
            coords = labels = None
            if any(s["coords"] for s in m["slides"]):
                coords = np.memmap(root / f"coords-{b}.bin", np.float32, "c", shape=(rows, 2))
            if any(s["labels"] for s in m["slides"]):
                labels = np.memmap(root / f"labels-{b}.bin", np.int8, "c", shape=(rows,))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{root}: feature store build {b} is damaged ({exc}); {fix}") from None
        if len(offsets) != len(m["slides"]) + 1 or int(offsets[-1]) != rows:
            raise DataError(f"{root}: feature store offsets do not match its manifest; {fix}")
        return cls(root, m, feats, offsets, coords, labels)

    @cached_property
    def position(self) -> dict[str, int]:
        """Slide id -> its index in the manifest (and the offsets)."""
        return {s["id"]: i for i, s in enumerate(self.manifest["slides"])}

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self.position

    def rows(self, slide_id: str) -> int:
        i = self.position[slide_id]
        return int(self.offsets[i + 1] - self.offsets[i])

    def stale(self, index: dict[str, Path], slide_ids: Iterable[str]) -> list[str]:
        """Why the store cannot serve ``slide_ids`` from the files of ``index`` (empty: it can)."""
        out = []
        for slide_id in slide_ids:
            i = self.position.get(slide_id)
            if i is None:
                out.append(f"slide {slide_id}: not in the store (added since it was built)")
                continue
            if slide_id not in index:
                out.append(f"slide {slide_id}: its feature file is gone")
                continue
            was, now = self.manifest["slides"][i]["source"], source_stamp(index[slide_id])
            if was != now:
                what = "moved" if was["path"] != now["path"] else "changed"
                out.append(f"slide {slide_id}: {now['path']} {what} since the store was built")
        return out

    def get(self, slide_id: str) -> SlideFeatures:
        """Slide ``slide_id`` as slices of the map (no copy): float16 features ``[N, D]``."""
        i = self.position[slide_id]
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        entry = self.manifest["slides"][i]
        return SlideFeatures(
            features=np.asarray(self.features[lo:hi]),
            coords=np.asarray(self.coords[lo:hi]) if entry["coords"] else None,
            instance_label=np.asarray(self.labels[lo:hi]) if entry["labels"] else None,
            attrs=dict(entry["attrs"]),
            layout="packed",
            embedding=bool(self.manifest["embedding"]),
        )


def build_store(
    root: str | Path,
    index: dict[str, Path],
    slide_ids: Sequence[str],
    read: Callable[[str], SlideFeatures],
    old: PackedFeatures | None = None,
    workers: int = 4,
    progress: bool = True,
) -> PackedFeatures:
    """Pack ``slide_ids`` (their files in ``index``, read by ``read``, which checks them) into
    a new build under ``root``; slides of ``old`` whose source is unchanged are copied from it."""
    root = Path(root)
    if not slide_ids:
        raise DataError(f"{root}: no slides to pack into the feature store")
    root.mkdir(parents=True, exist_ok=True)
    build = secrets.token_hex(4)
    fresh = set() if old is None else {s for s in slide_ids if not old.stale(index, [s])}

    def load(slide_id: str) -> tuple[SlideFeatures, dict]:
        stamp = source_stamp(index[slide_id])  # before the read: a file changed meanwhile is stale
        return (old.get(slide_id) if slide_id in fresh else read(slide_id)), stamp

    entries, offsets, any_coords, any_labels = [], [0], False, False
    paths = {k: root / f"{k}-{build}.bin" for k in ("features", "coords", "labels")}
    bar = tqdm(total=len(slide_ids), desc="packing features", disable=not progress, leave=False)
    with (
        atomic_path(paths["features"]) as fp,
        atomic_path(paths["coords"]) as cp,
        atomic_path(paths["labels"]) as lp,
        open(fp, "wb") as ff,
        open(cp, "wb") as cf,
        open(lp, "wb") as lf,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        step = 2 * workers  # a few slides at a time: memory stays bounded (slides can be GBs)
        for start in range(0, len(slide_ids), step):
            group = list(slide_ids[start : start + step])
            for slide_id, (sf, stamp) in zip(group, pool.map(load, group)):
                x = _as_half(sf.features, slide_id, index[slide_id])
                n = len(x)
                x.tofile(ff)
                coords = sf.coords if sf.coords is not None else np.full((n, 2), np.nan)
                np.ascontiguousarray(coords, dtype=np.float32).tofile(cf)
                lab = sf.instance_label if sf.instance_label is not None else np.full(n, -1)
                np.ascontiguousarray(lab, dtype=np.int8).tofile(lf)
                any_coords |= sf.coords is not None
                any_labels |= sf.instance_label is not None
                offsets.append(offsets[-1] + n)
                entries.append(_entry(slide_id, sf, stamp))
            bar.update(len(group))
    bar.close()
    if not any_coords:
        paths["coords"].unlink()
    if not any_labels:
        paths["labels"].unlink()
    with atomic_path(root / f"offsets-{build}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    dims = {e.pop("dim") for e in entries}
    if len(dims) > 1:  # read slides are checked one by one; this catches copies from `old`
        raise DataError(f"{root}: slides of dimensions {sorted(dims)}; one encoder per store")
    encoders = {e["attrs"].get("encoder") for e in entries} - {None}
    manifest = {
        "format": FORMAT,
        "build": build,
        "dtype": "float16",
        "rows": offsets[-1],
        "dim": dims.pop() if dims else 0,
        "encoder": ", ".join(sorted(map(str, encoders))) or None,
        "embedding": any(e.pop("embedding") for e in entries),
        "slides": entries,
    }
    write_json(root / MANIFEST, manifest)  # the build is current from here
    _remove_other_builds(root, build)
    return PackedFeatures.open(root)


def _as_half(x: np.ndarray, slide_id: str, path: Path) -> np.ndarray:
    with np.errstate(over="ignore"):  # an overflow is named below
        half = np.ascontiguousarray(x, dtype=DTYPE)
    if x.dtype != DTYPE and not np.isfinite(half).all():
        raise DataError(
            f"slide {slide_id}: {path} holds values beyond float16's range (|x| > 65504), "
            f"which the packed store cannot keep; use data.store: files for this cohort"
        )
    return half


def _entry(slide_id: str, sf: SlideFeatures, stamp: dict) -> dict:
    return {
        "id": slide_id,
        "source": stamp,
        "coords": sf.coords is not None,
        "labels": sf.instance_label is not None,
        "attrs": sf.attrs,
        "dim": int(sf.features.shape[1]),
        "embedding": sf.embedding,
    }


def _remove_other_builds(root: Path, build: str) -> None:
    for p in root.iterdir():
        stem = p.name.rsplit(".", 1)[0]
        if (
            p.is_file()
            and "-" in stem
            and stem.split("-")[0] in ("features", "coords", "labels", "offsets")
        ):
            if stem.rsplit("-", 1)[1] != build:
                p.unlink(missing_ok=True)


def open_store(
    root: str | Path,
    index: dict[str, Path],
    slide_ids: Sequence[str],
    read: Callable[[str], SlideFeatures],
    rebuild: bool = True,
    progress: bool = True,
) -> tuple[PackedFeatures, str]:
    """The store under ``root`` able to serve ``slide_ids``, and what was done ("up to date",
    "built", "rebuilt: <why>"). A missing or stale store is (re)built when ``rebuild``, else a
    :class:`DataError` names the stale slides. One process builds at a time (a lock on
    ``root``); the others then find it current."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"data.store_dir: cannot create the feature store folder {root} ({exc}); "
            f"set data.store_dir to a writable folder"
        ) from None
    with run_lock(root):
        old, why = None, ["no store yet"]
        if (root / MANIFEST).exists():
            try:
                old = PackedFeatures.open(root)
                why = old.stale(index, slide_ids)
            except DataError as exc:
                why = [str(exc)]
        if not why:
            return old, "up to date"
        if not rebuild:
            more = f" (and {len(why) - 3} more)" if len(why) > 3 else ""
            raise DataError(
                f"the feature store {root} is stale: {'; '.join(why[:3])}{more}; "
                f"run `mil cache CONFIG` to rebuild it"
            )
        keep = [] if old is None else [s for s in old.position if s in index]
        wanted = list(dict.fromkeys([*slide_ids, *keep]))  # other cohorts' slides stay packed
        store = build_store(root, index, wanted, read, old=old, progress=progress)
        return (
            store,
            "built" if why == ["no store yet"] else f"rebuilt ({why[0]}{', …' * (len(why) > 1)})",
        )


def default_store_dir(features: str | os.PathLike) -> Path:
    return Path(features) / DEFAULT_DIRNAME

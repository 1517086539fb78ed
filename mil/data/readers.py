"""Feature-file readers: our h5, CLAM, TRIDENT, STAMP, ``.pt`` and ``.npy``, detected not configured.

Layouts (see DESIGN.md):

* ours / TRIDENT / CLAM ``h5_files``: h5 with ``features [N, D]`` and optional
  ``coords [N, 2]`` (level-0 pixels); tile size in ``patch_size_level0``
  (root or ``coords`` attribute).
* STAMP / marugoto: h5 with ``feats [N, D]`` and ``coords`` in micrometres,
  root attributes ``unit``, ``tile_size_um``, ``tile_size_px``.
* CLAM ``pt_files/<id>.pt`` and any ``.pt``: a tensor, or a dict with
  ``features``/``coords`` (always loaded with ``weights_only=True``).
* ``.npy``: a ``[N, D]`` array (``allow_pickle=False``).
* slide or patient embeddings (TRIDENT ``slide_features_<encoder>/<slide>.h5``,
  STAMP ``<encoder>-slide/`` and ``<encoder>-pat/``): any of the above holding
  one vector ``[D]``, read as a bag of one instance ``[1, D]`` without
  coordinates (TRIDENT's copy of the tiles' ``coords`` is dropped).

Optional ``instance_label [N]`` (h5) carries instance-level ground truth such
as annotated tumour tiles; when present the runner reports how well instance
scores rank positive instances.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from mil.errors import DataError
from mil.io import load_tensors

FEATURE_SUFFIXES = (".h5", ".pt", ".npy")


@dataclass
class SlideFeatures:
    """What one feature file holds, as numpy arrays."""

    features: np.ndarray  # [N, D], float16 or float32
    coords: np.ndarray | None = None  # [N, 2], float32
    instance_label: np.ndarray | None = None  # [N], int8
    attrs: dict = field(default_factory=dict)
    layout: str = ""
    embedding: bool = False  # the file held one vector [D] (a slide or patient embedding)


def read_features(path: str | Path, check_finite: bool = True) -> SlideFeatures:
    """Read one feature file, detecting its layout; raise :class:`DataError` naming it if bad."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".h5":
            out = _read_h5(path)
        elif suffix == ".pt":
            out = _read_pt(path)
        elif suffix == ".npy":
            out = SlideFeatures(features=np.load(path, allow_pickle=False), layout="npy")
        else:
            raise DataError(
                f"{path}: unsupported feature file type {suffix!r} (use .h5, .pt or .npy)"
            )
    except DataError:
        raise
    except Exception as exc:  # h5py/torch/numpy raise many types for a corrupt file
        raise DataError(f"{path}: cannot read feature file ({type(exc).__name__}: {exc})") from None
    _validate(out, path, check_finite)
    return out


def _read_h5(path: Path) -> SlideFeatures:
    with h5py.File(path, "r") as f:
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        if "features" in f:
            feats = f["features"][()]
            layout = "h5"
        elif "feats" in f:
            feats = f["feats"][()]
            layout = "stamp"
        else:
            raise DataError(
                f"{path}: no 'features' (CLAM/TRIDENT/mil) or 'feats' (STAMP) dataset; "
                f"found {sorted(f.keys())}"
            )
        coords = None
        if "coords" in f:
            coords = f["coords"][()]
            attrs.update({f"coords.{k}": _plain(v) for k, v in f["coords"].attrs.items()})
        label = f["instance_label"][()] if "instance_label" in f else None
    if layout == "stamp":
        attrs.setdefault("coord_unit", attrs.get("unit", "um"))
        if "tile_size_um" in attrs:
            attrs.setdefault("tile_size", attrs["tile_size_um"])
    else:
        size = attrs.get("patch_size_level0", attrs.get("coords.patch_size_level0"))
        if size is not None:
            attrs.setdefault("tile_size", size)
        if "coords.patch_size_level0" in attrs and "encoder" not in attrs:
            layout = "trident"
    if feats.ndim == 3 and feats.shape[0] == 1:  # some CLAM forks store [1, N, D]
        feats = feats[0]
    if coords is not None and coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    return SlideFeatures(
        features=feats, coords=coords, instance_label=label, attrs=attrs, layout=layout
    )


def _read_pt(path: Path) -> SlideFeatures:
    obj = load_tensors(path)  # weights_only; Python objects are refused, and said so
    coords = None
    if isinstance(obj, dict):
        key = next((k for k in ("features", "feats", "x") if k in obj), None)
        if key is None:
            raise DataError(f"{path}: a dict without 'features'; keys are {sorted(obj)}")
        feats, coords = obj[key], obj.get("coords")
    else:
        feats = obj
    if not isinstance(feats, torch.Tensor):
        raise DataError(f"{path}: expected a tensor of features, found {type(feats).__name__}")
    feats = feats.detach()
    if feats.dtype == torch.bfloat16:
        feats = feats.float()
    coords_np = None if coords is None else torch.as_tensor(coords).numpy()
    return SlideFeatures(features=feats.numpy(), coords=coords_np, layout="pt")


def _validate(out: SlideFeatures, path: Path, check_finite: bool) -> None:
    if out.features.ndim == 1:
        _as_bag_of_one(out, path)
    f = out.features
    if f.ndim != 2:
        raise DataError(
            f"{path}: features must be [N, D] (tiles) or [D] (one slide or patient embedding), "
            f"found shape {tuple(f.shape)}"
        )
    if not np.issubdtype(f.dtype, np.floating):
        # integers or booleans are rarely features (tile indices, labels?): `mil check` warns
        out.attrs["cast_from"] = str(f.dtype)
        f = f.astype(np.float32)
    elif f.dtype not in (np.float16, np.float32):
        f = f.astype(np.float32)
    out.features = f
    if f.shape[0] == 0:
        raise DataError(
            f"{path}: empty bag (0 tiles); remove the slide from the CSV or re-extract it"
        )
    if f.shape[1] == 0:
        raise DataError(
            f"{path}: features of dimension 0 (shape {tuple(f.shape)}): the file holds no feature "
            f"values; re-extract the slide"
        )
    if check_finite and not np.isfinite(f).all():
        bad = int((~np.isfinite(f)).any(1).sum())
        raise DataError(f"{path}: {bad} of {f.shape[0]} tiles have NaN or infinite features")
    if out.coords is not None:
        c = out.coords
        if c.ndim != 2 or c.shape[1] < 2 or c.shape[0] != f.shape[0]:
            raise DataError(
                f"{path}: coords of shape {tuple(c.shape)} do not match {f.shape[0]} tiles (expected [N, 2])"
            )
        out.coords = np.ascontiguousarray(c[:, :2], dtype=np.float32)
    if out.instance_label is not None:
        lab = np.asarray(out.instance_label)
        if lab.size != f.shape[0] or (lab.ndim > 1 and lab.size != lab.shape[0]):
            raise DataError(
                f"{path}: instance_label of shape {tuple(lab.shape)} does not match "
                f"{f.shape[0]} tiles (expected [N] with N = {f.shape[0]})"
            )
        lab = lab.reshape(-1)
        if not np.isin(lab, (0, 1)).all():
            found = sorted(np.unique(lab).tolist())[:5]
            raise DataError(
                f"{path}: instance_label must hold 0/1 (1 = positive tile); found values {found}"
            )
        out.instance_label = lab.astype(np.int8)


def _as_bag_of_one(out: SlideFeatures, path: Path) -> None:
    """A slide or patient embedding ``[D]`` becomes a bag of one instance ``[1, D]``.

    Tile coordinates and labels stored beside it (TRIDENT keeps the patches'
    ``coords``) describe no instance of that bag, so they are dropped.
    """
    if out.features.size == 0:  # TRIDENT writes (0,) for a slide without tiles
        raise DataError(
            f"{path}: empty slide embedding (0 values); remove the slide from the CSV or re-encode it"
        )
    out.features = out.features[None, :]
    out.coords = out.instance_label = None
    out.embedding = True
    out.layout = f"{out.layout} embedding"


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def index_feature_dir(root: str | Path) -> tuple[dict[str, Path], str]:
    """Map slide id -> feature file under ``root``, detecting the directory layout.

    Returns (index, description). CLAM (``h5_files/`` + ``pt_files/``): h5 wins
    (it has coordinates). TRIDENT: ``root`` may be the job folder holding one
    ``features_<encoder>/`` (tiles) or ``slide_features_<encoder>/`` (slide
    embeddings) directory. Otherwise a flat folder of
    ``.h5``/``.pt``/``.npy`` files; a slide with two files of different types
    is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.features: feature folder not found: {root}")
    if (root / "h5_files").is_dir() or (root / "pt_files").is_dir():
        index = _flat_index(root / "pt_files") if (root / "pt_files").is_dir() else {}
        if (root / "h5_files").is_dir():
            index.update(_flat_index(root / "h5_files"))
        return index, f"CLAM layout in {root} ({len(index)} slides)"
    trident = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(("features_", "slide_features_"))
    )
    if trident and not any(p.suffix in FEATURE_SUFFIXES for p in root.iterdir() if p.is_file()):
        if len(trident) > 1:
            names = ", ".join(p.name for p in trident)
            raise DataError(
                f"data.features: {root} holds several TRIDENT encoders ({names}; features_*: "
                f"tiles, slide_features_*: one embedding per slide); point data.features at one of them"
            )
        index = _flat_index(trident[0])
        kind = "slide embeddings" if trident[0].name.startswith("slide_") else "layout"
        return index, f"TRIDENT {kind} {trident[0]} ({len(index)} slides)"
    index = _flat_index(root)
    return index, f"feature folder {root} ({len(index)} slides)"


def _flat_index(folder: Path) -> dict[str, Path]:
    """Slide id (file stem, Unicode NFC as the cohort's ids) -> feature file."""
    index: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and p.suffix.lower() in FEATURE_SUFFIXES):
            continue
        stem = unicodedata.normalize("NFC", p.stem)
        if stem in index:
            raise DataError(
                f"slide {stem!r} has two feature files: {index[stem].name} and {p.name} in {folder}"
            )
        index[stem] = p
    return index

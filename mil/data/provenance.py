"""Feature provenance: which encoder, magnification and tile size made a feature file, read
from the attributes extractors write, and the comparisons built on it (a cohort mixing
provenances, an external cohort made differently from a run's training cohort).

Attributes read (the first one present wins; a missing one is unknown, never an error):

* encoder: ``encoder`` (ours), ``extractor`` (STAMP), ``encoder_name``, ``patch_encoder``,
  ``feature_extractor``; else the TRIDENT folder ``features_<encoder>/`` (or
  ``slide_features_<encoder>/``) the file sits in. TRIDENT writes no encoder attribute: its
  ``name`` attributes are the slide's name.
* magnification of the tiles: ``magnification`` (ours), ``target_magnification`` (TRIDENT
  writes it on ``coords``; ``level0_magnification`` is the scan's, not the tiles').
* microns per pixel: ``mpp``, ``microns_per_pixel``; STAMP's ``tile_size_um / tile_size_px``.
* tile size, one field per unit so that only like is compared with like: ``tile size (px)``,
  the encoder's input at the tiles' magnification (TRIDENT ``patch_size``, STAMP
  ``tile_size_px``); ``tile size (µm)`` (STAMP ``tile_size_um``, before STAMP 2.1
  ``tile_size``); ``tile size (px at level 0)`` (``patch_size_level0``) only where neither is
  known, as it also depends on the scanner's base magnification.
* dtype: the stored one (float16, float32; ``cast_from`` where the reader cast integers).

Keys are as :func:`mil.data.readers.read_features` returns them: root attributes, and
``coords.<name>`` for the ``coords`` dataset's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mil.data.cohort import normalize_id, read_cohort_csv
from mil.data.readers import SlideFeatures, index_feature_dir
from mil.errors import DataError
from mil.schema import Config

ENCODER_KEYS = ("encoder", "extractor", "encoder_name", "patch_encoder", "feature_extractor")
MAGNIFICATION_KEYS = (
    "magnification",
    "target_magnification",
    "coords.target_magnification",
    "coords.magnification",
)
MPP_KEYS = ("mpp", "microns_per_pixel", "coords.mpp")
TILE_PX_KEYS = ("patch_size", "coords.patch_size", "tile_size_px")
TILE_LEVEL0_KEYS = ("patch_size_level0", "coords.patch_size_level0")
TILE_PX, TILE_UM, TILE_LEVEL0 = "tile size (px)", "tile size (µm)", "tile size (px at level 0)"

#: fields a mix of which ``mil check`` reports (the dimension is already an error there)
MIX_FIELDS = ("encoder", "magnification", "mpp", TILE_PX, TILE_UM, TILE_LEVEL0, "dtype")
#: fields in which an external cohort must match the run's training cohort
COMPARED_FIELDS = MIX_FIELDS[:-1]  # a float16 copy of the same features predicts the same

_ADVICE = {
    "encoder": "features of different encoders live in different spaces",
    "dtype": "harmless in itself, but a sign of files from different extraction runs",
}
_SCALE_ADVICE = "tiles of another magnification or size show the tissue at another scale"


@dataclass
class Provenance:
    """What made one feature file: ``fields`` holds the known ones (name -> value as text)."""

    path: Path
    fields: dict[str, str] = field(default_factory=dict)
    dim: int | None = None

    @classmethod
    def of_features(cls, path: str | Path, sf: SlideFeatures) -> Provenance:
        """From a file already read by :func:`~mil.data.readers.read_features`."""
        dtype = sf.attrs.get("cast_from", str(sf.features.dtype))
        return provenance_of(path, sf.attrs, dtype, sf.features.shape[-1], sf.layout)


def provenance_of(
    path: str | Path,
    attrs: dict,
    dtype: str | None = None,
    dim: int | None = None,
    layout: str = "",
) -> Provenance:
    """The provenance of the file at ``path`` from its attributes (see the module's doc)."""
    path = Path(path)
    fields: dict[str, str] = {}
    encoder = _first(attrs, ENCODER_KEYS) or _encoder_folder(path)
    if encoder is not None and str(encoder).strip():
        fields["encoder"] = str(encoder).strip()
    mag = _number(_first(attrs, MAGNIFICATION_KEYS))
    if mag is not None:
        fields["magnification"] = f"{mag:g}"
    tile_px = _number(_first(attrs, TILE_PX_KEYS))
    tile_um = _number(
        attrs.get("tile_size_um", attrs.get("tile_size") if layout == "stamp" else None)
    )
    mpp = _number(_first(attrs, MPP_KEYS))
    if mpp is None and tile_um and tile_px:
        mpp = tile_um / tile_px
    if mpp is not None:
        fields["mpp"] = f"{mpp:.2g}"
    if tile_px is not None:
        fields[TILE_PX] = f"{tile_px:g}"
    if tile_um is not None:
        fields[TILE_UM] = f"{tile_um:.4g}"
    level0 = _number(_first(attrs, TILE_LEVEL0_KEYS))
    if level0 is not None and tile_px is None and tile_um is None:
        fields[TILE_LEVEL0] = f"{level0:g}"
    if dtype:
        fields["dtype"] = str(dtype)
    return Provenance(path, fields, None if dim is None else int(dim))


def read_provenance(path: str | Path) -> Provenance:
    """The provenance of a feature file from its attributes and dataset header alone (the
    features are not read). A file this cannot open has an unknown provenance: reading its
    features names the problem."""
    path = Path(path)
    attrs: dict = {}
    dtype = dim = None
    layout = ""
    try:
        if path.suffix.lower() == ".h5":
            with h5py.File(path, "r") as f:
                attrs = {k: _plain(v) for k, v in f.attrs.items()}
                if "coords" in f:
                    attrs.update({f"coords.{k}": _plain(v) for k, v in f["coords"].attrs.items()})
                name = next((n for n in ("features", "feats") if n in f), None)
                if name is not None:
                    dtype, dim = str(f[name].dtype), (f[name].shape or (None,))[-1]
                    layout = "stamp" if name == "feats" else "h5"
        elif path.suffix.lower() == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            dtype, dim = str(arr.dtype), (arr.shape or (None,))[-1]
    except Exception:  # h5py and numpy raise many types for a corrupt file
        pass
    return provenance_of(path, attrs, dtype, dim, layout)


def cohort_files(cfg: Config) -> dict[str, Path]:
    """Slide id -> feature file for the slides of ``cfg``'s cohort CSV that have one (none for
    an instance table); a missing CSV or feature folder is a :class:`DataError`."""
    d = cfg.data
    if d.instances or not d.csv:
        return {}
    df = read_cohort_csv(d.csv, d.slide_col)
    if d.slide_col not in df.columns:
        raise DataError(f"{d.csv}: no slide column {d.slide_col!r} (data.slide_col)")
    index, _ = index_feature_dir(d.features)
    ids = df[d.slide_col].dropna().map(normalize_id)
    return {s: index[s] for s in ids if s in index}


# ---- the cohort -----------------------------------------------------------------------------


def provenance_summary(items: list[Provenance]) -> dict[str, dict[str, int]]:
    """Field -> value -> number of files, most common value first; with ``n_files``."""
    out: dict[str, dict[str, int]] = {"n_files": {"all": len(items)}}
    for name in MIX_FIELDS:
        counts = Counter(p.fields[name] for p in items if name in p.fields)
        if counts:
            out[name] = dict(counts.most_common())
    return out


def describe_values(items: list[Provenance], name: str) -> str:
    """``20 in 140 files (e.g. A.h5), 40 in 12 files (e.g. B.h5)``, most common value first,
    then how many files do not say."""
    example: dict[str, Path] = {}
    counts: Counter = Counter()
    for p in items:
        if name in p.fields:
            counts[p.fields[name]] += 1
            example.setdefault(p.fields[name], p.path)
    parts = [
        f"{value} in {n} file{'s' if n > 1 else ''} (e.g. {example[value].name})"
        for value, n in counts.most_common()
    ]
    unknown = len(items) - sum(counts.values())
    if unknown:
        parts.append(f"not recorded in {unknown}")
    return ", ".join(parts)


def mixed_provenance(items: list[Provenance]) -> list[tuple[str, str]]:
    """(field, message) for every field in which the files record two or more values."""
    out = []
    for name in MIX_FIELDS:
        if len({p.fields[name] for p in items if name in p.fields}) > 1:
            advice = _ADVICE.get(name, _SCALE_ADVICE)
            out.append(
                (
                    name,
                    f"mixed {name}: {describe_values(items, name)}; {advice}: make the cohort's "
                    f"features with one setting (or say why the mix is intended)",
                )
            )
    return out


def provenance_differences(
    train: list[Provenance], external: list[Provenance], train_name: str = "the run's cohort"
) -> list[str]:
    """A message per compared field in which the external files record a value no training
    file does, naming the values of both and an example file of each. Fields unknown on
    either side are not compared."""
    out = []
    for name in COMPARED_FIELDS:
        seen = {p.fields[name] for p in train if name in p.fields}
        new = {p.fields[name] for p in external if name in p.fields} - seen
        if seen and new:
            out.append(
                f"feature provenance differs from the run's training cohort in {name}: the "
                f"external cohort has {describe_values(external, name)}; {train_name} has "
                f"{describe_values(train, name)}. A model applied to features made another way "
                f"predicts without failing but meaninglessly: extract the external cohort's "
                f"features as the training cohort's were"
            )
    return out


def compare_provenance(run_cfg: Config, cfg: Config) -> tuple[dict, list[str]]:
    """The provenance summaries of a run's training cohort (``run``) and of an external
    cohort (``cohort``), and :func:`provenance_differences` between them. A training cohort
    that cannot be read any more is not compared, and says so."""
    external = [read_provenance(p) for p in cohort_files(cfg).values()]
    summary = {"cohort": provenance_summary(external)}
    try:
        train = [read_provenance(p) for p in cohort_files(run_cfg).values()]
    except DataError as exc:
        return summary, [
            f"the run's training cohort cannot be read ({exc}); the external cohort's feature "
            f"provenance (encoder, magnification, tile size) is not compared with it"
        ]
    summary["run"] = provenance_summary(train)
    name = f"the run's cohort ({run_cfg.data.features})"
    return summary, provenance_differences(train, external, name)


# ---- attribute values -----------------------------------------------------------------------


def _first(attrs: dict, keys: tuple[str, ...]):
    return next((attrs[k] for k in keys if attrs.get(k) is not None), None)


def _encoder_folder(path: Path) -> str | None:
    """TRIDENT's ``features_<encoder>`` / ``slide_features_<encoder>`` folder name."""
    for prefix in ("slide_features_", "features_"):
        if path.parent.name.startswith(prefix) and len(path.parent.name) > len(prefix):
            return path.parent.name[len(prefix) :]
    return None


def _number(value) -> float | None:
    """A positive finite number from an attribute: ``20``, ``20.0``, ``"20x"``, ``[0.25, 0.25]``."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, str):
        value = value.strip().rstrip("xX")
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) and x > 0 else None


def _plain(v):
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v

"""Feature groups of a tabular modality: MCAT's ``signatures.csv`` (gene families) or a 0/1
composition matrix (features x groups); genes the table lacks are counted, bad cells named."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from mil.errors import DataError, MilWarning

#: a gene of MCAT's ``signatures.csv`` joins its group with these columns of the omics table
GENE_SUFFIXES = ("", "_mut", "_cnv", "_rnaseq", "_rna", "_mrna")


def read_groups(spec, features: list[str]) -> tuple[list[list[int]], list[str]]:
    """Feature positions of each group of ``spec.groups`` (a :class:`~mil.data.tabular.TabularSpec`):
    a 0/1 composition matrix (first column: feature names, one column per group; its cells
    numbers) or MCAT's ``signatures.csv`` (one column of gene symbols per group; a gene joins
    its group with its ``_mut``, ``_cnv``, ``_rnaseq`` columns). Without a groups file, one
    group of all features. Members the table lacks are left out with a warning that counts
    them; a group left empty, or a composition cell other than 0/1, is a :class:`DataError`."""
    if spec.groups is None:
        return [list(range(len(features)))], [spec.name]
    path = Path(spec.groups)
    if not path.is_file():
        raise DataError(f"data.tabular {spec.name}.groups: file not found: {path}")
    try:
        g = pd.read_csv(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read the groups of modality {spec.name} ({exc})") from None
    where = {f: i for i, f in enumerate(features)}
    if is_composition(g):
        members, unmatched = _composition_members(g, where, path)
        what = "features of the composition matrix"
    else:
        members, unmatched = _signature_members(g, where)
        what = "genes"
    for name, m in members.items():
        if not m:
            raise DataError(
                f"{path}: group {name!r} has none of its columns in {spec.csv} (modality {spec.name}); "
                f"check the gene names or the table's columns"
            )
    _warn_unmatched(unmatched, f"{what} are not columns of {spec.csv} (modality {spec.name})", path)
    return [sorted(set(m)) for m in members.values()], [str(n) for n in members]


def _warn_unmatched(
    unmatched: dict[str, tuple[list[str], list[str]]], what: str, path: Path
) -> None:
    """One warning counting the members (unique names) the table lacks, and per group."""
    lost = {name: (miss, names) for name, (miss, names) in unmatched.items() if miss}
    if not lost:
        return
    missing = {m for miss, _ in lost.values() for m in miss}
    every = {m for _, names in unmatched.values() for m in names}
    per = "; ".join(
        f"{name}: {len(miss)} of {len(names)}, e.g. {miss[0]!r}"
        for name, (miss, names) in list(lost.items())[:4]
    )
    warnings.warn(
        f"{path}: {len(missing)} of {len(every)} {what} and are left out of their groups "
        f"({per}{'; …' if len(lost) > 4 else ''})",
        MilWarning,
        stacklevel=4,
    )


def is_composition(g: pd.DataFrame) -> bool:
    """A composition matrix holds numbers after its first column (of feature names); a
    signatures file holds gene symbols in every column."""
    rest = g.iloc[:, 1:]
    if rest.shape[1] == 0:
        return False
    cells = rest.stack().astype(str).str.strip()
    if len(cells) == 0:
        return False
    numeric = pd.to_numeric(cells, errors="coerce").notna().mean() >= 0.5
    names_first = not pd.to_numeric(g.iloc[:, 0], errors="coerce").notna().all()
    return bool(numeric and names_first)


def _composition_members(g: pd.DataFrame, where: dict[str, int], path: Path):
    first = g.iloc[:, 0].astype(str).str.strip()
    rest = g.iloc[:, 1:]
    num = rest.apply(lambda c: pd.to_numeric(c, errors="coerce"))
    bad = ~num.isin([0, 1])
    if bad.to_numpy().any():
        row, at = np.argwhere(bad.to_numpy())[0]
        col, cell = rest.columns[at], rest.iloc[row, at]
        shown = (
            "a blank cell"
            if pd.isna(cell)
            else repr(cell.item() if isinstance(cell, np.generic) else cell)
        )
        raise DataError(
            f"{path}: a composition matrix (features x groups) must hold 0 or 1 in every cell; "
            f"row {first.iloc[row]!r} (line {row + 2}), column {col!r} holds {shown} "
            f"({int(bad.to_numpy().sum())} such cells in all)"
        )
    members, unmatched = {}, {}
    for col in rest.columns:
        on = first[(num[col] == 1).to_numpy()]
        members[col] = [where[f] for f in on if f in where]
        unmatched[col] = ([f for f in on if f not in where], list(on))
    return members, unmatched


def _signature_members(g: pd.DataFrame, where: dict[str, int]):
    members, unmatched = {}, {}
    for col in g.columns:
        genes = list(dict.fromkeys(g[col].dropna().astype(str).str.strip()))
        found = {
            gene: [where[gene + s] for s in GENE_SUFFIXES if gene + s in where] for gene in genes
        }
        members[col] = [i for hits in found.values() for i in hits]
        unmatched[col] = ([gene for gene, hits in found.items() if not hits], genes)
    return members, unmatched

"""Stratified k-fold splits (patient-level or site-preserved), written and read as CLAM-style CSVs.

``<dir>/splits_<k>.csv`` has columns ``train,val,test`` of slide ids (columns
of unequal length, padded with empty cells); ``splits_<k>_descriptor.csv``
counts classes (or events) per partition. With ``repeats > 1`` the files are
``splits_r<r>_<k>.csv``.
"""

from mil.splits.assignment import read_assignment
from mil.splits.files import (
    check_site_preserved,
    describe,
    load_or_make_splits,
    read_splits,
    split_file,
    write_splits,
)
from mil.splits.folds import (
    PARTS,
    Split,
    inner_splits,
    inner_validation,
    make_splits,
    site_column,
    site_groups,
    strata,
    strata_options,
    stratified_group_folds,
)

__all__ = [
    "PARTS",
    "Split",
    "check_site_preserved",
    "describe",
    "inner_splits",
    "inner_validation",
    "load_or_make_splits",
    "make_splits",
    "read_assignment",
    "read_splits",
    "site_column",
    "site_groups",
    "split_file",
    "strata",
    "strata_options",
    "stratified_group_folds",
    "write_splits",
]

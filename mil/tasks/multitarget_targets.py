"""The multi-target task's options and targets (:mod:`mil.tasks.multitarget`): each entry of
``task.targets`` checked as its own task checks its options, each target read from its
column by its own task's reader on the rows where the cell has a value, and each target's
block of instance scores read as its own task reads them."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from mil.data.targets import Targets
from mil.errors import ConfigError, DataError
from mil.schema import build_section
from mil.tasks.base import Task
from mil.tasks.registry import get

#: the tasks a target may be
TARGET_TYPES = ("classification", "regression", "ordinal")
#: keys of a target entry besides its task's own options
ENTRY_KEYS = ("name", "label_col", "type", "classes")


@dataclass(frozen=True)
class TargetSpec:
    """One target: its name, column, task type, classes (or None) and the task's options."""

    name: str
    label_col: str
    type: str
    classes: tuple[str, ...] | None
    options: Any

    @property
    def task_class(self) -> type[Task]:
        return get(self.type)


@dataclass
class MultiTargetOptions:
    """``targets``: one mapping per target (``name``, ``label_col``, ``type``, ``classes`` and
    its task's options); ``weights``: ``equal`` (the sum of the losses) or ``uncertainty``."""

    targets: list[dict[str, Any]] | None = None
    weights: Literal["equal", "uncertainty"] = "equal"

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(
                "task.targets must list the targets, e.g. [{name: msi, label_col: msi_status}, "
                "{name: tmb, label_col: tmb, type: regression}]"
            )
        self.specs  # noqa: B018  (each entry checked now, so a config error names it)

    @property
    def specs(self) -> list[TargetSpec]:
        """The targets, each checked (a ``ValueError`` names the entry and the key)."""
        specs, names, cols = [], set(), set()
        for i, entry in enumerate(self.targets or []):
            where = f"task.targets[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(
                    f"{where} must be a mapping with name and label_col, found {entry!r}"
                )
            for key in ("name", "label_col"):
                if not isinstance(entry.get(key), str) or not entry[key].strip():
                    raise ValueError(f"{where}.{key} must be given (a column or word)")
            name, col = entry["name"], entry["label_col"]
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ValueError(f"{where}.name = {name!r}: use letters, digits, - and _ only")
            if name in names or col in cols:
                raise ValueError(
                    f"{where}: name {name!r} or label_col {col!r} is used by another target"
                )
            names.add(name), cols.add(col)
            kind = entry.get("type", "classification")
            if kind not in TARGET_TYPES:
                raise ValueError(f"{where}.type = {kind!r}; expected one of {list(TARGET_TYPES)}")
            classes = entry.get("classes")
            if classes is not None and (not isinstance(classes, list) or kind == "regression"):
                raise ValueError(f"{where}.classes must be a list of the {kind} target's classes")
            rest = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
            try:
                options = build_section(get(kind).Options, rest, f"{where}.", "task")
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix("task: ")) from None
            specs.append(
                TargetSpec(
                    name, col, kind, None if classes is None else tuple(map(str, classes)), options
                )
            )
        return specs


# ---- the targets in the cohort table --------------------------------------------------------


def _present(col: pd.Series) -> pd.Series:
    return col.notna() & (col.astype(str).str.strip() != "")


class MultiTargets(Targets):
    """Each target's own reader on the rows where its column has a value; bag columns
    ``<name>.<column>`` (``msi.label``, ``tmb.target``), missing where the cell is empty; the
    classes are ``<name>/<class>`` per class of each target with classes."""

    missing_allowed = True

    def __init__(self, specs: list[TargetSpec]) -> None:
        self.specs = specs
        self.readers = {s.name: s.task_class.target_reader(s.options) for s in specs}
        self.columns = tuple(f"{s.name}.{c}" for s in specs for c in self.readers[s.name].columns)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.specs == self.specs

    __hash__ = None  # type: ignore[assignment]

    def data_of(self, spec: TargetSpec, data: Any) -> Any:
        """``data`` as the target's own task reads it: its column and classes."""
        return dataclasses.replace(
            data,
            label_col=spec.label_col,
            classes=None if spec.classes is None else list(spec.classes),
            class_aliases={},
        )

    def source_columns(self, data: Any) -> dict[str, str]:
        return {s.label_col: f"task.targets[{i}].label_col" for i, s in enumerate(self.specs)}

    def read(self, df: pd.DataFrame, slide_ids: pd.Series, data: Any, source: str):
        out = pd.DataFrame(index=df.index)
        classes: list[str] = []
        for s in self.specs:
            reader = self.readers[s.name]
            have = _present(df[s.label_col]).to_numpy()
            if not have.any():
                raise _no_labels(source, s)
            part, names = reader.read(df[have], slide_ids[have], self.data_of(s, data), source)
            for c in reader.columns:
                out[f"{s.name}.{c}"] = np.nan
                out.loc[df.index[have], f"{s.name}.{c}"] = part[c].to_numpy(float)
            classes += [f"{s.name}/{c}" for c in names]
        return out, classes

    def view(self, slides: pd.DataFrame, spec: TargetSpec) -> pd.DataFrame:
        """The rows with the target's label, its columns under its own task's names."""
        cols = {f"{spec.name}.{c}": c for c in self.readers[spec.name].columns}
        have = slides[list(cols)].notna().all(1).to_numpy()
        return slides[have].rename(columns=cols)

    def strata(self, slides: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        per = []
        for s in self.specs:
            cols = [f"{s.name}.{c}" for c in self.readers[s.name].columns]
            have = slides[cols].notna().all(1).to_numpy()
            y = np.full(len(slides), -1, dtype=int)  # a missing label: a stratum of its own
            options = self.readers[s.name].strata(self.view(slides, s))
            # the coarsest of the target's own strata (class, grade; a regression's halves)
            y[have] = (
                [o for o in options if o[0] != "none"][-1][1] if len(options) > 1 else options[0][1]
            )
            per.append((s.name, y))
        joint = (
            pd.MultiIndex.from_arrays([y for _, y in per]).factorize()[0]
            if len(per) > 1
            else per[0][1]
        )
        names = " x ".join(n for n, _ in per)
        return [
            (f"all targets ({names})", np.asarray(joint)),
            *per[:1],
            ("none", np.zeros(len(slides), dtype=int)),
        ]

    def counts(self, part: pd.DataFrame, classes: list[str]) -> pd.Series:
        out = {}
        for s in self.specs:
            names = classes_of(classes, s.name)
            sub = self.readers[s.name].counts(self.view(part, s), names)
            out.update({f"{s.name}/{k}": v for k, v in sub.items()})
            out[f"{s.name}/missing"] = len(part) - len(self.view(part, s))
        return pd.Series(out)

    def check(self, df: pd.DataFrame, data: Any, folds: int) -> list[tuple[str, str]]:
        found = []
        for s in self.specs:
            if s.label_col not in df.columns:
                continue
            rows = df[_present(df[s.label_col])]
            found += [
                (f"{s.name}: {w}", what)
                for w, what in self.readers[s.name].check(rows, self.data_of(s, data), folds)
            ]
            missing = len(df) - len(rows)
            if missing:
                found.append(
                    (
                        s.name,
                        f"{missing} of {len(df)} slides have no {s.label_col!r} (no loss, no metric for them)",
                    )
                )
        return found

    def overview(self, df: pd.DataFrame, data: Any) -> str | None:
        lines = []
        for s in self.specs:
            if s.label_col in df.columns:
                line = self.readers[s.name].overview(
                    df[_present(df[s.label_col])], self.data_of(s, data)
                )
                lines.append(f"{s.name} ({s.type}): {line}")
        return "; ".join(lines) or None


def _no_labels(source: str, spec: TargetSpec) -> DataError:
    return DataError(
        f"{source}: column {spec.label_col!r} (target {spec.name!r}) has no value in any row"
    )


def classes_of(classes: list[str], name: str) -> list[str]:
    return [c[len(name) + 1 :] for c in classes if c.startswith(f"{name}/")]


def block_scores(
    multi: Any, values: np.ndarray, kind: str, name: str, cls: str | None, predicted: int | None
) -> tuple[np.ndarray, str]:
    """Target ``name``'s block of a score kind's columns ``values [N, K]`` (one per head output
    of the multi-target task ``multi``), as its own task reads them
    (:meth:`~mil.tasks.Task.instance_view`: a classification target's logits centred over its
    classes), one column ``[N]``: a class's (``cls``: its name or index; default the positive
    of two classes, else the bag's ``predicted`` class index), or the one score of a
    regression or ordinal target (a signed contribution for ``contribution``). Returns the
    scores and their label (``instance_logits[msi/MSI]``, ``contribution[tmb]``)."""
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[1] != multi.n_out:
        raise DataError(
            f"{kind!r} scores have shape {values.shape}, not one column per head output "
            f"({multi.n_out}: {', '.join(multi.score_columns())})"
        )
    task = multi.subs[name]
    view = task.instance_view(values[:, multi.blocks[name]], kind)
    n = view.shape[1]
    if n == 1:
        if cls is not None:
            raise DataError(f"target {name!r} has one score per tile; leave --cls out")
        return view[:, 0], f"{kind}[{name}]"
    classes = list(task.classes) if len(task.classes) == n else [str(j) for j in range(n)]
    if cls is None:
        j = n - 1 if n == 2 else predicted
        if j is None:
            raise DataError(f"target {name!r} has {n} classes; choose one with --cls: {classes}")
    elif cls in classes:
        j = classes.index(cls)
    elif cls.isdigit() and int(cls) < n:
        j = int(cls)
    else:
        raise DataError(f"--cls {cls!r}: not a class of target {name!r}: {classes} (or 0..{n - 1})")
    return view[:, j], f"{kind}[{name}/{classes[j]}]"

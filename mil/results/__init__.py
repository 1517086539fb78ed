"""The run folder: the one place that knows its layout, and its readers.

Layout (``results/<name>/`` by default)::

    config.yaml              the resolved config (identity of the run)
    splits/splits_<k>.csv    the split files used (+ _descriptor.csv)
    fold_<k>/                one per finished fold (fold_r<r>_<k> with repeats)
        history.csv          per-epoch losses and validation metrics
        predictions.csv      test bags (predictions_patient.csv, predictions_train.csv)
        attention.h5         instance scores of the test bags (:mod:`mil.results.scores`)
        model.pt             weights + what rebuilds them (:mod:`mil.results.checkpoint`)
        <task artifacts>     e.g. risk_groups.csv, km.png
        metrics.json         written last: its presence marks the fold finished
    summary.json, summary.csv, report.md, subgroups.csv, heatmaps/, <task artifacts>
    refit/                   model.pt, history.csv, refit.json: one model on every bag

Every file is written atomically (:mod:`mil.io`), so a reader sees whole
files; a damaged one is named in the error or warning.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mil.config import (
    DEFAULT_PATIENT_COL,
    Config,
    config_from_dict,
    dump_config,
    read_yaml_mapping,
)
from mil.errors import ConfigError, DataError, MilWarning
from mil.io import atomic_path, read_json, write_csv, write_text

CONFIG = "config.yaml"
SPLITS = "splits"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
REPORT = "report.md"
SUBGROUPS = "subgroups.csv"
HEATMAPS = "heatmaps"
HISTORY = "history.csv"
PREDICTIONS = "predictions.csv"
PREDICTIONS_PATIENT = "predictions_patient.csv"
PREDICTIONS_TRAIN = "predictions_train.csv"
PREDICTIONS_VAL = "predictions_val.csv"  # binary classification: the operating point's source
SCORES = "attention.h5"
MODEL = "model.pt"
METRICS = "metrics.json"
#: the run against the linear baselines on its folds (``mil train --baseline``)
BASELINES = "baselines.csv"
BASELINE_RUNS = "baselines"
#: one model refit on every bag of the run (``mil train --refit``): model.pt, history.csv and
#: refit.json (written last: the budget cross-validation chose, and why)
REFIT = "refit"
REFIT_JSON = "refit.json"


def fold_name(fold: int | str) -> str:
    """A fold as its folder names it: ``3`` -> ``"3"``; ``"r1_3"`` stays."""
    return str(fold)


def fold_key(name: str) -> tuple[int, int, str]:
    """Sort key of fold names: ``"2"`` before ``"10"``, repeat 0 before ``"r1_0"``."""
    try:
        if name.startswith("r"):
            r, k = name[1:].split("_")
            return int(r), int(k), ""
        return 0, int(name), ""
    except ValueError:
        return 1 << 30, 0, name


class RunFolder:
    """Paths and readers of one run folder (finished or not)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ---- paths ---------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def splits_dir(self) -> Path:
        return self.path / SPLITS

    def file(self, name: str) -> Path:
        """A run-level file (``summary.json``, ``report.md``, a task artifact)."""
        return self.path / name

    def fold_dir(self, fold: int | str) -> Path:
        """``fold_<k>/``; ``"refit"`` names the folder of the model refit on every bag."""
        if fold == REFIT:
            return self.path / REFIT
        return self.path / f"fold_{fold_name(fold)}"

    def fold_file(self, fold: int | str, name: str) -> Path:
        return self.fold_dir(fold) / name

    def split_file(self, fold: int | str) -> Path:
        return self.splits_dir / f"splits_{fold_name(fold)}.csv"

    # ---- which folds ---------------------------------------------------------------------

    def split_folds(self) -> list[str]:
        """Names of all folds the run's split files define (finished or not)."""
        names = [
            p.stem[len("splits_") :]
            for p in self.splits_dir.glob("splits_*.csv")
            if not p.stem.endswith("_descriptor")
        ]
        return sorted(names, key=fold_key)

    def finished_folds(self) -> list[str]:
        """Names of the folds with a ``metrics.json``, sorted."""
        names = [p.parent.name[len("fold_") :] for p in self.path.glob(f"fold_*/{METRICS}")]
        return sorted(names, key=fold_key)

    def fold_state(self, fold: int | str) -> str:
        """``"done"`` (a readable ``metrics.json``), ``"todo"`` (none) or ``"damaged"``."""
        path = self.fold_file(fold, METRICS)
        if not path.is_file():
            return "todo"
        try:
            _parse_record(path)
        except (OSError, UnicodeDecodeError, ValueError):
            return "damaged"
        return "done"

    # ---- readers -------------------------------------------------------------------------

    def read_config(self) -> Config:
        """The run's saved ``config.yaml``, validated; missing or broken is a clear error."""
        if not self.config_path.is_file():
            raise DataError(f"{self.path}: config.yaml missing; is this a mil run folder?")
        raw = read_yaml_mapping(self.config_path, "run's saved config")
        return config_from_dict(raw, source=str(self.config_path))

    def record(self, fold: int | str) -> dict[str, Any]:
        """A fold's ``metrics.json`` (test metrics, sizes, classes; an undefined metric is None)."""
        return read_json(
            self.fold_file(fold, METRICS),
            "fold record",
            f"re-run `mil train` on this run folder (--out {self.path}) to train the fold again",
        )

    def records(self) -> dict[str, dict[str, Any]]:
        """Fold name -> ``metrics.json`` record of every finished fold, in fold order.

        A damaged ``metrics.json`` (a partial copy, an edit) is left out with a
        warning naming it; re-running ``mil train`` on the run trains that fold again.
        """
        out = {}
        for fold in self.finished_folds():
            path = self.fold_file(fold, METRICS)
            try:
                record = _parse_record(path)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                warnings.warn(
                    f"{path} is damaged ({exc}); fold {fold} is left out. Re-run `mil train` "
                    f"on this run folder (--out {self.path}) to train it again",
                    MilWarning,
                    stacklevel=1,  # one warning per damaged file, whichever reader meets it
                )
                continue
            out[fold] = record
        return out

    def predictions(self, fold: int | str, name: str = PREDICTIONS) -> pd.DataFrame:
        """One prediction file of a fold; a missing or unreadable one is a clear error."""
        path = self.fold_file(fold, name)
        try:
            return pd.read_csv(path, dtype={"bag_id": str, "patient_id": str})
        except (OSError, ValueError) as err:  # missing, empty or unparsable
            raise DataError(
                f"{path}: cannot read this finished fold's predictions ({err}); "
                f"delete {path.parent.name} to retrain the fold"
            ) from None

    def all_predictions(self) -> pd.DataFrame:
        """Out-of-fold predictions of every finished fold (all repeats), with a ``fold_dir``
        column (``fold_3``, ``fold_r1_3``, ...) naming the fold that made each row."""
        parts = [self.predictions(f).assign(fold_dir=self.fold_dir(f).name) for f in self.records()]
        if not parts:
            raise DataError(
                f"{self.path}: no finished folds (fold_*/metrics.json) with predictions"
            )
        return pd.concat(parts, ignore_index=True)

    def first_repeat_tables(self, name: str) -> dict[str, pd.DataFrame]:
        """Fold name -> the fold file ``name`` (a CSV) of each finished fold of the first repeat
        (every bag once), for folds that have it; all repeats' if the first has none."""
        folds = [f for f in self.records() if self.fold_file(f, name).is_file()]
        first = [f for f in folds if not f.startswith("r")] or folds
        return {
            f: pd.read_csv(self.fold_file(f, name), dtype={"bag_id": str, "patient_id": str})
            for f in first
        }

    def summary(self) -> dict[str, Any]:
        return read_json(
            self.file(SUMMARY_JSON), "run summary", f"rebuild it with `mil summarize {self.path}`"
        )

    def summary_stale(self, n_boot: int) -> bool:
        """Whether the summary and report are missing, of another ``n_boot``, or older than
        the config or a fold record they summarise."""
        summary, report = self.file(SUMMARY_JSON), self.file(REPORT)
        if not summary.is_file() or not report.is_file():
            return True
        try:
            if json.loads(summary.read_text()).get("n_boot") != n_boot:
                return True
        except (OSError, UnicodeDecodeError, ValueError):
            return True
        made = min(summary.stat().st_mtime_ns, report.stat().st_mtime_ns)
        sources = [self.config_path, *self.path.glob(f"fold_*/{METRICS}")]
        return any(p.stat().st_mtime_ns > made for p in sources if p.is_file())


def _parse_record(path: Path) -> dict[str, Any]:
    """A fold's ``metrics.json``; ValueError (or OSError) unless it is a finished fold's record."""
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise ValueError("no 'metrics' record")
    return record


def config_splits(
    cfg: Config, run_dir: str | Path, cohort, force: bool = False
) -> tuple[list, Path]:
    """The folds a run of ``cfg`` in ``run_dir`` uses, and their folder: the config's
    ``splits.dir``, else the run's own ``splits/``; read there, or made there when absent
    (:func:`mil.splits.load_or_make_splits`, never overwritten unless ``force``)."""
    from mil.splits import load_or_make_splits

    s = cfg.splits
    folder = Path(s.dir) if s.dir else RunFolder(run_dir).splits_dir
    splits, _ = load_or_make_splits(
        folder,
        cohort,
        s.folds,
        s.val_fraction,
        s.seed,
        s.repeats,
        force=force,
        assignment=s.assignment,
        site_col=cfg.data.site_col if s.by_site else None,
    )
    return splits, folder


def write_artifacts(folder: str | Path, artifacts: dict[str, Any]) -> None:
    """Write a task's artifacts into ``folder``: tables as CSV, matplotlib Figures as PNG."""
    for name, item in artifacts.items():
        path = Path(folder) / name
        if isinstance(item, pd.DataFrame):
            write_csv(path, item)
        else:
            with atomic_path(path) as tmp:
                item.savefig(tmp, format="png")


def prepare_run_dir(cfg: Config, run_dir: Path) -> bool:
    """Write ``config.yaml``; refuse a folder that holds a run of another config.

    Reporting-only keys may change on a finished run: ``data.subgroup_cols``,
    and ``data.site_col`` where the folds are not site-preserved. The saved
    config takes the new values, and the summary joins those columns from the
    cohort CSV (no fold is retrained). Returns whether ``config.yaml`` was written.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    text = dump_config(cfg)
    path = RunFolder(run_dir).config_path
    if path.is_file():
        old = saved_config(path)
        new = yaml.safe_load(text)
        if run_identity(old) != run_identity(new):
            raise ConfigError(
                f"{run_dir} holds a run of a different config ({path}); "
                f"use another --out folder, or delete that one to start again"
            )
        if old == new:
            return False
    write_text(path, text)
    return True


def saved_config(path: Path) -> dict:
    """A run's saved ``config.yaml`` as a mapping, with the keys a newer ``mil`` added filled in
    at their defaults (as saved, where it holds a key this ``mil`` no longer has: such a
    config differs from every current one)."""
    old = read_yaml_mapping(path, "run's saved config")
    try:
        return yaml.safe_load(dump_config(config_from_dict(old, source=str(path))))
    except ConfigError:
        return old


def run_identity(raw: dict) -> dict:
    """The parts of a resolved config that decide a run's results (compared on resume)."""
    raw = copy.deepcopy(raw)
    for key in ("device", "threads", "faithfulness"):  # they change no prediction
        raw.get("train", {}).pop(key, None)
    data = raw.get("data", {})
    for key in ("subgroup_cols", "prefetch", "store_dir"):  # no prediction depends on them
        data.pop(key, None)
    if not raw.get("splits", {}).get("by_site"):
        data.pop("site_col", None)
    # runs saved before data.patient_col defaulted to null wrote the default "case_id",
    # which resolves to the same patients
    if data.get("patient_col") is None:
        data["patient_col"] = DEFAULT_PATIENT_COL
    return raw

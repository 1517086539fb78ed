"""``mil check``: validate a cohort's CSV and feature files before training."""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mil.config import DEFAULT_PATIENT_COL, Config
from mil.data.cohort import AVAILABILITY_COL, Cohort, normalize_id, read_cohort_csv, task_targets
from mil.data.collapse import FeatureSpread
from mil.data.provenance import Provenance, mixed_provenance
from mil.data.readers import index_feature_dir, read_features
from mil.data.tabular import check_availability_col, join_modality, parse_tabular
from mil.errors import ConfigError, DataError, MilWarning
from mil.tasks import make_task


@dataclass
class Problem:
    severity: str  # "error" or "warning"
    where: str  # slide id, column or file
    what: str


def check_cohort(cfg: Config) -> tuple[list[Problem], pd.DataFrame]:
    """Every problem found (not only the first) and a per-slide table."""
    d = cfg.data
    if d.instances:
        return _check_instances(cfg)
    csv = Path(d.csv)
    if not csv.is_file():
        return [Problem("error", str(csv), "cohort CSV not found (data.csv)")], pd.DataFrame()
    try:
        df = read_cohort_csv(csv, d.slide_col)
    except DataError as exc:
        return [Problem("error", str(csv), str(exc))], pd.DataFrame()
    if len(df) == 0:
        return [
            Problem("error", str(csv), "the cohort CSV has a header but no rows")
        ], pd.DataFrame()
    if d.slide_col not in df.columns:
        return [
            Problem("error", d.slide_col, f"slide column not in {csv} (data.slide_col)")
        ], pd.DataFrame()
    ids = df[d.slide_col].map(normalize_id)
    problems, cohort = _csv_problems(cfg, df, ids, csv)
    found, tables = tabular_problems(cfg, _patients(cfg, df, ids, cohort), cohort)
    problems += found
    try:
        index, _ = index_feature_dir(d.features)
    except DataError as exc:
        problems.append(Problem("error", str(d.features), str(exc)))
        return problems, pd.DataFrame()
    table, file_problems = _feature_table(ids, index, str(d.features))
    problems += file_problems
    extra = sorted(set(index) - set(ids))
    if extra:
        problems.append(
            Problem(
                "warning",
                str(d.features),
                f"{len(extra)} feature files not in the CSV (e.g. {', '.join(extra[:3])})",
            )
        )
    reader = task_targets(cfg)  # the task's own warnings: small classes, a censorship flag, ...
    problems += [Problem("warning", w, what) for w, what in reader.check(df, d, cfg.splits.folds)]
    table.attrs["targets"] = reader.overview(df, d)
    table.attrs["tables"] = tables
    return problems, table


def _patients(cfg: Config, df: pd.DataFrame, ids: pd.Series, cohort: Cohort | None) -> list[str]:
    """The cohort's patients; from the CSV's patient column where the cohort cannot be built
    (so its tables are checked all the same)."""
    if cohort is not None:
        return list(dict.fromkeys(cohort.bags["patient_id"]))
    col = cfg.data.patient_col or DEFAULT_PATIENT_COL
    return list(dict.fromkeys(df[col].map(normalize_id) if col in df.columns else ids))


def tabular_problems(
    cfg: Config, patients: list[str], cohort: Cohort | None = None
) -> tuple[list[Problem], list[str]]:
    """What ``mil train`` refuses or warns about in ``data.tabular``, table by table, found by
    the code it runs (:func:`mil.data.tabular.join_modality`), and one line per table saying
    how many patients it covers."""
    if not cfg.data.tabular:
        return [], []
    problems, lines = [], []
    if cohort is not None:
        try:
            check_availability_col(cohort)
        except DataError as exc:
            problems.append(Problem("error", AVAILABILITY_COL, str(exc)))
    for spec in parse_tabular(cfg.data.tabular, cfg.source):
        where, m = f"table {spec.name}", None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MilWarning)
            try:
                m = join_modality(spec, patients)
            except DataError as exc:
                problems.append(Problem("error", where, str(exc)))
        problems += [
            Problem("warning", where, str(w.message))
            for w in caught
            if issubclass(w.category, MilWarning)
        ]
        if m is not None:
            n, lost = int(m.present.sum()), int((~m.present).sum())
            lines.append(
                f"table {spec.name} ({spec.csv}): {n} of {len(patients)} patients have a row"
                f"{f' ({lost} treated as missing {spec.name})' if lost else ''}; "
                f"{len(m.features)} columns, {len(m.groups)} group(s)"
            )
    return problems + _unused_tables(cfg), lines


def _unused_tables(cfg: Config) -> list[Problem]:
    """``data.tabular`` given to a model (and ``compare:`` entries) that reads no table."""
    from mil.models import available, get

    def fuses(name: object) -> bool:
        try:
            return get(str(name)).uses_tabular
        except ConfigError:
            return False

    entries = [
        e["model"].get("name")
        for e in cfg.compare
        if isinstance(e, dict) and isinstance(e.get("model"), dict)
    ]
    if any(fuses(n) for n in [cfg.model_name, *entries]):
        return []
    names = ", ".join(str(t.get("name")) for t in cfg.data.tabular)
    fusers = ", ".join(n for n in available() if fuses(n))
    return [
        Problem(
            "warning",
            "data.tabular",
            f"model {cfg.model_name!r} reads no tables, so the tables of data.tabular ({names}) only "
            f"name each patient's availability subgroup (column {AVAILABILITY_COL!r}); to train on "
            f"them, use a model that fuses them ({fusers})",
        )
    ]


def _check_instances(cfg: Config) -> tuple[list[Problem], pd.DataFrame]:
    """An instance table: readable, consistent, and its per-bag table."""
    from mil.data.instances import load_instances

    d = cfg.data
    try:
        cohort, store = load_instances(cfg)
    except DataError as exc:
        return [Problem("error", str(d.instances), str(exc))], pd.DataFrame()
    table = pd.DataFrame(
        {
            "slide_id": cohort.bag_ids,
            "file": str(d.instances),
            "layout": "instance table",
            "tiles": [len(store.get(b)[0]) for b in cohort.bag_ids],
            "dim": store.dim,
            "coords": [store.get(b)[1] is not None for b in cohort.bag_ids],
            "status": "ok",
        }
    )
    frame = cohort.bags.rename(columns={"label": d.label_col}) if cohort.classes else None
    if frame is not None:  # class labels of the bags, as the CSV names them
        frame[d.label_col] = frame[d.label_col].map(dict(enumerate(cohort.classes)))
        table.attrs["targets"] = cohort.targets.overview(frame, d)
    problems, table.attrs["tables"] = tabular_problems(
        cfg, list(dict.fromkeys(cohort.bags["patient_id"])), cohort
    )
    return problems, table


def _csv_problems(
    cfg: Config, df: pd.DataFrame, ids: pd.Series, csv: Path
) -> tuple[list[Problem], Cohort | None]:
    """The cohort CSV's problems: duplicate ids, missing targets, what the cohort refuses or
    warns about, folds it cannot fill, a censorship column read as events; and the cohort,
    where it could be built."""
    d = cfg.data
    problems: list[Problem] = []
    cohort = None
    for sid, n in Counter(ids).items():
        if n > 1:
            problems.append(Problem("error", sid, f"slide id appears {n} times in the CSV"))
    reader = task_targets(cfg)
    for col in reader.source_columns(d):
        if col not in df.columns:
            problems.append(
                Problem("error", col, f"column not in {csv}; columns are {', '.join(df.columns)}")
            )
        elif not reader.missing_allowed:
            for sid in ids[df[col].isna()]:
                problems.append(Problem("error", sid, f"no value in column {col!r}"))
    if not any(p.severity == "error" for p in problems):
        # what only the whole cohort shows: patient-level consistency, subgroup columns
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MilWarning)
            try:
                cohort = Cohort.from_frame(df, cfg, source=str(csv))
            except DataError as exc:
                problems.append(Problem("error", str(csv), str(exc)))
        where = d.patient_col or DEFAULT_PATIENT_COL
        problems += [
            Problem("warning", where, str(w.message))
            for w in caught
            if issubclass(w.category, MilWarning)
        ]
        if cohort is not None:
            problems += split_problems(cfg, cohort)
    return problems, cohort


def _feature_table(
    ids: pd.Series, index: dict[str, Path], features: str
) -> tuple[pd.DataFrame, list[Problem]]:
    """Every slide's feature file read: layout, tiles, dimension, coordinates, status; and
    what the files say together (a mix of provenances, collapsed or copied features)."""
    problems: list[Problem] = []
    rows = []
    casts: dict[str, list[str]] = defaultdict(list)
    provenance, spread = [], FeatureSpread()
    for sid in ids:
        row = {"slide_id": sid, "file": "", "layout": "", "tiles": 0, "dim": 0, "embedding": False}
        row.update(coords=False, status="ok")
        if sid not in index:
            row["status"] = "missing file"
            problems.append(Problem("error", sid, f"no feature file in {features}"))
        else:
            row["file"] = str(index[sid])
            try:
                sf = read_features(index[sid])
                row.update(
                    layout=sf.layout,
                    tiles=sf.features.shape[0],
                    dim=sf.features.shape[1],
                    coords=sf.coords is not None,
                    embedding=sf.embedding,
                )
                if "cast_from" in sf.attrs:
                    casts[sf.attrs["cast_from"]].append(sid)
                provenance.append(Provenance.of_features(index[sid], sf))
                spread.add(index[sid], sf.features)
            except DataError as exc:
                row["status"] = "unreadable"
                problems.append(Problem("error", sid, str(exc)))
        rows.append(row)
    for dtype, slides in casts.items():
        problems.append(
            Problem(
                "warning",
                slides[0],
                f"{len(slides)} feature file(s) hold {dtype} features (e.g. {slides[0]}), read as "
                f"float32; integer arrays are rarely features: is 'features' the right dataset?",
            )
        )
    for where, what in mixed_provenance(provenance) + spread.findings():
        problems.append(Problem("warning", where, what))
    table = pd.DataFrame(rows)
    problems += _mixed_kinds(table)
    dims = table.loc[table["dim"] > 0, "dim"]
    if len(dims):
        common = int(dims.mode().iloc[0])
        for _, r in table[(table["dim"] > 0) & (table["dim"] != common)].iterrows():
            problems.append(
                Problem(
                    "error",
                    r["slide_id"],
                    f"feature dimension {r['dim']}, most slides have {common}",
                )
            )
            table.loc[table["slide_id"] == r["slide_id"], "status"] = "wrong dimension"
    return table, problems


def _mixed_kinds(table: pd.DataFrame) -> list[Problem]:
    """A cohort is tile bags ``[N, D]`` or slide/patient embeddings ``[D]``, never both (as
    ``mil train`` refuses): the files of the rarer kind, each named."""
    ok = table["status"] == "ok"
    n_emb = int(table.loc[ok, "embedding"].sum())
    n_tiles = int(ok.sum()) - n_emb
    if not n_emb or not n_tiles:
        return []
    odd = n_emb < n_tiles  # the rarer kind: embeddings (True) or tile features (False)
    problems = []
    for i, r in table[ok & (table["embedding"] == odd)].iterrows():
        if odd:
            what = (
                f"{r['file']} holds one vector [D] (a slide/patient embedding), while "
                f"{n_tiles} files hold tile features [N, D]"
            )
        else:
            what = (
                f"{r['file']} holds tile features [{r['tiles']}, {r['dim']}], while {n_emb} "
                f"files hold one vector [D] (slide/patient embeddings)"
            )
            if r["tiles"] == 1:
                what += (
                    "; a [1, D] array is a bag of one tile: save a slide embedding as a [D] vector"
                )
        what += "; a cohort is one kind: point data.features at one encoder's output"
        problems.append(Problem("error", r["slide_id"], what))
        table.loc[i, "status"] = "mixed kinds"
    return problems


def split_problems(cfg: Config, cohort) -> list[Problem]:
    """What ``mil train`` would refuse in the folds: too few patients or events for
    ``splits.folds`` and the inner validation split, and what the task's own fold setup
    refuses (a Cox training fold without two events, survival bins it cannot cut)."""
    from mil.splits import make_splits, read_assignment, read_splits

    s = cfg.splits
    site_col = cfg.data.site_col if s.by_site else None
    try:
        if s.dir and any(Path(s.dir).glob("splits_*.csv")):  # what `mil train` would read
            splits = read_splits(s.dir, cohort, s.folds, s.repeats)
        elif s.assignment:
            splits = read_assignment(
                s.assignment, cohort, s.folds, s.repeats, s.val_fraction, s.seed
            )
        else:
            splits = make_splits(cohort, s.folds, s.val_fraction, s.seed, s.repeats, site_col)
    except DataError as exc:
        return [Problem("error", "splits", str(exc))]
    problems = []
    task = make_task(cfg, cohort.classes)
    for sp in splits:
        train = cohort.bags[cohort.bags["bag_id"].isin(cohort.bags_of_slides(sp.train))]
        try:  # the fold's own checks, as `mil train` runs them (Cox events, survival bins, ...)
            task.setup_fold(train, fold_name=sp.name)
        except DataError as exc:
            problems.append(Problem("error", f"fold {sp.name}", str(exc)))
    for sp in splits:  # test bags that cannot carry the task's metrics (no events)
        test = cohort.bags[cohort.bags["bag_id"].isin(cohort.bags_of_slides(sp.test))]
        what = task.test_problem(test)
        if what is not None:
            problems.append(Problem("warning", f"fold {sp.name}", what))
    return problems


def format_check(problems: list[Problem], table: pd.DataFrame) -> str:
    lines = []
    if len(table) and "status" in table:
        ok = table[table["status"] == "ok"]
        lines.append(
            f"{len(table)} slides in the CSV, {len(ok)} readable; "
            f"tiles per slide {int(ok['tiles'].min()) if len(ok) else 0}-{int(ok['tiles'].max()) if len(ok) else 0}; "
            f"feature dim {sorted(set(ok['dim'].tolist()))}; layouts {sorted(set(ok['layout']))}; "
            f"coords in {int(ok['coords'].sum())}/{len(ok)}"
        )
        if table.attrs.get("targets"):
            lines.append(table.attrs["targets"])
    lines += table.attrs.get("tables", [])
    if problems:
        lines.append(f"{'severity':<8}  {'where':<24}  problem")
        for p in problems:
            lines.append(f"{p.severity:<8}  {p.where:<24}  {p.what}")
    n_err = sum(p.severity == "error" for p in problems)
    lines.append(f"{n_err} errors, {len(problems) - n_err} warnings")
    return "\n".join(lines)


def has_errors(problems: list[Problem]) -> bool:
    return any(p.severity == "error" for p in problems)

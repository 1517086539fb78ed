"""``mil generalize``: does a model hold at sites it never saw? One table per model.

``mil generalize CONFIG --external A.yaml [B.yaml ...] --out OUT`` runs, for each
model of the config (its ``compare:`` entries or ``--models``; else the config's
model), into ``OUT/<label>/``:

- ``internal/``: cross-validation with patient-level folds (``splits.by_site`` off);
- ``site/``: cross-validation with site-preserved folds (every patient of a site in
  one test fold; needs ``data.site_col``), so each bag is predicted by a model that
  never saw its site;
- ``external/<cohort>/``: ``mil evaluate`` of the internal run (its fold ensemble,
  or with ``--refit`` its model refit on every bag) on each external cohort.

Every model runs on the same split files (``OUT/splits_internal``,
``OUT/splits_site``). ``OUT/generalization.csv`` and ``generalization.md`` hold,
per model and headline metric, each setting's pooled value with its
patient-bootstrap 95% CI and its difference to internal CV:

- site-preserved CV scores the *same* patients as internal CV, so the difference
  is a paired bootstrap (both runs' predictions of a resampled patient go in
  together: :func:`paired_setting_difference`);
- an external cohort holds other patients, so its gap resamples each cohort on
  its own (:func:`mil.train.gaps.generalization_gap`, unpaired).

Finished folds and evaluations are reused, as everywhere in ``mil``. What would be
refused after training (an external cohort config that is not valid YAML, of another
task, without a column or feature files, with features of another dimension or, unless
``any_encoder``, another encoder; site-preserved CV on fewer sites than folds) is refused
before anything trains (:func:`check_before_training`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mil.compare import entries, entry_config
from mil.config import Config, derive, refuse_search
from mil.data.cohort import Cohort
from mil.data.provenance import cohort_files, compare_provenance, read_provenance
from mil.data.sources import load_cohort, read_cohort
from mil.errors import ConfigError, DataError
from mil.io import json_float, read_json, write_csv, write_text
from mil.reporting import p_value, value_ci
from mil.results import SUMMARY_JSON, RunFolder
from mil.splits.folds import site_column, site_groups
from mil.train.gaps import paired_setting_difference
from mil.train.summary import run_task

TABLE = "generalization.csv"
REPORT = "generalization.md"
SETTINGS = {"internal": "internal CV", "site": "site-preserved CV"}


def run_generalization(
    cfg: Config,
    externals: list[str | Path],
    out: str | Path,
    models: list[str] | None = None,
    refit: bool = False,
    progress: bool = True,
    log=print,
    n_boot: int = 1000,
    any_encoder: bool = False,
) -> pd.DataFrame:
    """Run the settings of the module for every model and write the table; returns it.
    ``any_encoder``: evaluate external features that name another encoder than the
    training cohort's (``mil evaluate --any-encoder``), with a warning."""
    from mil.evaluate import evaluate
    from mil.train.refit import refit as refit_run
    from mil.train.runner import resolve_device, run_cv

    out = Path(out)
    refuse_search(cfg, "mil generalize")
    names = _external_names(externals)
    # every model's settings, validated before anything runs
    runs = [(e["label"], setting_configs(entry_config(cfg, e), out)) for e in _entries(cfg, models)]
    checked: list[Any] = []
    for _, settings in runs:  # the models share a cohort: checked once per data: section
        if settings["internal"].data not in checked:
            check_before_training(settings, externals, any_encoder, where=cfg.source)
            checked.append(settings["internal"].data)
    rows = []
    for label, settings in runs:
        log(f"== {label} ==")
        dirs = {}
        for setting, sc in settings.items():
            log(f"-- {SETTINGS[setting]} --")
            dirs[setting] = run_cv(
                sc, out / label / setting, progress=progress, log=log, n_boot=n_boot
            )
        if refit:
            internal = settings["internal"]
            refit_run(
                internal,
                dirs["internal"],
                resolve_device(internal.train.device),
                progress=progress,
                log=log,
            )
        evaluations = {}
        for name, path in zip(names, externals):
            log(f"-- external: {name} --")
            ev = out / label / "external" / name
            evaluate(
                dirs["internal"],
                path,
                ev,
                n_boot=n_boot,
                progress=progress,
                refit=refit,
                any_encoder=any_encoder,
            )
            evaluations[name] = ev
        rows += model_rows(label, dirs, evaluations, n_boot)
    table = pd.DataFrame(rows)
    write_csv(out / TABLE, table)
    write_text(out / REPORT, format_generalization(table, cfg, refit, n_boot) + "\n")
    return table


def _entries(cfg: Config, models: list[str] | None) -> list[dict[str, Any]]:
    if models is None and not cfg.compare:  # the config's own model
        return [{"label": cfg.model_name, "model": {"name": cfg.model_name, **cfg.model_hparams}}]
    return entries(cfg, models)


def _external_names(externals: list[str | Path]) -> list[str]:
    names = [Path(p).stem for p in externals]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(
            f"--external: two cohort configs are named {dup[0]!r}; their evaluations would "
            "share a folder (rename one file)"
        )
    for p in externals:
        if not Path(p).is_file():
            raise ConfigError(f"--external {p}: no such cohort config")
    return names


@dataclass
class _PlannedRun:
    """What :func:`mil.evaluate.cohort_config_of` reads of a run, before the run exists."""

    config: Config
    path: Path
    classes: list[str]


def check_before_training(
    settings: dict[str, Config], externals: list[str | Path], any_encoder: bool, where: str
) -> None:
    """Refuse, before any fold trains, what would stop the study later: site-preserved CV on
    fewer sites than folds, and an external cohort that ``mil evaluate`` would refuse (a config
    that is not valid YAML, of another task or bag level, without its columns or feature files,
    labels none of the training classes, features of another dimension or kind or, unless
    ``any_encoder``, files that name another encoder than every training file's)."""
    from mil.evaluate import cohort_config_of
    from mil.train.external_checks import check_classes, check_encoder, check_feature_kind

    internal = settings["internal"]
    training = read_cohort(internal)
    if "site" in settings:
        _check_sites(training, settings["site"], where)
    classes = list(training.classes)
    planned = _PlannedRun(internal, Path(where), classes)
    dims = {read_provenance(p).dim for p in cohort_files(internal).values()} if externals else set()
    for path in externals:
        ext = cohort_config_of(planned, path, classes)
        check_classes(ext, classes)
        load_cohort(ext)  # its columns, labels, tables and feature files
        check_encoder(compare_provenance(internal, ext)[0], [], path, any_encoder)
        check_feature_kind(internal, ext, any_encoder)
        other = sorted({read_provenance(p).dim for p in cohort_files(ext).values()} - dims - {None})
        if dims - {None} and other:
            raise DataError(
                f"{path}: the external cohort's features have dimension {other[0]}, the training "
                f"cohort's {', '.join(map(str, sorted(dims - {None})))}; were they made by "
                f"another encoder?"
            )


def _check_sites(cohort: Cohort, cfg: Config, where: str) -> None:
    col, folds = cfg.data.site_col, cfg.splits.folds
    sites = sorted(site_column(cohort, col).unique())
    if len(sites) < folds:
        raise ConfigError(
            f"{where}: site-preserved CV needs at least {folds} sites (splits.folds), but "
            f"column {col!r} (data.site_col) of {cohort.source} has {len(sites)}: "
            f"{', '.join(sites)}. Drop data.site_col (generalize then runs internal CV and the "
            f"external cohorts only), give the cohort more sites, or lower splits.folds"
        )
    site_groups(cohort, col, folds)  # one site per patient


def setting_configs(cfg: Config, out: Path) -> dict[str, Config]:
    """The model's config with patient-level folds (``internal``) and, where the cohort names
    its sites, with site-preserved folds (``site``), each on split files shared by every model."""
    found = {}
    for setting in SETTINGS:
        if setting == "site" and not cfg.data.site_col:
            continue
        changes: dict[str, Any] = {
            "splits.dir": str(out / f"splits_{setting}"),
            "splits.by_site": setting == "site",
        }
        if setting == "site":
            changes["splits.assignment"] = None
        found[setting] = derive(cfg, changes, source=f"{cfg.source} ({SETTINGS[setting]})")
    return found


# ---- the table ------------------------------------------------------------------------------


def model_rows(
    label: str, dirs: dict[str, Path], evaluations: dict[str, Path], n_boot: int
) -> list[dict[str, Any]]:
    """One row per setting and headline metric of one model (see the module)."""
    task = run_task(dirs["internal"])
    internal = RunFolder(dirs["internal"]).all_predictions()
    rows = []
    for setting, run_dir in dirs.items():
        pred = internal if setting == "internal" else RunFolder(run_dir).all_predictions()
        value, ci = task.pooled_metrics(pred), task.pooled_ci(pred, n_boot=n_boot)
        diff = (
            {} if setting == "internal" else paired_setting_difference(task, pred, internal, n_boot)
        )
        for m in task.headline_metrics:
            if m not in value:
                continue
            row = _row(label, SETTINGS[setting], "", pred, m, value[m], ci.get(m))
            if m in diff:
                d = diff[m]
                row.update(
                    delta=d["delta"],
                    delta_ci_low=d["ci_low"],
                    delta_ci_high=d["ci_high"],
                    delta_p=d["p"],
                    pairing="paired (same patients)",
                )
            rows.append(row)
    for name, ev in evaluations.items():
        s = read_json(ev / SUMMARY_JSON, "external evaluation")
        for m in task.headline_metrics:
            if m not in s["metrics"]:
                continue
            ci = s["metrics"][m].get("ci95_pooled")
            row = _row(label, "external", name, None, m, json_float(s["metrics"][m]["value"]), ci)
            row.update(n_bags=s["n_bags"], n_patients=s["n_patients"])
            g = s["gap"].get(m)
            if g:
                row.update(
                    delta=json_float(g["difference"]),
                    delta_ci_low=json_float(g["ci95"][0]),
                    delta_ci_high=json_float(g["ci95"][1]),
                    delta_p=json_float(g["p"]),
                    pairing="unpaired (other patients)",
                )
            rows.append(row)
    return rows


def _row(label, setting, cohort, pred, metric, value, ci) -> dict[str, Any]:
    lo, hi = (float("nan"), float("nan")) if not ci else (json_float(ci[0]), json_float(ci[1]))
    row = {"model": label, "setting": setting, "cohort": cohort, "metric": metric}
    if pred is not None:
        row.update(
            n_bags=int(pred["bag_id"].nunique()), n_patients=int(pred["patient_id"].nunique())
        )
    row.update(value=float(value), ci_low=lo, ci_high=hi)
    row.update(delta=float("nan"), delta_ci_low=float("nan"), delta_ci_high=float("nan"))
    row.update(delta_p=float("nan"), pairing="")
    return row


def format_generalization(
    table: pd.DataFrame, cfg: Config, refit: bool = False, n_boot: int = 1000
) -> str:
    """``generalization.md``: one table per model, and what each row means."""
    predictor = "model refit on all its bags" if refit else "fold ensemble"
    lines = [
        f"# Generalization of {cfg.name}",
        "",
        "Each model's pooled out-of-fold metric under patient-level cross-validation "
        "(internal CV) and under site-preserved cross-validation (every patient of a site in one "
        f"test fold); each external cohort is predicted by internal CV's {predictor}. 95% CIs "
        f"are percentile-bootstrap intervals ({n_boot:,} resamples of patients). The "
        "difference to internal CV is paired for site-preserved CV (the same patients, both "
        "runs' predictions resampled together) and unpaired for external cohorts (other "
        "patients; each cohort resampled on its own).",
        "",
    ]
    if "site-preserved CV" not in set(table.get("setting", [])):
        lines += ["No `data.site_col`: site-preserved cross-validation was left out.", ""]
    for label, part in table.groupby("model", sort=False):
        lines += [
            f"## {label}",
            "",
            "| setting | metric | patients | value [95% CI] | − internal CV [95% CI] | p |",
            "|---|---|---|---|---|---|",
        ]
        for r in part.itertuples():
            where = r.setting if not r.cohort else f"external: {r.cohort}"
            value = value_ci(r.value, (r.ci_low, r.ci_high))
            d = value_ci(r.delta, (r.delta_ci_low, r.delta_ci_high), signed=True)
            lines.append(
                f"| {where} | {r.metric} | {r.n_patients} | {value} | {d} | {p_value(r.delta_p)} |"
            )
        lines.append("")
    return "\n".join(lines)

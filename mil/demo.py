"""``mil demo``: the synthetic cohorts, cross-validated end to end, with a printed summary."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from mil.config import config_from_dict
from mil.data.synthetic import demo_config
from mil.io import safe_filename
from mil.metrics.survival import c_index
from mil.results import RunFolder
from mil.run import Run
from mil.train.report import write_report
from mil.train.runner import run_cv
from mil.train.summary import format_summary

HEATMAPS = 3  # classification test slides drawn into <run>/heatmaps/


def run_demo(out: Path, progress: bool = True) -> dict[str, dict]:
    """Run the demo's experiments under ``out``; returns their summaries."""
    out = Path(out)
    summaries = {}
    t0 = time.perf_counter()
    for kind, loss in (("classification", None), ("survival", "cox"), ("survival", "nll")):
        t_run = time.perf_counter()
        raw = demo_config(kind, out) if loss is None else demo_config(kind, out, loss)
        cfg = config_from_dict(raw, source=f"<demo {raw['name']}>")
        run_dir = run_cv(cfg, out / raw["name"], progress=progress)
        summary = summaries[raw["name"]] = RunFolder(run_dir).summary()
        print(format_summary(summary))
        if kind == "classification":
            # heatmaps of the slides the model was surest are positive, shown in the report
            run = Run(run_dir)
            for slide in run.top_slides(HEATMAPS):
                run.save_heatmap(
                    slide, run_dir / "heatmaps" / f"{safe_filename(slide)}.png", dpi=100
                )
            write_report(run_dir)
        if kind == "survival":
            oracle = oracle_c_index(run_dir, cfg.data.csv)
            summary["oracle_c_index"] = oracle
            print(f"  oracle C-index of the true hazard on the same test folds: {oracle:.3f}")
        print(
            f"results: {run_dir} ({time.perf_counter() - t_run:.0f} s); report: {run_dir / 'report.md'}\n"
        )
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results under {out}")
    return summaries


def oracle_c_index(run_dir: Path, cohort_csv: str | Path) -> float:
    """Mean over folds of Harrell's C of the synthetic cohort's ``true_risk`` on each test fold."""
    true_risk = (
        pd.read_csv(cohort_csv, dtype={"case_id": str}).groupby("case_id")["true_risk"].first()
    )
    values = []
    run = RunFolder(run_dir)
    for fold in run.finished_folds():
        pred = run.predictions(fold)
        values.append(c_index(pred["time"], pred["event"], true_risk.loc[pred["patient_id"]]))
    return float(np.mean(values))

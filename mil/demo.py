"""``mil demo``: the synthetic cohorts, cross-validated end to end, with a printed summary."""

from __future__ import annotations

import time
from pathlib import Path

from mil.config import config_from_dict
from mil.data.demo import demo_config
from mil.train.runner import run_cv
from mil.train.summary import format_summary, summarize


def run_demo(out: Path, progress: bool = True) -> dict[str, dict]:
    """Run the demo's experiments under ``out``; returns their summaries."""
    out = Path(out)
    summaries = {}
    t0 = time.perf_counter()
    for kind in ("classification",):
        raw = demo_config(kind, out)
        cfg = config_from_dict(raw, source=f"<demo {kind}>")
        run_dir = run_cv(cfg, out / raw["name"], progress=progress)
        summaries[raw["name"]] = summarize(run_dir)
        print(format_summary(summaries[raw["name"]]))
        print(f"results: {run_dir}\n")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; results under {out}")
    return summaries

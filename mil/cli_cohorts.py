"""The commands about other cohorts: ``mil evaluate`` (a run on an external cohort) and
``mil generalize`` (internal, site-preserved and external results in one table); argument
parsing stays in :mod:`mil.cli`."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mil.evaluate import evaluate
    from mil.train.external_report import format_evaluation

    summary = evaluate(
        args.run_dir,
        args.cohort_config,
        args.out,
        n_boot=args.n_boot,
        device=args.device,
        progress=not args.quiet,
        refit=args.refit,
        any_encoder=args.any_encoder,
    )
    print(format_evaluation(summary))
    print(f"results: {args.out}")
    return 0


def cmd_generalize(args: argparse.Namespace) -> int:
    from mil.config import load_config
    from mil.generalization import REPORT, format_generalization, run_generalization

    cfg = load_config(args.config, args.set)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    out = Path(args.out) if args.out else Path("results") / f"{cfg.name}_generalization"
    table = run_generalization(
        cfg,
        args.external,
        out,
        models=models,
        refit=args.refit,
        progress=not args.quiet,
        n_boot=args.n_boot,
        any_encoder=args.any_encoder,
    )
    print(format_generalization(table, cfg, args.refit, args.n_boot))
    print(f"table: {out / REPORT}")
    return 0


def add_generalize_parser(sub, with_config, count) -> None:
    """``mil generalize``'s arguments."""
    g = sub.add_parser(
        "generalize",
        help="internal CV, site-preserved CV and external cohorts of each model in one table",
    )
    with_config(g)
    g.add_argument(
        "--external",
        nargs="+",
        default=[],
        metavar="COHORT_YAML",
        help="external cohort configs (their data: sections), each evaluated with mil evaluate",
    )
    g.add_argument("--out", help="folder for the runs and generalization.md")
    g.add_argument("--models", help="comma-separated compare labels or model names")
    g.add_argument("--refit", action="store_true", help="external cohorts by the refit model")
    g.add_argument(
        "--any-encoder",
        action="store_true",
        help="evaluate external features whose files name another encoder than the training "
        "cohort's (a warning instead of an error; for one encoder under two names)",
    )
    g.add_argument("--n-boot", type=count(1), default=1000, help="bootstrap resamples")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(fn=cmd_generalize)

"""The ``mil`` command line: parses arguments and calls the library; errors without tracebacks."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from mil.cli_cohorts import add_generalize_parser, cmd_evaluate
from mil.cli_review import add_review_parsers
from mil.errors import MilError, MilWarning


def _parse_folds(text: str | None, option: str = "--folds") -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MilError(
            f"{option} {text!r}: expected comma-separated {option[2:-1]} numbers, e.g. 0,2"
        ) from None


def cmd_train(args: argparse.Namespace) -> int:
    from mil.config import load_config
    from mil.results import RunFolder
    from mil.train.distributed import current
    from mil.train.runner import run_cv
    from mil.train.summary import format_summary

    cfg = load_config(args.config, args.set)
    folds, points = _parse_folds(args.folds), _parse_folds(args.points, "--points")
    baselines = _baseline_names(args.baseline)  # checked before anything trains
    if args.refit and cfg.search:
        raise MilError(
            f"--refit: {args.config} has a search: block, whose folds each chose their own "
            "hyper-parameters; write the chosen point into a config and refit that"
        )
    if args.refit and folds is not None:  # refused before any fold trains
        raise MilError(
            "--refit with --folds: the refit takes its training budget from every fold; run the "
            "fold jobs first, then the same command without --folds (finished folds are kept)"
        )
    if cfg.search:
        from mil.train.search import run_search

        run_dir = run_search(cfg, args.out, folds=folds, points=points, progress=not args.quiet)
    elif points is not None:
        raise MilError(f"--points: {args.config} has no search: block to take grid points from")
    else:
        run_dir = run_cv(cfg, args.out, folds=folds, progress=not args.quiet)
    if current().main:  # under torchrun, rank 0 speaks for the run
        if RunFolder(run_dir).finished_folds():  # a search may have no fold selected yet
            print(format_summary(RunFolder(run_dir).summary()))
        if baselines:
            _train_baselines(cfg, run_dir, baselines, not args.quiet, folds)
        if args.refit:
            from mil.train.refit import refit
            from mil.train.runner import resolve_device

            refit(cfg, run_dir, resolve_device(cfg.train.device), progress=not args.quiet)
        print(f"results: {run_dir}")
    return 0


def _baseline_names(text: str | None) -> list[str]:
    from mil.models import available

    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in available()]
    if unknown:
        raise MilError(
            f"--baseline {unknown[0]}: not a registered model (e.g. meanpool_linear, bow_linear)"
        )
    return names


def _train_baselines(cfg, run_dir: Path, names: list[str], progress: bool, folds) -> None:
    """``mil train --baseline``: the linear baselines on the run's folds, and the paired test."""
    from mil.compare import run_baselines
    from mil.reporting import p_phrase, value_ci

    table = run_baselines(cfg, run_dir, names, folds=folds, progress=progress)
    for r in table.itertuples():
        d = value_ci(r.delta, (r.delta_ci_low, r.delta_ci_high), signed=True)
        print(
            f"{cfg.model_name} - {r.baseline}: {r.metric} difference [95% CI] {d}, "
            f"{p_phrase(r.delta_p)}"
        )


def cmd_compare(args: argparse.Namespace) -> int:
    from mil.compare import format_comparison, run_compare
    from mil.config import load_config

    for item in args.set:
        if item.split("=", 1)[0].strip().split(".")[0] == "model":
            raise MilError(
                f"--set {item}: each compared model takes its hyper-parameters from its "
                f"compare: entry in {args.config} (or its defaults), not from model:; "
                "edit the entry, or give it a label and list that label in --models"
            )
    cfg = load_config(args.config, args.set)
    models = None
    if args.models and args.models != "all":
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    elif args.models == "all":
        from mil.models import available

        models = available()
    out = Path(args.out) if args.out else Path("results") / cfg.name
    table = run_compare(
        cfg,
        out,
        models=models,
        folds=_parse_folds(args.folds),
        progress=not args.quiet,
        reference=args.reference,
    )
    from mil.train.distributed import current

    if current().main:
        print(format_comparison(table, cfg))
        print(f"table: {out / 'comparison.md'}")
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    from mil.config import load_config
    from mil.data.sources import read_cohort
    from mil.splits import describe, load_or_make_splits

    cfg = load_config(args.config, args.set)
    if not cfg.splits.dir:
        raise MilError(f"{args.config}: splits.dir is not set; say where the split files go")
    cohort = read_cohort(cfg)
    splits, made = load_or_make_splits(
        cfg.splits.dir,
        cohort,
        cfg.splits.folds,
        cfg.splits.val_fraction,
        cfg.splits.seed,
        cfg.splits.repeats,
        force=args.force,
        assignment=cfg.splits.assignment,
        site_col=cfg.data.site_col if cfg.splits.by_site else None,
    )
    print(
        f"{'wrote' if made else 'read existing (use --force to remake)'} {len(splits)} splits in {cfg.splits.dir}"
    )
    for sp in splits:
        print(f"fold {sp.name}:\n{describe(sp, cohort).to_string()}")
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    from mil.train.summary import format_summary, summarize

    print(format_summary(summarize(args.run_dir)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mil.check import check_cohort, format_check, has_errors
    from mil.config import load_config

    cfg = load_config(args.config, args.set)
    problems, table = check_cohort(cfg)
    print(format_check(problems, table))
    return 1 if has_errors(problems) else 0


def cmd_cache(args: argparse.Namespace) -> int:
    from mil.config import load_config
    from mil.data.sources import pack_cohort

    cfg = load_config(args.config, args.set)
    packed, done = pack_cohort(cfg, rebuild=not args.check, progress=not args.quiet)
    m = packed.manifest
    size = packed.features.nbytes / 2**30
    print(
        f"feature store {packed.root}: {done}; {len(m['slides'])} slides, {m['rows']:,} "
        f"instances x {m['dim']} ({m['dtype']}, {size:.2f} GB)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mil.demo import run_demo

    run_demo(Path(args.out), progress=not args.quiet)
    return 0


def _count(least: int):
    """An argparse type: an integer of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mil", description="Multiple-instance learning on whole-slide tile features."
    )
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="YAML config file")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
        )

    t = sub.add_parser("train", help="cross-validate a model (resumes finished folds)")
    with_config(t)
    t.add_argument("--out", help="run folder (default results/<name>)")
    t.add_argument("--folds", help="only these folds, e.g. 0,2 (for one job per fold)")
    t.add_argument(
        "--points",
        help="with a search: block, only these grid points, e.g. 0,2 (one job per point)",
    )
    t.add_argument(
        "--baseline",
        nargs="?",
        const="meanpool_linear",
        metavar="NAMES",
        help="also run linear baselines on the same folds (default meanpool_linear; e.g. "
        "meanpool_linear,bow_linear) and report the run's paired difference to each",
    )
    t.add_argument(
        "--refit",
        action="store_true",
        help="then fit one model on every bag, for the epochs (or penalty) cross-validation "
        "chose, into <run>/refit/ (for `mil evaluate --refit`)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(fn=cmd_train)

    cp = sub.add_parser(
        "compare", help="run several models through the same folds and tabulate them"
    )
    with_config(cp)
    cp.add_argument(
        "--models",
        help="comma-separated compare labels or model names, or 'all' registered models "
        "(default: the config's compare: list, else all)",
    )
    cp.add_argument("--out", help="folder for the runs and comparison.md (default results/<name>)")
    cp.add_argument("--folds", help="only these folds, e.g. 0,2")
    cp.add_argument(
        "--reference",
        help="the label every other run is compared with, pairwise (default: best mean)",
    )
    cp.add_argument("--quiet", action="store_true", help="no progress bars")
    cp.set_defaults(fn=cmd_compare)

    s = sub.add_parser("splits", help="write (or show) the patient-level split files")
    with_config(s)
    s.add_argument("--force", action="store_true", help="remake splits even if the folder has some")
    s.set_defaults(fn=cmd_splits)

    m = sub.add_parser("summarize", help="rebuild summary.csv/json from a run's fold folders")
    m.add_argument("run_dir")
    m.set_defaults(fn=cmd_summarize)

    c = sub.add_parser("check", help="validate a cohort's CSV and feature files")
    with_config(c)
    c.set_defaults(fn=cmd_check)

    k = sub.add_parser(
        "cache", help="pack a cohort's features into one memory-mapped file (data.store: packed)"
    )
    with_config(k)
    k.add_argument(
        "--check",
        action="store_true",
        help="only check that the store is current (exit 2 naming the stale slides if not)",
    )
    k.add_argument("--quiet", action="store_true", help="no progress bars")
    k.set_defaults(fn=cmd_cache)

    d = sub.add_parser("demo", help="run the built-in synthetic demo end to end")
    d.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("evaluate", help="score a run's fold ensemble on an external cohort")
    e.add_argument("run_dir", help="a finished run folder (results/<name>/...)")
    e.add_argument("cohort_config", help="YAML whose data: section describes the external cohort")
    e.add_argument("--out", required=True, help="folder for predictions, summary.json, report.md")
    e.add_argument("--n-boot", type=_count(1), default=1000, help="bootstrap resamples")
    e.add_argument("--device", default="cpu", help="torch device of the fold models (default cpu)")
    e.add_argument(
        "--refit",
        action="store_true",
        help="predict with the run's model refit on every bag (mil train --refit) instead of "
        "the fold ensemble",
    )
    e.add_argument(
        "--any-encoder",
        action="store_true",
        help="evaluate features whose files name another encoder than the run's (a warning "
        "instead of an error; for one encoder under two names)",
    )
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(fn=cmd_evaluate)
    add_generalize_parser(sub, with_config, _count)

    add_review_parsers(sub, _count, _non_negative)  # mil heatmap, mil topk
    return p


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Every warning as one ``mil: warning: …`` line; another package's (scikit-learn, pandas,
    …) names its category and package: ``mil: warning: UserWarning (sklearn): …``."""
    if issubclass(category, MilWarning):
        return f"mil: warning: {message}\n"
    parts = Path(filename).parts
    found = [parts[i + 1] for i, p in enumerate(parts[:-1]) if p.endswith("-packages")]
    mine = Path(__file__).parent in Path(filename).parents
    origin = found[-1].removesuffix(".py") if found else "mil" if mine else Path(filename).stem
    return f"mil: warning: {category.__name__} ({origin}): {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    before = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return _run(args)
    finally:
        warnings.formatwarning = before


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.fn(args) or 0)
    except MilError as exc:
        print(f"mil: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except OSError as exc:  # unwritable output folder, full disk: the message names the path
        print(f"mil: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mil: interrupted; finished folds are kept and a re-run resumes", file=sys.stderr)
        return 130
    except Exception as exc:  # under torchrun: a collective broken by another process's exit
        from mil.train.distributed import peer_failure

        msg = peer_failure(exc)
        if msg is None:
            raise
        print(f"mil: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``mil heatmap`` and ``mil topk``: the command-line side of reviewing a run's instance
scores, their arguments and their calls into :class:`mil.Run`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mil.errors import MilError

SLIDES_HELP = (
    "folder of whole-slide images <slide_id>.svs|.tif|.tiff|.ndpi|... (read with tiffslide, "
    "else OpenSlide); default: the cohort CSV's slide_path column, where it has one"
)


def score_arguments(sp: argparse.ArgumentParser) -> None:
    """The arguments that choose a run's instance scores (``heatmap``, ``topk``)."""
    sp.add_argument("run_dir", help="a run folder (results/<name>/...)")
    sp.add_argument(
        "--fold", help="the fold whose scores to use (default: the fold that tested the slide)"
    )
    sp.add_argument(
        "--score",
        "--kind",
        dest="kind",
        default="default",
        help="instance score kind: default (chosen by the localization benchmark: "
        "instance_logits, the model's logit for the tile alone; survival: contribution, the "
        "tile's signed share of the risk), attention, contribution, instance_logits, "
        "attention_x_logit, instance_classifier (what the model saved)",
    )
    sp.add_argument("--cls", help="class (branch) of a multi-column score kind")
    sp.add_argument(
        "--target",
        help="a multi-target run's target (task.targets name): its scores read as its own "
        "task reads them (a class's evidence with --cls; a regression's or ordinal's signed "
        "contribution); --top-n ranks by its prediction",
    )
    sp.add_argument("--slides-dir", help=SLIDES_HELP)
    sp.add_argument(
        "--slide-reader",
        choices=["auto", "tiffslide", "openslide"],
        default="auto",
        help="whole-slide image reader (auto: tiffslide, else OpenSlide)",
    )


def add_review_parsers(sub, count, non_negative) -> None:
    """The ``heatmap`` and ``topk`` subcommands (``count``/``non_negative``: argparse types)."""
    h = sub.add_parser("heatmap", help="draw test slides' instance scores over the slide")
    score_arguments(h)
    which = h.add_mutually_exclusive_group(required=True)
    which.add_argument("--slide", action="append", help="slide id (repeatable)")
    which.add_argument(
        "--top-n",
        type=count(1),
        help="the N test slides with the highest predicted probability of the last "
        "(positive) class, or the highest risk",
    )
    h.add_argument("--out", help="folder for the PNGs (default RUN_DIR/heatmaps)")
    h.add_argument(
        "--normalize",
        choices=["rank", "minmax", "raw", "signed"],
        help="default rank: percentile within the slide (signed kinds: of |score|, sign kept, "
        "on a diverging map centred at 0); raw: the scores as saved",
    )
    h.add_argument(
        "--smooth", type=non_negative, default=0.0, help="Gaussian sigma in tiles (0 = none)"
    )
    h.add_argument(
        "--top-k", type=count(0), default=16, help="outline the K highest tiles (0 = none)"
    )
    h.add_argument("--cmap", help="matplotlib colormap (default viridis; RdBu_r when signed)")
    h.add_argument("--dpi", type=count(1), default=150)
    scale = h.add_mutually_exclusive_group()
    scale.add_argument("--vis-level", type=count(0), help="draw over this level of the slide")
    scale.add_argument("--vis-mpp", type=non_negative, help="draw at this many µm per pixel")
    h.add_argument(
        "--max-size",
        type=count(16),
        default=2048,
        help="without --vis-level/--vis-mpp: the drawing's longest side in pixels (default 2048)",
    )
    h.add_argument(
        "--alpha", type=non_negative, default=0.5, help="opacity of the colours (0-1, default 0.5)"
    )
    h.add_argument("--tissue", action="store_true", help="colour only tissue (a saturation mask)")
    h.set_defaults(fn=cmd_heatmap)

    k = sub.add_parser("topk", help="a slide's top-scored tiles for review: CSV, and crops")
    score_arguments(k)
    k.add_argument("--slide", action="append", required=True, help="slide id (repeatable)")
    k.add_argument("--k", type=count(1), default=16, help="tiles per slide (default 16)")
    k.add_argument("--out", help="CSV path (default RUN_DIR/topk_<slide>.csv)")
    k.add_argument(
        "--crops",
        help="folder for the top and bottom K tiles cut from the slide at level 0, with a "
        "contact sheet: CROPS/<slide>/top_01.png..., tiles.csv, contact_sheet.png",
    )
    k.set_defaults(fn=cmd_topk)


def cmd_heatmap(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")

    from mil.run import Run

    run = Run(args.run_dir)
    cls = score_class(run, args.target, args.cls)
    slides = args.slide or run.top_slides(args.top_n, fold=args.fold)
    out = Path(args.out) if args.out else run.path / "heatmaps"
    draw = dict(
        vis_level=args.vis_level,
        vis_mpp=args.vis_mpp,
        max_size=args.max_size,
        alpha=args.alpha,
        tissue=args.tissue,
        backend=args.slide_reader,
    )
    paths = run.save_heatmaps(
        slides,
        out,
        args.slides_dir,
        draw,
        dpi=args.dpi,
        fold=args.fold,
        kind=args.kind,
        cls=cls,
        normalize=args.normalize,
        smooth=args.smooth,
        top_k=args.top_k,
        cmap=args.cmap,
    )
    for path in paths:
        print(path)
    return 0


def cmd_topk(args: argparse.Namespace) -> int:
    import pandas as pd

    from mil.io import safe_filename, write_csv
    from mil.run import Run

    run = Run(args.run_dir)
    cls = score_class(run, args.target, args.cls)
    frames = [run.top_tiles(s, args.k, kind=args.kind, cls=cls, fold=args.fold) for s in args.slide]
    table = pd.concat(frames, ignore_index=True)
    out = (
        Path(args.out) if args.out else run.path / f"topk_{safe_filename('_'.join(args.slide))}.csv"
    )
    write_csv(out, table)
    print(out)
    if args.crops:
        import matplotlib

        matplotlib.use("Agg")
        for slide in args.slide:
            wsi = run.slide_file(slide, args.slides_dir)
            if wsi is None:
                raise MilError(
                    f"--crops: no whole-slide image for {slide}; give --slides-dir, or a "
                    f"slide_path column in the cohort CSV ({run.config.data.csv})"
                )
            folder = run.save_tile_crops(
                slide,
                wsi,
                Path(args.crops),
                args.k,
                kind=args.kind,
                cls=cls,
                fold=args.fold,
                backend=args.slide_reader,
            )
            print(folder / "contact_sheet.png")
    return 0


def score_class(run, target: str | None, cls: str | None) -> str | None:
    """``--target``/``--cls`` as :meth:`mil.Run.scores`'s ``cls``: ``"<target>[/<class>]"`` for
    a multi-target run (whose bags ``--top-n`` then ranks by that target), ``--cls`` otherwise."""
    names = getattr(run.task, "target_names", None)
    if names is None:
        if target is not None:
            raise MilError(
                f"--target {target}: {run.path} is a single-target run (task "
                f"{run.task.name!r}); leave --target out"
            )
        return cls
    if target is None:
        if cls is None or not str(cls).isdigit():
            raise MilError(
                f"{run.path} is a multi-target run: name the target with --target, one of "
                f"{', '.join(names)} (or --cls J for head output J as saved)"
            )
        return cls
    if target not in names:
        raise MilError(
            f"--target {target!r}: not a target of {run.path}; its targets are {', '.join(names)}"
        )
    run.task.ranking_target = target
    return target if cls is None else f"{target}/{cls}"

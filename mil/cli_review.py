"""``mil heatmap`` and ``mil topk``: the command-line side of reviewing a run's instance
scores (argument parsing stays in :mod:`mil.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mil.errors import MilError


def cmd_heatmap(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")

    from mil.io import safe_filename
    from mil.run import Run

    run = Run(args.run_dir)
    slides = args.slide or run.top_slides(args.top_n, fold=args.fold)
    out = Path(args.out) if args.out else run.path / "heatmaps"
    out.mkdir(parents=True, exist_ok=True)
    for slide in slides:
        slide_path = _find_slide_file(args.slides_dir, slide) if args.slides_dir else None
        path = run.save_heatmap(
            slide,
            out / f"{safe_filename(slide)}.png",
            dpi=args.dpi,
            fold=args.fold,
            kind=args.kind,
            cls=args.cls,
            normalize=args.normalize,
            smooth=args.smooth,
            top_k=args.top_k,
            cmap=args.cmap,
            slide_path=slide_path,
        )
        print(path)
    return 0


def _find_slide_file(folder: str, slide_id: str) -> Path:
    # compared by name, never globbed: an id holding "../" or "*" must not reach other folders
    hits = sorted(
        p for p in Path(folder).iterdir() if p.is_file() and p.stem == slide_id and p.suffix
    )
    if not hits:
        raise MilError(f"--slides-dir {folder}: no slide file named {slide_id}.* for the thumbnail")
    return hits[0]


def cmd_topk(args: argparse.Namespace) -> int:
    import pandas as pd

    from mil.io import safe_filename, write_csv
    from mil.run import Run

    run = Run(args.run_dir)
    frames = [
        run.top_tiles(s, args.k, kind=args.kind, cls=args.cls, fold=args.fold) for s in args.slide
    ]
    table = pd.concat(frames, ignore_index=True)
    out = (
        Path(args.out) if args.out else run.path / f"topk_{safe_filename('_'.join(args.slide))}.csv"
    )
    write_csv(out, table)
    print(out)
    return 0

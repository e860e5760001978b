"""``layerselect plot``: figures of saved statistics (and a before/after comparison)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="plot activation ratio, overlap and the selection of saved statistics",
        description=(
            "Write activation_ratio, overlap (with --reference) and selection_<criterion> figures "
            "for STATS_DIR into --out, plus overlap_comparison with --compare OTHER_STATS_DIR."
        ),
    )
    p.add_argument("stats_dir", help="directory written by `layerselect analyze`")
    p.add_argument("--out", required=True, help="output directory for the figures")
    p.add_argument("--compare", default=None, metavar="OTHER_STATS_DIR", help="statistics to compare against (after)")
    p.add_argument("--labels", default="before,after", help="labels of STATS_DIR and --compare (default before,after)")
    p.add_argument("--selection", default=None, help="selection.json to plot (default: run msd)")
    p.add_argument("--reference", default="en")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--format", dest="formats", default="png,svg", help="comma-separated: png,svg,pdf (default png,svg)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..criteria import Selection
    from ..errors import InvalidInputError
    from ..plots import plot_all
    from ..stats import ActivationStats

    stats = ActivationStats.load(args.stats_dir)
    other = ActivationStats.load(args.compare) if args.compare else None
    selection = Selection.load(args.selection) if args.selection else None
    labels = tuple(x.strip() for x in args.labels.split(","))
    if len(labels) != 2:
        raise InvalidInputError(f"--labels needs two comma-separated names, got {args.labels!r}")
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    written = plot_all(
        stats, args.out, selection=selection, compare=other, reference=args.reference, tau=args.tau,
        formats=formats, labels=labels,
    )
    for path in written:
        print(f"wrote {path}")
    return 0

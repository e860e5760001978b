"""``layerselect demo``: the README's main job (see :mod:`layerselect.demo`)."""

from __future__ import annotations

import argparse

from ..models import DEFAULT_MODEL, KNOWN_MODELS
from ._common import add_precision_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the default real model (Gemma-3-270M)",
        description="Analyse packaged parallel prompts, select layers (msd), train them briefly, "
        "save and reload the adapter, and compare overlap with English before/after.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"one of {', '.join(KNOWN_MODELS)} or a checkpoint dir")
    p.add_argument("--out", default=None,
                   help="output directory (default: ~/.cache/layerselect/demo, or $LAYERSELECT_CACHE/demo)")
    p.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep the Trainer's final checkpoint (optimizer state; about 2x the adapter)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_precision_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(model=args.model, out=args.out, steps=args.steps, progress=not args.no_progress,
             keep_checkpoints=args.keep_checkpoints, precision=args.precision)
    return 0

"""``layerselect analyze``: collect activation statistics and print the per-layer table."""

from __future__ import annotations

import argparse
import sys

from ..stats import ActivationStats
from ..texts import load_texts
from ._common import add_model_args, add_precision_arg, load_model_from_args, parse_langs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="count FFN neuron firing per layer and language",
        description="Collect ActivationStats over texts grouped by language and print R / overlap / MSD per layer.",
    )
    add_model_args(p)
    p.add_argument("--data", required=True,
                   help="mgsm (bundled MGSM), demo, mgsm:DIR, txt:DIR, jsonl:FILE, hf:DIR (or a path; kind detected)")
    p.add_argument("--langs", default=None, help="comma-separated languages to use (default: all found)")
    p.add_argument("--limit", type=int, default=None, help="first N texts per language")
    p.add_argument("--out", required=True, help="directory to write stats.safetensors + stats.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder that holds something other than earlier statistics")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", default=None, help="e.g. 0-7 or 0,1,2 (default: all)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--padding-side", choices=("right", "left"), default="right")
    p.add_argument("--per-sample-counts", action="store_true", help="also store per-sample per-neuron counts (large)")
    p.add_argument("--reference", default="en", help="reference language for the overlap column")
    add_precision_arg(p, default="fp32")
    p.set_defaults(func=run)


def parse_layer_spec(spec: str | None) -> list[int] | None:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    if spec is None:
        return None
    from ..errors import InvalidInputError

    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise InvalidInputError(f"bad layer spec {spec!r}; use e.g. '0-5' or '0,2,4'") from None
    return out


def run(args: argparse.Namespace) -> int:
    from .._io import check_output_path
    from ..stats import META_FILE

    # Before the (slow) model load and pass: an --out that cannot be written fails now.
    check_output_path(args.out, META_FILE, overwrite=args.overwrite, what="stats folder")
    texts = load_texts(args.data, langs=parse_langs(args.langs), limit=args.limit)
    model, tokenizer = load_model_from_args(args)
    print(f"analyzing {sum(map(len, texts.values()))} texts in {len(texts)} languages: {', '.join(texts)}",
          file=sys.stderr)
    stats = ActivationStats.collect(
        model,
        tokenizer,
        texts,
        batch_size=args.batch_size,
        layers=parse_layer_spec(args.layers),
        max_length=args.max_length,
        padding_side=args.padding_side,
        per_sample_counts=args.per_sample_counts,
        model_name=args.model,
        precision=args.precision,
    )
    stats.save(args.out, overwrite=args.overwrite)
    ref = args.reference if args.reference in stats.groups else None
    print(stats.format_table(reference=ref))
    print(f"tokens per language: {dict(zip(stats.groups, stats.tokens.tolist()))}")
    print(f"wrote {args.out}/stats.safetensors and stats.json ({stats.meta['seconds']:.1f}s)")
    return 0

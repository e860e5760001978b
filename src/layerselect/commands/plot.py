"""``layerselect plot``: figures of saved statistics (and a before/after comparison), or representations.

Example::

    layerselect plot stats/ --out figs/
    layerselect plot --representations --model gemma-3-270m --adapter runs/slam \\
        --data mgsm:../shared/data/mgsm --layers 0,3,17 --limit 60 --out figs/
"""

from __future__ import annotations

import argparse

from ._common import add_model_args, add_precision_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="plot activation ratio, overlap and the selection of saved statistics",
        description=(
            "Write activation_ratio, overlap (with --reference) and selection_<criterion> figures "
            "for STATS_DIR into --out, plus overlap_comparison with --compare OTHER_STATS_DIR. "
            "With --representations: last-token hidden states of parallel texts at --layers, "
            "projected to 2-D and coloured by language, base vs --adapter side by side (paper Fig. 10)."
        ),
    )
    p.add_argument("stats_dir", nargs="?", default=None, help="directory written by `layerselect analyze`")
    p.add_argument("--out", required=True, help="output directory for the figures")
    p.add_argument("--compare", default=None, metavar="OTHER_STATS_DIR", help="statistics to compare against (after)")
    p.add_argument("--labels", default="before,after", help="labels of STATS_DIR and --compare (default before,after)")
    p.add_argument("--selection", default=None, help="selection.json to plot (default: run msd)")
    p.add_argument("--reference", default="en")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--format", dest="formats", default="png,svg", help="comma-separated: png,svg,pdf (default png,svg)")
    g = p.add_argument_group("--representations")
    g.add_argument("--representations", action="store_true",
                   help="plot hidden-state representations instead of statistics")
    add_model_args(g)
    g.add_argument("--adapter", default=None, help="adapter directory: plot base vs base+adapter side by side")
    g.add_argument("--data", default=None,
                   help="parallel texts: mgsm (bundled MGSM), demo, mgsm:DIR, txt:DIR, jsonl:FILE, hf:DIR "
                   "(or a path; kind detected) (default: the mgsm folder of $LAYERSELECT_DATA_DIR, else "
                   "../shared/data/mgsm from the working directory; an error if it does not exist)")
    g.add_argument("--langs", default=None, help="comma-separated languages (default: all found)")
    g.add_argument("--limit", type=int, default=50, help="texts per language (default 50)")
    g.add_argument("--layers", default=None, help="comma-separated layers (default: first, middle, last)")
    g.add_argument("--method", choices=("pca", "tsne"), default="pca", help="projection (tsne needs scikit-learn)")
    g.add_argument("--batch-size", type=int, default=8)
    add_precision_arg(g)
    p.set_defaults(func=run)


def run_representations(args: argparse.Namespace) -> int:
    import copy
    from pathlib import Path

    from .._io import write_json
    from ..arch import get_layout
    from ..errors import InvalidInputError
    from ..plots import check_colours, plot_state_projections, save_figure
    from ..representations import last_token_states, parallel_alignment
    from ..texts import default_data_dir, load_texts
    from ._common import load_model_from_args, parse_langs

    data = args.data
    if data is None:
        base_dir = default_data_dir()
        if base_dir is None or not (base_dir / "mgsm").is_dir():
            raise InvalidInputError("pass --data, e.g. mgsm:../shared/data/mgsm")
        data = f"mgsm:{base_dir / 'mgsm'}"
    texts = load_texts(data, parse_langs(args.langs), args.limit)
    check_colours(len(texts))  # before the model is loaded
    model, tokenizer = load_model_from_args(args)
    n = get_layout(model).num_layers
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted({0, n // 2, n - 1})
    models = {"base": model}
    if args.adapter:
        from ..selective_ffn import SelectiveFFNModel

        models["base+adapter"] = SelectiveFFNModel.from_pretrained(copy.deepcopy(model), args.adapter)
    states: dict[str, dict] = {}
    langs: list[str] = []
    for name, m in models.items():
        states[name], langs = last_token_states(m, tokenizer, texts, layers, batch_size=args.batch_size,
                                                precision=args.precision)
    out = Path(args.out)
    for path in save_figure(
        plot_state_projections(list(states.values()), langs, layers, labels=list(states), method=args.method),
        out / f"representations_{args.method}", [f.strip().lower() for f in args.formats.split(",") if f.strip()],
    ):
        print(f"wrote {path}")
    if "en" in texts and len(texts) > 1 and len({len(v) for v in texts.values()}) == 1:
        # the figure as numbers: closeness of each language's states to their English translations'
        table = {name: {str(layer): parallel_alignment(st[layer], langs, "en") for layer in layers}
                 for name, st in states.items()}
        print("alignment with English (centred cosine to the translation / top-1 retrieval), mean over languages:")
        print("layer  " + "  ".join(f"{name:>20}" for name in table))
        for layer in layers:
            cells = [f"{t[str(layer)]['avg']['cosine']:>9.4f} / {t[str(layer)]['avg']['retrieval']:>7.3f}" for t in table.values()]
            print(f"{layer:>5}  " + "  ".join(f"{c:>20}" for c in cells))
        write_json(out / "representations_alignment.json",
                   {"texts_per_language": len(next(iter(texts.values()))), "languages": list(texts), "alignment": table})
        print(f"wrote {out / 'representations_alignment.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidInputError
    from ..selection import Selection

    if args.representations:
        return run_representations(args)
    if args.stats_dir is None:
        raise InvalidInputError("pass STATS_DIR (from `layerselect analyze`), or --representations")
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

"""``layerselect train``: select layers (or take them), then fine-tune their FFN on X->English pairs.

Example::

    layerselect train --model gemma-3-270m --layers auto --analysis-data mgsm:../shared/data/mgsm \\
        --train-data pairs:../shared/data/gsm8kinstruct_question --max-pairs 500 --max-steps 50 \\
        --out runs/slam
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..errors import InvalidInputError
from ._common import add_model_args, add_precision_arg, load_model_from_args, parse_langs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune the FFN of selected layers on X->English translation (SLAM)",
        description=(
            "Train only the FFN matrices of the chosen layers on the paper's translation prompt and "
            "write a delta adapter. Defaults follow the paper: lr 2e-5, cosine, 3 epochs, "
            "effective batch 128 (gradient accumulation), max length 1024."
        ),
    )
    add_model_args(p)
    p.add_argument("--layers", default="auto",
                   help="'auto' (analyze --analysis-data + msd selection), or a spec like 0-5 / 0,2,4")
    p.add_argument("--selection", default=None, help="selection.json from `layerselect select` (overrides --layers)")
    p.add_argument("--criterion", default="msd", help="criterion for --layers auto (default: msd)")
    p.add_argument("--analysis-data", default=None, help="texts for --layers auto: mgsm (bundled), mgsm:DIR, txt:DIR, ...")
    p.add_argument("--analysis-limit", type=int, default=None, help="first N texts per language for --layers auto")
    p.add_argument("--train-data", required=True,
                   help="pairs:DIR ({xx}-en/train.{xx,en}), jsonl:FILE, hf:DIR, or demo (140 bundled pairs)")
    p.add_argument("--langs", default=None, help="comma-separated source languages (default: all found)")
    p.add_argument("--max-pairs", type=int, default=None, help="first N pairs per language")
    p.add_argument("--holdout", type=int, default=0, help="hold out N pairs per language and report their loss")
    p.add_argument("--no-filter", action="store_true", help="skip the quality filter")
    p.add_argument("--target-modules", default="up,down", help="FFN matrices to train (default: up,down)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (default: epochs)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=4, help="per-device batch size")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="gradient accumulation steps (default: reach an effective batch of 128)")
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from the latest checkpoint in --out, or from the given checkpoint dir")
    p.add_argument("--out", required=True, help="output directory (checkpoints, adapter/, loss.json/png)")
    add_precision_arg(p)
    p.add_argument("--data-order", choices=("length", "random", "sequential"), default="length",
                   help="length (default): batches of pairs of similar length, far less padding; random: the "
                        "Trainer's shuffle; sequential: the data's own order")
    p.add_argument("--retain", default=None, metavar="SPEC",
                   help="retention guard: measure the NLL of a held-out reference-language set before training and "
                        "every --retain-every steps, and act when it rises by more than --retain-tolerance over that "
                        "baseline. SPEC: gsm8k (200 bundled English GSM8K-train problems), gsm8k:FILE (question/"
                        "solution JSON lines), or translation pairs as for --train-data (jsonl:FILE, pairs:DIR, hf:DIR)")
    p.add_argument("--retain-tolerance", type=float, default=None, metavar="R",
                   help="relative rise of the retained NLL that fires the guard (default 0.01 = 1%%)")
    p.add_argument("--retain-every", type=int, default=None, metavar="N",
                   help="measure the retained NLL every N optimizer steps (default 20; also at the last step)")
    p.add_argument("--retain-mode", choices=("stop", "best"), default=None,
                   help="stop (default): stop training when the guard fires; best: train to the end, then restore "
                        "the measured step with the lowest retained NLL if it fired")
    p.set_defaults(func=run)


def _resolve_layers(args: argparse.Namespace, model: Any, tokenizer: Any, out: Path) -> tuple[list[int], Any]:
    """Return (layers, selection-or-None) from --selection, --layers SPEC or --layers auto."""
    from ..arch import get_layout
    from .analyze import parse_layer_spec

    layout = get_layout(model)
    if args.selection:
        from ..selection import Selection

        path = Path(args.selection)
        selection = Selection.load(path / "selection.json" if path.is_dir() else path)
        return layout.check_layers([int(x) for x in selection.layers]), selection
    if args.layers != "auto":
        layers = parse_layer_spec(args.layers) or []
        if not layers:
            raise InvalidInputError(f"layer spec {args.layers!r} names no layer")
        return layout.check_layers(layers), None
    from ..selection import select

    if not args.analysis_data:
        if args.criterion == "snr":  # data-free
            selection = select(model=model, criterion="snr")
            selection.save(out / "selection.json")
            return layout.check_layers([int(x) for x in selection.layers]), selection
        raise InvalidInputError("--layers auto needs --analysis-data (e.g. mgsm:DIR), or give --layers 0-5")
    from ..stats import ActivationStats
    from ..texts import load_texts

    texts = load_texts(args.analysis_data, limit=args.analysis_limit)
    if "en" not in texts:
        raise InvalidInputError(f"--analysis-data needs English ('en') texts as the reference; found {sorted(texts)}")
    _status(f"[1/3] analyzing {sum(map(len, texts.values()))} texts in {len(texts)} languages ...")
    stats = ActivationStats.collect(model, tokenizer, texts, model_name=args.model)
    stats.save(out / "stats")
    selection = select(stats, criterion=args.criterion, model=model)  # weight criteria (snr) read the model
    selection.save(out / "selection.json")
    _status(f"      selected layers {list(selection.layers)} ({args.criterion}): {selection.reason}")
    return layout.check_layers([int(x) for x in selection.layers]), selection


def _status(msg: str) -> None:
    """A progress line: stderr, so that stdout holds only the summary."""
    print(msg, file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    """Numbers that would only fail deep inside the Trainer, checked up front."""
    positive = {"--batch-size": args.batch_size, "--max-length": args.max_length, "--save-steps": args.save_steps}
    if args.grad_accum is not None:
        positive["--grad-accum"] = args.grad_accum
    if args.max_pairs is not None:
        positive["--max-pairs"] = args.max_pairs
    for flag, value in positive.items():
        if value < 1:
            raise InvalidInputError(f"{flag} must be a positive integer, got {value}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise InvalidInputError(f"--max-steps must be a positive number of steps (or -1 for epochs), got {args.max_steps}")
    if not args.epochs > 0:
        raise InvalidInputError(f"--epochs must be positive, got {args.epochs}")
    if not args.lr > 0 or args.lr != args.lr:
        raise InvalidInputError(f"--lr must be a positive learning rate, got {args.lr}")
    if args.holdout < 0:
        raise InvalidInputError(f"--holdout must be 0 or more, got {args.holdout}")
    _check_retain_args(args)


def _check_retain_args(args: argparse.Namespace) -> None:
    """The retention guard's flags: numbers in range, and none of them without --retain."""
    if args.retain is None:
        given = [flag for flag, value in (("--retain-tolerance", args.retain_tolerance),
                                          ("--retain-every", args.retain_every),
                                          ("--retain-mode", args.retain_mode)) if value is not None]
        if given:
            raise InvalidInputError(f"{', '.join(given)} needs --retain SPEC (the held-out set the guard watches, "
                                    "e.g. --retain gsm8k)")
        return
    if not args.retain.strip():
        raise InvalidInputError("--retain needs a SPEC: gsm8k, gsm8k:FILE, jsonl:FILE, pairs:DIR or hf:DIR")
    tol = args.retain_tolerance
    if tol is not None and not (tol >= 0 and tol != float("inf")):
        raise InvalidInputError(f"--retain-tolerance must be a relative rise >= 0 (0.01 = 1%), got {tol}")
    if args.retain_every is not None and args.retain_every < 1:
        raise InvalidInputError(f"--retain-every must be a positive number of optimizer steps, got {args.retain_every}")


def run(args: argparse.Namespace) -> int:
    from ..data import filter_examples, first_per_language, load_translation_data, split_holdout

    out = Path(args.out)
    _check_args(args)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is an existing file; give a folder for checkpoints and the adapter")
    if args.resume:
        from ..train import resolve_checkpoint

        resolve_checkpoint(True if args.resume == "latest" else args.resume, out)
    # Validate the data before the (slow) model load.
    pairs = load_translation_data(args.train_data, langs=parse_langs(args.langs))
    heldout = []
    if args.holdout:
        pairs, heldout = split_holdout(pairs, per_lang=args.holdout, seed=args.seed)
    pairs = first_per_language(pairs, args.max_pairs)  # after the holdout: it draws from all pairs
    if not args.no_filter:
        pairs, report = filter_examples(pairs)
        _status(f"quality filter: {report}")
    if not pairs:
        dropped = "" if args.no_filter else " after the quality filter (--no-filter skips it)"
        raise InvalidInputError(f"--train-data {args.train_data} holds no training pairs{dropped}; "
                                "nothing was written")
    langs = sorted({p.lang for p in pairs})
    _status(f"training pairs: {len(pairs)} in {len(langs)} languages ({', '.join(langs)})")
    retain_pairs = None
    if args.retain:
        from ..train import load_retention_data

        retain_pairs = load_retention_data(args.retain)  # before the model load, like the training data
        _status(f"retention set: {len(retain_pairs)} pairs ({args.retain})")

    model, tokenizer = load_model_from_args(args)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _train(args, out, model, tokenizer, pairs, heldout, retain_pairs)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty --out behind
        raise


def _train(args: argparse.Namespace, out: Path, model: Any, tokenizer: Any, pairs: list[Any],
           heldout: list[Any], retain_pairs: list[Any] | None = None) -> int:
    from ..selective_ffn import SelectiveFFNConfig, get_slam_model
    from ..train import default_training_args, train_slam, translation_loss

    layers, selection = _resolve_layers(args, model, tokenizer, out)
    config = SelectiveFFNConfig(
        layers=selection if selection is not None and hasattr(selection, "layers") else layers,
        target_modules=[t.strip() for t in args.target_modules.split(",") if t.strip()],
        base_model_name_or_path=args.model,
    )
    slam = get_slam_model(model, config)
    overrides: dict[str, Any] = dict(
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, save_steps=args.save_steps, seed=args.seed,
    )
    if args.grad_accum is not None:
        overrides["gradient_accumulation_steps"] = args.grad_accum
    if args.device == "cpu":
        overrides["use_cpu"] = True
    training_args = default_training_args(out, precision=args.precision, data_order=args.data_order, **overrides)
    measure_precision = "bf16" if training_args.bf16 else "fp32"
    before = (translation_loss(model, tokenizer, heldout, max_length=args.max_length, progress=True,
                               desc="held-out loss before", precision=measure_precision) if heldout else None)
    _status(f"[2/3] training layers {layers} (effective batch "
            f"{training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size}"
            f", lr {training_args.learning_rate:.2e}) ...")
    resume: bool | str | None = True if args.resume == "latest" else args.resume
    adapter_dir = train_slam(slam, tokenizer, pairs, None, training_args, output_dir=out,
                             max_length=args.max_length, resume_from_checkpoint=resume,
                             retain=_retention_guard(args, tokenizer, retain_pairs))
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    if heldout:
        after = translation_loss(model, tokenizer, heldout, max_length=args.max_length, progress=True,
                                 desc="held-out loss after", precision=measure_precision)
        summary.update(heldout_pairs=len(heldout), heldout_loss_before=before, heldout_loss_after=after)
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=1) + "\n")
    if adapter_dir is not None:  # the model card: what only this command knows
        from ..selective_ffn.card import update_model_card

        update_model_card(adapter_dir, _card_facts(args, pairs, summary, out))
    print("[3/3] done")
    print(f"  layers:               {layers}")
    print(f"  trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,} "
          f"({summary['trainable_percent']:.2f}%)")
    print(f"  precision:            {summary['precision']}")
    print(f"  steps:                {summary['steps']} ({summary['seconds']:.1f}s, "
          f"mean train loss {summary['train_loss']:.4f})")
    if heldout:
        print(f"  held-out loss:        {before:.4f} -> {summary['heldout_loss_after']:.4f} ({len(heldout)} pairs)")
    if summary.get("retention"):
        print(f"  retention:            {_retention_line(summary['retention'])}")
    print(f"  loss curve:           {out / 'loss.png'} , {out / 'loss.json'}")
    print(f"  adapter:              {adapter_dir}")
    return 0


def _card_facts(args: argparse.Namespace, pairs: list[Any], summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Training data, steps and losses for the adapter's model card (absolute paths are cut there)."""
    rows = json.loads((out / "loss.json").read_text(encoding="utf-8")).get("train", []) if (out / "loss.json").is_file() else []
    facts = {
        "train_data": args.train_data, "train_pairs": len(pairs), "languages": sorted({p.lang for p in pairs}),
        "steps": summary.get("steps"), "effective_batch_size": summary.get("effective_batch_size"),
        "learning_rate": summary.get("learning_rate"), "precision": summary.get("precision"),
        "train_loss": summary.get("train_loss"), "final_train_loss": rows[-1].get("loss") if rows else None,
    }
    for key in ("heldout_pairs", "heldout_loss_before", "heldout_loss_after"):
        if summary.get(key) is not None:
            facts[key] = summary[key]
    return facts


def _retention_guard(args: argparse.Namespace, tokenizer: Any, retain_pairs: list[Any] | None) -> Any:
    """The ``RetentionGuard`` the --retain flags ask for (None without --retain)."""
    if retain_pairs is None:
        return None
    from ..train import RetentionGuard

    options = {"every": args.retain_every, "tolerance": args.retain_tolerance, "mode": args.retain_mode}
    return RetentionGuard(retain_pairs, tokenizer, max_length=args.max_length, name="retain", data_name=args.retain,
                          **{k: v for k, v in options.items() if v is not None})


def _retention_line(r: dict[str, Any]) -> str:
    """One line for the summary: baseline -> last measured NLL, and whether/where the guard fired."""
    if r["baseline"] is None:
        return f"not measured ({r['data']}: this run trained no step and its history holds no measurement)"
    final = "not finite" if r["final_nll"] is None else f"{r['final_nll']:.4f}"
    line = f"NLL {r['baseline']:.4f} -> {final} at step {r['final_step']} ({r['data']}, {r['pairs']} pairs)"
    if not r["fired"]:
        return line + f"; within +{100 * r['tolerance']:.2f}%"
    line += f"; fired at step {r['fired_step']}"
    if r["stopped_at_step"] is not None:
        return line + f", stopped at step {r['stopped_at_step']}"
    if r["restored_step"] is not None:
        return line + f", restored step {r['restored_step']} (NLL {r['best_nll']:.4f})"
    return line

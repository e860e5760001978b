"""``layerselect select``: run a selection criterion over saved statistics and explain it."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..errors import InvalidInputError

#: Formats of ``--emit``.
EMIT_FORMATS = ("axolotl", "llamafactory", "peft")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="choose the layers to train from activation statistics",
        description=(
            "Run a selection criterion (default: msd, the paper's rule) over statistics written by "
            "`layerselect analyze`, print a per-layer table and the explanation, and optionally "
            "save the Selection as JSON and bootstrap its stability."
        ),
    )
    p.add_argument("stats_dir", nargs="?", default=None,
                   help="directory written by `layerselect analyze`, or a selection.json to re-emit (--emit)")
    p.add_argument("--criterion", default="msd", help="registered name or module:function (default: msd)")
    p.add_argument(
        "--param", action="append", default=[], metavar="K=V",
        help="criterion parameter, repeatable; V is parsed as JSON when it can be (k=6, tau=0.3, reference=en)",
    )
    p.add_argument("--out", default=None, help="write the Selection as JSON here (e.g. selection.json)")
    p.add_argument("--stability", type=int, default=0, metavar="N", help="bootstrap N resamples of the questions")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import MODULE first (it may register criteria), repeatable",
    )
    p.add_argument("--reference", default="en", help="reference language for the rule (criteria that take one, e.g. msd) and the overlap column (default en)")
    p.add_argument("--model", default=None,
                   help="model for weight criteria such as snr; with --emit, where the parameter names come from "
                        "(for a selection file only its config is read)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (a directory)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--emit", choices=EMIT_FORMATS, default=None,
        help="also write the selection for another trainer: axolotl (unfrozen_parameters, YAML), "
             "llamafactory (freeze settings, YAML; only for the first/last n layers and whole sub-modules) "
             "or peft (a LoraConfig with layers_to_transform, JSON). Printed on stdout (the table and "
             "explanation then go to stderr) unless --emit-out is given",
    )
    p.add_argument("--emit-out", default=None, metavar="FILE", help="write the --emit output to FILE")
    p.add_argument("--target-modules", default="up,down",
                   help="matrices the emitted settings train, as for `layerselect train` (default: up,down; ffn = gate,up,down)")
    p.add_argument("--family", default=None,
                   help="model family for --emit (llama, qwen2, phi3 ...) when neither --model is given nor the "
                        "selection records one")
    p.set_defaults(func=run)


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["k=6", "reference=en"]`` -> ``{"k": 6, "reference": "en"}`` (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidInputError(f"bad --param {item!r}; write KEY=VALUE, e.g. --param k=6")
        if key in ("stats", "model", "criterion"):
            raise InvalidInputError(f"--param {key}=... is not a criterion parameter; use STATS_DIR / --model / --criterion")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def layer_table(stats: Any, selection: Any, reference: str = "en") -> str:
    """Per layer: R min/max/spread, average overlap with ``reference``, MSD, the criterion's score, selected."""
    rows = {row["layer"]: row for row in stats.layer_table(reference if reference in stats.groups else None)}
    has_ov = any("overlap_avg" in r for r in rows.values())
    head = (
        f"{'layer':>5}  {'R min':>7}  {'R max':>7}  {'R spread':>9}  "
        + (f"{'overlap(' + reference + ')':>12}  " if has_ov else "")
        + f"{'MSD':>11}  {selection.criterion + ' score':>14}  selected"
    )
    lines = [head, "-" * len(head)]
    for layer in sorted(rows):
        r = rows[layer]
        score = selection.scores.get(layer)
        lines.append(
            f"{layer:>5}  {r['R_min']:>7.4f}  {r['R_max']:>7.4f}  {r['R_max'] - r['R_min']:>9.5f}  "
            + (f"{r['overlap_avg']:>12.4f}  " if has_ov else "")
            + f"{r['MSD']:>11.4e}  {'' if score is None else f'{score:.6g}':>14}  "
            + ("*" if layer in selection.layers else "")
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.emit_out and not args.emit:
        raise InvalidInputError("--emit-out needs --emit axolotl|llamafactory|peft")
    if args.emit_out and Path(args.emit_out).is_dir():
        raise InvalidInputError(f"--emit-out {args.emit_out} is a folder; give a file path")
    to_stderr = bool(args.emit) and not args.emit_out  # stdout carries the emitted settings only
    with contextlib.redirect_stdout(sys.stderr) if to_stderr else contextlib.nullcontext():
        sel, model = _select(args)
    if args.emit:
        text = emit(sel, args.emit, model if model is not None else _emit_source(args),
                    [t.strip() for t in args.target_modules.split(",") if t.strip()])
        if args.emit_out:
            print(f"wrote {atomic_write_text(args.emit_out, text)}")
        else:
            sys.stdout.write(text)
    return 0


def emit(sel: Any, fmt: str, source: Any, target_modules: list[str]) -> str:
    """The text of ``--emit FMT``: YAML for axolotl / llamafactory, JSON for peft."""
    from ..selection.emit import peft_target_modules, source_of, trained_matrices, yaml_text

    family = (source if isinstance(source, str) else sel.meta.get("model_type") if source is None
              else getattr(source, "model_type", None) or getattr(getattr(source, "config", None), "model_type", None))
    about = (f"settings from a layerselect selection: layers {sel.layers} ({sel.criterion})"
             + (f" of {family}" if isinstance(family, str) else "") + f"; matrices {','.join(target_modules)}")
    if fmt == "axolotl":
        return yaml_text(sel.to_axolotl(source, target_modules), f"Axolotl {about}")
    if fmt == "llamafactory":
        return yaml_text(sel.to_llamafactory(source, target_modules), f"LLaMA-Factory {about}")
    try:
        from peft import LoraConfig
    except ImportError:
        raise InvalidInputError("--emit peft needs peft: pip install peft") from None
    src, num_layers = source_of(source, sel.meta)
    modules = peft_target_modules(trained_matrices(src, sel.layers, target_modules, num_layers=num_layers))
    config = sel.to_peft_config(LoraConfig(task_type="CAUSAL_LM", target_modules=modules))
    # What differs from LoraConfig's defaults, plus the fields that say what trains: loads with
    # LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"}) in any PEFT version.
    data, default = config.to_dict(), LoraConfig(task_type="CAUSAL_LM").to_dict()
    keep = {"peft_type", "task_type", "r", "lora_alpha", "target_modules", "layers_to_transform"}
    data = {k: v for k, v in data.items() if k in keep or (k in default and k != "peft_version" and v != default[k])}
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", str(value))  # enums (PEFT's TaskType)


def _emit_source(args: argparse.Namespace) -> Any:
    """What --emit reads parameter names from: --model's config (no weights), --family, or None (recorded)."""
    if args.model:
        from transformers import AutoConfig

        from ..models import resolve_model

        try:
            return AutoConfig.from_pretrained(resolve_model(args.model, args.gguf_file), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot read the config of --model {args.model}: {exc}") from None
    return args.family


def _select(args: argparse.Namespace) -> tuple[Any, Any]:
    """Run the criterion (or read a selection file) and print the table and explanation."""
    from ..selection import Selection, get_criterion, select
    from ..stats import ActivationStats

    if args.stats_dir and Path(args.stats_dir).is_file():
        if args.stability:
            raise InvalidInputError("--stability resamples statistics: give STATS_DIR, not a selection file")
        sel = Selection.load(args.stats_dir)
        print(sel.explain())
        if args.out:
            print(f"\nwrote {sel.save(args.out)}")
        return sel, None
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise InvalidInputError(f"cannot import --import {module!r}: {exc}") from None
    if args.out and Path(args.out).is_dir():
        raise InvalidInputError(f"--out {args.out} is a folder; give a file path such as {args.out}/selection.json")
    spec = get_criterion(args.criterion)
    params = parse_params(args.param)
    if "reference" not in params and "reference" in inspect.signature(spec.func).parameters:
        params["reference"] = args.reference  # one reference language for the rule and the table
    stats = ActivationStats.load(args.stats_dir) if args.stats_dir else None
    if stats is None and "stats" in spec.required:
        raise InvalidInputError(f"criterion {spec.name!r} needs STATS_DIR (from `layerselect analyze`)")
    model, name = None, None
    if "model" in spec.required or args.model:
        # Only the user names the model to load: a path recorded inside stats.json is data, and
        # data never decides what gets loaded.
        name = args.model
        if not name:
            recorded = stats.model_name if stats is not None else None
            raise InvalidInputError(
                f"criterion {spec.name!r} reads the model's weights: pass --model"
                + (f" (the statistics say they came from {recorded!r}; pass that if you trust it)" if recorded else "")
            )
        from ..models import load_model

        model, _ = load_model(name, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)
    sel = select(stats, spec, model=model, **params)
    if name:
        sel.meta["model_name"] = name  # the name the user gave, not the cache path it resolved to
    if stats is not None:
        print(layer_table(stats, sel, args.reference))
        print()
    print(sel.explain())
    if args.out:
        path = sel.save(args.out)
        print(f"\nwrote {path}")
    if args.stability:
        st = sel.stability(n_boot=args.stability, seed=args.seed)
        print(f"\nstability ({args.stability} bootstrap resamples of the questions, seed {args.seed}):")
        print(st.format_table())
        if args.out:
            out = Path(args.out)
            spath = out.with_name(out.stem + ".stability.json")
            atomic_write_text(spath, json.dumps(st.to_dict(), indent=2) + "\n")
            print(f"wrote {spath}")
    return sel, model

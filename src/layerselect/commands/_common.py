"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from ..models import DEFAULT_MODEL, KNOWN_MODELS, load_model


def add_model_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--model``, ``--gguf-file``, ``--dtype``, ``--device``."""
    parser.add_argument(
        "--model",
        required=required,
        default=None if required else DEFAULT_MODEL,
        help=f"checkpoint dir, .gguf file, cached hub id, or one of {', '.join(KNOWN_MODELS)}"
        + ("" if required else f" (default: {DEFAULT_MODEL})"),
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (a directory)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or float64")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


def add_precision_arg(parser: Any, default: str = "auto") -> None:
    """``--precision {auto,fp32,bf16}``: bf16 autocast where the hardware is fast at it, or forced."""
    from ..precision import PRECISIONS

    parser.add_argument(
        "--precision", choices=PRECISIONS, default=default,
        help=f"auto: bf16 autocast where the hardware multiplies bf16 natively (a CUDA GPU with bf16, a "
             f"CPU with avx512_bf16 or AMX), fp32 elsewhere; fp32 or bf16 force it. Weights and saved "
             f"deltas stay in --dtype (default: {default})")


def load_model_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    return load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)


def parse_langs(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


# Library errors name Python parameters (``overwrite=True``); on the command line the
# same advice must name the flags. Longer phrases first, so they win over their parts.
_FLAG_WORDING: tuple[tuple[str, str], ...] = (
    ("overwrite=True", "--overwrite"),
    ("target_modules='ffn'", "--target-modules ffn"),
    ("pass the model or its config, not the family name", "pass --model (only its config is read), not --family"),
    ("pass the model, its transformers config (AutoConfig.from_pretrained(DIR)) or its family name (e.g. 'llama')",
     "pass --model (only its config is read) or --family (e.g. --family llama)"),
    ("pass task= and langs=", "pass --task and --langs"),
    ("pass task=", "pass --task"),
    ("backend='transformers'", "--backend transformers"),
    ("to langs", "to --langs"),
    ("from langs", "from --langs"),
    ("out_dir ", "--out "),
    ("base_dir ", "--base "),
)


def flag_wording(message: str) -> str:
    """``message`` with the library's parameter names replaced by this CLI's flags.

    Example:
        >>> flag_wording("choose an empty folder, or pass overwrite=True")
        'choose an empty folder, or pass --overwrite'
    """
    for python_words, flag_words in _FLAG_WORDING:
        message = message.replace(python_words, flag_words)
    return message


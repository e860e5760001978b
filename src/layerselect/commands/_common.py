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


def load_model_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    return load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)


def parse_langs(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [x.strip() for x in value.split(",") if x.strip()]

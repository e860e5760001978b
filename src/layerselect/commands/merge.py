"""``layerselect merge``: write a normal checkpoint with an adapter merged in, streaming."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a selective-FFN adapter into a safetensors checkpoint",
        description=(
            "Apply an adapter's deltas to a (sharded) safetensors checkpoint tensor by tensor and write "
            "a checkpoint that AutoModelForCausalLM.from_pretrained loads. Memory stays near the largest "
            "targeted tensor, not the model."
        ),
    )
    p.add_argument("--base", required=True,
                   help="base checkpoint directory (model.safetensors[.index.json]), a .gguf file, "
                   "or a bundled model name (gemma-3-270m, smollm2-135m)")
    p.add_argument("--adapter", required=True, help="adapter directory (layerselect_adapter.json + layerselect_deltas.safetensors)")
    p.add_argument("--out", required=True, help="output directory for the merged checkpoint")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the deltas (default 1.0)")
    p.add_argument("--dtype", default=None, help="cast floating weights first (e.g. the training dtype)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder that holds something other than an earlier merge")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --base (a directory)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="apply even if the base's fingerprint differs (shapes are still checked)")
    p.set_defaults(func=run)


def _cached_snapshot(model_id: str) -> str | None:
    """The local folder of a model id already in the Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # not an id, or not cached: the caller reports it
        return None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import InvalidInputError
    from ..models import resolve_model
    from ..selective_ffn import merge_checkpoint

    t0 = time.perf_counter()
    base = resolve_model(args.base, args.gguf_file)
    if not Path(base).is_dir():
        base = _cached_snapshot(base) or base
    if not Path(base).is_dir():
        raise InvalidInputError(
            f"--base {args.base} is not a checkpoint folder, a .gguf file, a bundled model name or a model "
            "id in the local Hugging Face cache"
        )
    out = merge_checkpoint(base, args.adapter, args.out, scale=args.scale, strict=args.strict,
                           dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {args.base} -> {out} ({time.perf_counter() - t0:.1f}s)")
    return 0

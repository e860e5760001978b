"""``layerselect export-lora``: a delta adapter as a standard PEFT LoRA adapter (PEFT, vLLM).

Example::

    layerselect export-lora --adapter runs/slam/adapter --rank full --out runs/slam/lora
    layerselect export-lora --adapter runs/slam/adapter --rank 64 --out runs/slam/lora64
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-lora",
        help="convert a selective-FFN adapter into a PEFT LoRA adapter (SVD of each delta)",
        description=(
            "Factor each trained delta by SVD into LoRA matrices B @ A and write a PEFT LoRA adapter "
            "(target_modules + layers_to_transform, lora_alpha = r so the scaling is 1) that "
            "peft.PeftModel.from_pretrained and vLLM's multi-LoRA serving load. Prints each matrix's "
            "relative reconstruction error; --rank full reproduces the merged model."
        ),
    )
    p.add_argument("--adapter", required=True, help="layerselect adapter folder")
    p.add_argument("--rank", default="full", help="LoRA rank r, or 'full' (default: full)")
    p.add_argument("--out", required=True, help="output folder for the LoRA adapter")
    p.add_argument("--base-name", default=None,
                   help="base_model_name_or_path to record (default: the adapter's base model name)")
    p.add_argument("--dtype", default="float32", help="dtype of the stored factors (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that is not an earlier export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import parse_dtype
    from ..selective_ffn.lora import export_lora

    report = export_lora(args.adapter, args.out, rank=args.rank, base_model_name_or_path=args.base_name,
                         dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    print(report.format_table())
    print(f"wrote {args.out}")
    return 0

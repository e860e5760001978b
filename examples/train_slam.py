"""Train SLAM from Python: select layers from activation statistics, fine-tune their FFN, reload the adapter.

Single process (CPU or one GPU), a small run:
    python examples/train_slam.py --model gemma-3-270m --max-pairs 200 --max-steps 20 --batch-size 8 --grad-accum 1

Many GPUs, the paper's setup (DeepSpeed ZeRO-2, effective batch 128 = 8 GPUs x 4 x 4 accumulation):
    torchrun --nproc_per_node 8 examples/train_slam.py --model PATH --deepspeed examples/deepspeed_zero2.json
or FSDP through accelerate:
    accelerate launch --config_file examples/fsdp.yaml examples/train_slam.py --model PATH
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layerselect.data import filter_examples, load_translation_data
from layerselect.models import load_model
from layerselect.selective_ffn.config import SelectiveFFNConfig
from layerselect.selective_ffn.model import SelectiveFFNModel
from layerselect.texts import default_data_dir, load_texts
from layerselect.train import train_slam


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--layers", default=None, help="e.g. 0,1,2 (default: msd selection on MGSM)")
    p.add_argument("--max-pairs", type=int, default=None, help="pairs per language (default: all)")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=None, help="default: reach the paper's batch of 128")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config, e.g. examples/deepspeed_zero2.json")
    p.add_argument("--out", default="runs/slam-example")
    args = p.parse_args()
    data_dir = default_data_dir() or Path("../shared/data")

    model, tokenizer = load_model(args.model)
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    else:
        from layerselect.selection import select
        from layerselect.stats import ActivationStats

        texts = load_texts(f"mgsm:{data_dir / 'mgsm'}", limit=50)
        selection = select(ActivationStats.collect(model, tokenizer, texts), criterion="msd")
        print(selection.reason)
        layers = selection  # a Selection: the config keeps its provenance

    pairs = load_translation_data(f"pairs:{data_dir / 'gsm8kinstruct_question'}", max_pairs=args.max_pairs)
    pairs, report = filter_examples(pairs)
    print(report)

    # Paper defaults (lr 2e-5, cosine, 3 epochs, effective batch 128 via accumulation); override any.
    overrides = dict(per_device_train_batch_size=args.batch_size, max_steps=args.max_steps)
    if args.grad_accum:
        overrides["gradient_accumulation_steps"] = args.grad_accum
    if args.deepspeed:
        overrides["deepspeed"] = args.deepspeed
    adapter_dir = train_slam(model, tokenizer, pairs, SelectiveFFNConfig(layers=layers),
                             output_dir=args.out, max_length=args.max_length, **overrides)
    print(f"adapter: {adapter_dir}; loss curve: {Path(args.out) / 'loss.png'}")

    # Reload onto a fresh base: the selected FFN matrices equal the trained ones.
    base, _ = load_model(args.model)
    aligned = SelectiveFFNModel.from_pretrained(base, adapter_dir)
    print(aligned)


if __name__ == "__main__":
    main()

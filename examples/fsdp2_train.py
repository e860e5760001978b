"""SLAM training with FSDP2 (``torch.distributed.fsdp.fully_shard``) on N processes, through ``layerselect.train``.

Each decoder layer and the root are sharded across the processes; only the FFN
matrices of ``--layers`` train (frozen and trainable weights share the layer
units). The training loop is the library's one loop (``train_model``: HF
``Trainer``), handed a model that is already sharded: the Trainer leaves it
unwrapped and FSDP2 reduces the gradients. Adapters and checkpoints gather only
the trained matrices, one at a time, never the whole model; a checkpoint is the
same ``checkpoint-N/`` folder as on one process (with the optimizer state whole),
so a run resumes on any number of processes.

CPU (gloo), a tiny Llama built from a fixed seed, seconds:
    torchrun --nproc_per_node 2 examples/fsdp2_train.py --model tiny-llama --layers 0,1 \\
        --max-steps 8 --batch-size 2 --out runs/fsdp2
    # same global batch on one process -> the same adapter (to float32 rounding):
    torchrun --nproc_per_node 1 examples/fsdp2_train.py --model tiny-llama --layers 0,1 \\
        --max-steps 8 --batch-size 4 --out runs/fsdp1

GPUs (NCCL), a real model and X->English pairs (effective batch = batch x accumulation x processes):
    torchrun --nproc_per_node 8 examples/fsdp2_train.py --model PATH --layers 0,1,2,3,4,5 \\
        --train-data pairs:../shared/data/gsm8kinstruct_question --dtype bfloat16 \\
        --batch-size 4 --grad-accum 4 --max-steps 1200 --lr 2e-5 --save-steps 200 --out runs/slam-fsdp2

Writes ``OUT/adapter`` (load with ``SelectiveFFNModel.from_pretrained(base, OUT/adapter)``),
``OUT/train_summary.json`` and ``OUT/checkpoint-S`` every ``--save-steps``;
``--resume OUT/checkpoint-S`` continues a run (on any number of processes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from layerselect.distributed import shard_slam_model
from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model
from layerselect.train import train_model

TINY = {
    "tiny-llama": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
}


def build_tiny(name: str, dtype: torch.dtype, seed: int) -> tuple[Any, None]:
    """A randomly initialised model from a named config; identical on every rank (fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**TINY[name], pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg.name_or_path = name
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model, None


def synthetic_features(n: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """Token sequences of 8-24 ids, labels on the second half only (like a prompt + English target)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(8, 25, (), generator=g))
        ids = [1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist()
        cut = length // 2
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:], "attention_mask": [1] * length})
    return out


def real_features(tokenizer: Any, spec: str, langs: str | None, max_pairs: int | None, max_length: int) -> list:
    from layerselect.data import TranslationDataset, filter_examples, load_translation_data

    pairs = load_translation_data(spec, langs=langs.split(",") if langs else None, max_pairs=max_pairs)
    pairs, _ = filter_examples(pairs)
    return TranslationDataset(pairs, tokenizer, max_length=max_length).features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"one of {sorted(TINY)} or a model for layerselect.models.load_model")
    p.add_argument("--layers", required=True, help="e.g. 0,1")
    p.add_argument("--targets", default="up,down", help="FFN matrices to train (default: the paper's up,down)")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True, help="per process; global = batch x processes x accumulation")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--train-data", default=None, help="pairs:DIR / jsonl:FILE (real models); tiny models use synthetic data")
    p.add_argument("--langs", default=None)
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--save-steps", type=int, default=0, help="write OUT/checkpoint-S every S steps (0: never)")
    p.add_argument("--resume", default=None, help="a checkpoint directory to continue from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # fully_shard needs the process group before the Trainer would create it.
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    if args.model in TINY:
        model, tokenizer = build_tiny(args.model, dtype, args.seed)
        features = synthetic_features(256, model.config.vocab_size, args.seed + 1)
    else:
        from layerselect.models import load_model

        if not args.train_data:
            p.error("--train-data is required with a real model")
        model, tokenizer = load_model(args.model, dtype=dtype)
        features = real_features(tokenizer, args.train_data, args.langs, args.max_pairs, args.max_length)
    model.to(device)
    config = SelectiveFFNConfig(layers=[int(x) for x in args.layers.split(",")], target_modules=args.targets.split(","))
    slam = get_slam_model(model, config)   # keeps the base's targeted weights (host RAM) for the deltas
    shard_slam_model(slam)                 # fully_shard: each decoder layer, then the root

    train_model(
        slam, tokenizer, features, output_dir=args.out, resume_from_checkpoint=args.resume,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps, max_grad_norm=1.0, seed=args.seed,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        save_total_limit=None, data_order="sequential",  # a fixed order: N processes see 1 process's batches
        precision="bf16" if dtype == torch.bfloat16 else "fp32", dataloader_num_workers=0,
        **({} if cuda else {"ddp_backend": "gloo", "use_cpu": True}),
    )
    if dist.get_rank() == 0:
        print(f"adapter: {Path(args.out) / 'adapter'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if not torch.cuda.is_available():
        # gloo's worker threads outlive destroy_process_group (the group is still referenced
        # outside Python), so they are torn down during interpreter shutdown, which now and then
        # aborts a rank ("terminate called without an active exception") after all the work is
        # done. Everything is written and the group destroyed: flush and leave without teardown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

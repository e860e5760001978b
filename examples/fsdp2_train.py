"""SLAM training with FSDP2 (``torch.distributed.fsdp.fully_shard``): a plain torch loop on N processes.

Each decoder layer and the root are sharded across the processes; only the FFN
matrices of ``--layers`` train (frozen and trainable weights share the layer
units). The adapter and checkpoints gather only the trained matrices, one at a
time, never the whole model.

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

Writes ``OUT/adapter`` (load with ``SelectiveFFNModel.from_pretrained(base, OUT/adapter)``) and
``OUT/checkpoint-S`` every ``--save-steps``; ``--resume OUT/checkpoint-S`` continues a run
(on any number of processes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from layerselect.distributed import (
    load_checkpoint,
    save_checkpoint,
    shard_slam_model,
    trainable_parameters,
)
from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model

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


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    from layerselect.data import TranslationCollator

    return TranslationCollator(pad_token_id=pad_id)(features)


def cosine_with_warmup(max_steps: int, warmup: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))

    return fn


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
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    if args.model in TINY:
        model, tokenizer = build_tiny(args.model, dtype, args.seed)
        features = synthetic_features(256, model.config.vocab_size, args.seed + 1)
        pad_id = 0
    else:
        from layerselect.models import load_model

        if not args.train_data:
            p.error("--train-data is required with a real model")
        model, tokenizer = load_model(args.model, dtype=dtype)
        features = real_features(tokenizer, args.train_data, args.langs, args.max_pairs, args.max_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.to(device)
    config = SelectiveFFNConfig(layers=[int(x) for x in args.layers.split(",")], target_modules=args.targets.split(","))
    slam = get_slam_model(model, config)   # keeps the base's targeted weights (host RAM) for the deltas
    shard_slam_model(slam)                 # fully_shard: each decoder layer, then the root
    slam.train()
    params = trainable_parameters(slam)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(args.max_steps, args.warmup_steps))
    start = 0
    if args.resume:
        start = int(load_checkpoint(slam, args.resume, optimizer=optimizer, scheduler=scheduler)["step"])

    out = Path(args.out)
    micro, global_batch = args.batch_size, args.batch_size * world * args.grad_accum
    log = []
    t0 = time.perf_counter()
    for step in range(start, args.max_steps):
        # The global batch of this step, the same whatever the world size; this rank's slices of it.
        first = step * global_batch
        chunks = []
        for a in range(args.grad_accum):
            lo = first + (a * world + rank) * micro
            chunks.append(collate([features[i % len(features)] for i in range(lo, lo + micro)], pad_id))
        # Normalise by the target tokens of the whole global batch, so N processes == 1 process.
        n_tokens = torch.tensor(sum(int((c["labels"][:, 1:] != -100).sum()) for c in chunks), device=device)
        dist.all_reduce(n_tokens)
        total = 0.0
        for a, batch in enumerate(chunks):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = slam(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                  ignore_index=-100, reduction="sum")
            # FSDP averages gradients over ranks: scale back to a sum over the global batch.
            loss = nll * world / n_tokens
            if hasattr(slam.model, "set_requires_gradient_sync"):
                slam.model.set_requires_gradient_sync(a == len(chunks) - 1)
            loss.backward()
            total += float(nll.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.tensor(total, device=device)
        dist.all_reduce(step_loss)
        log.append({"step": step + 1, "loss": float(step_loss) / float(n_tokens)})
        if rank == 0:
            print(f"step {step + 1}/{args.max_steps} loss {log[-1]['loss']:.4f}", flush=True)
        if args.save_steps and (step + 1) % args.save_steps == 0:
            save_checkpoint(slam, out / f"checkpoint-{step + 1}", optimizer=optimizer, scheduler=scheduler,
                            step=step + 1, is_main_process=rank == 0)

    slam.save_pretrained(out / "adapter", is_main_process=rank == 0)   # every rank: a per-matrix gather
    if rank == 0:
        summary = {"processes": world, "global_batch": global_batch, "steps": args.max_steps, "resumed_from": start,
                   "seconds": time.perf_counter() - t0, "layers": config.layers, "loss": log}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        print(f"adapter: {out / 'adapter'}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

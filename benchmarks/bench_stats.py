"""Overhead of ActivationStats.collect against a plain forward, and its memory against a naive collector.

Runs on Gemma-3-270M (or --model) over MGSM from ../shared/data (or --data),
subsampled to --per-lang questions per language. Every variant sees exactly the
same length-sorted batches; the variants alternate for --repeats rounds and the
median time of each is reported, so both see the same machine load.

- plain:   the base decoder (model.model, no LM head, no hooks), same batches;
- collect: ActivationStats.collect (hooks on every layer; stops before the final norm/LM head);
- naive:   a hook that keeps every layer's activations (real tokens only) and
           counts at the end; measured for memory, in a separate process.

Usage:
    python benchmarks/bench_stats.py                  # Gemma-3-270M, 10 languages x 12 questions
    python benchmarks/bench_stats.py --model smollm2-135m --per-lang 25 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from layerselect import ActivationStats
from layerselect.arch import get_layout
from layerselect.models import load_model
from layerselect.texts import PAPER_LANGS, default_data_dir, load_texts


def batches_for(tokenizer, texts, batch_size):
    seqs = [tokenizer(t)["input_ids"] for items in texts.values() for t in items]
    seqs.sort(key=len, reverse=True)
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        out.append((ids, mask))
    return out, sum(map(len, seqs))


def plain_forward(model, batches):
    decoder = model.model
    with torch.inference_mode():
        for ids, mask in batches:
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)


def naive_collect(model, batches):
    """Keep every activation of real tokens, count at the end (the memory baseline)."""
    layout = get_layout(model)
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in range(layout.num_layers)}
    current = {}

    def hook(i):
        def fn(_m, _a, out):
            kept[i].append(out[current["mask"].bool()].float().clone())

        return fn

    handles = [layout.ffn(i).act.register_forward_hook(hook(i)) for i in range(layout.num_layers)]
    with torch.inference_mode():
        for ids, mask in batches:
            current["mask"] = mask
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    return torch.stack([(torch.cat(v) > 0).sum(0) for v in kept.values()])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args) -> None:
    """Run one variant once in this fresh process and print its extra peak RSS."""
    model, tok = load_model(args.model)
    texts = load_texts(f"mgsm:{args.data}/mgsm", langs=PAPER_LANGS, limit=args.per_lang)
    batches, _ = batches_for(tok, texts, args.batch_size)
    plain_forward(model, batches[-1:])  # warm up allocator and kernels
    before = peak_rss_mb()
    if args.memory_child == "naive":
        naive_collect(model, batches)
    elif args.memory_child == "collect":
        ActivationStats.collect(model, tok, texts, batch_size=args.batch_size, progress=False)
    else:
        plain_forward(model, batches)
    print(json.dumps({"variant": args.memory_child, "extra_peak_mb": peak_rss_mb() - before}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--data", default=str(default_data_dir() or "../shared/data"))
    p.add_argument("--per-lang", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return

    model, tok = load_model(args.model)
    texts = load_texts(f"mgsm:{args.data}/mgsm", langs=PAPER_LANGS, limit=args.per_lang)
    batches, n_tokens = batches_for(tok, texts, args.batch_size)
    print(f"{args.model}: {sum(map(len, texts.values()))} texts, {n_tokens} tokens, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, {args.repeats} rounds")
    plain_forward(model, batches[:2])  # warm-up
    times = {"plain": [], "collect": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        plain_forward(model, batches)
        times["plain"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ActivationStats.collect(model, tok, texts, batch_size=args.batch_size, progress=False)
        times["collect"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("plain", "collect"):
        print(f"  {k:8s} median {med[k]:7.2f}s  {n_tokens / med[k]:8.0f} tok/s   rounds {[round(x, 2) for x in times[k]]}")
    print(f"  time ratio collect / plain forward: {med['collect'] / med['plain']:.3f}x")

    mem = {}
    for variant in ("plain", "collect", "naive"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", variant, "--model", args.model, "--data", args.data,
             "--per-lang", str(args.per_lang), "--batch-size", str(args.batch_size)],
            capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"},
        )
        mem[variant] = json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_mb"]
    print("  extra peak RSS above the loaded model (MB): "
          + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
    if mem["collect"] <= mem["plain"] + 1:
        print(f"  collect adds no measurable memory over a plain forward; naive keeps {mem['naive']:.0f} MB "
              "of activations (and grows with the number of tokens)")
    else:
        print(f"  memory ratio naive / collect: {mem['naive'] / mem['collect']:.1f}x "
              "(naive grows with the number of tokens; collect does not)")


if __name__ == "__main__":
    main()

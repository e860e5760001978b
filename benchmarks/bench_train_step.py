"""Training-step time and peak memory of selective FFN fine-tuning vs the alternatives.

On SmolLM2-135M (real weights, CPU, float32, AdamW, fixed batch and sequence length),
per training step:

  (a) full fine-tuning
  (b) plain ``requires_grad`` masking of the FFN up/down matrices of layers 0-5
      (how the paper's released code does it)
  (c) ``get_slam_model`` on the same matrices (c2: with ``reference="disk"``)
  (d) PEFT LoRA r=256 on the same matrices (the paper's LoRA baseline)

Each variant runs in its own subprocess, so peak memory is that process's peak
resident set size (``VmHWM``: everything torch allocated, plus the model load);
variants alternate over ``--rounds`` and the best median step time is kept.
Then: streaming-merge peak memory against checkpoint and shard size, and adapter
load time.

    python benchmarks/bench_train_step.py              # a few minutes on 2 idle cores
    python benchmarks/bench_train_step.py --batch 4 --seq 128 --steps 5   # heavier

"wall s" is the median wall time per step; "cpu s" the process CPU time per step
(all threads), which is less sensitive to other load on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m"
LAYERS = [0, 1, 2, 3, 4, 5]
VARIANTS = {
    "a": "full fine-tuning",
    "b": "requires_grad masking",
    "c": "get_slam_model",
    "c2": "get_slam_model ref=disk",
    "d": "PEFT LoRA r=256",
}


def _peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM (reset at exec, unlike ru_maxrss, which Linux carries
    over from the forking parent), falling back to ru_maxrss off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# ----------------------------------------------------------------------------------------
# Children
# ----------------------------------------------------------------------------------------
def child_train(variant: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from layerselect.models import load_model

    model, _ = load_model(MODEL)
    loaded_rss = _rss_mb()
    names = {f"model.layers.{i}.mlp.{m}_proj.weight" for i in LAYERS for m in ("up", "down")}
    if variant == "a":
        net = model
    elif variant == "b":
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        net = model
    elif variant in ("c", "c2"):
        from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model

        net = get_slam_model(model, SelectiveFFNConfig(layers=LAYERS), reference="cpu" if variant == "c" else "disk")
    elif variant == "d":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=256, lora_alpha=512, lora_dropout=0.0, target_modules=["up_proj", "down_proj"],
                         layers_to_transform=LAYERS)
        net = get_peft_model(model, cfg)
    else:
        raise SystemExit(f"unknown variant {variant}")
    params = [p for p in net.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 49000, (batch, seq), generator=g)
    net.train()
    times, cpu = [], []
    for i in range(steps + 1):  # one warm-up step
        t0, c0 = time.perf_counter(), time.process_time()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 1:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"variant": variant, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "peak_mb": _peak_rss_mb(),
            "loaded_rss_mb": loaded_rss, "trainable": trainable, "loss": float(loss)}


def child_merge(base: str, adapter: str, out: str) -> dict:
    import torch  # noqa: F401  (import cost is part of the baseline, not the merge)

    from layerselect.selective_ffn import merge_checkpoint

    before = _peak_rss_mb()
    t0 = time.perf_counter()
    merge_checkpoint(base, adapter, out)
    return {"merge_s": time.perf_counter() - t0, "peak_mb": _peak_rss_mb(), "baseline_peak_mb": before}


# ----------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------
def _run_child(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_training(args: argparse.Namespace) -> None:
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS:
            results[v].append(_run_child("train", v, str(args.steps), str(args.batch), str(args.seq), str(args.threads)))
    best = {v: min(r, key=lambda x: x["step_s"]) for v, r in results.items()}
    cpu = {v: min(x["cpu_s"] for x in r) for v, r in results.items()}
    peak = {v: min(x["peak_mb"] for x in r) for v, r in results.items()}
    print(f"\n== training step: {MODEL}, float32, AdamW, batch {args.batch} x seq {args.seq}, "
          f"{args.threads} threads, layers {LAYERS} up+down, median of {args.steps} steps after 1 warm-up, "
          f"best of {args.rounds} rounds ==")
    print(f"{'variant':<28}{'trainable':>13}{'wall s':>8}{'x(a)':>6}{'x(b)':>6}"
          f"{'cpu s':>8}{'x(a)':>6}{'x(b)':>6}{'peak MB':>9}{'x(a)':>6}{'x(b)':>6}")
    for v, name in VARIANTS.items():
        r = best[v]
        print(f"({v}) {name:<{25 - len(v)}}{r['trainable']:>13,}{r['step_s']:>8.3f}"
              f"{r['step_s'] / best['a']['step_s']:>6.2f}{r['step_s'] / best['b']['step_s']:>6.2f}"
              f"{cpu[v]:>8.3f}{cpu[v] / cpu['a']:>6.2f}{cpu[v] / cpu['b']:>6.2f}"
              f"{peak[v]:>9.0f}{peak[v] / peak['a']:>6.2f}{peak[v] / peak['b']:>6.2f}")
    print(f"(model loaded: {best['a']['loaded_rss_mb']:.0f} MB RSS before training)")
    print("all wall step times (s):", {v: [round(x["step_s"], 3) for x in r] for v, r in results.items()})
    print("all peaks (MB):", {v: [round(x["peak_mb"]) for x in r] for v, r in results.items()})


def bench_merge_and_load(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from layerselect.models import load_model
    from layerselect.selective_ffn import (
        SelectiveFFNConfig,
        SelectiveFFNModel,
        get_slam_model,
        load_deltas,
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, _ = load_model(MODEL)
        model.save_pretrained(tmp / "base", max_shard_size="100MB")
        slam = get_slam_model(model, SelectiveFFNConfig(layers=LAYERS))
        with torch.no_grad():  # stand-in for training: a small update of every targeted weight
            for p in slam.parameters():
                if p.requires_grad:
                    p.add_(1e-4 * torch.randn_like(p))
        t0 = time.perf_counter()
        slam.save_pretrained(tmp / "adapter")
        save_s = time.perf_counter() - t0
        adapter_mb = sum(f.stat().st_size for f in (tmp / "adapter").iterdir()) / 2**20
        meta = json.loads((tmp / "adapter" / "layerselect_adapter.json").read_text())
        del slam, model

        base = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
        t0 = time.perf_counter()
        SelectiveFFNModel.from_pretrained(base, tmp / "adapter")
        from_pretrained_s = time.perf_counter() - t0
        base2 = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
        t0 = time.perf_counter()
        load_deltas(base2, tmp / "adapter", strict=False)
        load_nostrict_s = time.perf_counter() - t0
        del base, base2

        shards = sorted((tmp / "base").glob("*.safetensors"))
        ckpt_mb = sum(f.stat().st_size for f in shards) / 2**20
        largest_mb = max(f.stat().st_size for f in shards) / 2**20
        m = _run_child("merge", str(tmp / "base"), str(tmp / "adapter"), str(tmp / "merged"))
    print(f"\n== adapter: {len(meta['tensors'])} tensors, {adapter_mb:.1f} MB on disk, "
          f"patched elements {meta['reconstruction']['patched_elements']}, save {save_s:.2f} s ==")
    print(f"load: SelectiveFFNModel.from_pretrained {from_pretrained_s:.2f} s (checksum + fingerprint + apply); "
          f"load_deltas(strict=False) {load_nostrict_s:.2f} s")
    print(f"\n== streaming merge: checkpoint {ckpt_mb:.0f} MB in {len(shards)} shards (largest {largest_mb:.0f} MB) ==")
    print(f"merge time {m['merge_s']:.2f} s; peak RSS {m['peak_mb']:.0f} MB "
          f"(process baseline before merging {m['baseline_peak_mb']:.0f} MB, so the merge added "
          f"{m['peak_mb'] - m['baseline_peak_mb']:.0f} MB = {(m['peak_mb'] - m['baseline_peak_mb']) / ckpt_mb:.2f}x "
          f"the checkpoint, {(m['peak_mb'] - m['baseline_peak_mb']) / largest_mb:.2f}x the largest shard)")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "train":
            out = child_train(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]))
        else:
            out = child_merge(*rest)
        print(json.dumps(out))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    t0 = time.perf_counter()
    if not args.skip_train:
        bench_training(args)
    bench_merge_and_load(args)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

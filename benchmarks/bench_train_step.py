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

``--loss-paths`` (alone, or with the rest) compares the two loss paths side by side
(``layerselect.loss``): a SLAM step (``get_slam_model`` on layers [0], up+down,
AdamW) on X->English pairs from the demo (batch 4, max length 96) with the standard
full-logits loss (``model(..., labels=...)``, what HF Trainer computes) vs the
label-only loss, on Gemma-3-270M and SmolLM2-135M; then the translation-loss pass
over the demo's 140 packaged pairs (``translation_loss``, batch 4) on Gemma-3-270M,
both ways. Peak memory there is the process's peak RSS *during the timed steps*
(``VmHWM`` reset through ``/proc/self/clear_refs`` after loading and warm-up), and
its growth above the RSS before the steps.

    python benchmarks/bench_train_step.py --loss-paths --skip-train --skip-merge

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


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _demo_batches(tokenizer, batch: int, seq: int) -> list[dict]:
    from layerselect.data import TranslationCollator, TranslationDataset, TranslationExample
    from layerselect.demo import DEMO_LANGS, load_demo_prompts

    prompts = load_demo_prompts()
    pairs = [TranslationExample(lang, p[lang], p["en"]) for p in prompts for lang in DEMO_LANGS if lang != "en"]
    ds = TranslationDataset(pairs, tokenizer, max_length=seq)
    collate = TranslationCollator.for_tokenizer(tokenizer)
    return [collate([ds[j] for j in range(i, min(i + batch, len(ds)))]) for i in range(0, len(ds), batch)]


def child_loss_step(model_name: str, mode: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    """SLAM step (layers [0] up+down, AdamW) with the standard or the label-only loss."""
    import torch

    torch.set_num_threads(threads)
    from layerselect.loss import label_only_loss
    from layerselect.models import load_model
    from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model

    model, tok = load_model(model_name)
    net = get_slam_model(model, SelectiveFFNConfig(layers=[0]))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    # Shuffled with a fixed seed so batches mix languages and lengths; the same batches for both modes.
    batches = _demo_batches(tok, batch, seq)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0)).tolist()
    net.train()
    times, cpu, tokens, losses = [], [], 0, []
    peak_ok = False
    for i in range(steps + 1):  # one warm-up step
        b = batches[order[i % len(order)]]
        if i == 1:
            rss_before = _rss_mb()
            peak_ok = _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "standard":
            loss = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        else:
            loss = label_only_loss(net, b["input_ids"], b["labels"], b["attention_mask"], label_only=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 1:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            tokens += int(b["attention_mask"].sum())
            losses.append(float(loss))
    return {"model": model_name, "mode": mode, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "tokens_per_s": tokens / sum(times), "peak_mb": _peak_rss_mb() if peak_ok else float("nan"),
            "rss_before_mb": rss_before, "losses": losses}


def child_loss_pass(model_name: str, mode: str, threads: int) -> dict:
    """``translation_loss`` over the demo's 140 pairs (batch 4), standard or label-only."""
    import torch

    torch.set_num_threads(threads)
    from layerselect.data import TranslationExample
    from layerselect.demo import DEMO_LANGS, load_demo_prompts
    from layerselect.models import load_model
    from layerselect.train import translation_loss

    model, tok = load_model(model_name)
    prompts = load_demo_prompts()
    pairs = [TranslationExample(lang, p[lang], p["en"]) for p in prompts for lang in DEMO_LANGS if lang != "en"]
    rss_before = _rss_mb()
    peak_ok = _reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    value = translation_loss(model, tok, pairs, batch_size=4, label_only=(mode == "label"))
    return {"model": model_name, "mode": mode, "pass_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "loss": value, "pairs": len(pairs),
            "peak_mb": _peak_rss_mb() if peak_ok else float("nan"), "rss_before_mb": rss_before}


def bench_loss_paths(args: argparse.Namespace) -> None:
    print(f"\n== loss paths: SLAM step, layers [0] up+down, AdamW, float32, demo pairs, batch {args.loss_batch}, "
          f"max length {args.loss_seq}, {args.threads} threads, median of {args.loss_steps} steps after 1 warm-up; "
          "modes alternate in each round ==")
    head = (f"{'model':<14}{'loss path':<12}{'wall s':>8}{'cpu s':>8}{'tok/s':>8}{'peak MB':>9}"
            f"{'+MB':>7}{'x time':>8}{'x cpu':>7}{'x peak':>8}{'x +MB':>7}")
    rows = []
    for name in args.loss_models:
        res: dict[str, list[dict]] = {"standard": [], "label": []}
        for r in range(args.rounds):
            for mode in (("standard", "label") if r % 2 == 0 else ("label", "standard")):
                res[mode].append(_run_child("loss_step", name, mode, str(args.loss_steps), str(args.loss_batch),
                                            str(args.loss_seq), str(args.threads)))
        best = {m: min(v, key=lambda x: x["step_s"]) for m, v in res.items()}
        cpu = {m: min(x["cpu_s"] for x in v) for m, v in res.items()}
        peak = {m: min(x["peak_mb"] for x in v) for m, v in res.items()}
        grow = {m: min(x["peak_mb"] - x["rss_before_mb"] for x in v) for m, v in res.items()}
        for m in ("standard", "label"):
            rows.append(f"{name:<14}{m:<12}{best[m]['step_s']:>8.2f}{cpu[m]:>8.2f}{best[m]['tokens_per_s']:>8.1f}"
                        f"{peak[m]:>9.0f}{grow[m]:>7.0f}{best[m]['step_s'] / best['standard']['step_s']:>8.2f}"
                        f"{cpu[m] / cpu['standard']:>7.2f}{peak[m] / peak['standard']:>8.2f}"
                        f"{grow[m] / grow['standard']:>7.2f}")
        print("losses (standard / label-only):", res["standard"][0]["losses"], res["label"][0]["losses"])
        print("all wall step times (s):", {m: [round(x["step_s"], 2) for x in v] for m, v in res.items()})
    print(head)
    print("\n".join(rows))
    if args.loss_pass_model:
        res = {"standard": [], "label": []}
        for r in range(args.rounds):
            for mode in (("standard", "label") if r % 2 == 0 else ("label", "standard")):
                res[mode].append(_run_child("loss_pass", args.loss_pass_model, mode, str(args.threads)))
        best = {m: min(v, key=lambda x: x["pass_s"]) for m, v in res.items()}
        print(f"\n== translation_loss over the demo's {best['label']['pairs']} pairs, {args.loss_pass_model}, "
              f"batch 4, float64 log-softmax ==")
        print(f"{'loss path':<12}{'wall s':>8}{'cpu s':>8}{'peak MB':>9}{'x time':>8}{'x cpu':>7}  loss")
        for m in ("standard", "label"):
            print(f"{m:<12}{best[m]['pass_s']:>8.1f}{best[m]['cpu_s']:>8.1f}{best[m]['peak_mb']:>9.0f}"
                  f"{best[m]['pass_s'] / best['standard']['pass_s']:>8.2f}"
                  f"{best[m]['cpu_s'] / best['standard']['cpu_s']:>7.2f}  {best[m]['loss']!r}")


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
        elif kind == "loss_step":
            out = child_loss_step(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]), int(rest[5]))
        elif kind == "loss_pass":
            out = child_loss_pass(rest[0], rest[1], int(rest[2]))
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
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--loss-paths", action="store_true", help="standard vs label-only loss (see above)")
    p.add_argument("--loss-models", nargs="+", default=["gemma-3-270m", "smollm2-135m"])
    p.add_argument("--loss-steps", type=int, default=3)
    p.add_argument("--loss-batch", type=int, default=4)
    p.add_argument("--loss-seq", type=int, default=96)
    p.add_argument("--loss-pass-model", default="gemma-3-270m", help="'' to skip the translation-loss pass")
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.loss_paths:
        bench_loss_paths(args)
    if not args.skip_train:
        bench_training(args)
    if not args.skip_merge:
        bench_merge_and_load(args)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

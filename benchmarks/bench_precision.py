"""bf16 mixed precision against fp32, side by side in one run (``layerselect.precision``).

On Gemma-3-270M (real weights) by default, in one process:

(a) the machine's GEMM peak: a 2048^3 matrix product in fp32 and in bf16 (GFLOP/s);
(b) one selective training step (the msd layer 0, up+down, AdamW, label-only loss)
    on 8 X->English pairs, fp32 vs bf16 autocast: time per step (median, the two
    precisions alternating), the loss of the same batch, and the step's achieved
    GFLOP/s (FLOPs counted by ``torch.utils.flop_counter``) against (a);
(c) one full fine-tuning step on the same batch (every weight, AdamW): the same;
(d) a 40-step run through ``layerselect.train.train_slam`` (the path users run), in
    each precision from the same start: final training loss, and the held-out
    translation loss after it (both measured in fp32);
(e) the reasoning gap on 40 MGSM questions x en,de,zh,sw: NLL per language and the
    average gap, bf16 vs fp32;
(f) activation statistics under bf16 autocast: how many firing counts change, and
    whether the msd selection changes;
(g) padding: the fraction of padded positions in training batches, in the
    Trainer's random order vs grouped by length (``data_order="length"``, the default).

Where bf16 falls short of a goal, the top ops of a profiled step say why.

    python benchmarks/bench_precision.py                       # about 15 minutes on 2 cores
    python benchmarks/bench_precision.py --skip-run --skip-gap # the timings only
    python benchmarks/bench_precision.py --shape llama2-7b --device cuda --timing-only  # GPU

``--shape`` builds a randomly initialised Llama of that shape (no download); with
it only (a)-(c) run (random weights have no meaningful loss or gap).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny.py: offline tokenizer for --shape

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      tie_word_embeddings=False),
    "tiny": dict(vocab_size=32000, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                 tie_word_embeddings=False),
}
GAP_LANGS = ["en", "de", "zh", "sw"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an ``n x n @ n x n`` product over ``reps`` runs."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.shape:
        from transformers import AutoConfig, AutoModelForCausalLM

        from tiny import tiny_tokenizer

        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", **SHAPES[args.shape])
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return model, tiny_tokenizer()
    from layerselect.models import load_model

    return load_model(args.model, device=args.device)


def pairs(limit_per_lang: int | None = None) -> list[Any]:
    """X->English pairs: the shared GSM8K question translations, else the bundled demo pairs."""
    from layerselect.data import load_translation_data

    src = SHARED / "gsm8kinstruct_question"
    return load_translation_data(f"pairs:{src}" if src.is_dir() else "demo", max_pairs=limit_per_lang)


def step_batch(tokenizer: Any, n: int, max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``n`` training pairs of about ``max_length`` tokens (the longest pairs, cut), one per language in turn."""
    from layerselect.data import TranslationCollator
    from layerselect.train import build_train_dataset

    ds = build_train_dataset(pairs(40), tokenizer, max_length)
    items = sorted((ds[i] for i in range(len(ds))), key=lambda x: -len(x["input_ids"]))[:n]
    batch = TranslationCollator.for_tokenizer(tokenizer)(items)
    return {k: v.to(device) for k, v in batch.items()}


def trainable(model: Any, full: bool) -> Any:
    """The model to train: every weight (``full``) or the selective model on layer 0, up+down."""
    from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model

    if full:
        return model.requires_grad_(True)
    return get_slam_model(model, SelectiveFFNConfig(layers=[0], target_modules=["up", "down"]))


def make_step(trained: Any, batch: dict[str, torch.Tensor], precision: str) -> Any:
    """A closure doing forward + backward + AdamW on ``batch`` in ``precision``; returns the loss."""
    from layerselect.loss import label_only_loss
    from layerselect.precision import autocast

    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-7)
    device = next(trained.parameters()).device
    trained.train()

    def step() -> float:
        with autocast(precision, device):
            out = label_only_loss(trained, batch["input_ids"], batch["labels"], batch["attention_mask"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def batch_loss(trained: Any, batch: dict[str, torch.Tensor], precision: str) -> float:
    from layerselect.loss import label_only_loss
    from layerselect.precision import autocast

    with torch.no_grad(), autocast(precision, next(trained.parameters()).device):
        return float(label_only_loss(trained, batch["input_ids"], batch["labels"], batch["attention_mask"]).loss)


def step_flops(step: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def compare_steps(model: Any, batch: dict[str, torch.Tensor], full: bool, rounds: int,
                  peaks: dict[str, float]) -> dict[str, Any]:
    """fp32 vs bf16 step times (alternating), the loss of the same batch, achieved GFLOP/s.

    The model's weights are restored afterwards (the steps use a tiny lr, but later
    measures must see the base model exactly).
    """
    device = next(model.parameters()).device
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = trainable(model, full)
    losses = {p: batch_loss(trained, batch, p) for p in ("fp32", "bf16")}
    steps = {p: make_step(trained, batch, p) for p in ("fp32", "bf16")}
    flops = step_flops(steps["fp32"])  # the same ops in either precision
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for p in steps:
        steps[p]()  # warm-up
    for _ in range(rounds):
        for p in steps:
            sync(device)
            t0 = time.perf_counter()
            steps[p]()
            sync(device)
            times[p].append(time.perf_counter() - t0)
    del steps, trained
    model.requires_grad_(False)
    model.load_state_dict(saved)
    med = {p: statistics.median(t) for p, t in times.items()}
    return {
        "seconds": med, "ratio_bf16_fp32": med["bf16"] / med["fp32"],
        "loss": losses, "loss_rel_diff": abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"]),
        "gflop": flops / 1e9,
        "achieved_gflops": {p: flops / med[p] / 1e9 for p in med},
        "fraction_of_peak": {p: flops / med[p] / 1e9 / peaks[p] for p in med},
        "tokens": int(batch["attention_mask"].sum()),
    }


def profile_top(model: Any, batch: dict[str, torch.Tensor], precision: str, n: int = 8) -> list[dict[str, Any]]:
    """The ``n`` ops that take the most self CPU time in one selective step."""
    from torch.profiler import ProfilerActivity, profile

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = make_step(trainable(model, full=False), batch, precision)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    model.requires_grad_(False)
    model.load_state_dict(saved)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
            for e in rows]


def run_40_steps(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """40 steps of train_slam from the same start in each precision; final loss and held-out loss (fp32)."""
    from layerselect.models import load_model
    from layerselect.selective_ffn import SelectiveFFNConfig
    from layerselect.train import train_slam, translation_loss

    data = pairs(args.run_pairs)
    by_lang: dict[str, list[Any]] = {}
    for p in data:
        by_lang.setdefault(p.lang, []).append(p)
    heldout = [p for items in by_lang.values() for p in items[:5]]
    train = [p for items in by_lang.values() for p in items[5:]]
    out: dict[str, Any] = {"steps": args.run_steps, "train_pairs": len(train), "heldout_pairs": len(heldout)}
    for precision in ("fp32", "bf16"):
        model, tok = load_model(args.model, device=args.device)
        t0 = time.perf_counter()
        _, trainer = train_slam(
            model, tok, train, SelectiveFFNConfig(layers=[0]), output_dir=tmp / precision, precision=precision,
            max_steps=args.run_steps, learning_rate=1e-4, per_device_train_batch_size=4,
            gradient_accumulation_steps=4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            save_strategy="no", disable_tqdm=True, max_length=256, return_trainer=True, seed=0,
        )
        seconds = time.perf_counter() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        out[precision] = {
            "final_loss": losses[-1], "last10_mean_loss": statistics.mean(losses[-10:]),
            "heldout_loss_fp32": translation_loss(model, tok, heldout, max_length=256, precision="fp32"),
            "train_seconds": seconds, "losses": losses,
        }
        del model, trainer
    f, b = out["fp32"], out["bf16"]
    out["final_loss_rel_diff"] = abs(b["final_loss"] - f["final_loss"]) / f["final_loss"]
    out["last10_rel_diff"] = abs(b["last10_mean_loss"] - f["last10_mean_loss"]) / f["last10_mean_loss"]
    out["heldout_rel_diff"] = abs(b["heldout_loss_fp32"] - f["heldout_loss_fp32"]) / f["heldout_loss_fp32"]
    out["time_ratio"] = b["train_seconds"] / f["train_seconds"]
    return out


def gap_both(model: Any, tok: Any, n: int) -> dict[str, Any]:
    from layerselect.eval import load_solutions, reasoning_gap
    from layerselect.resources import mgsm_solutions_path
    from layerselect.texts import load_texts

    texts = load_texts("mgsm", langs=GAP_LANGS, limit=n)
    sols = load_solutions(mgsm_solutions_path(), limit=n)
    res = {}
    for p in ("fp32", "bf16"):
        t0 = time.perf_counter()
        r = reasoning_gap(model, tok, texts, sols, bootstrap=0, precision=p, batch_size=8)
        res[p] = {"nll": r["nll"], "avg_gap": r["avg_gap"], "seconds": time.perf_counter() - t0}
    res["avg_gap_diff"] = res["bf16"]["avg_gap"] - res["fp32"]["avg_gap"]
    res["nll_diff"] = {g: res["bf16"]["nll"][g] - res["fp32"]["nll"][g] for g in GAP_LANGS}
    res["time_ratio"] = res["bf16"]["seconds"] / res["fp32"]["seconds"]
    return res


def stats_both(model: Any, tok: Any, n: int) -> dict[str, Any]:
    from layerselect.precision import autocast
    from layerselect.selection import select
    from layerselect.stats import ActivationStats
    from layerselect.texts import PAPER_LANGS, load_texts

    texts = load_texts("mgsm", langs=[g for g in PAPER_LANGS if g != "te"], limit=n)
    t0 = time.perf_counter()
    s32 = ActivationStats.collect(model, tok, texts, batch_size=16, progress=False)
    t32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    with autocast("bf16", next(model.parameters()).device):
        s16 = ActivationStats.collect(model, tok, texts, batch_size=16, progress=False)
    t16 = time.perf_counter() - t0
    diff = (s16.counts - s32.counts).abs()
    sel32, sel16 = select(s32, criterion="msd"), select(s16, criterion="msd")
    return {
        "texts_per_language": n, "languages": list(texts), "counts": int(s32.counts.numel()),
        "counts_changed": int((diff > 0).sum()), "max_abs_change": int(diff.max()),
        "total_abs_change": int(diff.sum()), "firings_fp32": int(s32.counts.sum()),
        "selection_fp32": list(sel32.layers), "selection_bf16": list(sel16.layers),
        "msd_max_rel_diff": float(((s16.msd() - s32.msd()).abs() / s32.msd().abs().clamp_min(1e-30)).max()),
        "time_ratio": t16 / t32,
    }


def padding(tokenizer: Any, batch_size: int = 4, accum: int = 4, seed: int = 0) -> dict[str, Any]:
    """Padded fraction of training batches, the Trainer's random order vs LengthGroupedSampler."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from layerselect.train import build_train_dataset

    ds = build_train_dataset(pairs(200), tokenizer, 1024)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]

    def padded(order: list[int]) -> float:
        pad = total = 0
        for i in range(0, len(order) - batch_size + 1, batch_size):
            ls = [lengths[j] for j in order[i:i + batch_size]]
            pad += max(ls) * len(ls) - sum(ls)
            total += max(ls) * len(ls)
        return pad / total

    gen = torch.Generator().manual_seed(seed)
    random_order = torch.randperm(len(lengths), generator=gen).tolist()
    # The Trainer builds it with its whole optimizer-step batch (per device x accumulation).
    grouped = list(LengthGroupedSampler(batch_size * accum, lengths=lengths,
                                        generator=torch.Generator().manual_seed(seed)))
    return {"pairs": len(lengths), "batch_size": batch_size, "random": padded(random_order),
            "grouped": padded(grouped)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random Llama of this shape instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=200, help="tokens per training example (the longest pairs, cut)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--run-steps", type=int, default=40)
    p.add_argument("--run-pairs", type=int, default=120, help="pairs per language for the 40-step run")
    p.add_argument("--gap-questions", type=int, default=40)
    p.add_argument("--stats-questions", type=int, default=20)
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--skip-run", action="store_true")
    p.add_argument("--skip-gap", action="store_true")
    p.add_argument("--skip-stats", action="store_true")
    p.add_argument("--timing-only", action="store_true", help="(a)-(c) and padding only")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.shape or args.timing_only:
        args.skip_run = args.skip_gap = args.skip_stats = True

    import tempfile

    from layerselect.precision import fast_bf16

    device = torch.device(args.device)
    res: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                           "device": str(device), "fast_bf16": fast_bf16(device)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, "
          f"fast bf16: {res['fast_bf16']}", flush=True)
    peaks = {"fp32": gemm_peak(device, torch.float32), "bf16": gemm_peak(device, torch.bfloat16)}
    res["gemm_peak_gflops"] = peaks
    print(f"(a) GEMM 2048^3 peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
          f"(bf16/fp32 {peaks['bf16'] / peaks['fp32']:.2f}x)", flush=True)

    model, tok = load(args)
    model.requires_grad_(False)
    res["model"] = args.shape or args.model
    batch = step_batch(tok, args.batch, args.seq, device)

    sel = compare_steps(model, batch, full=False, rounds=args.rounds, peaks=peaks)
    res["selective_step"] = sel
    print(f"(b) selective step (layer 0 up+down, {args.batch} x {batch['input_ids'].shape[1]} tokens): "
          f"fp32 {sel['seconds']['fp32']:.3f} s, bf16 {sel['seconds']['bf16']:.3f} s, "
          f"bf16/fp32 {sel['ratio_bf16_fp32']:.2f}x; loss {sel['loss']['fp32']:.5f} vs {sel['loss']['bf16']:.5f} "
          f"(rel {sel['loss_rel_diff']:.1e})", flush=True)
    print(f"    {sel['gflop']:.1f} GFLOP per step: fp32 {sel['achieved_gflops']['fp32']:.0f} GFLOP/s "
          f"= {100 * sel['fraction_of_peak']['fp32']:.0f}% of its peak, bf16 {sel['achieved_gflops']['bf16']:.0f} "
          f"GFLOP/s = {100 * sel['fraction_of_peak']['bf16']:.0f}% of its peak", flush=True)
    if device.type == "cpu":
        res["profile_bf16"] = profile_top(model, batch, "bf16")
        print("    where a bf16 selective step spends its time (self CPU, top ops):")
        for row in res["profile_bf16"]:
            print(f"      {100 * row['share']:5.1f}%  {row['self_ms']:8.1f} ms  {row['op']}")

    if not args.skip_full:
        full = compare_steps(model, batch, full=True, rounds=max(2, args.rounds // 2), peaks=peaks)
        res["full_step"] = full
        print(f"(c) full fine-tuning step: fp32 {full['seconds']['fp32']:.3f} s, bf16 {full['seconds']['bf16']:.3f} s, "
              f"bf16/fp32 {full['ratio_bf16_fp32']:.2f}x; loss rel diff {full['loss_rel_diff']:.1e}; "
              f"bf16 at {100 * full['fraction_of_peak']['bf16']:.0f}% of its peak", flush=True)

    res["padding"] = pad = padding(tok)
    print(f"(g) padded positions in training batches of {pad['batch_size']} ({pad['pairs']} pairs): "
          f"random order {100 * pad['random']:.1f}%, grouped by length {100 * pad['grouped']:.1f}%", flush=True)

    if not args.skip_gap:
        g = gap_both(model, tok, args.gap_questions)
        res["gap"] = g
        print(f"(e) reasoning gap, {args.gap_questions} questions x {','.join(GAP_LANGS)}: avg gap fp32 "
              f"{g['fp32']['avg_gap']:+.4f}, bf16 {g['bf16']['avg_gap']:+.4f} (diff {g['avg_gap_diff']:+.4f}); "
              f"time bf16/fp32 {g['time_ratio']:.2f}x", flush=True)
        for lang in GAP_LANGS:
            print(f"    NLL {lang}: fp32 {g['fp32']['nll'][lang]:.4f}  bf16 {g['bf16']['nll'][lang]:.4f}  "
                  f"diff {g['nll_diff'][lang]:+.4f}")
    if not args.skip_stats:
        s = stats_both(model, tok, args.stats_questions)
        res["stats"] = s
        print(f"(f) activation counts under bf16 ({s['texts_per_language']} MGSM questions x "
              f"{len(s['languages'])} languages): {s['counts_changed']:,} of {s['counts']:,} counts change "
              f"(largest by {s['max_abs_change']}, {s['total_abs_change']:,} firings of {s['firings_fp32']:,}); "
              f"msd selects {s['selection_fp32']} in fp32, {s['selection_bf16']} in bf16; "
              f"time bf16/fp32 {s['time_ratio']:.2f}x", flush=True)
    del model
    if not args.skip_run:
        with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
            r = run_40_steps(args, Path(tmp))
        res["run_40_steps"] = r
        print(f"(d) {r['steps']}-step train_slam run ({r['train_pairs']} pairs): final loss fp32 "
              f"{r['fp32']['final_loss']:.4f}, bf16 {r['bf16']['final_loss']:.4f} (rel {r['final_loss_rel_diff']:.2%}); "
              f"mean of the last 10 rel {r['last10_rel_diff']:.2%}; held-out loss (fp32) "
              f"{r['fp32']['heldout_loss_fp32']:.4f} vs {r['bf16']['heldout_loss_fp32']:.4f} "
              f"(rel {r['heldout_rel_diff']:.2%}); time bf16/fp32 {r['time_ratio']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Device check: layerselect's costs on a model of Llama-2-7B's shape, randomly initialised.

Run through ``benchmarks/device_check.sh`` on a CUDA machine (no download: the
model is built with ``from_config`` in bfloat16 directly on the GPU, the
tokenizer is the tiny offline BPE of ``tests/tiny.py``). Measures, in one process:

(a) ``ActivationStats.collect`` vs a plain forward of the decoder trunk, same batches;
(b) one SLAM training step (layers 0-5, up+down, AdamW) with the standard
    full-logits loss vs the label-only loss (``layerselect.loss``), half of each
    sequence labelled;
(c) full fine-tuning (every weight, AdamW, standard loss) for comparison;

and prints time per step, peak device memory and the ratios. ``--tiny`` (or
``LAYERSELECT_DEVICE_CHECK_TINY=1``) uses a small config so the script can be
tested on a CPU in seconds.

    python benchmarks/device_check.py            # CUDA, Llama-2-7B shape, bf16
    python benchmarks/device_check.py --tiny     # any machine, small shape
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny.py: offline tokenizer

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=32000, hidden_size=128, intermediate_size=344, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _timed(fn, device: torch.device, steps: int) -> tuple[float, float]:
    """Median seconds of ``fn()`` over ``steps`` calls after one warm-up, and the peak memory (GiB)."""
    fn()
    _sync(device)
    _reset_peak(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), _peak_gb(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("LAYERSELECT_DEVICE_CHECK_TINY") == "1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", default="0,1,2,3,4,5")
    p.add_argument("--skip-full", action="store_true", help="skip full fine-tuning")
    args = p.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from layerselect import ActivationStats
    from layerselect.loss import label_only_loss
    from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model
    from tiny import tiny_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 64)
    shape = TINY if args.tiny else LLAMA2_7B
    config = AutoConfig.for_model("llama", **shape)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; model: llama {'(tiny)' if args.tiny else 'Llama-2-7B shape'}, "
          f"{n_params / 1e9:.2f}B parameters, {dtype}, built in {time.perf_counter() - t0:.1f} s", flush=True)

    # (a) collect vs plain forward -------------------------------------------------------------
    tok = tiny_tokenizer()
    words = "Janet has ducks that lay eggs every day and she sells them at the market for two dollars".split()  # noqa: SIM905
    n_texts = 8 if args.tiny else 64
    texts = {g: [" ".join(words[(i + j) % len(words)] for j in range(20 + 3 * i)) for i in range(n_texts)]
             for g in ("en", "de", "sw", "zh")}
    bs = 4 if args.tiny else 32
    model.eval()

    def collect() -> None:
        ActivationStats.collect(model, tok, texts, batch_size=bs, progress=False)

    seqs = [tok(t)["input_ids"] for items in texts.values() for t in items]
    batches = []
    for i in range(0, len(seqs), bs):
        chunk = seqs[i:i + bs]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        batches.append((ids, mask))

    @torch.no_grad()
    def plain() -> None:
        for ids, mask in batches:
            model.model(input_ids=ids, attention_mask=mask)

    t_plain, m_plain = _timed(plain, device, args.steps)
    t_coll, m_coll = _timed(collect, device, args.steps)
    print(f"(a) collect {t_coll:.3f} s vs plain trunk forward {t_plain:.3f} s: ratio {t_coll / t_plain:.3f}; "
          f"peak {m_coll:.1f} vs {m_plain:.1f} GiB", flush=True)

    # (b) SLAM step, standard vs label-only --------------------------------------------------------
    layers = [int(x) for x in args.layers.split(",") if int(x) < shape["num_hidden_layers"]]
    slam = get_slam_model(model, SelectiveFFNConfig(layers=layers))
    model.train()
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, min(shape["vocab_size"], 30000), (args.batch, args.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # the prompt half carries no label, as in SLAM's translation data
    opt = torch.optim.AdamW([p for p in slam.parameters() if p.requires_grad], lr=1e-5)

    def step(loss_fn) -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def standard():
        return slam(input_ids=ids, attention_mask=mask, labels=labels).loss

    def label_only():
        return label_only_loss(slam, ids, labels, mask, label_only=True).loss

    with torch.no_grad():
        a, b = standard(), label_only()
    print(f"    loss standard {float(a):.6f} vs label-only {float(b):.6f} (rel diff {abs(float(a - b)) / float(a):.1e})")
    tokens = args.batch * args.seq
    res = {}
    for mode, fn in (("standard", standard), ("label-only", label_only), ("standard", standard)):
        t, m = _timed(lambda fn=fn: step(fn), device, args.steps)
        if mode not in res or t < res[mode][0]:  # standard runs before and after: best of the two
            res[mode] = (t, m)
    n_train = sum(p.numel() for p in slam.parameters() if p.requires_grad)
    for mode, (t, m) in res.items():
        print(f"(b) SLAM step layers {layers} ({n_train / 1e6:.0f}M trainable), {mode:<10}: {t:.3f} s/step, "
              f"{tokens / t:,.0f} tokens/s, peak {m:.1f} GiB")
    ts, ms = res["standard"]
    tl, ml = res["label-only"]
    print(f"    label-only / standard: time {tl / ts:.3f}x, peak memory {ml / ms:.3f}x", flush=True)
    del opt

    # (c) full fine-tuning ----------------------------------------------------------------------------
    if not args.skip_full:
        model.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        t, m = _timed(lambda: step(standard), device, args.steps)
        print(f"(c) full fine-tuning ({n_params / 1e9:.2f}B trainable): {t:.3f} s/step, {tokens / t:,.0f} tokens/s, "
              f"peak {m:.1f} GiB; SLAM label-only / full: time {tl / t:.3f}x, peak {ml / m:.3f}x")
        print(f"    SLAM standard / full: time {ts / t:.3f}x, peak {ms / m:.3f}x")


if __name__ == "__main__":
    main()

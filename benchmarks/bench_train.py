"""Wall time per optimizer step and samples/s: selected-layer FFN training vs full fine-tuning.

Both runs use the same model, data, batch, sequence length and HF Trainer, in one
process, one after the other; the first ``--warmup`` steps of each are not timed.
Wall time and process CPU time are both reported: on a shared machine the wall time
mostly measures the scheduler, while CPU time (with ``--threads 1``) measures the work.

    python benchmarks/bench_train.py --model gemma-3-270m --layers 0 --steps 6 --batch-size 8 --max-length 128

Prints a table and writes JSON to ``--out`` (default ``runs/bench_train.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from layerselect.data import TranslationCollator, TranslationDataset, load_translation_data
from layerselect.models import load_model
from layerselect.selective_ffn.config import SelectiveFFNConfig
from layerselect.selective_ffn.model import get_slam_model
from layerselect.texts import default_data_dir
from layerselect.train import default_training_args


class StepTimer(TrainerCallback):
    """Records wall time of every optimizer step (forward+backward of all micro-batches + update)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._t = self._c = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)
        self.cpu_times.append(time.process_time() - self._c)


def run(model, tokenizer, dataset, args, out_dir: str) -> dict:
    timer = StepTimer()
    targs = default_training_args(
        out_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=2e-5, warmup_steps=0, save_strategy="no",
        logging_steps=1000, use_cpu=args.device == "cpu", disable_tqdm=True, seed=0,
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                      data_collator=TranslationCollator.for_tokenizer(tokenizer), callbacks=[timer])
    trainer.train()
    timed = timer.times[args.warmup:]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = statistics.median(timed)
    cpu = statistics.median(timer.cpu_times[args.warmup:])
    return {"trainable_params": trainable, "step_s_median": step, "step_s_all": timed,
            "samples_per_s": args.batch_size / step, "cpu_s_median": cpu,
            "samples_per_cpu_s": args.batch_size / cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--layers", default="0", help="comma-separated layers for the selective run")
    p.add_argument("--data", default=None, help="pairs:DIR (default: $LAYERSELECT_DATA_DIR/gsm8kinstruct_question)")
    p.add_argument("--langs", default="de,sw,zh")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/bench_train.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or f"pairs:{(default_data_dir() or Path('../shared/data')) / 'gsm8kinstruct_question'}"
    n = args.batch_size * (args.steps + args.warmup)
    langs = args.langs.split(",")
    pairs = load_translation_data(data, langs=langs, max_pairs=-(-n // len(langs)))
    results = {}
    for name in ("selective", "full"):
        model, tok = load_model(args.model, device=args.device)
        ds = TranslationDataset(pairs, tok, max_length=args.max_length)
        if name == "selective":
            layers = [int(x) for x in args.layers.split(",")]
            slam = get_slam_model(model, SelectiveFFNConfig(layers=layers))
            model = slam.model
        else:
            for prm in model.parameters():
                prm.requires_grad_(True)
        model.train()
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = run(model, tok, ds, args, tmp)
        print(f"{name}: {results[name]['step_s_median']:.2f} s/step", file=sys.stderr, flush=True)
        del model
    tokens = sum(min(len(f["input_ids"]), args.max_length) for f in ds.features[: n])
    meta = {"model": args.model, "layers": args.layers, "batch_size": args.batch_size,
            "max_length": args.max_length, "steps_timed": args.steps, "warmup": args.warmup,
            "mean_tokens_per_example": tokens / min(n, len(ds)), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "command": " ".join(sys.argv)}
    print(f"| run | trainable params | wall s / optimizer step (median of {args.steps}) | samples/s "
          "| CPU s / step | samples / CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['trainable_params']:,} | {r['step_s_median']:.2f} | {r['samples_per_s']:.2f} "
              f"| {r['cpu_s_median']:.2f} | {r['samples_per_cpu_s']:.2f} |")
    speedup = results["full"]["step_s_median"] / results["selective"]["step_s_median"]
    cpu_speedup = results["full"]["cpu_s_median"] / results["selective"]["cpu_s_median"]
    print(f"selective vs full per step: {speedup:.2f}x wall, {cpu_speedup:.2f}x CPU time ({meta})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "speedup_wall": speedup, "speedup_cpu": cpu_speedup}, indent=1) + "\n")


if __name__ == "__main__":
    main()

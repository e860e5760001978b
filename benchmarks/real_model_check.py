"""Real-model check of one-stage alignment: before/after held-out translation loss, English-only loss,
and average overlap with English in the selected layers; SLAM vs all-layer FFN vs LoRA at equal steps.

    python benchmarks/real_model_check.py --model gemma-3-270m --layers 0 --steps 40 \\
        --batch-size 8 --max-length 128 --eval-per-lang 20 --runs slam,all_ffn,lora

Pairs come from ``gsm8kinstruct_question``; 200 pairs per language are held out (``--holdout``) and the
first ``--eval-per-lang`` of them per language are evaluated (the evaluation is the slow part on CPU).
Layers: ``--layers 0`` (what msd selects for Gemma-3-270M on MGSM, DESIGN.md), or ``--selection FILE``.
Writes ``--out`` (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from layerselect.data import filter_examples, load_translation_data, split_holdout
from layerselect.models import load_model
from layerselect.selective_ffn.config import SelectiveFFNConfig
from layerselect.stats import ActivationStats
from layerselect.texts import default_data_dir
from layerselect.train import (
    SLAMTrainer,
    build_train_dataset,
    default_training_args,
    plain_text_features,
    train_slam,
    translation_loss,
)


def measure(model, tok, heldout, layers, max_length) -> dict:
    """Held-out translation loss, English-only LM loss, and AVG overlap with English in ``layers``."""
    t = time.perf_counter()
    model.eval()
    english = [ex.target for ex in heldout]
    texts: dict[str, list[str]] = {}
    for ex in heldout:
        texts.setdefault(ex.lang, []).append(ex.source)
    texts["en"] = english[: max(len(v) for v in texts.values())]
    stats = ActivationStats.collect(model, tok, texts, layers=layers, progress=False, max_length=max_length)
    avg = stats.overlap(reference="en").average
    return {
        "translation_loss": translation_loss(model, tok, heldout, max_length=max_length),
        "english_loss": translation_loss(model, tok, plain_text_features(english, tok, max_length)),
        "overlap_avg_selected": float(avg.mean()),
        "overlap_avg_per_layer": {int(layer): float(v) for layer, v in zip(stats.layers, avg)},
        "seconds": time.perf_counter() - t,
    }


def train_lora(model, tok, pairs, targs, r: int) -> int:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    from layerselect.data import TranslationCollator

    trainer = SLAMTrainer(model=peft_model, args=targs, train_dataset=build_train_dataset(pairs, tok, 128),
                          data_collator=TranslationCollator.for_tokenizer(tok))
    trainer.train()
    peft_model.merge_and_unload()
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--layers", default="0")
    p.add_argument("--selection", default=None, help="selection.json (overrides --layers)")
    p.add_argument("--data", default=None)
    p.add_argument("--langs", default="de,es,fr,ja,ru,sw,zh")
    p.add_argument("--holdout", type=int, default=200)
    p.add_argument("--eval-per-lang", type=int, default=20)
    p.add_argument("--train-per-lang", type=int, default=500)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-lr", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--runs", default="slam,all_ffn,lora")
    p.add_argument("--overlap-layers", default=None,
                   help="layers whose overlap is measured (default: the selected ones and the 4 above; "
                        "the lowest trained layer's own firing cannot change with up/down targets)")
    p.add_argument("--out", default="runs/real_model_check.json")
    args = p.parse_args()
    data = args.data or f"pairs:{(default_data_dir() or Path('../shared/data')) / 'gsm8kinstruct_question'}"
    langs = args.langs.split(",")
    pairs = load_translation_data(data, langs=langs)
    train, held = split_holdout(pairs, per_lang=args.holdout, seed=0)
    held_eval = [ex for lang in langs for ex in [e for e in held if e.lang == lang][: args.eval_per_lang]]
    train, report = filter_examples(train)
    train = [ex for lang in langs for ex in [e for e in train if e.lang == lang][: args.train_per_lang]]
    print(f"filter: {report}; training pool {len(train)}; held out {len(held)}, evaluated {len(held_eval)}",
          file=sys.stderr, flush=True)
    if args.selection:
        layers = [int(x) for x in json.loads(Path(args.selection).read_text())["layers"]]
    else:
        layers = [int(x) for x in args.layers.split(",")]

    model, tok = load_model(args.model)
    n_layers = model.config.num_hidden_layers
    if args.overlap_layers:
        overlap_layers = [int(x) for x in args.overlap_layers.split(",")]
    else:
        overlap_layers = list(range(min(layers), min(n_layers, max(layers) + 5)))
    results: dict = {"config": vars(args) | {"layers_selected": layers, "overlap_layers": overlap_layers, "train_pool": len(train),
                                             "heldout_total": len(held), "heldout_evaluated": len(held_eval),
                                             "filter": report.to_dict()}}
    results["before"] = measure(model, tok, held_eval, overlap_layers, args.max_length)
    print(f"before: {results['before']}", file=sys.stderr, flush=True)
    del model
    for run in args.runs.split(","):
        model, tok = load_model(args.model)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            kw = dict(max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                      gradient_accumulation_steps=1, warmup_steps=0.1, save_strategy="no", use_cpu=True,
                      disable_tqdm=True, seed=0, logging_steps=5)
            if run == "lora":
                targs = default_training_args(tmp, learning_rate=args.lora_lr, **kw)
                trainable = train_lora(model, tok, train, targs, args.lora_r)
            else:
                run_layers = layers if run == "slam" else list(range(n_layers))
                cfg = SelectiveFFNConfig(layers=run_layers)
                train_slam(model, tok, train, cfg, output_dir=tmp, learning_rate=args.lr,
                           max_length=args.max_length, **kw)
                trainable = json.loads((Path(tmp) / "train_summary.json").read_text())["trainable_parameters"]
        train_s = time.perf_counter() - t
        res = measure(model, tok, held_eval, overlap_layers, args.max_length)
        res.update(trainable_params=trainable, train_seconds=train_s, steps=args.steps)
        results[run] = res
        print(f"{run}: {res}", file=sys.stderr, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        del model
    b = results["before"]
    print(f"| run | trainable params | held-out translation loss | English-only loss | AVG overlap, layers {overlap_layers} |")
    print("|---|---:|---:|---:|---:|")
    print(f"| before | - | {b['translation_loss']:.4f} | {b['english_loss']:.4f} | {b['overlap_avg_selected']:.4f} |")
    for run in args.runs.split(","):
        r = results[run]
        de = 100 * (r["english_loss"] / b["english_loss"] - 1)
        print(f"| {run} ({r['steps']} steps, {r['train_seconds']:.0f}s) | {r['trainable_params']:,} | "
              f"{r['translation_loss']:.4f} | {r['english_loss']:.4f} ({de:+.1f}%) | {r['overlap_avg_selected']:.4f} |")
    runs = ["before", *args.runs.split(",")]
    print(f"\n| layer | {' | '.join(runs)} |")
    print("|---:|" + "---:|" * len(runs))
    for layer in overlap_layers:
        cells = " | ".join(f"{results[r]['overlap_avg_per_layer'][layer]:.4f}" for r in runs)
        mark = " (trained)" if layer in layers else ""
        print(f"| {layer}{mark} | {cells} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

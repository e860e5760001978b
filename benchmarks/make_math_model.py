"""The paper's starting point, made here: a math-tuned Gemma-3-270M (our MetaMath analogue).

SLAM is applied in the paper to MetaMath, a model already fine-tuned on English math
solutions. This script makes the analogue through the library's own training path
(``layerselect.train.train_model``): Gemma-3-270M fine-tuned on GSM8K-train, question ->
English solution, with the loss on the solution tokens only, in exactly the prompt the
reasoning gap scores (:func:`layerselect.eval.gap_item`, the paper's Table 8 prompt), plus
EOS so the model learns to stop.

- Data: ``gsm8k_train_solutions.jsonl`` (7,473 problems, MIT). The last 200 problems
  (indices 7273-7472) are the *English dev set* and never train; MGSM is never trained on.
- Method: LoRA (r 16, alpha 32, every linear layer of the decoder), merged into the weights
  at the end, so the result is a plain checkpoint like MetaMath. Why not full fine-tuning:
  on this CPU a LoRA step costs 0.43x a full step (16 s vs 37 s in fp32, docs/results.md),
  and full fine-tuning would also train the 168M-parameter tied embedding (62% of the model).
- Resumable: Trainer checkpoints in ``WORK/checkpoints`` (every ``--save-steps``); the
  measures before training are kept in the report and not recomputed; a finished model in
  the cache is not trained again.
- Output: the merged model in ``$LAYERSELECT_CACHE/models/NAME`` (outside the repo; load it
  with ``load_model(NAME)``-style paths or pass the folder to ``--model``), and a report JSON
  (costs, dev NLL, NLL_en on the 250 MGSM English solutions, the average reasoning gap
  before and after) in ``--report``.

    PYTHONPATH=src python3 benchmarks/make_math_model.py \\
        --report docs/results/gemma-3-270m-gsm8k/math_model.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEV_SIZE = 200


def build_parser() -> argparse.ArgumentParser:
    from layerselect.texts import default_data_dir

    data = default_data_dir()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--name", default="gemma-3-270m-gsm8k", help="the cached model's folder name")
    p.add_argument("--data", default=str(data / "gsm8k_train" / "gsm8k_train_solutions.jsonl") if data else None)
    p.add_argument("--mgsm", default=str(data / "mgsm") if data else None)
    p.add_argument("--solutions", default=str(data / "mgsm_solutions" / "mgsm_en_solutions.jsonl") if data else None)
    p.add_argument("--gap-langs", default="en,de,fr,ru,zh,ja,sw,th")
    p.add_argument("--gap-questions", type=int, default=60, help="MGSM questions per language for the average gap")
    p.add_argument("--nll-questions", type=int, default=250, help="MGSM English solutions for NLL_en")
    p.add_argument("--dev-size", type=int, default=DEV_SIZE, help="dev problems measured (of the 200 held out)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="checkpoints (default: $LAYERSELECT_CACHE/experiments/NAME)")
    p.add_argument("--report", required=True)
    return p


def read_problems(path: str) -> list[dict[str, Any]]:
    """GSM8K-train records, checked: index, question and solution present, indices 0..n-1 in order."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) \
                    or not isinstance(rec.get("solution"), str) or rec.get("index") != len(rows):
                raise SystemExit(f"{path}:{line_no}: not a GSM8K record in order (index, question, solution)")
            rows.append(rec)
    return rows


def sft_features(tokenizer: Any, problems: list[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Prompt(question) + " " + solution + EOS; labels on the solution and EOS only (the gap's own tokens)."""
    from layerselect.eval import gap_item

    out = []
    for rec in problems:
        ids, target = gap_item(tokenizer, rec["question"], rec["solution"])
        ids, target = ids + [tokenizer.eos_token_id], target + [True]
        if len(ids) > max_length:
            continue  # a truncated solution would teach the model to stop mid-way
        out.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, target)],
                    "attention_mask": [1] * len(ids)})
    return out


def measures(model: Any, tokenizer: Any, args: argparse.Namespace, dev: list[dict[str, Any]]) -> dict[str, Any]:
    """Dev NLL (English GSM8K-train, held out), NLL_en on the 250 MGSM solutions, the average gap."""
    from layerselect.eval import MGSM, load_solutions, reasoning_gap
    from layerselect.train import translation_loss

    t0 = time.perf_counter()
    model.eval()
    dev_feats = sft_features(tokenizer, dev[: args.dev_size], 10**6)
    for f in dev_feats:  # the dev NLL scores the solution, as the gap does (not the EOS)
        f["labels"][-1] = -100
    task = MGSM()
    en = [e.question for e in task.load(args.mgsm, "en", args.nll_questions)]
    all_solutions = load_solutions(args.solutions, limit=max(args.nll_questions, args.gap_questions))
    nll_en = reasoning_gap(model, tokenizer, {"en": en}, all_solutions[: len(en)], batch_size=args.eval_batch_size,
                           bootstrap=0, precision=args.precision)
    langs = args.gap_langs.split(",")
    questions = {g: [e.question for e in task.load(args.mgsm, g, args.gap_questions)] for g in langs}
    gap = reasoning_gap(model, tokenizer, questions, all_solutions[: args.gap_questions],
                        batch_size=args.eval_batch_size, bootstrap=1000, seed=args.seed, precision=args.precision)
    return {
        "dev_nll": translation_loss(model, tokenizer, dev_feats, batch_size=args.eval_batch_size,
                                    precision=args.precision),
        "nll_en_mgsm": nll_en["nll"]["en"], "nll_questions": len(en),
        "gap_questions": args.gap_questions,
        "nll": gap["nll"], "gap": gap["gap"], "avg_gap": gap["avg_gap"],
        "avg_gap_interval": gap["avg_gap_interval"], "precision": gap["precision"],
        "seconds": time.perf_counter() - t0,
    }


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_merged(model: Any, tokenizer: Any, target: Path) -> None:
    """The merged model and tokenizer, written whole into a scratch folder, then renamed into place."""
    scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    os.replace(scratch, target)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data is None or args.mgsm is None or args.solutions is None:
        raise SystemExit("the shared data was not found; pass --data, --mgsm and --solutions")
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers.trainer_utils import get_last_checkpoint

    from layerselect.models import cache_dir, load_model
    from layerselect.precision import resolve_precision
    from layerselect.train import train_model

    target = cache_dir() / "models" / args.name
    work = Path(args.work) if args.work else cache_dir() / "experiments" / args.name
    report_path = Path(args.report)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    problems = read_problems(args.data)
    train_rows, dev = problems[:-DEV_SIZE], problems[-DEV_SIZE:]
    model, tokenizer = load_model(args.model)
    args.precision = resolve_precision(args.precision, torch.device("cpu"), torch.float32)
    settings = {k: getattr(args, k) for k in ("model", "steps", "batch_size", "grad_accum", "lr", "lora_r",
                                              "max_length", "seed", "precision", "gap_langs", "gap_questions",
                                              "nll_questions", "dev_size")}
    if report.get("settings") not in (None, settings):
        raise SystemExit(f"{report_path} was made with other settings; move it away to start again")
    report.update(settings=settings, dev=f"GSM8K-train indices {len(train_rows)}-{len(problems) - 1} "
                  f"({DEV_SIZE} problems, never trained on)", method="LoRA merged into the weights")
    if "before" not in report:
        print("[math-model] measuring the base model", file=sys.stderr)
        report["before"] = measures(model, tokenizer, args, dev)
        write_json(report_path, report)
    if not (target / "config.json").is_file():
        features = sft_features(tokenizer, train_rows, args.max_length)
        report["train_examples"] = len(features)
        report["train_dropped_too_long"] = len(train_rows) - len(features)
        lora = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
        ckpt_dir = work / "checkpoints"
        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        t0 = time.perf_counter()
        train_model(lora, tokenizer, features, output_dir=ckpt_dir, save_final=False, resume_from_checkpoint=last,
                    precision=args.precision, data_order="length", max_steps=args.steps,
                    per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
                    max_grad_norm=1.0, seed=args.seed, logging_steps=5, save_strategy="steps",
                    save_steps=args.save_steps, save_total_limit=1, max_length=args.max_length,
                    use_cpu=not torch.cuda.is_available())
        summary = json.loads((ckpt_dir / "train_summary.json").read_text())
        report["training"] = {k: summary[k] for k in ("steps", "trainable_parameters", "trainable_percent",
                                                      "train_loss", "effective_batch_size", "precision")}
        walls = summary["step_seconds"]
        report["training"]["s_per_step"] = sum(walls[1:]) / max(len(walls) - 1, 1) if walls else None
        report["training"]["seconds_this_process"] = time.perf_counter() - t0
        report["training"]["resumed_from_step"] = summary.get("resumed_from_step")
        model = lora.merge_and_unload()
        save_merged(model, tokenizer, target)
        write_json(report_path, report)
    if "after" not in report:
        model, tokenizer = load_model(str(target))
        print("[math-model] measuring the math-tuned model", file=sys.stderr)
        report["after"] = measures(model, tokenizer, args, dev)
        write_json(report_path, report)
    b, a = report["before"], report["after"]
    print(f"dev NLL {b['dev_nll']:.4f} -> {a['dev_nll']:.4f}; NLL_en (MGSM) {b['nll_en_mgsm']:.4f} -> "
          f"{a['nll_en_mgsm']:.4f}; avg gap {b['avg_gap']:+.4f} -> {a['avg_gap']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

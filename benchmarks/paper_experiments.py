"""The paper's experiments in one resumable command: SLAM, its ablations and baselines, measured alike.

Every run starts from the same fresh base, trains through ``layerselect.train.train_model``
(the loop ``layerselect train`` runs; selective, LoRA and full fine-tuning are just
different models handed to it) on the same X->English pairs (same order, steps, batch,
learning rate; AdamW, no weight decay, constant lr, gradient norm clipped at 1,
label-only loss) and is measured the same way:

- held-out translation loss (pairs held out of training; the lr is chosen on these,
  never on MGSM: ``--lr-grid``), and English-only LM loss on the English side of
  those pairs (forgetting);
- the reasoning gap (:func:`layerselect.eval.reasoning_gap`) per language, its
  average and bootstrap intervals;
- the average overlap with English per layer (paper Fig. 6);
- trainable parameters, seconds per optimizer step, peak memory (each run in its
  own process by default, so the peak RSS is that run's).

Runs: ``base`` (no training, the reference row, always first; it also computes the
activation statistics and the msd selection), ``slam`` (msd layers, up+down),
``slam_gate`` (msd layers, gate+up+down), ``attn`` and ``attn_ffn`` (msd layers,
attention / attention + gate+up+down; Fig. 5), ``first_n``, ``random`` (3 seeds),
``last_n`` (as many layers as msd picks, up+down), ``all_ffn`` (up+down of every
layer), ``lora`` (peft LoRA r=8, alpha 16, all linear layers) and ``full``.

One JSON per run in ``--out/runs``; finished runs are skipped on restart. A run
interrupted mid-way starts again, unless ``--checkpoint-every N`` had the Trainer save
its checkpoint (trained tensors, optimizer, RNG) to ``--out/checkpoints/NAME`` every N
steps and after the last one: then it resumes there (a run killed while being measured
is measured again, not trained again). ``--choose-lr RUN=LR/LR/...`` chooses a run's lr
before the table: on the held-out translation loss, or on the English dev NLL for
the runs that end on solutions (``translate_train``, ``two_stage``); a finished row at
one of the grid's lrs counts as that trial, and with ``--checkpoint-every`` a ``full``
trial's trained model is ``two_stage``'s first stage at the same lr (not trained twice).
``--save-adapters`` keeps each selective and LoRA run's trained adapter in
``--out/adapters/NAME``. ``--table`` writes the markdown report from the JSONs.

    PYTHONPATH=src python3 benchmarks/paper_experiments.py --model gemma-3-270m --steps 300 \\
        --batch-size 4 --grad-accum 4 --out docs/results/gemma-3-270m
    PYTHONPATH=src python3 benchmarks/paper_experiments.py --out docs/results/gemma-3-270m \\
        --table docs/results.md
    PYTHONPATH=src python3 benchmarks/paper_experiments.py --quick --model DIR --out /tmp/x   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ALL_RUNS = ("slam", "slam_gate", "attn", "attn_ffn", "first_n", "random", "last_n", "all_ffn", "lora", "full")
# The paper-protocol runs (docs/results.md, "paper protocol"): they need --english-sft (GSM8K-train
# solutions), so they are asked for by name, never run by default.
PROTOCOL_RUNS = ("slam_guard", "translate_train", "two_stage")
KNOWN_RUNS = (*ALL_RUNS, *PROTOCOL_RUNS)
# Optional settings: recorded only when set, so the records made before them stay valid.
_OPTIONAL_SETTING_KEYS = ("english_sft", "english_dev", "first_n_fraction", "lr_by_run", "retain_tolerance",
                          "retain_every")
GAP_LANGS = ("en", "de", "fr", "es", "ru", "zh", "ja", "sw", "th", "bn")
TRAIN_LANGS = ("de", "es", "fr", "ja", "ru", "sw", "zh")
# Settings that may differ between the runs of one table: each run's record holds its own lr,
# and that lr is compared instead (so choosing one run's lr later keeps the other rows).
_PER_RUN_SETTING_KEYS = ("lr_by_run",)
# Settings that must match for a saved run to be reused.
_SETTING_KEYS = (
    "model", "dtype", "train_data", "train_langs", "heldout_per_lang", "steps", "batch_size", "grad_accum",
    "lr", "max_length", "seed", "gap_langs", "gap_questions", "stats_questions", "bootstrap",
)


# ----------------------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    from layerselect.texts import default_data_dir

    data = default_data_dir()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 autocast for training and measures where the hardware is fast at it (auto), or "
                        "forced; statistics always count in fp32. Recorded in settings (absent = fp32)")
    p.add_argument("--train-data", default=str(data / "gsm8kinstruct_question") if data else None)
    p.add_argument("--train-langs", default=",".join(TRAIN_LANGS))
    p.add_argument("--heldout-per-lang", type=int, default=30)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-grid", default=None,
                   help="comma-separated lrs: train slam with each and keep the best held-out translation loss")
    p.add_argument("--lr-grid-only", action="store_true",
                   help="with --lr-grid or --choose-lr: choose the lrs (lr_search.json, lr_search/RUN.json) and "
                        "stop (choose the lr for a longer run elsewhere)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=",".join(ALL_RUNS), help=f"comma-separated among {','.join(ALL_RUNS)}")
    p.add_argument("--random-seeds", default="0,1,2")
    p.add_argument("--mgsm", default=str(data / "mgsm") if data else None)
    p.add_argument("--solutions", default=str(data / "mgsm_solutions" / "mgsm_en_solutions.jsonl") if data else None)
    p.add_argument("--gap-langs", default=",".join(GAP_LANGS))
    p.add_argument("--gap-questions", type=int, default=250)
    p.add_argument("--stats-questions", type=int, default=100, help="MGSM questions per language for the statistics")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--english-sft", default=None, metavar="JSONL",
                   help="GSM8K-train solutions (gsm8k_train_solutions.jsonl): enables the English dev NLL column "
                        "(its last --english-dev problems, never trained on) and the runs that train on solutions "
                        f"({', '.join(PROTOCOL_RUNS)})")
    p.add_argument("--english-dev", type=int, default=None, metavar="N",
                   help="with --english-sft: the last N problems are the English dev set (default 200)")
    p.add_argument("--first-n-fraction", type=float, default=None, metavar="F",
                   help="first_n trains round(F x layers) layers (the paper: 6/32) instead of as many as msd picks")
    p.add_argument("--lr-by-run", default=None, metavar="RUN=LR,...",
                   help="a learning rate per run (e.g. full=2e-5,two_stage=2e-5); the others use --lr")
    p.add_argument("--choose-lr", default=None, metavar="RUN=LR/LR/...,...",
                   help="choose a run's lr on held-out data before the table (e.g. full=1e-5/2e-5/5e-5): the "
                        "held-out translation loss, or the English dev NLL for translate_train and two_stage; "
                        "one JSON per trial in --out/lr_search/RUN; the chosen lr joins --lr-by-run")
    p.add_argument("--retain-tolerance", type=float, default=None,
                   help="slam_guard: relative rise of the English dev NLL that stops training (default 0.01)")
    p.add_argument("--retain-every", type=int, default=None, help="slam_guard: measure every N steps (default 10)")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a tiny budget for a smoke test (2 steps, 4 questions)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each run in its own process (default; gives per-run peak memory)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # worker mode: one run
    p.add_argument("--table", default=None, metavar="MD", help="write the markdown report from --out's JSONs")
    p.add_argument("--notes", default=None, help="--table: a markdown file appended as 'What it shows'")
    p.add_argument("--overwrite", action="store_true", help="discard finished runs made with other settings")
    p.add_argument("--save-adapters", action="store_true",
                   help="write each selective and LoRA run's trained adapter to --out/adapters/NAME "
                        "(layerselect's or PEFT's format; `layerselect eval/plot --adapter` loads the former)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save the run's trained tensors and optimizer every N steps and after the last (to "
                        "--out/checkpoints) and "
                        "resume an interrupted run from there; 0 (default) restarts interrupted runs")
    return p


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: the smallest budget that still runs every code path."""
    args.steps, args.batch_size, args.grad_accum = 2, 2, 1
    args.heldout_per_lang, args.gap_questions, args.stats_questions = 2, 4, 4
    args.bootstrap = 20
    if args.max_length == build_parser().get_default("max_length"):  # an explicit --max-length stays
        args.max_length = 128


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    out = {k: getattr(args, k) for k in _SETTING_KEYS}
    for key in _OPTIONAL_SETTING_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = Path(value).name if key == "english_sft" else value
    precision = resolved_precision(args)
    if precision != "fp32":  # absent = fp32: the records made before the option stay valid
        out["precision"] = precision
    # The data folder's name, not where this machine keeps it: results stay resumable on another checkout.
    if out.get("train_data"):
        out["train_data"] = Path(str(out["train_data"])).name
    return out


def resolved_precision(args: argparse.Namespace) -> str:
    """``fp32`` or ``bf16``: what ``--precision`` means on this machine."""
    from layerselect.precision import resolve_precision

    return resolve_precision(getattr(args, "precision", "fp32"), "cuda" if torch.cuda.is_available() else "cpu")


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # truncated or not JSON: treated as not ours
        return None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _csv(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the per-run keys: what every run of one table shares."""
    return {k: v for k, v in settings.items() if k not in _PER_RUN_SETTING_KEYS}


def record_lr(record: dict[str, Any]) -> float | None:
    """The lr a finished run (or trial) trained at; records without one trained at the table's ``--lr``."""
    return record.get("lr", (record.get("settings") or {}).get("lr"))


def is_current(record: Any, name: str, args: argparse.Namespace) -> bool:
    """Whether a finished run's record stands for run ``name`` under these options (same settings and lr)."""
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict) or record.get("run") != name:
        return False
    if comparable(record["settings"]) != comparable(settings_of(args)):  # the table's --lr included
        return False
    return name == "base" or record_lr(record) == run_args(name, args).lr


def parse_lr_map(value: str | None, option: str, grid: bool = False) -> dict[str, Any]:
    """``RUN=LR,...`` (or ``RUN=LR/LR/...`` with ``grid``) checked: known runs, positive numbers, no repeats."""
    out: dict[str, Any] = {}
    for item in _csv(value or ""):
        name, sep, lrs = item.partition("=")
        name = name.strip()
        if not sep or name not in KNOWN_RUNS:
            raise SystemExit(f"{option}: {item!r} is not RUN=LR with RUN one of {', '.join(KNOWN_RUNS)}")
        if name in out:
            raise SystemExit(f"{option} names {name!r} twice")
        try:
            values = [float(x) for x in lrs.split("/")] if grid else [float(lrs)]
        except ValueError:
            raise SystemExit(f"{option}: {item!r}: learning rates must be numbers, e.g. {name}=2e-5") from None
        if not values or any(not v > 0 for v in values):  # also NaN
            raise SystemExit(f"{option}: {item!r}: learning rates must be positive")
        if len({f"{v:g}" for v in values}) < len(values):  # trial files are named by the lr's %g
            raise SystemExit(f"{option}: {item!r}: two learning rates are the same to 6 digits")
        if grid and name == "random":
            raise SystemExit(f"{option}: random's seeds train at --lr, slam's; choose that one with --lr-grid")
        out[name] = values if grid else values[0]
    return out


def with_run_lr(args: argparse.Namespace, name: str, lr: float) -> argparse.Namespace:
    """``args`` whose ``--lr-by-run`` trains run ``name`` at ``lr`` (the other runs unchanged)."""
    lrs = {k: repr(v) for k, v in parse_lr_map(args.lr_by_run, "--lr-by-run").items()}
    lrs[name] = repr(float(lr))
    out = argparse.Namespace(**vars(args))
    out.lr_by_run = ",".join(f"{k}={v}" for k, v in lrs.items())
    return out


def expand_runs(runs: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """Run names in order, ``random`` expanded to ``random_s{seed}``; ``base`` first."""
    out = ["base"]
    for r in runs:
        if r not in KNOWN_RUNS and r != "base":
            raise SystemExit(f"unknown run {r!r}; use some of {', '.join(KNOWN_RUNS)}")
        names = [f"random_s{s}" for s in seeds] if r == "random" else [r]
        out += [n for n in names if n not in out]
    return out


# ----------------------------------------------------------------------------------------- data
def load_data(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """Training features (exactly steps x batch x accum, in a fixed order), held-out pairs, MGSM texts."""
    from layerselect.data import TranslationDataset, load_translation_data, split_holdout
    from layerselect.eval import MGSM, load_solutions

    pairs = load_translation_data(f"pairs:{args.train_data}", langs=_csv(args.train_langs))
    train, heldout = split_holdout(pairs, per_lang=args.heldout_per_lang, seed=args.seed)
    rng = random.Random(args.seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    need = args.steps * args.batch_size * args.grad_accum
    chosen = [train[i] for i in order[: need * 2]]  # a margin for pairs truncated away
    ds = TranslationDataset(chosen, tokenizer, max_length=args.max_length)
    if len(ds) < need:
        raise SystemExit(f"only {len(ds)} training pairs for {need} needed")
    features = [ds[i] for i in range(need)]
    held = TranslationDataset(heldout, tokenizer, max_length=args.max_length)
    english = [{"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids)}
               for ids in (tokenizer(ex.target, add_special_tokens=True)["input_ids"][: args.max_length]
                           for ex in heldout)]
    task = MGSM()
    langs = _csv(args.gap_langs)
    questions = {g: [e.question for e in task.load(args.mgsm, g, args.gap_questions)] for g in langs}
    solutions = load_solutions(args.solutions, limit=args.gap_questions)
    stats_texts = {g: [e.question for e in task.load(args.mgsm, g, args.stats_questions)] for g in langs}
    data = {"train": features, "heldout": [held[i] for i in range(len(held))], "english": english,
            "questions": questions, "solutions": solutions, "stats_texts": stats_texts,
            "train_pairs": len(train), "heldout_pairs": len(heldout)}
    if getattr(args, "english_sft", None):
        data.update(solution_data(args, tokenizer, train, need))
    return data


def solution_data(args: argparse.Namespace, tokenizer: Any, train_pairs: Sequence[Any], need: int) -> dict[str, Any]:
    """What the paper protocol adds: the English dev set, English SFT and X-question SFT features.

    The last ``--english-dev`` GSM8K-train problems are the dev set: measured, never trained
    on (the math-tuned model held them out too). ``sft``: English question -> solution;
    ``translate_train``: the question in X (a training translation pair, joined on its
    English side, word for word) -> the English solution. Both in a fixed shuffled order,
    exactly ``need`` examples, in the prompt the reasoning gap scores.
    """
    if str(Path(__file__).parent) not in sys.path:  # the sibling script, also when this one is loaded by path
        sys.path.insert(0, str(Path(__file__).parent))
    from make_math_model import DEV_SIZE, read_problems, sft_features

    problems = read_problems(args.english_sft)
    n_dev = args.english_dev or DEV_SIZE
    fit, dev = problems[:-n_dev], problems[-n_dev:]
    dev_feats = sft_features(tokenizer, dev, 10**6)
    for f in dev_feats:  # scored like the gap: the solution, not the EOS
        f["labels"][-1] = -100
    rng = random.Random(args.seed)
    order = list(range(len(fit)))
    rng.shuffle(order)
    sft = sft_features(tokenizer, [fit[i] for i in order[: need * 2]], args.max_length)[:need]
    solution_of = {rec["question"].strip(): rec["solution"] for rec in fit}
    joined = [{"question": ex.source, "solution": solution_of[ex.target.strip()]}
              for ex in train_pairs if ex.target.strip() in solution_of]
    rng.shuffle(joined)
    translated = sft_features(tokenizer, joined[: need * 2], args.max_length)[:need]
    if len(sft) < need or len(translated) < need:
        raise SystemExit(f"only {len(sft)} English / {len(translated)} X-question SFT examples for {need} needed")
    return {"english_dev": dev_feats, "sft": sft, "translate_train": translated, "translate_train_joinable": len(joined)}


# ----------------------------------------------------------------------------------------- measures
def measure(model: Any, tokenizer: Any, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from layerselect import ActivationStats
    from layerselect.eval import reasoning_gap
    from layerselect.train import translation_loss

    model.eval()
    t0 = time.perf_counter()
    precision = resolved_precision(args)
    out: dict[str, Any] = {
        name: translation_loss(model, tokenizer, data[key], batch_size=args.eval_batch_size, precision=precision)
        for name, key in (("heldout_translation_loss", "heldout"), ("english_loss", "english"))
    }
    if "english_dev" in data:
        out["english_dev_nll"] = translation_loss(model, tokenizer, data["english_dev"],
                                                  batch_size=args.eval_batch_size, precision=precision)
    gap = reasoning_gap(model, tokenizer, data["questions"], data["solutions"], batch_size=args.eval_batch_size,
                        bootstrap=args.bootstrap, seed=args.seed, precision=precision)
    out["gap"] = gap
    stats = ActivationStats.collect(model, tokenizer, data["stats_texts"], batch_size=args.eval_batch_size,
                                    progress=False, model_name=args.model)  # the name given, not a cache path
    ov = stats.overlap(reference="en")
    out["overlap_avg"] = [float(x) for x in ov.average]
    out["overlap_per_lang"] = {g: [float(x) for x in ov.per_group[:, i]] for i, g in enumerate(stats.groups)}
    out["measure_seconds"] = time.perf_counter() - t0
    return out, stats


# ----------------------------------------------------------------------------------------- runs
def run_spec(name: str, model: Any, msd_layers: list[int], first_n_fraction: float | None = None) -> dict[str, Any]:
    """What a run trains: ``{"kind": "selective"|"lora"|"full"|"none", "layers", "targets"}``
    (plus ``"variant"`` for the runs whose data or schedule differ: slam_guard, translate_train, two_stage)."""
    from layerselect.arch import get_layout
    from layerselect.selection import select

    n_layers = get_layout(model).num_layers
    k = len(msd_layers)
    if name == "base":
        return {"kind": "none", "layers": [], "targets": []}
    if name in ("lora", "full"):
        return {"kind": name, "layers": list(range(n_layers)), "targets": ["all-linear"] if name == "lora" else ["all"]}
    if name in ("translate_train", "two_stage"):
        return {"kind": "full", "layers": list(range(n_layers)), "targets": ["all"], "variant": name}
    if name == "slam_guard":
        return {"kind": "selective", "layers": list(msd_layers), "targets": ["up", "down"], "variant": name}
    if name == "first_n" and first_n_fraction:
        k = max(1, round(first_n_fraction * n_layers))
    if name.startswith("random_s"):  # the library's random criterion, as many layers as msd picks
        layers = select(model=model, criterion="random", k=k, seed=int(name.removeprefix("random_s"))).layers
        return {"kind": "selective", "layers": list(layers), "targets": ["up", "down"]}
    layers, targets = {
        "slam": (msd_layers, ["up", "down"]),
        "slam_gate": (msd_layers, ["gate", "up", "down"]),
        "attn": (msd_layers, ["attn"]),
        "attn_ffn": (msd_layers, ["attn", "ffn"]),
        "first_n": (list(range(k)), ["up", "down"]),
        "last_n": (list(range(n_layers - k, n_layers)), ["up", "down"]),
        "all_ffn": (list(range(n_layers)), ["up", "down"]),
    }[name]
    return {"kind": "selective", "layers": list(layers), "targets": targets}


def prepare(model: Any, spec: dict[str, Any], savable: bool = False) -> tuple[Any, int, int]:
    """Make the right parameters trainable; returns ``(model to train, trainable, base total)``.

    ``savable``: a selective run keeps a CPU copy of its targeted base matrices, which
    its adapter file (exact deltas against them) needs; without it nothing is copied.
    """
    from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model

    total = sum(p.numel() for p in model.parameters())
    if spec["kind"] == "selective":
        slam = get_slam_model(model, SelectiveFFNConfig(layers=spec["layers"], target_modules=spec["targets"]),
                              reference="cpu" if savable else None)
        return slam, slam.get_nb_trainable_parameters()[0], total
    if spec["kind"] == "lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))
        return peft_model, sum(p.numel() for p in peft_model.parameters() if p.requires_grad), total
    if spec["kind"] == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, total, total
    for p in model.parameters():
        p.requires_grad_(False)
    return model, 0, total


def train(model: Any, tokenizer: Any, features: Sequence[dict[str, list[int]]], args: argparse.Namespace,
          run_dir: Path, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train through ``layerselect.train.train_model``, the loop users run; returns losses and timings per step.

    The harness's settings are training options: a constant lr without warmup, AdamW
    without weight decay, clipping at 1, the label-only loss, and a fixed data order
    (``features`` are already ``steps x batch x accum`` pairs in order; ``sequential``
    feeds them as they are). With ``--checkpoint-every N`` the Trainer saves its
    checkpoint (trainable tensors, optimizer, RNG) to ``run_dir`` every N steps and after
    the last, and an interrupted run resumes from the latest one; a run that had finished
    training trains no further step.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from layerselect.train import train_model

    every = getattr(args, "checkpoint_every", 0) or 0
    settings = settings_of(args)
    stamp = run_dir / "settings.json"
    old = _read_json_or_none(stamp) if every and stamp.is_file() else settings
    if not isinstance(old, dict) or comparable(old) != comparable(settings):  # "lr" is this run's own
        raise SystemExit(f"{run_dir} holds a checkpoint made with other (or unreadable) settings; delete it to "
                         "start this run again")
    if every:
        _write_json(stamp, settings)
    last = get_last_checkpoint(str(run_dir)) if every and run_dir.is_dir() else None
    resumed_at = int(Path(last).name.split("-")[-1]) if last else 0
    if last:
        print(f"[experiments] resuming at step {resumed_at} from {last}", file=sys.stderr)
    _, trainer = train_model(
        model, tokenizer, list(features), output_dir=run_dir, save_final=False, resume_from_checkpoint=last,
        precision=resolved_precision(args), data_order="sequential", max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", logging_steps=1, seed=args.seed, disable_tqdm=True,
        save_strategy="steps" if every else "no", save_steps=every or 500, save_total_limit=1,
        use_cpu=not torch.cuda.is_available(), callbacks=list(callbacks),
    )
    model.eval()
    summary = json.loads((run_dir / "train_summary.json").read_text())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    walls, cpus = summary["step_seconds"], summary["step_cpu_seconds"]
    timed, timed_cpu = walls[1:] or walls, cpus[1:] or cpus
    return {"train_loss": losses, "resumed_at_step": resumed_at, "steps_trained": summary["steps"],
            "s_per_step": sum(timed) / len(timed) if timed else None,
            "cpu_s_per_step": sum(timed_cpu) / len(timed_cpu) if timed_cpu else None, "step_seconds": walls,
            "train_seconds": sum(walls)}


def run_args(name: str, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with this run's learning rate (``--lr-by-run``), else ``--lr``."""
    lrs = parse_lr_map(args.lr_by_run, "--lr-by-run")
    key = "random" if name.startswith("random_s") else name  # random=LR sets every seed's
    out = argparse.Namespace(**vars(args))
    if key in lrs:
        out.lr = lrs[key]
    return out


def train_run(name: str, model: Any, tokenizer: Any, data: dict[str, Any], args: argparse.Namespace,
              run_dir: Path) -> dict[str, Any]:
    """Train run ``name`` on its data: the translation pairs, X-question SFT, or both stages of two_stage."""
    rargs = run_args(name, args)
    if name == "translate_train":
        return {**train(model, tokenizer, data["translate_train"], rargs, run_dir), "lr": rargs.lr}
    if name == "two_stage":  # QAlign: full fine-tuning on the translations, then English SFT to restore reasoning
        first = train(model, tokenizer, data["train"], rargs, run_dir / "stage1")
        model.train()
        second = train(model, tokenizer, data["sft"], rargs, run_dir / "stage2")
        return {"lr": rargs.lr, "stages": {"translation": first, "english_sft": second},
                "train_loss": first["train_loss"] + second["train_loss"],
                "s_per_step": (first["train_seconds"] + second["train_seconds"])
                / max(len(first["step_seconds"]) + len(second["step_seconds"]), 1),
                "step_seconds": first["step_seconds"] + second["step_seconds"],
                "train_seconds": first["train_seconds"] + second["train_seconds"]}
    callbacks = []
    if name == "slam_guard":
        callbacks.append(retention_guard(tokenizer, data, args))
    timing = train(model, tokenizer, data["train"], rargs, run_dir, callbacks)
    if callbacks:
        timing["retention"] = callbacks[0].summary()
    return {**timing, "lr": rargs.lr}


def retention_guard(tokenizer: Any, data: dict[str, Any], args: argparse.Namespace) -> Any:
    """The library's retention guard on the English dev set (stop when its NLL rises by the tolerance)."""
    from layerselect.train import RetentionGuard

    return RetentionGuard(data["english_dev"], tokenizer, every=args.retain_every or 10,
                          tolerance=0.01 if args.retain_tolerance is None else args.retain_tolerance,
                          mode="stop", batch_size=args.eval_batch_size, data_name="English dev set")


def base_selection(stats: Any) -> dict[str, Any]:
    """The paper's msd rule on the base model's statistics."""
    from layerselect.selection import select

    sel = select(stats, "msd", reference="en")
    return {"layers": list(sel.layers), "reason": sel.explain()}


def finished_twin(out: Path, name: str, spec: dict[str, Any], settings: dict[str, Any],
                  lr: float | None = None) -> dict[str, Any] | None:
    """A finished run (same settings) that trains exactly ``spec``: its record stands for ``name`` too.

    Every run starts from the same base with the same data order, so two runs with
    the same kind, layers, targets and lr are the same computation (a recomputed one
    agrees bit for bit; see random_s0 = slam in docs/results.md). ``lr``: this run's
    (default: ``settings["lr"]``).
    """
    if spec["kind"] == "none":
        return None
    lr = settings.get("lr") if lr is None else lr
    for rec in load_runs(out):  # in table order: slam is the twin named before its controls
        if (rec.get("run") != name and "same_as" not in rec and isinstance(rec.get("settings"), dict)
                and comparable(rec["settings"]) == comparable(settings) and record_lr(rec) == lr
                and rec.get("variant") == spec.get("variant")
                and (rec.get("kind"), rec.get("layers"), rec.get("targets")) == (spec["kind"], spec["layers"], spec["targets"])):
            return rec
    return None


def do_run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load a fresh base, train run ``name``, measure it; returns the JSON record."""
    from layerselect.models import load_model

    out = Path(args.out)
    device = "cuda" if torch.cuda.is_available() else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    torch.manual_seed(args.seed)
    data = load_data(args, tokenizer)
    sel_path = out / "selection.json"
    if name != "base":
        if not sel_path.is_file():
            raise SystemExit("run 'base' first: it computes the msd selection")
        msd_layers = json.loads(sel_path.read_text())["layers"]
    else:
        msd_layers = []
    spec = run_spec(name, model, msd_layers, args.first_n_fraction)
    twin = finished_twin(out, name, spec, settings_of(args), run_args(name, args).lr)
    if twin is not None:  # e.g. first_n when msd picks the first layers: the same training, already measured
        print(f"[experiments] {name}: trains exactly what {twin['run']} trained; its record is reused",
              file=sys.stderr)
        return {**twin, "run": name, "same_as": twin["run"]}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    save_adapter = args.save_adapters and spec["kind"] in ("selective", "lora")
    # a selective model's checkpoints hold its adapter, which needs the base matrices
    trainable_model, trainable, total = prepare(model, spec, savable=save_adapter or bool(args.checkpoint_every))
    run_dir = out / "checkpoints" / name
    if spec.get("variant") and "english_dev" not in data:
        raise SystemExit(f"run {name!r} needs --english-sft (the GSM8K-train solutions)")
    timing = train_run(name, trainable_model, tokenizer, data, args, run_dir) if spec["kind"] != "none" else {}
    if save_adapter:  # before measuring: the adapter is the run's product, the measures are about it
        trainable_model.save_pretrained(out / "adapters" / name)
    measures, stats = measure(trainable_model, tokenizer, data, args)
    if name == "base":
        stats.save(out / "base_stats")
        _write_json(sel_path, base_selection(stats))
    record = {
        "run": name, **spec, "trainable_params": trainable, "total_params": total,
        "trainable_pct": 100.0 * trainable / total, **timing, **measures,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "train_pairs_available": data["train_pairs"], "heldout_pairs": data["heldout_pairs"],
        "settings": settings_of(args), "torch_threads": torch.get_num_threads(),
    }
    if save_adapter:
        record["adapter"] = f"adapters/{name}"  # relative to --out
    return record


def run_all(args: argparse.Namespace) -> list[str]:
    """Every run not yet finished with these settings; returns the names run."""
    out = Path(args.out)
    runs_dir = out / "runs"
    settings = settings_of(args)
    sfile = out / "settings.json"
    old = check_table_settings(args)
    if old is not None:
        if old.get("lr_by_run") != settings.get("lr_by_run"):  # the command that makes the table is now this one
            _write_json(sfile, {**settings, "command": _command(args)})
    else:  # a resumed table keeps the command that started it (a resume may spell --out differently)
        _write_json(sfile, {**settings, "command": _command(args)})
    done = []
    for name in expand_runs(_csv(args.runs), [int(s) for s in _csv(args.random_seeds)]):
        path = runs_dir / f"{name}.json"
        if path.is_file() and is_current(_read_json_or_none(path), name, args):
            print(f"[experiments] {name}: done, skipped", file=sys.stderr)
            continue
        print(f"[experiments] {name}: running", file=sys.stderr)
        if args.isolate:
            cmd = [sys.executable, os.path.abspath(__file__), *child_argv(_argv(args), args.lr, args.lr_by_run),
                   "--no-isolate", "--only", name]
            subprocess.run(cmd, check=True)
        else:
            finish_run(name, args)
        done.append(name)
    return done


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line ``main`` parsed (``sys.argv`` when the namespace was built elsewhere)."""
    return list(getattr(args, "argv", None) or sys.argv[1:])


def _command(args: argparse.Namespace) -> str:
    return " ".join(["benchmarks/paper_experiments.py", *_argv(args)])


def finish_run(name: str, args: argparse.Namespace) -> None:
    """Run ``name``, write its JSON, then drop its mid-run checkpoint (the JSON is the result)."""
    out = Path(args.out)
    _write_json(out / "runs" / f"{name}.json", do_run(name, args))
    shutil.rmtree(out / "checkpoints" / name, ignore_errors=True)


def child_argv(argv: Sequence[str], lr: float, lr_by_run: str | None = None) -> list[str]:
    """The command line of one isolated run: this one, with the learning rates already chosen.

    ``--lr-grid`` and ``--choose-lr`` are dropped, ``--lr`` set to ``lr`` (the grid's choice,
    or ``--lr``) and, when given, ``--lr-by-run`` to ``lr_by_run`` (with the runs'
    chosen lrs): a child re-parses the command line, and would otherwise train at the
    default lr.
    """
    valued = ("--lr-grid", "--lr", "--choose-lr", *(("--lr-by-run",) if lr_by_run is not None else ()))
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("--isolate", "--no-isolate", "--lr-grid-only"):
            continue
        if a in valued:
            skip = i + 1 < len(argv)
            continue
        if a.startswith(tuple(f"{v}=" for v in valued)):
            continue
        out.append(a)
    return [*out, "--lr", repr(float(lr)), *(("--lr-by-run", lr_by_run) if lr_by_run else ())]


def choose_lr(args: argparse.Namespace) -> float:
    """Train ``slam`` with each lr of ``--lr-grid``; keep the lowest held-out translation loss.

    Only the held-out translation pairs are measured (never MGSM), so a trial costs
    its training plus one pass over those pairs. The msd layers come from the base
    model's statistics, collected once. One JSON per trial in ``--out/lr_search``;
    finished trials are skipped on restart.
    """
    grid = [float(x) for x in _csv(args.lr_grid)]
    folder = Path(args.out) / "lr_search"
    results = {lr: lr_trial(args, lr, folder)["heldout_translation_loss"] for lr in grid}
    best = min(results, key=results.get)
    _write_json(Path(args.out) / "lr_search.json", {"heldout_translation_loss": {f"{k:g}": v for k, v in results.items()},
                                                   "chosen": best, "settings": settings_of(args)})
    if note := grid_edge_note(grid, best):
        print(f"[experiments] slam: {note}", file=sys.stderr)
    return best


def grid_edge_note(grid: Sequence[float], chosen: float) -> str:
    """A warning when ``chosen`` is the end of its ``grid``: the best lr may lie beyond it ('' otherwise).

    >>> grid_edge_note([1e-5, 2e-5, 5e-5], 1e-5)
    "1e-05 is the grid's smallest lr: a smaller one may do better"
    """
    if len(set(grid)) < 2:
        return ""
    if chosen == min(grid):
        return f"{chosen:g} is the grid's smallest lr: a smaller one may do better"
    if chosen == max(grid):
        return f"{chosen:g} is the grid's largest lr: a larger one may do better"
    return ""


def lr_trial(args: argparse.Namespace, lr: float, folder: Path) -> dict[str, Any]:
    """One lr of the grid: train slam from a fresh base, measure the held-out translation loss."""
    from layerselect import ActivationStats
    from layerselect.models import load_model

    trial = argparse.Namespace(**vars(args))
    trial.lr = lr
    settings = settings_of(trial)
    path = folder / f"lr{lr:g}.json"
    old = _read_json_or_none(path) if path.is_file() else None  # a truncated trial is trained again
    if (isinstance(old, dict) and isinstance(old.get("settings"), dict)
            and isinstance(old.get("heldout_translation_loss"), float)
            and comparable(old["settings"]) == comparable(settings)):
        print(f"[experiments] lr {lr:g}: done, skipped", file=sys.stderr)
        return old
    model, tokenizer = load_model(args.model, dtype=args.dtype,
                                  device="cuda" if torch.cuda.is_available() else None)
    torch.manual_seed(args.seed)
    data = load_data(trial, tokenizer)
    sel_path = folder / "selection.json"
    if not sel_path.is_file():
        stats = ActivationStats.collect(model, tokenizer, data["stats_texts"], batch_size=args.eval_batch_size,
                                        progress=False, model_name=args.model)
        _write_json(sel_path, base_selection(stats))
    spec = run_spec("slam", model, json.loads(sel_path.read_text())["layers"])
    from layerselect.train import translation_loss

    slam, _, _ = prepare(model, spec, savable=bool(args.checkpoint_every))
    timing = train(slam, tokenizer, data["train"], trial, folder / f"lr{lr:g}")
    record = {"lr": lr, "layers": spec["layers"], "targets": spec["targets"],
              "heldout_translation_loss": translation_loss(slam, tokenizer, data["heldout"],
                                                           batch_size=args.eval_batch_size,
                                                           precision=resolved_precision(args)),
              "train_loss": timing["train_loss"], "s_per_step": timing["s_per_step"], "settings": settings}
    _write_json(path, record)
    shutil.rmtree(folder / f"lr{lr:g}", ignore_errors=True)
    print(f"[experiments] lr {lr:g}: held-out translation loss {record['heldout_translation_loss']:.4f}",
          file=sys.stderr)
    return record


def lr_criterion(name: str) -> str:
    """What a run's lr is chosen on: held-out data of what it trains on last, never MGSM.

    The runs that end on solutions (``translate_train``, and ``two_stage``'s English SFT
    stage) are judged on the English dev set; the others on the held-out translation pairs.
    """
    return "english_dev_nll" if name in ("translate_train", "two_stage") else "heldout_translation_loss"


def choose_run_lrs(args: argparse.Namespace) -> str | None:
    """``--choose-lr``: each named run's lr, chosen on its held-out criterion; returns the new ``--lr-by-run``.

    A finished run of the table at one of the grid's lrs is that trial (same training);
    the other trials train the run from a fresh base and measure only the criterion.
    One JSON per trial in ``--out/lr_search/RUN/``, the choice in ``--out/lr_search/RUN.json``;
    finished trials are skipped on restart.
    """
    grids = parse_lr_map(args.choose_lr, "--choose-lr", grid=True)
    clash = set(grids) & set(parse_lr_map(args.lr_by_run, "--lr-by-run"))
    if clash:
        raise SystemExit(f"--choose-lr and --lr-by-run both set the lr of {sorted(clash)}; keep one")
    needs_sft = sorted(n for n in grids if n in PROTOCOL_RUNS)
    if needs_sft and not args.english_sft:
        raise SystemExit(f"--choose-lr for {', '.join(needs_sft)} needs --english-sft (the GSM8K-train solutions)")
    if "slam" in grids and args.lr_grid:
        raise SystemExit("--lr-grid already chooses slam's lr (the table's --lr); drop slam from --choose-lr")
    lr_by_run = args.lr_by_run
    for name, grid in grids.items():
        criterion = lr_criterion(name)
        values = {lr: run_trial(with_run_lr(args, name, lr), name, lr)[criterion] for lr in grid}
        finite = {lr: v for lr, v in values.items() if math.isfinite(v)}
        if not finite:
            raise SystemExit(f"--choose-lr {name}: every trial diverged ({criterion} not finite); try smaller lrs")
        best = min(finite, key=finite.get)
        _write_json(Path(args.out) / "lr_search" / f"{name}.json",
                    {"run": name, "criterion": criterion, "values": {f"{k:g}": v for k, v in values.items()},
                     "chosen": best,
                     "settings": comparable(settings_of(args))})
        print(f"[experiments] {name}: chosen lr {best:g} ({criterion})", file=sys.stderr)
        if note := grid_edge_note(grid, best):
            print(f"[experiments] {name}: {note}", file=sys.stderr)
        lr_by_run = with_run_lr(argparse.Namespace(lr_by_run=lr_by_run), name, best).lr_by_run
    return lr_by_run


_NO_SELECTION_RUNS = ("base", "lora", "full", "translate_train", "two_stage")


def _msd_layers_for(name: str, args: argparse.Namespace) -> list[int]:
    """The msd layers a trial of run ``name`` trains (only the selective runs need them): the table's own."""
    if name in _NO_SELECTION_RUNS:
        return []
    out = Path(args.out)
    sel = _read_json_or_none(out / "selection.json")
    layers = sel.get("layers") if isinstance(sel, dict) else None
    if (not is_current(_read_json_or_none(out / "runs" / "base.json"), "base", args) or not isinstance(layers, list)
            or not layers or not all(isinstance(i, int) and i >= 0 for i in layers)):
        raise SystemExit(f"--choose-lr {name}: a trial trains the msd layers of this table's base model; run "
                         "'base' first (--runs base), then choose")
    return layers


def check_table_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--out``'s settings.json (None if new or ``--overwrite``); exits if its runs were made otherwise."""
    out = Path(args.out)
    sfile = out / "settings.json"
    if not sfile.is_file() or args.overwrite:
        return None
    old = _read_json_or_none(sfile)
    if not isinstance(old, dict):
        raise SystemExit(f"{sfile} is unreadable; use another --out, or --overwrite to start the table again")
    diff = {k: (old.get(k), v) for k, v in comparable(settings_of(args)).items() if old.get(k) != v}
    if diff:
        raise SystemExit(f"{out} holds runs made with other settings {diff}; use another --out or --overwrite")
    return old


def run_trial(args: argparse.Namespace, name: str, lr: float) -> dict[str, Any]:
    """Train run ``name`` at ``lr`` (``args`` already say so) from a fresh base; measure its lr criterion.

    A finished trial is read back; so is a finished row of the table at this lr (the same
    training), which is kept as the trial's record (``"from_table_row": true``).
    """
    from layerselect.models import load_model
    from layerselect.train import translation_loss

    folder = Path(args.out) / "lr_search" / name
    path = folder / f"lr{lr:g}.json"
    old = _read_json_or_none(path) if path.is_file() else None
    criterion = lr_criterion(name)
    msd_layers = _msd_layers_for(name, args)  # before anything loads: a missing base run is said at once
    if is_current(old, name, args) and isinstance(old.get(criterion), float):
        print(f"[experiments] {name} lr {lr:g}: done, skipped", file=sys.stderr)
        return old
    row = _read_json_or_none(Path(args.out) / "runs" / f"{name}.json")
    if is_current(row, name, args) and isinstance(row.get(criterion), float):
        # the table's row trained exactly this; kept as a trial, so the choice survives the row's redo
        record = {"run": name, "lr": lr, criterion: row[criterion], "from_table_row": True,
                  "settings": settings_of(args)}
        _write_json(path, record)
        print(f"[experiments] {name} lr {lr:g}: the table's row is this trial", file=sys.stderr)
        return record
    print(f"[experiments] {name} lr {lr:g}: training", file=sys.stderr)
    model, tokenizer = load_model(args.model, dtype=args.dtype,
                                  device="cuda" if torch.cuda.is_available() else None)
    torch.manual_seed(args.seed)
    data = load_data(args, tokenizer)
    spec = run_spec(name, model, msd_layers, args.first_n_fraction)
    trainable_model = prepare(model, spec, savable=bool(args.checkpoint_every))[0]
    run_dir = Path(args.out) / "checkpoints" / "lr_search" / name / f"lr{lr:g}"
    timing = train_run(name, trainable_model, tokenizer, data, args, run_dir)
    key = "english_dev" if criterion == "english_dev_nll" else "heldout"
    record = {"run": name, "lr": lr, **spec, criterion: translation_loss(
        trainable_model, tokenizer, data[key], batch_size=args.eval_batch_size, precision=resolved_precision(args)),
        "train_loss": timing["train_loss"], "train_seconds": timing["train_seconds"], "settings": settings_of(args)}
    _write_json(path, record)
    if name == "full" and hand_over_to_two_stage(args, lr, run_dir):
        print(f"[experiments] full lr {lr:g}: its last checkpoint is two_stage's first stage at this lr; "
              "kept for that trial", file=sys.stderr)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"[experiments] {name} lr {lr:g}: {criterion} {record[criterion]:.4f}", file=sys.stderr)
    return record


def hand_over_to_two_stage(args: argparse.Namespace, lr: float, run_dir: Path) -> bool:
    """Move a ``full`` trial's checkpoint folder to ``two_stage``'s trial at the same lr, as its stage 1.

    ``full`` is ``two_stage``'s first stage alone: the same pairs in the same order, the
    same seed and settings (the table's ``full`` row and ``two_stage``'s first stage have
    equal losses at every step). So when ``--choose-lr`` also tries ``two_stage`` at this
    lr and that trial has not run, its first stage resumes at the last step of this one
    instead of training it again (half of each such trial's time). The folder's
    settings stamp goes with it, and ``train`` checks it as for any resume.
    """
    grid = parse_lr_map(getattr(args, "choose_lr", None), "--choose-lr", grid=True).get("two_stage", [])
    if f"{lr:g}" not in {f"{v:g}" for v in grid} or not (run_dir / f"checkpoint-{args.steps}").is_dir():
        return False
    out = Path(args.out)
    done = _read_json_or_none(out / "lr_search" / "two_stage" / f"lr{lr:g}.json")
    if is_current(done, "two_stage", with_run_lr(args, "two_stage", lr)):
        return False
    stage1 = out / "checkpoints" / "lr_search" / "two_stage" / f"lr{lr:g}" / "stage1"
    if stage1.exists():  # that trial started on its own; its own checkpoints stand
        return False
    stage1.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run_dir, stage1)
    return True


# ----------------------------------------------------------------------------------------- report
_RECORD_KEYS = ("run", "kind", "layers", "targets", "settings", "gap", "overlap_avg", "trainable_params",
                "trainable_pct", "peak_rss_mb", "heldout_translation_loss", "english_loss")


def load_runs(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The finished runs' records in table order; an unreadable or incomplete file is named and left out."""
    runs = []
    for path in sorted(Path(out, "runs").glob("*.json")):
        rec = _read_json_or_none(path)
        missing = [k for k in _RECORD_KEYS if k not in rec] if isinstance(rec, dict) else list(_RECORD_KEYS)
        if (missing or rec["run"] != path.stem or not isinstance(rec["gap"], dict)
                or not isinstance(rec["settings"], dict)):
            print(f"[experiments] {path}: not a finished run's record (missing or wrong: "
                  f"{', '.join(missing) or 'run, gap or settings'}); left out; delete it to run it again",
                  file=sys.stderr)
            continue
        runs.append(rec)
    order = {n: i for i, n in enumerate(("base", *KNOWN_RUNS))}
    return sorted(runs, key=lambda r: (order.get(r["run"].split("_s")[0] if r["run"].startswith("random") else r["run"], 99),
                                       r["run"]))


def _mean_other_nll(gap: dict[str, Any]) -> float:
    """Mean NLL over the non-reference languages: avg gap = this - NLL of the reference, exactly."""
    others = [x for x in gap["langs"] if x != gap["reference"]]
    return sum(gap["nll"][x] for x in others) / len(others) if others else float("nan")


def _timed_steps(run: dict[str, Any]) -> tuple[int, int]:
    """``(timed, trained)`` optimizer steps: a resumed run timed only the steps after its checkpoint."""
    parts = list(run["stages"].values()) if isinstance(run.get("stages"), dict) else [run]
    timed = sum(len(p.get("step_seconds") or []) for p in parts)
    trained = sum(p.get("steps_trained") or len(p.get("step_seconds") or []) for p in parts)
    return timed, max(trained, timed)


def _train_seconds(run: dict[str, Any]) -> float | None:
    """Wall-clock training time of a run (its optimizer steps; None when it did not train).

    A run resumed from a checkpoint timed only its last steps (the earlier ones ran in
    another process): its time is those steps' mean x every step, see :func:`_time_cell`.
    """
    if isinstance(run.get("stages"), dict):  # each stage extrapolated on its own step times
        times = [_train_seconds(stage) for stage in run["stages"].values()]
        return sum(times) if all(t is not None for t in times) else None
    t = run["train_seconds"] if "train_seconds" in run else sum(run.get("step_seconds") or []) or None
    timed, trained = _timed_steps(run)
    if timed == 0 < trained:  # resumed after its last step (killed while measured): never timed here
        return None
    return t * trained / timed if t is not None and timed < trained else t


def _time_cell(run: dict[str, Any], slam_time: float | None) -> str:
    t = _train_seconds(run)
    if "same_as" in run or (t is None and not _timed_steps(run)[1]):
        return "-"
    if t is None:
        return "not timed (resumed after training)"
    timed, trained = _timed_steps(run)
    if timed < trained:  # extrapolated, and the page says so
        ratio = f"{t / slam_time:.1f}x; " if slam_time else ""  # slam_time: None or > 0
        return f"≈{t:.0f} ({ratio}{timed} of {trained} steps timed, resumed)"
    return f"{t:.0f} ({t / slam_time:.1f}x)" if slam_time else f"{t:.0f}"


def _lr_cell(run: dict[str, Any]) -> str:
    lr = record_lr(run)
    return f"{lr:g}" if run["kind"] != "none" and isinstance(lr, (int, float)) else "-"


def _iv(x: Any) -> str:
    return f"[{x[0]:+.3f}, {x[1]:+.3f}]" if x else "-"


def paired_delta(run: dict[str, Any], base: dict[str, Any], stat: str = "avg_gap", n_boot: int = 1000,
                 seed: int = 0) -> tuple[float, float, float]:
    """:func:`layerselect.eval.paired_delta` of two run records' reasoning gaps (a mismatch exits by name)."""
    from layerselect.errors import InvalidInputError
    from layerselect.eval import paired_delta as library_paired_delta

    try:
        return library_paired_delta(run["gap"], base["gap"], stat, n_boot=n_boot, seed=seed)
    except InvalidInputError as exc:
        raise SystemExit(f"{run.get('run')} vs {base.get('run')}: {exc}") from None


def paired_gap_delta(run: dict[str, Any], base: dict[str, Any], n_boot: int = 1000,
                     seed: int = 0) -> tuple[float, float, float]:
    """``(delta, low, high)``: change of the average gap from ``base`` to ``run`` (:func:`paired_delta`)."""
    return paired_delta(run, base, "avg_gap", n_boot, seed)


def write_table(out: str | os.PathLike[str], md_path: str | os.PathLike[str], notes: str | None = None) -> str:
    """The markdown report of every finished run in ``out`` (plus an overlap figure next to ``md_path``)."""
    runs = load_runs(out)
    if not runs:
        raise SystemExit(f"no finished runs in {out}/runs")
    settings = json.loads(Path(out, "settings.json").read_text()) if Path(out, "settings.json").is_file() else {}
    base = next((r for r in runs if r["run"] == "base"), None)
    lines = ["# Results: SLAM and its ablations on a real model", "",
             "Generated by `benchmarks/paper_experiments.py --table` from the JSONs in "
             f"`{out}` (one per run). Command:", "", "```", settings.get("command", "?"), "```", ""]
    s = settings
    if s:
        weights = s["dtype"] + (f", {s['precision']} autocast" if s.get("precision") else "")
        lines += [f"Model `{s['model']}` ({weights}); {s['steps']} optimizer steps x effective batch "
                  f"{s['batch_size'] * s['grad_accum']} ({s['batch_size']} x {s['grad_accum']} accumulation), "
                  f"lr {s['lr']:g} unless the lr column says otherwise (AdamW, constant, no weight decay), max length {s['max_length']}; "
                  f"training languages {s['train_langs']}; held out {s['heldout_per_lang']} pairs per language; "
                  f"reasoning gap on the first {s['gap_questions']} MGSM questions in {s['gap_langs']} "
                  f"({s['bootstrap']} bootstrap resamples); overlap statistics on {s['stats_questions']} "
                  "questions per language.", ""]
    row_lr = {r["run"]: record_lr(r) for r in runs}
    for choice in _lr_choices(out, settings):
        values = ", ".join(f"{lr} -> {v:.4f}" for lr, v in choice["values"].items())
        remarks = [grid_edge_note([float(lr) for lr in choice["values"]], choice["chosen"])]
        if row_lr.get(choice["run"]) not in (choice["chosen"], None):
            remarks.append(f"its row was trained at {row_lr[choice['run']]:g}: run the command again")
        remark = "; ".join(r for r in remarks if r)
        lines += [f"The lr of `{choice['run']}` was chosen on the {_CRITERION_NAMES[choice['criterion']]}: "
                  f"{values}; chosen {choice['chosen']:g}" + (f" ({remark})" if remark else "") + ".", ""]
    dev = any("english_dev_nll" in r for r in runs)
    slam_time = next((_train_seconds(r) for r in runs if r["run"] == "slam"), None)
    lines += ["| run | layers | targets | lr | trainable | s/step | peak RSS MB | held-out transl. loss | "
              "English loss | NLL en | NLL non-en (mean) | avg gap [95% CI] | Δ avg gap vs base [95% paired CI] |"
              + (" English dev NLL | training time s (x slam) |" if dev else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if dev else "")]
    for r in runs:
        g = r["gap"]
        d, lo, hi = paired_gap_delta(r, base) if base and r is not base else (float("nan"),) * 3
        layers = "all" if r["kind"] in ("lora", "full") or len(r["layers"]) > 8 else str(r["layers"])
        step = f"= {r['same_as']}" if "same_as" in r else f"{r['s_per_step']:.2f}" if r.get("s_per_step") else "-"
        lines.append(
            f"| {r['run']} | {layers if r['kind'] != 'none' else '-'} | {'+'.join(r['targets']) or '-'} | "
            f"{_lr_cell(r)} | "
            f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}%) | {step} | {r['peak_rss_mb']:.0f} | "
            f"{r['heldout_translation_loss']:.4f} | {r['english_loss']:.4f} | {g['nll'][g['reference']]:.4f} | "
            f"{_mean_other_nll(g):.4f} | "
            f"{g['avg_gap']:+.4f} {_iv(g.get('avg_gap_interval'))} | {'-' if r['run'] == 'base' else f'{d:+.4f} [{lo:+.4f}, {hi:+.4f}]'} |"
            + (f" {r.get('english_dev_nll', float('nan')):.4f} | {_time_cell(r, slam_time)} |" if dev else ""))
    if base:
        # the gap shrinks when the other languages improve or when English gets worse: say which
        lines += ["", "Where the change of the gap comes from: NLL of the English reference and mean NLL of the "
                  "other languages, change from base with 95% paired bootstrap intervals (negative = better):", "",
                  "| run | Δ NLL en | Δ NLL non-en (mean) | Δ avg gap |", "|---|---|---|---|"]
        for r in runs:
            if r is base or "same_as" in r:
                continue
            cells = [paired_delta(r, base, stat) for stat in ("nll_ref", "nll_others", "avg_gap")]
            lines.append(f"| {r['run']} | " + " | ".join(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" for d, lo, hi in cells) + " |")
    langs = [x for x in runs[0]["gap"]["langs"] if x != runs[0]["gap"]["reference"]]
    lines += ["", "Reasoning gap per language (NLL_g - NLL_en, nats per solution token; 95% bootstrap interval "
              "in the JSON):", "", "| run | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for r in runs:
        lines.append(f"| {r['run']} | " + " | ".join(f"{r['gap']['gap'][x]:+.3f}" for x in langs) + " |")
    n_layers = len(runs[0]["overlap_avg"])
    lines += ["", "Average overlap with English per layer (tau = 0.5; paper Fig. 6):", "",
              "| run | " + " | ".join(str(i) for i in range(n_layers)) + " |", "|---|" + "---|" * n_layers]
    for r in runs:
        lines.append(f"| {r['run']} | " + " | ".join(f"{x:.3f}" for x in r["overlap_avg"]) + " |")
    fig = _overlap_figure(runs, Path(md_path).with_suffix("").as_posix() + "_overlap.png")
    if fig:
        lines += ["", f"![overlap per layer]({Path(fig).relative_to(Path(md_path).parent).as_posix()})"]
    if notes:
        lines += ["", Path(notes).read_text(encoding="utf-8").rstrip()]
    text = "\n".join(lines) + "\n"
    Path(md_path).parent.mkdir(parents=True, exist_ok=True)
    Path(md_path).write_text(text, encoding="utf-8")
    return text


_CRITERION_NAMES = {"heldout_translation_loss": "held-out translation loss", "english_dev_nll": "English dev NLL"}


def _lr_choices(out: str | os.PathLike[str], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The readable ``--choose-lr`` records in ``out/lr_search`` made with the table's ``settings``."""
    found = []
    for path in sorted(Path(out, "lr_search").glob("*.json")):
        rec = _read_json_or_none(path)
        if (isinstance(rec, dict) and rec.get("run") == path.stem and rec.get("criterion") in _CRITERION_NAMES
                and isinstance(rec.get("values"), dict) and isinstance(rec.get("chosen"), float)
                and all(isinstance(v, float) for v in rec["values"].values())
                and all(_is_positive_number(lr) for lr in rec["values"])
                and isinstance(rec.get("settings"), dict)
                and comparable(rec["settings"]) == comparable({k: v for k, v in settings.items() if k != "command"})):
            found.append(rec)
    return found


def _is_positive_number(text: str) -> bool:
    try:
        return math.isfinite(value := float(text)) and value > 0
    except ValueError:
        return False


def _overlap_figure(runs: list[dict[str, Any]], path: str) -> str | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    from layerselect.plots import LANG_COLORS

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, r in enumerate(r for r in runs if "same_as" not in r):  # a reused record would hide its twin
        ax.plot(r["overlap_avg"], marker="o", ms=3, color=LANG_COLORS[k % len(LANG_COLORS)], label=r["run"],
                lw=2.2 if r["run"] in ("base", "slam") else 1.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("average overlap with English")
    ax.legend(fontsize=7, ncol=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what the isolated runs re-parse and settings.json records
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        print(write_table(args.out, args.table, args.notes))
        return 0
    if args.quick:
        apply_quick(args)
    if args.only:
        finish_run(args.only, args)
        return 0
    if args.lr_grid:
        args.lr = choose_lr(args)
        print(f"[experiments] chosen lr {args.lr:g} (held-out translation loss)", file=sys.stderr)
    if args.lr_grid_only and not (args.lr_grid or args.choose_lr):
        raise SystemExit("--lr-grid-only stops after choosing lrs: give --lr-grid or --choose-lr")
    if args.choose_lr:
        check_table_settings(args)  # before hours of trials, not after
        args.lr_by_run = choose_run_lrs(args)
    if args.lr_grid_only:
        return 0
    run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

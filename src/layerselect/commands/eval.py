"""``layerselect eval``: accuracy per language and PCR, with resumable generations.

Example::

    layerselect eval --model smollm2-135m --task mgsm --data mgsm \\
        --langs en,de,zh --limit 20 --out results/
    layerselect eval --task mgsm --out results/ --rescore     # re-score, no model
    layerselect eval --metric nll --model gemma-3-270m --task mgsm \
        --out gap/   # reasoning gap (bundled MGSM + solutions by default)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..texts import PAPER_LANGS
from ._common import add_model_args, add_precision_arg, load_model_from_args, parse_langs


def register(sub: argparse._SubParsersAction) -> None:
    from ..eval.generate import DEFAULT_MAX_NEW_TOKENS
    from ..eval.tasks import TASKS

    p = sub.add_parser(
        "eval",
        help="accuracy per language and prediction consistency (MGSM, MSVAMP, xCSQA)",
        description=(
            "Generate answers greedily with the paper's prompt, score the last number (or label), "
            "and print accuracy per language, their average, and PCR against English. Every "
            "generation is saved to OUT/{task}_{lang}.jsonl; rerunning resumes where it stopped."
        ),
    )
    add_model_args(p)
    p.add_argument("--adapter", default=None, help="selective-FFN adapter directory, merged into --model")
    p.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="benchmark (default: mgsm; with --rescore: the one in OUT/run.json)")
    p.add_argument("--data", default=None,
                   help="the task's data folder, or 'mgsm' for the bundled MGSM "
                   "(default: the bundled MGSM for --task mgsm, else $LAYERSELECT_DATA_DIR/{task})")
    p.add_argument("--langs", default=None,
                   help=f"comma-separated languages (default: those of {','.join(PAPER_LANGS)} found in --data)")
    p.add_argument("--limit", type=int, default=None, help="first N questions per language")
    p.add_argument("--out", required=True, help="output folder (generations JSONL, results.json, results.md)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm: GPUs per model")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vllm: fraction of GPU memory")
    p.add_argument("--rescore", action="store_true", help="re-score saved generations in --out; no model is loaded")
    p.add_argument("--overwrite", action="store_true", help="discard saved generations and start again")
    p.add_argument("--reference", default="en", help="language PCR is measured against (default: en)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--metric", choices=("accuracy", "nll"), default="accuracy",
                   help="accuracy (default: generate and score answers) or nll: the generation-free "
                        "reasoning gap, NLL of the English solution given the question in each language")
    p.add_argument("--solutions", default=None,
                   help="--metric nll: English solutions JSONL, line i = question i "
                        "(default: the bundled MGSM solutions)")
    p.add_argument("--bootstrap", type=int, default=1000, help="--metric nll: bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="--metric nll: bootstrap seed")
    add_precision_arg(p)
    p.set_defaults(func=run)


def _default_data(task: str) -> str:
    from ..eval.tasks import get_task
    from ..texts import default_data_dir

    bundled = get_task(task).bundled_data()
    if bundled is not None:
        return str(bundled)
    base = default_data_dir()
    if base is None or not (base / task).is_dir():
        raise InvalidInputError(f"pass --data, the {task} data folder (no default found)")
    return str(base / task)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model (with ``--adapter`` merged in, if given) and its tokenizer."""
    model, tokenizer = load_model_from_args(args)
    if args.adapter:
        model = _apply_adapter(model, args.adapter)
    return model, tokenizer


def _apply_adapter(model: Any, adapter: str) -> Any:
    try:
        from ..selective_ffn import SelectiveFFNModel
    except ImportError as exc:
        raise InvalidInputError(
            f"--adapter needs layerselect.selective_ffn, which could not be imported ({exc})"
        ) from exc
    return SelectiveFFNModel.from_pretrained(model, adapter).merge_and_unload()


#: The library's errors name Python parameters; on the command line they are these flags.
def run(args: argparse.Namespace) -> int:
    langs = parse_langs(args.langs)
    if args.metric == "nll":
        return run_gap(args, langs)
    return run_accuracy(args, langs)


def run_accuracy(args: argparse.Namespace, langs: list[str] | None) -> int:
    """The default metric: generate, score, and print accuracy and PCR per language."""
    from ..eval import evaluate, rescore

    if args.rescore:  # task None -> the one recorded in run.json
        table = rescore(args.out, task=args.task, langs=langs, limit=args.limit,
                        reference=args.reference, verbose=not args.quiet)
        _print_quiet(args, table)
        return 0
    args.task = args.task or "mgsm"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InvalidInputError(f"--out {args.out} is an existing file; give a folder for the generations")
    data = args.data or _default_data(args.task)
    if not os.path.exists(data):
        from ..eval.tasks import get_task

        data = str(get_task(args.task).resolve_data(data))
    if langs is None:
        from ..eval.tasks import get_task

        found = get_task(args.task).available_langs(data)
        if not found:
            raise InvalidInputError(f"no {args.task} data files found in {data}; check --data")
        langs = [x for x in PAPER_LANGS if x in found] or found
    name = args.model + (f"+{args.adapter}" if args.adapter else "")
    common = dict(
        langs=langs, data=data, limit=args.limit, out_dir=args.out, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, model_name=name, reference=args.reference,
        overwrite=args.overwrite, verbose=not args.quiet,
    )
    if args.backend == "transformers":
        common["precision"] = args.precision
    if args.backend == "vllm":
        vllm_kwargs = {"dtype": args.dtype} if args.dtype != "float32" else {}
        if args.tensor_parallel_size:
            vllm_kwargs["tensor_parallel_size"] = args.tensor_parallel_size
        if args.gpu_memory_utilization:
            vllm_kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.adapter is None and args.gguf_file is None:
            from ..models import resolve_model

            path = resolve_model(args.model)
            table = evaluate(path, None, args.task, backend="vllm", vllm_kwargs=vllm_kwargs, **common)
            _print_quiet(args, table)
            return 0
        # Merge on the CPU and serve the merged checkpoint.
        model, tokenizer = _load(args)
        with tempfile.TemporaryDirectory(prefix="layerselect-merged-") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
            table = evaluate(tmp, None, args.task, backend="vllm", vllm_kwargs=vllm_kwargs, **common)
        _print_quiet(args, table)
        return 0
    model, tokenizer = _load(args)
    print(f"evaluating {name} on {args.task} in {', '.join(langs)}", file=sys.stderr)
    table = evaluate(model, tokenizer, args.task, **common)
    _print_quiet(args, table)
    return 0


def _print_quiet(args: argparse.Namespace, table: dict[str, Any]) -> None:
    """With --quiet, evaluate prints nothing; the table is still the command's output."""
    if args.quiet:
        print(table["markdown"])


def _default_solutions() -> str:
    """The English MGSM solutions bundled with the package (GSM8K test solutions, MIT)."""
    from ..resources import mgsm_solutions_path

    return str(mgsm_solutions_path())


def run_gap(args: argparse.Namespace, langs: list[str] | None) -> int:
    """``--metric nll``: the reasoning gap per language; writes OUT/reasoning_gap.json and .md."""
    from .._io import write_json
    from ..eval import format_gap_table, load_solutions, reasoning_gap
    from ..eval.tasks import get_task

    task_name = args.task or "mgsm"
    if args.rescore:
        raise InvalidInputError("--rescore re-scores generations; --metric nll has none to re-score")
    if args.backend != "transformers":
        raise InvalidInputError("--metric nll scores with the transformers backend only")
    data = args.data or _default_data(task_name)
    task = get_task(task_name)
    found = task.available_langs(data)
    if langs is None:  # the reference first, then the paper's order
        langs = [x for x in PAPER_LANGS if x in found] or found
        langs = [args.reference, *[x for x in langs if x != args.reference]]
    if args.reference not in langs:
        langs = [args.reference, *langs]
    solutions = load_solutions(args.solutions or _default_solutions(), limit=args.limit)
    questions = {}
    for lang in langs:
        exs = task.load(data, lang, args.limit)
        if len(exs) != len(solutions):
            raise InvalidInputError(
                f"{len(exs)} {task_name} questions in {lang!r} but {len(solutions)} solutions; "
                "the solutions file must have one line per question"
            )
        questions[lang] = [task.format_query(e) for e in exs]
    model, tokenizer = _load(args)
    name = args.model + (f"+{args.adapter}" if args.adapter else "")
    print(f"reasoning gap of {name} on {task_name} ({len(solutions)} questions) in {', '.join(langs)}",
          file=sys.stderr)
    result = reasoning_gap(model, tokenizer, questions, solutions, reference=args.reference,
                           batch_size=args.batch_size, bootstrap=args.bootstrap, seed=args.seed,
                           verbose=not args.quiet, precision=args.precision)
    result = {"task": task_name, "model": name, "dtype": args.dtype, **result}
    md = format_gap_table(result, title=f"{task_name} reasoning gap: {name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "reasoning_gap.json", result)
    (out / "reasoning_gap.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0

"""``evaluate``: generate, extract, score, and keep every generation on disk (resumable).

Output folder layout (``out_dir``)::

    run.json               settings the generations were made with (checked on resume)
    {task}_{lang}.jsonl    one record per question: id, lang, question, gold,
                           response, prediction, correct
    results.json           accuracy per language, average, PCR per language
    results.md             the same as a markdown table (paper Table 2 layout)

Records are appended line by line and flushed after every batch, so an
interrupted run loses at most the batch in flight. On restart, finished
records are kept and only the missing questions are generated; a truncated
last line (a crash mid-write) is dropped and the file repaired. When a
language is complete its file is rewritten (atomically) in dataset order, so
an interrupted-and-resumed run leaves the same files as an uninterrupted one.
:func:`rescore` re-extracts and re-scores the saved responses without a model.

Example:
    >>> from layerselect.eval import evaluate
    >>> table = evaluate(model, tokenizer, "mgsm", langs=["en", "de"], data="../shared/data/mgsm",
    ...                  limit=20, out_dir="results/")                      # doctest: +SKIP
    >>> table["accuracy"]["de"], table["pcr"]["de"]                         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text, write_json
from .._progress import progress as progress_bar
from .._running import context_length
from ..errors import FormatError, InvalidInputError
from .generate import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_STOP,
    PROMPT_TEMPLATE,
    Generator,
    TransformersGenerator,
    VLLMGenerator,
    build_prompt,
)
from .metrics import format_table, score_table
from .records import read_records, records_path, rewrite_records
from .tasks import Example, Task, get_task

__all__ = ["evaluate", "rescore", "read_records", "records_path", "write_results"]

_RUN_KEYS = ("task", "model", "prompt_template", "max_new_tokens", "stop", "model_fingerprint")


def _record(example: Example, response: str, task: Task) -> dict[str, Any]:
    pred = task.extract(response)
    return {
        "id": example.id,
        "lang": example.lang,
        "question": example.question,
        "gold": example.answer,
        "response": response,
        "prediction": pred,
        "correct": task.is_correct(pred, example.answer),
    }


def _check_run(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    path = out_dir / "run.json"
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        if not isinstance(old, dict):
            old = {}
        diff = [k for k in _RUN_KEYS if k in old and k in settings and old[k] != settings[k]]
        old_data, new_data = old.get("data_sha256") or {}, settings.get("data_sha256") or {}
        changed = sorted(g for g in new_data if isinstance(old_data, dict) and g in old_data and old_data[g] != new_data[g])
        if changed:
            diff.append("data_sha256")
        precisions = old.get("precision", "fp32"), settings.get("precision", "fp32")  # absent = fp32
        if precisions[0] != precisions[1]:
            diff.append("precision")
        if diff:
            details = "; ".join(
                f"the questions of {changed} changed" if k == "data_sha256"
                else "precision: {!r} -> {!r}".format(*precisions) if k == "precision"
                else f"{k}: {old[k]!r} -> {settings[k]!r}"
                for k in diff
            )
            raise InvalidInputError(
                f"{out_dir} holds generations made with other settings ({details}); "
                "use another output folder, or overwrite=True to start again"
            )
    write_json(path, settings)


def model_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """A cheap digest of a model's weights: names, shapes and a strided sample of every tensor.

    Training or merging an adapter changes essentially every element of the
    matrices it touches, so a strided sample detects it; hashing every weight of
    a 7B model would cost seconds for nothing.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            h.update(f"{name}:{tuple(p.shape)};".encode())
            if p.device.type == "meta" or p.numel() == 0:
                continue
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            picked = flat[::step].to("cpu", torch.float32) if flat.is_floating_point() else flat[::step].cpu().double()
            h.update(picked.numpy().tobytes())
    return h.hexdigest()[:32]


def _examples_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.id, e.question, str(e.answer)], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:32]


def write_results(out_dir: str | os.PathLike[str], table: dict[str, Any], title: str = "") -> str:
    """Save ``table`` as ``results.json`` and ``results.md``; return the markdown."""
    out_dir = Path(out_dir)
    md = format_table(table, title=title)
    write_json(out_dir / "results.json", table)
    atomic_write_text(out_dir / "results.md", md + "\n")
    return md


def evaluate(
    model: Any,
    tokenizer: Any,
    task: str | Task,
    langs: Sequence[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    stop: Sequence[str] = DEFAULT_STOP,
    backend: str = "transformers",
    generator: Generator | None = None,
    model_name: str | None = None,
    reference: str = "en",
    overwrite: bool = False,
    verbose: bool = True,
    vllm_kwargs: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Evaluate ``model`` on ``task`` in ``langs``; return the Table-2 numbers.

    Args:
        model: a causal LM (transformers backend), or a checkpoint path (vLLM backend).
        tokenizer: its tokenizer (unused by vLLM; may be None there).
        task: ``"mgsm"``, ``"msvamp"``, ``"xcsqa"`` or a :class:`~layerselect.eval.tasks.Task`.
        langs: languages to evaluate (default: every language found in ``data``).
        data: the task's data folder (see :mod:`layerselect.eval.tasks`); None or
            ``"mgsm"`` means the MGSM copy bundled with the package.
        limit: the first ``limit`` questions per language.
        out_dir: where generations and results go (see module doc); None keeps
            everything in memory (no resume).
        batch_size: prompts per generate call (transformers backend).
        max_new_tokens: generation limit per response (paper: 512).
        stop: stop strings ending a response.
        backend: ``"transformers"`` or ``"vllm"``.
        generator: any callable ``prompts -> responses``; overrides ``backend``.
        model_name: recorded in ``run.json``; a resume with another name is refused.
        reference: the language PCR is measured against.
        overwrite: discard existing generations in ``out_dir`` for these languages.
        verbose: a progress bar per language on stderr, the table on stdout.
        vllm_kwargs: extra ``vllm.LLM`` arguments.
        precision: transformers backend: ``"fp32"`` (default), ``"bf16"`` autocast or
            ``"auto"`` (bf16 where the hardware is fast at it); recorded in ``run.json``, and
            a resume in another precision is refused (greedy answers can differ).

    Returns:
        :func:`~layerselect.eval.metrics.score_table` output plus ``"task"``,
        ``"model"`` and ``"markdown"``. PCR is empty when ``reference`` is not
        among ``langs``. With the transformers backend, ``"truncated_to_context"``
        (``{lang: n}``, also in ``results.json``) counts the prompts that did not fit the
        model's positions with room for the answer and lost their beginning (a warning per
        language says so; see :class:`~layerselect.eval.generate.TransformersGenerator`).
    """
    task = get_task(task)
    data = task.resolve_data(data)  # None or "mgsm" -> the bundled MGSM
    langs = _resolve_langs(task, data, langs)
    examples = {lang: task.load(data, lang, limit) for lang in langs}
    _check_same_questions(task, examples, reference)
    name = model_name or str(getattr(getattr(model, "config", None), "name_or_path", model))
    custom = generator is not None
    if generator is None:
        generator = _make_generator(model, tokenizer, backend, batch_size, max_new_tokens, stop, vllm_kwargs,
                                    precision)
    out = _prepare_out(out_dir)
    if out is not None:
        settings = {
            "task": task.name,
            "model": name,
            "model_fingerprint": model_fingerprint(model) if isinstance(model, torch.nn.Module) else str(model),
            "data_sha256": {lang: _examples_digest(examples[lang]) for lang in langs},
            "prompt_template": PROMPT_TEMPLATE,
            "max_new_tokens": max_new_tokens,
            "stop": list(stop),
            "langs": langs,
            "limit": limit,
        }
        if isinstance(generator, TransformersGenerator) and generator.precision != "fp32":
            settings["precision"] = generator.precision  # absent = fp32, as every run before it
        _check_run(out, settings, overwrite)
    step = batch_size if backend == "transformers" or custom else max(batch_size, 256)
    cut = _prompts_cut(task, examples, generator)
    correct = {
        lang: _answer_lang(task, lang, examples[lang], generator, step, out, overwrite=overwrite, verbose=verbose)
        for lang in langs
    }
    return _finish(correct, task, name, reference, out, verbose, extra={"truncated_to_context": cut} if cut else None)


def _prompts_cut(task: Task, examples: dict[str, list[Example]], generator: Generator) -> dict[str, int] | None:
    """Per language, how many prompts are cut to the model's context (one warning each); None for other backends."""
    if not isinstance(generator, TransformersGenerator):
        return None
    generator.warn_cut = False  # one warning per language here, not one per batch
    limit = context_length(generator.model)
    cut = {}
    for lang, exs in examples.items():
        cut[lang], longest = generator.count_cut([build_prompt(task.format_query(e)) for e in exs])
        if cut[lang] and limit is not None:
            warnings.warn(
                f"{cut[lang]} of {len(exs)} {task.name} {lang} prompts do not fit the model's {limit} positions "
                f"with room for the answer (longest {longest} tokens); their beginning is cut",
                stacklevel=3,
            )
    return cut


def _resolve_langs(task: Task, data: Path, langs: Sequence[str] | None) -> list[str]:
    """``langs`` without repeats, or every language with a data file in ``data``."""
    if langs is None:
        langs = task.available_langs(data)
        if not langs:
            raise InvalidInputError(f"no {task.name} data files found in {data}")
    langs = list(dict.fromkeys(langs))
    if not langs:
        raise InvalidInputError(f"no languages to evaluate: pass langs=[...] (e.g. ['en', 'de']) for {data}")
    return langs


def _check_same_questions(task: Task, examples: dict[str, list[Example]], reference: str) -> None:
    """PCR compares answers question by question: every language must hold the reference's questions."""
    if reference not in examples:
        return
    ref_ids = [e.id for e in examples[reference]]
    for lang, exs in examples.items():
        if [e.id for e in exs] != ref_ids and set(e.id for e in exs) != set(ref_ids):
            raise InvalidInputError(
                f"PCR needs the same questions in every language, but {task.name} {lang!r} has "
                f"{len(exs)} questions and {reference!r} {len(ref_ids)} with different ids; "
                f"check the data files or drop {reference!r} from langs"
            )


def _make_generator(
    model: Any,
    tokenizer: Any,
    backend: str,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str],
    vllm_kwargs: dict[str, Any] | None,
    precision: str = "fp32",
) -> Generator:
    if backend == "transformers":
        return TransformersGenerator(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     stop=stop, precision=precision)
    if backend == "vllm":
        if not isinstance(model, (str, os.PathLike)):
            raise InvalidInputError(
                "the vllm backend serves a checkpoint: pass its path as model "
                "(merge an adapter and save_pretrained it first)"
            )
        return VLLMGenerator(model, max_new_tokens=max_new_tokens, stop=stop, **(vllm_kwargs or {}))
    raise InvalidInputError(f"unknown backend {backend!r}; use 'transformers' or 'vllm'")


def _prepare_out(out_dir: str | os.PathLike[str] | None) -> Path | None:
    """``out_dir`` as an existing, writable folder (created if needed); None stays None."""
    if out_dir is None:
        return None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"eval output {out} is an existing file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"cannot create eval output {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InvalidInputError(f"eval output {out} is not writable")
    return out


def _answer_lang(
    task: Task,
    lang: str,
    exs: Sequence[Example],
    generator: Generator,
    step: int,
    out: Path | None,
    *,
    overwrite: bool,
    verbose: bool,
) -> dict[str, bool]:
    """Generate the answers of one language not yet in ``out``; ``{id: correct}`` in dataset order.

    Records are appended and flushed after every batch (an interrupted run loses
    at most that batch); at the end the file is rewritten in dataset order.
    """
    path = records_path(out, task, lang) if out is not None else None
    if path is not None and overwrite and path.exists():
        path.unlink()
    done = {str(r["id"]): r for r in read_records(path)} if path is not None else {}
    todo = [e for e in exs if e.id not in done]
    # Longest prompts first: batches of similar length waste less padding.
    todo.sort(key=lambda e: -len(task.format_query(e)))
    fh = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115
    bar = progress_bar(total=len(exs), initial=len(exs) - len(todo), desc=f"eval {task.name} {lang}",
                       unit="q", disable=not verbose)
    try:
        for i in range(0, len(todo), step):
            chunk = todo[i : i + step]
            responses = generator([build_prompt(task.format_query(e)) for e in chunk])
            if len(responses) != len(chunk):
                raise InvalidInputError(f"generator returned {len(responses)} responses for {len(chunk)} prompts")
            for e, resp in zip(chunk, responses):
                rec = _record(e, resp, task)
                done[e.id] = rec
                if fh is not None:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
            bar.update(len(chunk))
    finally:
        bar.close()
        if fh is not None:
            fh.close()
    ordered = [done[e.id] for e in exs]
    if path is not None:
        extra = [r for k, r in done.items() if k not in {e.id for e in exs}]
        rewrite_records(path, ordered + extra)  # dataset order; records beyond the limit are kept
    return {r["id"]: bool(r["correct"]) for r in ordered}


def _finish(correct: dict[str, dict[str, bool]], task: Task, name: str, reference: str,
            out: Path | None, verbose: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    table = score_table(correct, reference=reference)
    table["task"] = task.name
    table["model"] = name
    table.update(extra or {})
    title = f"{task.name}"
    md = write_results(out, table, title=title) if out is not None else format_table(table, title=title)
    table["markdown"] = md
    if verbose:
        print(md)
        if reference not in correct:
            print(f"(no PCR: {reference!r} was not evaluated)")
        if out is not None:
            print(f"wrote generations and results to {out}")
    return table


def rescore(
    out_dir: str | os.PathLike[str],
    task: str | Task | None = None,
    langs: Sequence[str] | None = None,
    limit: int | None = None,
    *,
    reference: str = "en",
    verbose: bool = True,
) -> dict[str, Any]:
    """Re-extract answers from saved generations and re-score them (no model needed).

    ``task`` and ``langs`` default to those in ``out_dir/run.json``; ``limit``
    keeps the first ``limit`` records of each language. Updates the
    ``prediction``/``correct`` fields in the JSONL files and the results files.

    Example:
        >>> table = rescore("results/")  # doctest: +SKIP
    """
    out = Path(out_dir)
    run_path = out / "run.json"
    try:
        run = json.loads(run_path.read_text(encoding="utf-8")) if run_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{run_path} is not valid JSON ({exc}); pass task= and langs=") from None
    if not isinstance(run, dict):
        raise FormatError(f"{run_path} is not a JSON object")
    if task is None and "task" not in run:
        raise InvalidInputError(f"{out} has no run.json naming the task; pass task=")
    task = get_task(task or run["task"])
    if langs is None:
        langs = run.get("langs") or sorted(
            p.stem[len(task.name) + 1 :] for p in out.glob(f"{task.name}_*.jsonl")
        )
    if not langs:
        raise InvalidInputError(f"{out} holds no {task.name}_{{lang}}.jsonl generations to rescore")
    correct: dict[str, dict[str, bool]] = {}
    for lang in langs:
        path = records_path(out, task, lang)
        records = read_records(path)
        if not records:
            raise InvalidInputError(f"no generations for {lang!r} in {path}; run evaluate first")
        for i, rec in enumerate(records, 1):
            missing = [k for k in ("id", "response", "gold") if k not in rec]
            if missing or not isinstance(rec.get("response"), str):
                raise FormatError(
                    f"{path}: record {i} lacks {missing or ['a text response']}; it was not written by "
                    "layerselect eval. Regenerate with overwrite=True"
                )
            problem = task.gold_problem(rec["gold"])
            if problem is not None:
                raise FormatError(
                    f"{path}: record {i} (id {rec['id']!r}), field 'gold': {problem}; fix the record, "
                    "or regenerate with overwrite=True"
                )
            rec["prediction"] = task.extract(rec["response"])
            rec["correct"] = task.is_correct(rec["prediction"], rec["gold"])
        rewrite_records(path, records)
        used = records[:limit] if limit is not None else records
        correct[lang] = {str(r["id"]): bool(r["correct"]) for r in used}
    return _finish(correct, task, run.get("model", str(out)), reference, out, verbose)

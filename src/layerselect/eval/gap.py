"""The reasoning gap: a generation-free measure of how much worse a model reasons in language g than in English.

For question ``i`` and language ``g`` the text is the paper's inference prompt
(:data:`~layerselect.eval.generate.PROMPT_TEMPLATE`) holding the question in
``g``, then ``" "`` + the English step-by-step solution ``s_i``, tokenized in
one piece with the tokenizer's default special tokens (BOS). The *target*
tokens are those that carry a character of ``" " + s_i`` (the token carrying
the space before the solution included; found from the tokenizer's character
offsets); no EOS is added. Then, accumulated in float64::

    NLL_g = sum_i sum_{target t} -log p(t | prefix) / sum_i #targets_i
    gap_g = NLL_g - NLL_ref

The solution is the same English text in every language, so ``gap_g`` says how
much less the model "follows" the English reasoning when the question is asked
in ``g``; it has signal on small models whose accuracy is ~0. A bootstrap over
questions (the same resample for every language) gives 95% intervals of each
gap and of the average gap over the non-reference languages.

Example:
    >>> from layerselect.eval import reasoning_gap, load_solutions
    >>> sols = load_solutions("../shared/data/mgsm_solutions/mgsm_en_solutions.jsonl")  # doctest: +SKIP
    >>> res = reasoning_gap(model, tokenizer, {"en": q_en, "de": q_de}, sols)           # doctest: +SKIP
    >>> res["nll"]["en"], res["gap"]["de"], res["interval"]["de"]                        # doctest: +SKIP
    (1.58, 0.20, [0.17, 0.23])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._progress import progress as progress_bar
from .._running import context_length, eval_mode, pad_batch, pad_token_id, warn_cut_to_context
from ..errors import FormatError, InvalidInputError
from ..precision import autocast, model_device, model_dtype, resolve_precision
from .generate import PROMPT_TEMPLATE, build_prompt

__all__ = [
    "reasoning_gap",
    "load_solutions",
    "gap_item",
    "target_nll",
    "format_gap_table",
    "paired_delta",
]

def load_solutions(path: str | os.PathLike[str], limit: int | None = None) -> list[str]:
    """The English solutions, one per MGSM question, from a JSON Lines file.

    Each line is an object with a ``"solution"`` string (and optionally
    ``"index"``, which must then equal the line's position: line i is question
    i of every ``mgsm_{lang}.tsv``).

    Example:
        >>> import json, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "s.jsonl")
        >>> _ = open(p, "w").write(json.dumps({"index": 0, "solution": "2+3=5\\n#### 5"}) + "\\n")
        >>> load_solutions(p)
        ['2+3=5\\n#### 5']
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"no solutions file at {path}")
    out: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FormatError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("solution"), str) or not rec["solution"].strip():
                raise FormatError(f"{path}:{lineno}: expected an object with a non-empty 'solution' string")
            if "index" in rec and rec["index"] != len(out):
                raise FormatError(
                    f"{path}:{lineno}: index {rec['index']!r} but this is solution {len(out)}; "
                    "solutions must be in question order"
                )
            out.append(rec["solution"])
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise FormatError(f"{path} holds no solutions")
    return out


def gap_item(tokenizer: Any, question: str, solution: str, prompt: str | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of prompt(question) + " " + solution, and which of them are targets.

    A token is a target when its character span overlaps ``" " + solution``
    (the token carrying that leading space included). With a slow tokenizer
    (no offsets) the two parts are tokenized separately and concatenated.

    Example:
        >>> ids, target = gap_item(tok, "What is 2+3?", "2+3=5")   # doctest: +SKIP
        >>> tok.decode([i for i, t in zip(ids, target) if t])      # doctest: +SKIP
        ' 2+3=5'
    """
    head = build_prompt(question, prompt or PROMPT_TEMPLATE)
    text = head + " " + solution
    boundary = len(head)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids = list(enc["input_ids"])
        target = [end > boundary and end > start for start, end in enc["offset_mapping"]]
    else:
        a = list(tokenizer(head, add_special_tokens=True)["input_ids"])
        b = list(tokenizer(" " + solution, add_special_tokens=False)["input_ids"])
        ids, target = a + b, [False] * len(a) + [True] * len(b)
    if target and target[0]:
        target[0] = False  # the first token has no prefix to be predicted from
    if not any(target):
        raise InvalidInputError(f"no target tokens for solution {solution[:40]!r}")
    return ids, target


@torch.no_grad()
def target_nll(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row sum of ``-log p(token)`` over the ``target`` positions, in float64.

    ``target[b, t]`` marks token ``t`` of row ``b`` as predicted from positions
    ``< t``. Computed by :func:`layerselect.loss.label_only_loss`, the library's one
    loss path: only the predicting positions go through the output head, in
    chunks, so no ``[tokens, vocab]`` buffer for the whole batch is ever built.

    Example:
        >>> target_nll(model, ids, mask, target)   # doctest: +SKIP
        tensor([41.2, 37.9], dtype=torch.float64)
    """
    from ..loss import IGNORE_INDEX, label_only_loss

    labels = torch.where(target.to(torch.bool), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    out = label_only_loss(model, input_ids, labels, attention_mask, dtype=torch.float64)
    return out.nll_sum.detach().to("cpu", torch.float64)


def _score(
    model: Any, items: Sequence[tuple[list[int], list[bool]]], batch_size: int, pad_id: int, desc: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """(NLL sums, target counts) per item, batching items of similar length (right padding).

    A progress bar labelled ``gap {desc}`` when ``desc`` is given.
    """
    n = len(items)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.array([sum(t) for _, t in items], dtype=np.int64)
    order = sorted(range(n), key=lambda i: -len(items[i][0]))
    dev = model_device(model)
    with progress_bar(total=n, desc=f"gap {desc}", unit="q", disable=not desc) as bar:
        for b in range(0, n, batch_size):
            idx = order[b : b + batch_size]
            ids, mask = pad_batch([items[i][0] for i in idx], pad_id, padding_side="right")
            target, _ = pad_batch([items[i][1] for i in idx], 0, padding_side="right")
            sums[idx] = target_nll(model, ids.to(dev), mask.to(dev), target.bool().to(dev)).numpy()
            bar.update(len(idx))
    return sums, counts


def _interval(x: np.ndarray) -> list[float]:
    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]


def reasoning_gap(
    model: Any,
    tokenizer: Any,
    questions: Mapping[str, Sequence[str]],
    solutions: Sequence[str],
    *,
    reference: str = "en",
    batch_size: int = 8,
    prompt: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    verbose: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """NLL of the English solutions given the question in each language, and the gap to ``reference``.

    Args:
        model: a causal LM (a :class:`~layerselect.selective_ffn.SelectiveFFNModel` works too).
        tokenizer: its tokenizer (a fast one gives exact target offsets).
        questions: ``{lang: [question, ...]}``, line-aligned across languages.
        solutions: the English solution of each question (same order).
        reference: the language gaps are measured against; must be in ``questions``.
        batch_size: texts per forward pass (results do not depend on it).
        prompt: inference template with ``{query}`` (default: the paper's Table 8 prompt).
        bootstrap: resamples of the questions for the 95% intervals (0: no intervals).
        seed: the bootstrap's random seed.
        verbose: a progress bar per language on stderr.
        precision: ``"fp32"`` (default, comparable across machines), ``"bf16"`` autocast, or
            ``"auto"`` (bf16 where the hardware is fast at it; :mod:`layerselect.precision`).
            Sums stay float64; on Gemma-3-270M bf16 moved the average gap by 0.0007
            nats/token (``benchmarks/bench_precision.py``).

    Returns:
        ``{"langs", "reference", "n_questions", "nll": {lang}, "tokens": {lang},
        "gap": {lang}, "interval": {lang: [lo, hi]} (of the gap; [0, 0] for the
        reference), "nll_interval": {lang: [lo, hi]}, "avg_gap",
        "avg_gap_interval", "per_question": {lang: {"nll_sum": [...], "tokens": [...]}},
        "prompt", "bootstrap", "seed", "precision", "truncated_to_context": {lang: n}}``
        (``precision``: what ran, fp32 or bf16; ``truncated_to_context``: how many texts of
        each language were longer than the model's ``max_position_embeddings`` and were
        cut to it, with a warning: the solution's tail past the context is not scored).
    """
    n = _check_gap_inputs(questions, solutions, reference, batch_size)
    langs = list(questions)
    used = resolve_precision(precision, model_device(model), model_dtype(model))
    sums, counts, cut = _score_langs(model, tokenizer, questions, solutions, batch_size, prompt, verbose, used)
    if bootstrap > 0:
        intervals = _bootstrap_intervals(sums, counts, langs, reference, n, bootstrap, seed)
    else:
        intervals = {"interval": {}, "nll_interval": {}, "avg_gap_interval": None}
    return {
        "langs": langs,
        "reference": reference,
        "n_questions": n,
        **_gap_summary(sums, counts, langs, reference),
        **intervals,
        "prompt": prompt or PROMPT_TEMPLATE,
        "bootstrap": bootstrap,
        "seed": seed,
        "precision": used,
        "truncated_to_context": cut,
        "per_question": {g: {"nll_sum": sums[g].tolist(), "tokens": counts[g].tolist()} for g in langs},
    }


def _check_gap_inputs(
    questions: Mapping[str, Sequence[str]], solutions: Sequence[str], reference: str, batch_size: int
) -> int:
    """The number of questions, after checking that every language has one per solution."""
    if reference not in questions:
        raise InvalidInputError(f"reference language {reference!r} is not among {sorted(questions)}")
    n = len(solutions)
    for lang in questions:
        if len(questions[lang]) != n:
            raise InvalidInputError(
                f"{len(questions[lang])} questions in {lang!r} but {n} solutions; they must be line-aligned"
            )
    if n == 0:
        raise InvalidInputError("no questions to score")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    return n


def _score_langs(
    model: Any,
    tokenizer: Any,
    questions: Mapping[str, Sequence[str]],
    solutions: Sequence[str],
    batch_size: int,
    prompt: str | None,
    verbose: bool,
    precision: str = "fp32",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
    """Per-question NLL sums and target counts of every language, in eval mode (restored after),
    and how many texts of each language were cut to the model's context."""
    pad_id = pad_token_id(tokenizer)
    limit = context_length(model)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    cut: dict[str, int] = {}
    with eval_mode(model), autocast(precision, model_device(model)):
        for lang in questions:
            items = [gap_item(tokenizer, q, s, prompt) for q, s in zip(questions[lang], solutions)]
            cut[lang] = 0 if limit is None else sum(len(ids) > limit for ids, _ in items)
            if cut[lang]:
                longest = max(len(ids) for ids, _ in items)
                items = [(ids[:limit], target[:limit]) for ids, target in items]
                warn_cut_to_context(cut[lang], len(items), limit, longest,
                                    f"{lang} question + solution texts", stacklevel=4)
            sums[lang], counts[lang] = _score(model, items, batch_size, pad_id, lang if verbose else "")
    return sums, counts, cut


def _gap_summary(
    sums: Mapping[str, np.ndarray], counts: Mapping[str, np.ndarray], langs: Sequence[str], reference: str
) -> dict[str, Any]:
    """NLL per target token of each language, its gap to ``reference``, and the average gap."""
    nll = {g: float(sums[g].sum() / counts[g].sum()) for g in langs}
    gap = {g: nll[g] - nll[reference] for g in langs}
    others = [g for g in langs if g != reference]
    return {
        "nll": nll,
        "tokens": {g: int(counts[g].sum()) for g in langs},
        "gap": gap,
        "avg_gap": float(np.mean([gap[g] for g in others])) if others else 0.0,
    }


def _bootstrap_intervals(
    sums: Mapping[str, np.ndarray],
    counts: Mapping[str, np.ndarray],
    langs: Sequence[str],
    reference: str,
    n: int,
    bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """95% intervals of each NLL, each gap and the average gap, from one resample shared by all languages."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(bootstrap, n))  # one resample for every language
    boot = {g: sums[g][idx].sum(1) / counts[g][idx].sum(1) for g in langs}
    others = [g for g in langs if g != reference]
    avg = _interval(np.mean([boot[g] - boot[reference] for g in others], axis=0)) if others else None
    return {
        "interval": {g: _interval(boot[g] - boot[reference]) for g in langs},
        "nll_interval": {g: _interval(boot[g]) for g in langs},
        "avg_gap_interval": avg,
    }


def format_gap_table(result: Mapping[str, Any], title: str = "") -> str:
    """Markdown table: language, NLL, gap and its 95% interval, target tokens.

    Example:
        >>> r = {"langs": ["en", "de"], "reference": "en", "nll": {"en": 1.5, "de": 1.7},
        ...      "gap": {"en": 0.0, "de": 0.2}, "interval": {"de": [0.1, 0.3]},
        ...      "tokens": {"en": 10, "de": 10}, "avg_gap": 0.2, "avg_gap_interval": [0.1, 0.3]}
        >>> print(format_gap_table(r).splitlines()[3])
        | de | 1.7000 | +0.2000 | [+0.1000, +0.3000] | 10 |
    """
    def iv(x: Any) -> str:
        return f"[{x[0]:+.4f}, {x[1]:+.4f}]" if x else "-"

    lines = [f"### {title}", ""] if title else []
    lines += ["| lang | NLL | gap | 95% interval | target tokens |", "|---|---|---|---|---|"]
    ref = result["reference"]
    for g in result["langs"]:
        gap = "0 (reference)" if g == ref else f"{result['gap'][g]:+.4f}"
        ival = "-" if g == ref else iv(result.get("interval", {}).get(g))
        lines.append(f"| {g} | {result['nll'][g]:.4f} | {gap} | {ival} | {result['tokens'][g]} |")
    if len(result["langs"]) > 1:
        lines.append(f"| avg (non-{ref}) | | {result['avg_gap']:+.4f} | {iv(result.get('avg_gap_interval'))} | |")
    if not all(math.isfinite(v) for v in result["nll"].values()):
        lines.append("\n(non-finite NLL: check the model's dtype)")
    return "\n".join(lines)


#: What :func:`paired_delta` can compare.
PAIRED_STATS = ("avg_gap", "nll_ref", "nll_others")


def paired_delta(
    after: Mapping[str, Any], before: Mapping[str, Any], stat: str = "avg_gap", *, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """``(delta, low, high)``: the change of a gap statistic from ``before`` to ``after``, 95% paired bootstrap.

    ``after`` and ``before`` are :func:`reasoning_gap` results of two models on the same
    questions and languages (e.g. base and SLAM-trained). ``stat``: ``"avg_gap"`` (mean
    over the other languages of NLL - NLL_reference), ``"nll_ref"`` (NLL of the reference
    language) or ``"nll_others"`` (mean NLL of the other languages; ``avg_gap =
    nll_others - nll_ref``). The questions are resampled once per draw and the statistic
    recomputed for both on that draw (token-weighted, as :func:`reasoning_gap`): the
    interval of a difference, not two overlapping intervals.

    Example:
        >>> d, lo, hi = paired_delta(gap_after, gap_before)                # doctest: +SKIP
        >>> d_en, _, _ = paired_delta(gap_after, gap_before, "nll_ref")     # doctest: +SKIP
    """
    if stat not in PAIRED_STATS:
        raise InvalidInputError(f"unknown statistic {stat!r}; use one of {', '.join(PAIRED_STATS)}")

    def shape(gap: Mapping[str, Any]) -> dict[str, int]:
        return {x: len(gap["per_question"][x]["nll_sum"]) for x in gap["langs"]}

    if shape(after) != shape(before) or len(set(shape(before).values())) != 1 \
            or after.get("reference") != before.get("reference"):
        raise InvalidInputError(
            f"gaps measured on other questions or languages cannot be paired: {shape(after)} vs {shape(before)}; "
            "measure both with the same questions, languages and reference")

    def value(gap: Mapping[str, Any], idx: np.ndarray) -> np.ndarray:
        ref, pq = gap["reference"], gap["per_question"]

        def nll(lang: str) -> np.ndarray:
            sums, counts = np.asarray(pq[lang]["nll_sum"]), np.asarray(pq[lang]["tokens"])
            return sums[idx].sum(axis=-1) / counts[idx].sum(axis=-1)

        others = np.mean([nll(x) for x in gap["langs"] if x != ref], axis=0)
        return {"avg_gap": others - nll(ref), "nll_ref": nll(ref), "nll_others": others}[stat]

    n = len(before["per_question"][before["reference"]]["nll_sum"])
    everything = np.arange(n)[None, :]
    delta = float(value(after, everything)[0] - value(before, everything)[0])
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    low, high = np.quantile(value(after, draws) - value(before, draws), [0.025, 0.975])
    return delta, float(low), float(high)

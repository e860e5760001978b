"""Evaluation as in the paper: multilingual accuracy and Prediction Consistency Ratio.

- :func:`evaluate` generates answers with the paper's inference prompt (greedy),
  writes every generation to JSONL (resumable), and returns accuracy per
  language, the average, and PCR per non-English language;
- :func:`rescore` re-scores saved generations without a model;
- :func:`extract_answer`, :func:`accuracy`, :func:`pcr` are the scoring functions alone;
- :func:`reasoning_gap` is the generation-free reasoning measure: NLL of the English
  solution given the question in each language, its gap to English, bootstrap intervals
  (:func:`load_solutions` reads the solutions, :func:`format_gap_table` prints it);
- :class:`MGSM`, :class:`MSVAMP`, :class:`XCSQA` are the tasks (:func:`get_task` by name).

Example:
    >>> from layerselect.eval import extract_answer, accuracy, pcr
    >>> extract_answer("9 * $2 = $18.")
    18.0
    >>> accuracy([True, False]), pcr([True, True], [True, False])
    (0.5, 0.5)
"""

from __future__ import annotations

from .extract import extract_answer, extract_label, extract_number, normalize_digits, parse_number
from .gap import format_gap_table, gap_item, load_solutions, paired_delta, reasoning_gap, target_nll
from .generate import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_STOP,
    PROMPT_TEMPLATE,
    TransformersGenerator,
    VLLMGenerator,
    build_prompt,
    truncate_at_stop,
)
from .metrics import accuracy, format_table, pcr, pcr_by_language, score_table
from .records import read_records, records_path
from .runner import evaluate, rescore, write_results
from .tasks import MGSM, MSVAMP, TASKS, XCSQA, Example, Task, get_task

__all__ = [
    "evaluate",
    "reasoning_gap",
    "paired_delta",
    "load_solutions",
    "gap_item",
    "target_nll",
    "format_gap_table",
    "rescore",
    "extract_answer",
    "extract_number",
    "extract_label",
    "normalize_digits",
    "parse_number",
    "accuracy",
    "pcr",
    "pcr_by_language",
    "score_table",
    "format_table",
    "Task",
    "Example",
    "MGSM",
    "MSVAMP",
    "XCSQA",
    "TASKS",
    "get_task",
    "PROMPT_TEMPLATE",
    "DEFAULT_STOP",
    "DEFAULT_MAX_NEW_TOKENS",
    "build_prompt",
    "truncate_at_stop",
    "TransformersGenerator",
    "VLLMGenerator",
    "read_records",
    "records_path",
    "write_results",
]

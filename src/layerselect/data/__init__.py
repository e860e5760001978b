"""Translation pairs for one-stage alignment training: loading, filtering, prompting, masking.

SLAM trains on X->English translation of questions with the paper's prompt
(Table 7), and the loss is taken on the English target only::

    Translate this from [German] to [English]:
    [German]: Natalia hat im April ...
    [English]: Natalia sold clips ...

A :class:`TranslationExample` holds one pair; they come from

- ``pairs:DIR``: a folder of ``{xx}-en/train.{xx}`` + ``{xx}-en/train.en``,
  line-aligned (the layout of ``gsm8kinstruct_question``);
- ``jsonl:FILE``: one ``{"lang": ..., "source": ..., "target": ...}`` per line;
- a Hugging Face ``datasets.Dataset`` with those columns
  (:func:`examples_from_hf`), or ``hf:DIR`` for one saved with ``save_to_disk``.

:func:`filter_examples` drops empty, degenerate and length-ratio-outlier pairs
and reports why; :func:`tokenize_example` builds ``input_ids`` / ``labels``
(``-100`` on the prompt) / ``attention_mask``; :class:`TranslationDataset`
does that for a whole list and :class:`TranslationCollator` pads a batch on
the right.

Modules, in reading order:

================  ==========================================================
``prompt``        :class:`TranslationExample`, the prompt, language names
``loaders``       :func:`load_translation_data` and the readers behind it
``subsets``       :func:`first_per_language` (``max_pairs``), :func:`split_holdout`
``quality``       :func:`filter_examples`, :class:`FilterReport`
``tokenization``  :func:`tokenize_example`, :class:`TranslationDataset`
``collate``       :class:`TranslationCollator`
================  ==========================================================

Example:
    >>> from layerselect.data import load_translation_data, filter_examples, TranslationDataset
    >>> pairs = load_translation_data("pairs:../shared/data/gsm8kinstruct_question",
    ...                               langs=["de", "sw"], max_pairs=1000)          # doctest: +SKIP
    >>> pairs, report = filter_examples(pairs); print(report)                      # doctest: +SKIP
    >>> train_ds = TranslationDataset(pairs, tokenizer, max_length=1024)           # doctest: +SKIP
    >>> format_prompt("de", "Hallo Welt")
    'Translate this from [German] to [English]:\\n[German]: Hallo Welt\\n[English]:'
"""

from __future__ import annotations

from .collate import TranslationCollator
from .loaders import (
    demo_pairs,
    examples_from_hf,
    load_jsonl_pairs,
    load_parallel_dir,
    load_translation_data,
)
from .prompt import (
    LANGUAGE_NAMES,
    PROMPT_TEMPLATE,
    TranslationExample,
    format_prompt,
    language_name,
)
from .quality import FilterReport, filter_examples
from .subsets import first_per_language, split_holdout
from .tokenization import TranslationDataset, tokenize_example

__all__ = [
    "LANGUAGE_NAMES",
    "PROMPT_TEMPLATE",
    "TranslationExample",
    "FilterReport",
    "TranslationDataset",
    "TranslationCollator",
    "language_name",
    "format_prompt",
    "load_parallel_dir",
    "load_jsonl_pairs",
    "examples_from_hf",
    "demo_pairs",
    "load_translation_data",
    "filter_examples",
    "first_per_language",
    "split_holdout",
    "tokenize_example",
]

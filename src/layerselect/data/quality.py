"""The quality filter: drop empty, degenerate and length-ratio-outlier pairs, and say why.

Example:
    >>> kept, report = filter_examples([TranslationExample("de", "Hallo.", "Hello.")])
    >>> print(report)
    kept 1 of 1 pairs; dropped 0 (none)
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .prompt import TranslationExample

__all__ = ["FilterReport", "filter_examples"]


@dataclass
class FilterReport:
    """What :func:`filter_examples` kept and dropped (``dropped[reason]``, ``dropped_by_lang[lang][reason]``)."""

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_by_lang: dict[str, dict[str, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"kept {self.kept} of {self.total} pairs; dropped {self.total - self.kept} ({parts})"

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped),
                "dropped_by_lang": {k: dict(v) for k, v in self.dropped_by_lang.items()}}


# A unit of 1-20 characters repeated at least 4 more times in a row.
_REPEAT = re.compile(r"(.{1,20}?)\1{4,}", re.DOTALL)


def _degenerate(text: str, min_span: int = 20, max_fraction: float = 0.3) -> bool:
    """True when a short unit repeats back to back over >= ``min_span`` chars and >= ``max_fraction`` of the text,
    or when a long text is made of very few distinct words (``"the the the ..."``)."""
    for m in _REPEAT.finditer(text):
        span = m.end() - m.start()
        if span >= min_span and span >= max_fraction * len(text) and not m.group(1).isdigit():
            return True
    words = text.split()
    return len(words) >= 12 and len(set(words)) / len(words) < 0.25


def filter_examples(
    examples: Iterable[TranslationExample],
    *,
    max_ratio: float = 3.0,
    min_chars: int = 1,
) -> tuple[list[TranslationExample], FilterReport]:
    """Drop pairs that would teach noise; return ``(kept, report)``.

    Reasons, checked in this order (a pair counts once, under the first):

    - ``empty``: source or target shorter than ``min_chars`` after stripping;
    - ``repetition``: degenerate repetition in source or target (a short unit
      repeated back to back over a large part of the text, or a long text of
      very few distinct words), the usual failure of machine-translated data;
    - ``length_ratio``: ``len(source) / len(target)`` (characters) more than
      ``max_ratio`` times above or below the *median ratio of that language*
      (scripts differ: Chinese runs about 0.3x English in characters).

    Example:
        >>> ex = [TranslationExample("de", "Hallo Welt.", "Hello world."),
        ...       TranslationExample("de", "", "Nothing."),
        ...       TranslationExample("de", "ja " * 30, "yes " * 30)]
        >>> kept, report = filter_examples(ex)
        >>> len(kept), report.dropped
        (1, {'empty': 1, 'repetition': 1})
    """
    examples = list(examples)
    report = FilterReport(total=len(examples))
    reasons: list[str | None] = []
    for ex in examples:
        if len(ex.source.strip()) < min_chars or len(ex.target.strip()) < min_chars:
            reasons.append("empty")
        elif _degenerate(ex.source) or _degenerate(ex.target):
            reasons.append("repetition")
        else:
            reasons.append(None)
    log_ratio: dict[str, list[float]] = {}
    for ex, why in zip(examples, reasons):
        if why is None:
            log_ratio.setdefault(ex.lang, []).append(math.log(len(ex.source) / len(ex.target)))
    median = {lang: statistics.median(v) for lang, v in log_ratio.items()}
    limit = math.log(max_ratio)
    kept = []
    for i, ex in enumerate(examples):
        why = reasons[i]
        if why is None and abs(math.log(len(ex.source) / len(ex.target)) - median[ex.lang]) > limit:
            why = "length_ratio"
        if why is None:
            kept.append(ex)
        else:
            report.dropped[why] = report.dropped.get(why, 0) + 1
            per = report.dropped_by_lang.setdefault(ex.lang, {})
            per[why] = per.get(why, 0) + 1
    report.kept = len(kept)
    return kept, report


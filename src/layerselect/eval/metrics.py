"""Accuracy and the Prediction Consistency Ratio (PCR), and the paper's Table-2 layout.

PCR (paper, Sec. 4) = ``|M ∩ N| / |M|`` with ``M`` the questions answered
correctly in English and ``N`` those answered correctly in another language,
over the *same* questions. When ``M`` is empty (English got nothing right)
PCR is undefined: :func:`pcr` returns ``nan`` and tables show ``n/a``.

Example:
    >>> accuracy([True, False, True, True])
    0.75
    >>> accuracy([18.0, 3.0, None], [18, 4, 5])
    0.3333333333333333
    >>> pcr({"q1": True, "q2": True, "q3": False}, {"q1": True, "q2": False, "q3": True})
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidInputError
from .tasks import Task, get_task

__all__ = ["accuracy", "pcr", "pcr_by_language", "score_table", "format_table"]

Flags = Mapping[str, bool] | Sequence[bool]


def accuracy(
    predictions: Sequence[Any] | Mapping[str, bool],
    golds: Sequence[Any] | None = None,
    *,
    task: str | Task = "mgsm",
) -> float:
    """Fraction correct.

    Either ``accuracy(flags)`` with one bool per question (a sequence, or a
    mapping ``id -> bool``), or ``accuracy(predictions, golds, task=...)`` with
    extracted answers (None = no answer) and gold answers, compared the way
    ``task`` compares them (numbers numerically, labels case-insensitively).

    Example:
        >>> accuracy(["B", "c", None], ["B", "C", "A"], task="xcsqa")
        0.6666666666666666
    """
    if isinstance(predictions, Mapping):
        predictions = list(predictions.values())
    if golds is None:
        flags = list(predictions)
        if not all(isinstance(f, bool) for f in flags):
            raise InvalidInputError(
                "accuracy(flags) takes one bool per question; pass golds to compare extracted answers"
            )
    else:
        if len(predictions) != len(golds):
            raise InvalidInputError(f"{len(predictions)} predictions but {len(golds)} gold answers")
        t = get_task(task)
        flags = [t.is_correct(p, g) for p, g in zip(predictions, golds)]
    if not flags:
        raise InvalidInputError("accuracy of zero questions is undefined")
    return sum(flags) / len(flags)


def _as_mapping(flags: Flags | None, what: str) -> dict[str, bool]:
    if flags is None:
        raise InvalidInputError(
            f"PCR needs the {what} results; evaluate English on the same questions (add 'en' to langs)"
        )
    if isinstance(flags, Mapping):
        return {str(k): bool(v) for k, v in flags.items()}
    return {str(i): bool(v) for i, v in enumerate(flags)}


def pcr(english: Flags | None, other: Flags) -> float:
    """Prediction Consistency Ratio ``|M ∩ N| / |M|``.

    ``english`` and ``other`` give, per question, whether it was answered
    correctly: mappings ``question id -> bool`` (or aligned sequences of bools).
    Both must cover exactly the same questions, else
    :class:`~layerselect.errors.InvalidInputError`. Returns ``nan`` when no
    English question is correct (``M`` empty).

    Example:
        >>> pcr([True, True, False, False], [True, False, True, False])
        0.5
        >>> import math; math.isnan(pcr([False, False], [True, False]))
        True
    """
    en = _as_mapping(english, "English")
    xx = _as_mapping(other, "other language's")
    if en.keys() != xx.keys():
        only_en = sorted(en.keys() - xx.keys())[:5]
        only_xx = sorted(xx.keys() - en.keys())[:5]
        raise InvalidInputError(
            "PCR needs English and the other language evaluated on the same questions; "
            f"only in English: {only_en}{'...' if len(en.keys() - xx.keys()) > 5 else ''}, "
            f"only in the other: {only_xx}{'...' if len(xx.keys() - en.keys()) > 5 else ''}"
        )
    m = {k for k, v in en.items() if v}
    if not m:
        return math.nan
    n = {k for k, v in xx.items() if v}
    return len(m & n) / len(m)


def pcr_by_language(correct: Mapping[str, Flags], reference: str = "en") -> dict[str, float]:
    """PCR of every language except ``reference`` against it (``{lang: pcr}``).

    Example:
        >>> pcr_by_language({"en": [True, True], "de": [True, False], "zh": [False, False]})
        {'de': 0.5, 'zh': 0.0}
    """
    if reference not in correct:
        raise InvalidInputError(
            f"PCR is measured against {reference!r}, which was not evaluated "
            f"(languages: {', '.join(correct)}); add it to langs"
        )
    return {lang: pcr(correct[reference], flags) for lang, flags in correct.items() if lang != reference}


def score_table(correct: Mapping[str, Flags], reference: str = "en") -> dict[str, Any]:
    """The paper's Table-2 numbers: accuracy per language, their average, PCR per language.

    Returns ``{"langs": [...], "n": {lang: questions}, "accuracy": {lang: acc},
    "average": mean accuracy over all languages (reference included),
    "pcr": {lang: pcr} (empty when ``reference`` was not evaluated),
    "pcr_average": mean PCR over non-reference languages (None if undefined)}``.
    Fractions in [0, 1]; ``nan`` PCRs become None.
    """
    if not correct:
        raise InvalidInputError("no languages to score")
    acc = {lang: accuracy(flags) for lang, flags in correct.items()}
    pcrs: dict[str, float | None] = {}
    if reference in correct:
        pcrs = {k: (None if math.isnan(v) else v) for k, v in pcr_by_language(correct, reference).items()}
    defined = [v for v in pcrs.values() if v is not None]
    return {
        "langs": list(correct),
        "n": {lang: len(flags) for lang, flags in correct.items()},
        "accuracy": acc,
        "average": sum(acc.values()) / len(acc),
        "reference": reference,
        "pcr": pcrs,
        "pcr_average": sum(defined) / len(defined) if defined else None,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def format_table(table: Mapping[str, Any], title: str = "") -> str:
    """A markdown table (languages as columns, then Avg), values in percent.

    Example:
        >>> print(format_table(score_table({"de": [True, False], "en": [True, True]})))
        |  | de | en | Avg |
        |---|---|---|---|
        | Acc | 50.0 | 100.0 | 75.0 |
        | PCR | 50.0 | – | 50.0 |
    """
    langs = list(table["langs"])
    ref = table.get("reference", "en")
    head = f"| {title} | " + " | ".join(langs) + " | Avg |"
    sep = "|" + "---|" * (len(langs) + 2)
    acc = "| Acc | " + " | ".join(_pct(table["accuracy"][lang]) for lang in langs)
    acc += f" | {_pct(table['average'])} |"
    rows = [head, sep, acc]
    if table.get("pcr"):
        cells = ["–" if lang == ref else _pct(table["pcr"].get(lang)) for lang in langs]
        rows.append("| PCR | " + " | ".join(cells) + f" | {_pct(table.get('pcr_average'))} |")
    return "\n".join(rows)

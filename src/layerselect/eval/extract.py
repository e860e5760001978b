"""Answer extraction: the last number (MGSM, MSVAMP) or the last bracketed label (xCSQA).

The paper scores a response by the *last number* in it, compared numerically
with the gold answer. :func:`extract_answer` implements that with the
normalisations a multilingual model needs:

- digits of any script (Bengali ``১২``, Thai ``๑๒``, Devanagari ``१२``,
  full-width ``１２``, Arabic-Indic ``١٢`` ...) become ASCII digits via
  :func:`unicodedata.decimal`; full-width/Arabic separators and the Unicode
  minus sign become ``, . -``;
- thousands separators: ``1,000`` / ``1,000,000`` / Indian ``1,00,000`` and a
  (narrow) no-break or thin space between digit groups (``1 000``);
  a comma followed by exactly 1–2 digits is a decimal comma (``3,5`` = 3.5);
- decimals and trailing zeros: ``8.0`` == ``8.00`` == 8; a trailing full stop
  is a sentence end, not a decimal point (``$18.`` -> 18);
- negatives: ``-3`` -> -3.0, but a hyphen right after a letter, digit or
  closing bracket is not a sign (``10-3`` -> 3.0, ``COVID-19`` -> 19.0);
- currency signs and units around the number are ignored (``$18``, ``18€``,
  ``18美元``, ``16টি``; ``-$5`` is -5): numbers inside words are found, as in
  the paper's scorer.

Limits: a point is always a decimal point (German ``1.000`` reads as 1.0),
fractions such as ``1/2`` give their last number, and words for numbers
("eighteen") are not numbers.

Example:
    >>> extract_answer("She makes 9 * $2 = $18.")
    18.0
    >>> extract_answer("উত্তর হল ১,০০০.৫০ টাকা")
    1000.5
    >>> extract_answer("The answer is (B).", task="xcsqa")
    'B'
    >>> extract_answer("no idea") is None
    True
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["extract_answer", "extract_number", "extract_label", "normalize_digits", "parse_number"]

# Separators and signs from other scripts, mapped to ASCII before parsing.
_PUNCT = {
    "\u066b": ".",  # ARABIC DECIMAL SEPARATOR
    "\u066c": ",",  # ARABIC THOUSANDS SEPARATOR
    "\uff0c": ",",  # FULLWIDTH COMMA
    "\uff0e": ".",  # FULLWIDTH FULL STOP
    "\u2212": "-",  # MINUS SIGN
    "\uff0d": "-",  # FULLWIDTH HYPHEN-MINUS
    "\u2013": "-",  # EN DASH (often used as a minus)
    "\uff04": "$",  # FULLWIDTH DOLLAR SIGN
    "\u00a0": "\u202f",  # NO-BREAK SPACE -> one canonical group separator
    "\u2009": "\u202f",  # THIN SPACE
}

_GROUP = "[,\u202f]"
# Numbers with thousands separators (western or Indian grouping), or plain digits,
# then an optional decimal part (point, or a comma followed by 1-2 digits).
_NUMBER = re.compile(
    r"(?:(?P<sign>(?<![\w)\]])-)[$€£¥₹]?)?"
    r"(?P<int>\d{1,2}(?:,\d{2})+,\d{3}(?!\d)"  # Indian: 1,00,000
    rf"|\d{{1,3}}(?:{_GROUP}\d{{3}})+(?!\d)"  # 1,000,000 / 1 000
    r"|\d+)"
    r"(?P<frac>\.\d+|,\d{1,2}(?![\d,]))?"
)

# (A), [B], ( c ) ... : a single letter label in brackets.
_LABEL = re.compile(r"[(\[（【]\s*([A-Za-z])\s*[)\]）】]")


def normalize_digits(text: str) -> str:
    """Map digits of every script to ASCII and foreign separators/minus signs to ASCII ones.

    Example:
        >>> normalize_digits("১৮ ๑๒ １２ ١٢٫٥ १०")
        '18 12 12 12.5 10'
    """
    out = []
    for ch in text:
        if ch in _PUNCT:
            out.append(_PUNCT[ch])
        elif ch.isdigit() and not ch.isascii():
            d = unicodedata.decimal(ch, None)
            out.append(str(d) if d is not None else ch)
        else:
            out.append(ch)
    return "".join(out)


def _to_float(match: re.Match[str]) -> float:
    digits = re.sub(_GROUP, "", match.group("int"))
    frac = match.group("frac") or ""
    value = float(digits + ("." + frac[1:] if frac else ""))
    return -value if match.group("sign") else value


def extract_number(text: str) -> float | None:
    """The last number in ``text`` as a float, or None when there is none.

    Example:
        >>> extract_number("It costs 1,000.50 dollars, not 3.")
        3.0
        >>> extract_number("Die Antwort ist -3,5.")
        -3.5
    """
    if not text:
        return None
    text = normalize_digits(text)
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    frac = last.group("frac") or ""
    if frac.startswith(",") and re.search(r"\d,$", text[: last.start()]):
        # "1,2,3": a list, not a decimal comma -> its last item
        return float(frac[1:])
    return _to_float(last)


def parse_number(value: object) -> float:
    """A gold answer (int, float or a string such as ``"114,200"``) as a float.

    Raises :class:`~layerselect.errors.InvalidInputError` if it holds no number.

    Example:
        >>> parse_number("114,200")
        114200.0
    """
    if isinstance(value, bool):
        raise InvalidInputError(f"gold answer {value!r} is a boolean, not a number")
    if isinstance(value, (int, float)):
        return float(value)
    number = extract_number(str(value))
    if number is None:
        raise InvalidInputError(f"gold answer {value!r} holds no number")
    return number


def extract_label(text: str, labels: str | None = None) -> str | None:
    """The last bracketed single-letter label (``(A)``, ``[b]``, ``（C）``), upper-cased.

    ``labels`` restricts the accepted letters (e.g. ``"ABCDE"``); others are ignored.

    Example:
        >>> extract_label("(A) is wrong, so the answer is (c).")
        'C'
    """
    if not text:
        return None
    allowed = None if labels is None else set(labels.upper())
    found = None
    for m in _LABEL.finditer(text):
        letter = m.group(1).upper()
        if allowed is None or letter in allowed:
            found = letter
    return found


def extract_answer(text: str, task: str | Task = "mgsm") -> float | str | None:
    """Extract the answer a response gives, the way the paper scores ``task``.

    ``task`` is a task name (``"mgsm"``, ``"msvamp"``, ``"xcsqa"``) or a
    :class:`~layerselect.eval.tasks.Task`. Numeric tasks give a float (the last
    number), xCSQA a label such as ``"B"`` (the last bracketed label); None
    when the response holds no answer.

    Example:
        >>> extract_answer("16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.0")
        18.0
    """
    from .tasks import get_task

    return get_task(task).extract(text)

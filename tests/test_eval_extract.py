"""Answer extraction: hand-written responses in several languages and scripts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerselect.errors import InvalidInputError
from layerselect.eval import (
    extract_answer,
    extract_label,
    extract_number,
    get_task,
    normalize_digits,
    parse_number,
)

# (response, expected last number) -- written by hand, one tricky point each.
NUMERIC_CASES = [
    # plain English, the paper's style
    ("16 - 3 - 4 = 9 eggs. 9 * $2 = $18. The answer is 18.", 18.0),
    ("$18.", 18.0),  # currency sign + trailing full stop
    ("She makes $18 every day", 18.0),
    ("It costs 1,000.50 dollars.", 1000.5),  # thousands separator + decimals
    ("1,000,000 people live there", 1_000_000.0),
    ("8.0", 8.0),  # trailing zeros
    ("The answer is 8.00 dollars", 8.0),
    ("0.5 of the cake", 0.5),
    ("-3", -3.0),  # negatives
    ("The temperature drops to -3.", -3.0),
    ("He lost -$5 today", -5.0),
    ("10-3 = 7", 7.0),  # minus between numbers is not a sign
    ("We computed 10-3", 3.0),
    ("COVID-19", 19.0),  # hyphen after a letter is not a sign
    ("Answer: 70000 dollars", 70000.0),
    ("So 1,2,3", 3.0),  # a list, not a decimal comma
    # numbers inside words (as in the paper's scorer)
    ("Step1: 5 apples. Step2", 2.0),
    ("Jibu ni shilingi18", 18.0),
    ("所以答案是18美元。", 18.0),
    ("答えは18ドルです。", 18.0),
    # other Latin-script languages
    ("Die Antwort ist 3,5 Euro.", 3.5),  # decimal comma
    ("La réponse est 1\u202f000 €.", 1000.0),  # narrow no-break space grouping
    ("La respuesta es 1\u00a0250.", 1250.0),  # no-break space grouping
    ("Ответ: 18 долларов.", 18.0),
    ("Kwa hiyo jibu ni 18.", 18.0),
    ("Total: 1,00,000 rupees", 100_000.0),  # Indian grouping
    # other scripts' digits
    ("উত্তর হল ১৮ ডলার।", 18.0),  # Bengali
    ("১,০০০.৫০ টাকা", 1000.5),  # Bengali with separators
    ("জেনেট প্রতিদিন ১৬টি ডিম পায়", 16.0),  # Bengali number glued to a word
    ("คำตอบคือ ๑๘ บาท", 18.0),  # Thai
    ("उत्तर १२५ है", 125.0),  # Devanagari
    ("答案是１８元", 18.0),  # full-width
    ("合計１，２００円", 1200.0),  # full-width with full-width comma
    ("الجواب هو ١٢٫٥", 12.5),  # Arabic-Indic with Arabic decimal separator
    ("Ответ −7", -7.0),  # Unicode minus sign
    # no answer
    ("I do not know.", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), NUMERIC_CASES)
def test_extract_number_table(text, expected):
    got = extract_answer(text, task="mgsm")
    if expected is None:
        assert got is None
    else:
        assert isinstance(got, float)
        assert got == pytest.approx(expected, abs=1e-9)


def test_eight_point_zero_is_correct_for_eight():
    task = get_task("mgsm")
    assert task.is_correct(extract_answer("It is 8.0"), 8)
    assert task.is_correct(extract_answer("$18."), parse_number("18"))
    assert not task.is_correct(extract_answer("8.5"), 8)
    assert not task.is_correct(None, 8)


def test_msvamp_uses_the_same_extraction():
    assert extract_answer("x = 1,234", task="msvamp") == 1234.0


LABEL_CASES = [
    ("The answer is (B).", "B"),
    ("(A) is wrong; (c) is right.", "C"),
    ("Option [D] fits best", "D"),
    ("答案是（E）", "E"),
    ("The answer is B", None),  # not bracketed
    ("(Z) is not a choice (x)", None),  # not among A-J
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), LABEL_CASES)
def test_extract_label_table(text, expected):
    assert extract_answer(text, task="xcsqa") == expected


def test_extract_label_restricted_letters():
    assert extract_label("(A) then (F)", "ABCDE") == "A"


def test_normalize_digits_every_script():
    assert normalize_digits("১২ ๑๒ १२ １２ ١٢ ۱۲") == "12 12 12 12 12 12"
    assert normalize_digits("x²") == "x²"  # superscripts are not decimal digits


def test_parse_number_gold_answers():
    assert parse_number("114,200") == 114200.0
    assert parse_number(3) == 3.0
    with pytest.raises(InvalidInputError):
        parse_number("none")


def test_unknown_task():
    with pytest.raises(InvalidInputError, match="unknown task"):
        extract_answer("1", task="gsm9k")


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-10**9, max_value=10**9), st.sampled_from(["", "$", "€"]))
def test_property_formatted_integers(n, currency):
    sign = "-" if n < 0 else ""
    text = f"so the answer is {sign}{currency}{abs(n):,}."
    assert extract_number(text) == float(n)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=10**7), st.integers(min_value=0, max_value=99))
def test_property_bengali_decimals(whole, cents):
    ascii_text = f"{whole:,}.{cents:02d}"
    bengali = ascii_text.translate(str.maketrans("0123456789", "০১২৩৪৫৬৭৮৯"))
    assert math.isclose(extract_number(f"মোট {bengali} টাকা।"), whole + cents / 100)

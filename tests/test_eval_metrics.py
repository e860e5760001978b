"""Accuracy and PCR on a hand-made set, numbers computed by hand."""

from __future__ import annotations

import math

import pytest

from layerselect.errors import InvalidInputError
from layerselect.eval import accuracy, format_table, pcr, pcr_by_language, score_table

# Five questions q0..q4.
#   en: q0 q1 q3 right      -> acc 3/5 = 0.6, M = {q0, q1, q3}
#   de: q0 q2 q3 right      -> acc 0.6, M ∩ N = {q0, q3} -> PCR 2/3
#   zh: only q4 right       -> acc 0.2, M ∩ N = {}       -> PCR 0
#   average accuracy (en included) = (0.6 + 0.6 + 0.2) / 3 = 0.4666...
#   mean PCR over de, zh = (2/3 + 0) / 2 = 1/3
EN = {"q0": True, "q1": True, "q2": False, "q3": True, "q4": False}
DE = {"q0": True, "q1": False, "q2": True, "q3": True, "q4": False}
ZH = {"q0": False, "q1": False, "q2": False, "q3": False, "q4": True}


def test_accuracy_by_hand():
    assert accuracy(EN) == pytest.approx(0.6)
    assert accuracy(list(ZH.values())) == pytest.approx(0.2)


def test_accuracy_from_predictions_and_golds():
    # 18.0 == 18, 8.0 == 8 right; 3 != 4 and None wrong -> 2/4
    assert accuracy([18.0, 8.0, 3.0, None], [18, "8", 4, 5]) == 0.5
    assert accuracy(["b", "A"], ["B", "C"], task="xcsqa") == 0.5


def test_accuracy_errors():
    with pytest.raises(InvalidInputError, match="zero questions"):
        accuracy([])
    with pytest.raises(InvalidInputError, match="gold"):
        accuracy([1.0, 2.0], [1.0])
    with pytest.raises(InvalidInputError, match="bool"):
        accuracy([1.0, 2.0])


def test_pcr_by_hand():
    assert pcr(EN, DE) == pytest.approx(2 / 3)
    assert pcr(EN, ZH) == 0.0
    assert pcr(EN, EN) == 1.0
    # aligned sequences work too
    assert pcr(list(EN.values()), list(DE.values())) == pytest.approx(2 / 3)


def test_pcr_empty_m_is_nan():
    assert math.isnan(pcr({"q0": False, "q1": False}, {"q0": True, "q1": False}))


def test_pcr_errors():
    with pytest.raises(InvalidInputError, match="English"):
        pcr(None, DE)
    with pytest.raises(InvalidInputError, match="same questions"):
        pcr(EN, {"q0": True, "q1": True})
    with pytest.raises(InvalidInputError, match="'en'.*not evaluated"):
        pcr_by_language({"de": DE, "zh": ZH})


def test_score_table_and_markdown():
    table = score_table({"de": DE, "zh": ZH, "en": EN})
    assert table["accuracy"] == pytest.approx({"de": 0.6, "zh": 0.2, "en": 0.6})
    assert table["average"] == pytest.approx(1.4 / 3)
    assert table["pcr"] == pytest.approx({"de": 2 / 3, "zh": 0.0})
    assert table["pcr_average"] == pytest.approx(1 / 3)
    assert table["n"] == {"de": 5, "zh": 5, "en": 5}
    assert format_table(table, title="mgsm") == (
        "| mgsm | de | zh | en | Avg |\n"
        "|---|---|---|---|---|\n"
        "| Acc | 60.0 | 20.0 | 60.0 | 46.7 |\n"
        "| PCR | 66.7 | 0.0 | – | 33.3 |"
    )


def test_score_table_without_english_and_with_undefined_pcr():
    assert score_table({"de": DE})["pcr"] == {}
    none_right = {k: False for k in EN}
    table = score_table({"en": none_right, "de": DE})
    assert table["pcr"] == {"de": None}
    assert table["pcr_average"] is None
    assert "| PCR | – | n/a | n/a |" in format_table(table)

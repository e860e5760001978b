"""One MGSM reader: the text loader (analyze/train) and the benchmark (eval) read a file the same way."""

from __future__ import annotations

import pytest

from layerselect.errors import FormatError
from layerselect.eval.tasks import MGSM
from layerselect.texts import load_texts, read_mgsm_tsv

# A question holding a tab, CRLF endings, and blank lines after the last question.
TRICKY = "Col A\tcol B: how many?\t12\r\nWhat is 1,000 + 1?\t1,001\n  Spaced  \t 3 \n\n\n"


def _folder(tmp_path, text, lang="en"):
    d = tmp_path / "mgsm"
    d.mkdir(exist_ok=True)
    (d / f"mgsm_{lang}.tsv").write_bytes(text.encode("utf-8"))
    return d


def test_the_text_loader_and_the_benchmark_agree_on_a_tricky_file(tmp_path):
    d = _folder(tmp_path, TRICKY)
    texts = load_texts(f"mgsm:{d}")["en"]
    examples = MGSM().load(d, "en")
    # Split at the last tab, by hand: the tab inside the first question stays there.
    expected = ["Col A\tcol B: how many?", "What is 1,000 + 1?", "Spaced"]
    assert texts == expected
    assert [e.question for e in examples] == expected
    assert [e.answer for e in examples] == [12.0, 1001.0, 3.0]
    assert [e.id for e in examples] == ["0", "1", "2"]
    assert [(r.line, r.answer) for r in read_mgsm_tsv(d / "mgsm_en.tsv")] == [(1, "12"), (2, "1,001"), (3, "3")]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a?\t1\n\nb?\t2\n", 2, "blank line"),  # would shift every later question
        ("a?\t1\n   \nb?\t2\n", 2, "blank line"),
        ("a?\t1\nno tab here\n", 2, "no tab"),
        ("a?\t1\n\t2\n", 2, "question before the tab is empty"),
    ],
)
def test_both_call_sites_refuse_the_same_bad_line(tmp_path, text, line, words):
    d = _folder(tmp_path, text)
    where = f"mgsm_en.tsv:{line}:"
    with pytest.raises(FormatError, match=words) as from_texts:
        load_texts(f"mgsm:{d}")
    with pytest.raises(FormatError, match=words) as from_task:
        MGSM().load(d, "en")
    assert where in str(from_texts.value) and where in str(from_task.value)


def test_a_bad_answer_is_refused_by_the_benchmark_with_its_line(tmp_path):
    d = _folder(tmp_path, "a?\t1\nb?\tmany\n")
    assert load_texts(f"mgsm:{d}")["en"] == ["a?", "b?"]  # the loader needs only the questions
    with pytest.raises(FormatError, match=r"mgsm_en.tsv:2:"):
        MGSM().load(d, "en")


def test_bundled_mgsm_reads_the_same_through_both(tmp_path):
    texts = load_texts("mgsm", langs=["en", "zh"])
    task = MGSM()
    for lang in ("en", "zh"):
        examples = task.load(task.resolve_data(None), lang)
        assert len(examples) == 250
        assert [e.question for e in examples] == texts[lang]

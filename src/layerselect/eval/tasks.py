"""Benchmarks as small task objects: how to read the data, phrase the query, and score.

A :class:`Task` knows three things: how to load the examples of one language
from a data folder (:meth:`Task.load`), how to turn an example into the
``{query}`` of the paper's inference prompt (:meth:`Task.format_query`), and
how to extract and check an answer (:meth:`Task.extract`,
:meth:`Task.is_correct`). Adding a benchmark is one subclass registered in
:data:`TASKS`.

Data layouts (``data`` is a folder; ``{lang}`` a language code such as ``de``):

- ``mgsm``: ``mgsm_{lang}.tsv`` or ``{lang}.tsv``, one ``question<TAB>answer``
  per line, read by :func:`layerselect.texts.read_mgsm_tsv` (split at the last
  tab; a blank line before the end is an error); line *i* is the same question
  in every language (id = ``str(i)``, counting from 0).
- ``msvamp``: ``msvamp_{lang}.jsonl``, ``{lang}.jsonl``, ``test_{lang}.jsonl``
  (or ``.json``: JSON Lines or one JSON array). Each record has the question
  under ``question`` / ``query`` / ``m_query`` / ``input`` / ``problem`` /
  ``Question`` (a ``Body`` field, as in the original SVAMP, is prepended) and
  a numeric answer under ``answer`` / ``Answer`` / ``answer_number`` /
  ``response`` / ``target`` / ``label`` / ``output`` (number or string such
  as ``"1,200"``); an ``id`` / ``ID`` / ``idx`` field, else the line index, is
  the id that aligns languages.
- ``xcsqa``: ``xcsqa_{lang}.jsonl``, ``{lang}.jsonl``, ``dev_{lang}.jsonl``,
  ``{lang}/dev.jsonl`` (or ``.json``). Records as in X-CSQA
  (``{"id", "question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}``)
  or flat (``question`` string + ``choices`` as a list of strings, a list of
  ``{label, text}`` or a ``{"label": [...], "text": [...]}`` dict; the gold
  label under ``answerKey`` / ``answer`` / ``label``).

Example:
    >>> task = get_task("mgsm")
    >>> examples = task.load("../shared/data/mgsm", "de", limit=5)  # doctest: +SKIP
    >>> task.extract("9 * 2 = 18."), task.is_correct(18.0, 18.0)
    (18.0, True)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .._io import read_text
from ..errors import FormatError, InvalidInputError
from ..texts import read_mgsm_tsv
from .extract import extract_label, extract_number, parse_number

__all__ = ["Example", "Task", "MGSM", "MSVAMP", "XCSQA", "TASKS", "get_task"]


@dataclass(frozen=True)
class Example:
    """One benchmark question in one language.

    ``id`` aligns the same question across languages (PCR needs it);
    ``answer`` is a float for numeric tasks and a label such as ``"B"`` for
    multiple choice; ``choices`` maps labels to texts (multiple choice only).
    """

    id: str
    lang: str
    question: str
    answer: float | str
    choices: dict[str, str] = field(default_factory=dict)


class Task:
    """Base class of a benchmark. Subclasses set :attr:`name` and implement :meth:`load_file`."""

    #: Short name used on the command line and in file names.
    name: ClassVar[str] = ""
    #: File names tried, in order, for language ``{lang}``.
    file_patterns: ClassVar[tuple[str, ...]] = ()
    #: ``"number"`` or ``"label"``.
    answer_type: ClassVar[str] = "number"

    # -- data ---------------------------------------------------------------
    def bundled_data(self) -> Path | None:
        """The copy of this task's data shipped in the package, or None (only MGSM has one)."""
        return None

    def resolve_data(self, data: str | Path | None) -> Path:
        """``data`` as a folder: None or the task's own name (with no such path) -> the bundled copy.

        Example:
            >>> get_task("mgsm").resolve_data(None).name
            'mgsm'
        """
        if data is None or (str(data) == self.name and not Path(data).exists()):
            bundled = self.bundled_data()
            if bundled is None:
                raise InvalidInputError(
                    f"{self.name} data is not bundled with layerselect: pass its data folder"
                    + (f" (no path {str(data)!r} exists)" if data is not None else "")
                )
            return bundled
        return Path(data)

    def find_file(self, data: str | Path, lang: str) -> Path:
        """The data file of ``lang`` inside the folder ``data`` (or ``data`` itself if it is a file)."""
        data = Path(data)
        if data.is_file():
            return data
        if not data.is_dir():
            raise InvalidInputError(f"{self.name} data folder {data} does not exist")
        for pattern in self.file_patterns:
            path = data / pattern.format(lang=lang)
            if path.is_file():
                return path
        tried = ", ".join(p.format(lang=lang) for p in self.file_patterns)
        raise InvalidInputError(
            f"no {self.name} data for language {lang!r} in {data} (looked for {tried}); "
            f"languages found there: {', '.join(self.available_langs(data)) or 'none'}"
        )

    def available_langs(self, data: str | Path) -> list[str]:
        """Languages that have a data file in the folder ``data``, sorted."""
        data = Path(data)
        if not data.is_dir():
            return []
        regexes = [
            re.compile(re.escape(p).replace(re.escape("{lang}"), r"([A-Za-z][A-Za-z_-]*)"))
            for p in self.file_patterns
        ]
        found = set()
        for path in data.rglob("*"):
            rel = path.relative_to(data).as_posix()
            for regex in regexes:  # the first (most specific) pattern decides
                m = regex.fullmatch(rel)
                if m:
                    if path.is_file():
                        found.add(m.group(1))
                    break
        return sorted(found)

    def load(self, data: str | Path, lang: str, limit: int | None = None) -> list[Example]:
        """The first ``limit`` examples of ``lang`` (all when None)."""
        if limit is not None and limit < 1:
            raise InvalidInputError(f"limit must be a positive number of questions, got {limit}")
        examples = self.load_file(self.find_file(data, lang), lang)
        if not examples:
            raise InvalidInputError(f"{self.name} data for {lang!r} is empty")
        ids = [e.id for e in examples]
        if len(set(ids)) != len(ids):
            raise InvalidInputError(f"{self.name} data for {lang!r} has duplicate question ids")
        return examples[:limit] if limit is not None else examples

    def load_file(self, path: Path, lang: str) -> list[Example]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- prompting and scoring ---------------------------------------------------
    def format_query(self, example: Example) -> str:
        """The text that fills ``{query}`` in the inference prompt."""
        return example.question

    def extract(self, text: str) -> float | str | None:
        """The answer a response gives (None when it gives none)."""
        return extract_number(text)

    def is_correct(self, prediction: float | str | None, gold: float | str) -> bool:
        """Whether an extracted answer matches the gold one (numbers compared numerically)."""
        if prediction is None:
            return False
        return math.isclose(float(prediction), float(gold), rel_tol=1e-9, abs_tol=1e-6)

    def gold_problem(self, gold: object) -> str | None:
        """Why a saved gold answer cannot be scored by :meth:`is_correct` (None when it can).

        Example:
            >>> get_task("mgsm").gold_problem("five")
            "'five' is not a number"
        """
        if isinstance(gold, bool) or not isinstance(gold, (int, float, str)):
            return f"{gold!r} is not a number"
        try:
            value = float(gold)
        except ValueError:
            return f"{gold!r} is not a number"
        return None if math.isfinite(value) else f"{gold!r} is not a finite number"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MGSM(Task):
    """MGSM: 250 grade-school math questions in 11 languages; answer = last number."""

    name = "mgsm"
    file_patterns = ("mgsm_{lang}.tsv", "{lang}.tsv")

    def bundled_data(self) -> Path:
        from ..resources import mgsm_dir

        return mgsm_dir()

    def load_file(self, path: Path, lang: str) -> list[Example]:
        out = []
        for row in read_mgsm_tsv(path):
            try:
                gold = parse_number(row.answer)
            except InvalidInputError as exc:
                raise FormatError(f"{path}:{row.line}: {exc}") from None
            out.append(Example(id=str(row.line - 1), lang=lang, question=row.question, answer=gold))
        return out


def _read_records(path: Path) -> list[dict[str, Any]]:
    """JSON Lines, or one JSON array / ``{"data": [...]}`` object."""
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}: not valid JSON ({exc})") from None
    else:
        records = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if i == 0 and stripped.startswith("{"):
                    # maybe a pretty-printed {"data": [...]} object
                    try:
                        obj = json.loads(text)
                    except json.JSONDecodeError:
                        obj = None
                    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                        return obj["data"]
                raise FormatError(f"{path}:{i + 1}: not valid JSON ({exc})") from None
    if not all(isinstance(r, dict) for r in records):
        raise FormatError(f"{path}: every record must be a JSON object")
    return records


def _first(record: dict[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in record and record[key] not in (None, ""):
            return record[key]
    return None


def _record_id(record: dict[str, Any], index: int) -> str:
    value = _first(record, ("id", "ID", "idx", "qid"))
    return str(index) if value is None else str(value)


class MSVAMP(Task):
    """MSVAMP: 1,000 SVAMP math word problems per language (JSON Lines); answer = last number."""

    name = "msvamp"
    file_patterns = (
        "msvamp_{lang}.jsonl", "{lang}.jsonl", "test_{lang}.jsonl",
        "msvamp_{lang}.json", "{lang}.json", "test_{lang}.json",
    )
    question_keys: ClassVar[tuple[str, ...]] = ("question", "query", "m_query", "input", "problem", "Question")
    answer_keys: ClassVar[tuple[str, ...]] = (
        "answer", "Answer", "answer_number", "response", "target", "label", "output",
    )

    def load_file(self, path: Path, lang: str) -> list[Example]:
        out = []
        for i, rec in enumerate(_read_records(path)):
            question = _first(rec, self.question_keys)
            answer = _first(rec, self.answer_keys)
            if question is None or answer is None:
                raise FormatError(
                    f"{path}: record {i + 1} needs a question (one of {list(self.question_keys)}) "
                    f"and a numeric answer (one of {list(self.answer_keys)}); it has {sorted(rec)}"
                )
            body = rec.get("Body")
            if body and isinstance(body, str) and body.strip() not in str(question):
                question = f"{body.strip()} {str(question).strip()}"
            try:
                gold = parse_number(answer)
            except InvalidInputError as exc:
                raise FormatError(f"{path}: record {i + 1}: {exc}") from None
            out.append(Example(id=_record_id(rec, i), lang=lang, question=str(question).strip(), answer=gold))
        return out


class XCSQA(Task):
    """X-CSQA: commonsense multiple choice (labels A-E); answer = last bracketed label."""

    name = "xcsqa"
    answer_type = "label"
    file_patterns = (
        "xcsqa_{lang}.jsonl", "{lang}.jsonl", "dev_{lang}.jsonl", "{lang}/dev.jsonl",
        "xcsqa_{lang}.json", "{lang}.json", "dev_{lang}.json", "{lang}/dev.json",
    )

    @staticmethod
    def _choices(raw: Any, path: Path, i: int) -> dict[str, str]:
        if isinstance(raw, dict) and "label" in raw and "text" in raw:
            return {str(lbl).upper(): str(txt) for lbl, txt in zip(raw["label"], raw["text"])}
        if isinstance(raw, Sequence) and not isinstance(raw, str) and raw:
            if all(isinstance(c, dict) for c in raw):
                return {str(c["label"]).upper(): str(c["text"]) for c in raw}
            return {chr(ord("A") + k): str(c) for k, c in enumerate(raw)}
        raise FormatError(f"{path}: record {i + 1} has no usable 'choices'")

    def load_file(self, path: Path, lang: str) -> list[Example]:
        out = []
        for i, rec in enumerate(_read_records(path)):
            q = rec.get("question")
            if isinstance(q, dict):
                stem, raw_choices = q.get("stem"), q.get("choices")
            else:
                stem, raw_choices = q, rec.get("choices")
            answer = _first(rec, ("answerKey", "answer", "label"))
            if not stem or answer is None:
                raise FormatError(
                    f"{path}: record {i + 1} needs 'question' (or question.stem) and 'answerKey'"
                )
            choices = self._choices(raw_choices, path, i)
            gold = str(answer).strip().upper()
            if gold not in choices:
                raise FormatError(f"{path}: record {i + 1}: answer {gold!r} is not one of {sorted(choices)}")
            out.append(Example(_record_id(rec, i), lang, str(stem).strip(), gold, choices))
        return out

    def format_query(self, example: Example) -> str:
        options = " ".join(f"({label}) {text}" for label, text in example.choices.items())
        return f"{example.question}\nAnswer Choices: {options}"

    def extract(self, text: str) -> str | None:
        return extract_label(text, "ABCDEFGHIJ")

    def is_correct(self, prediction: float | str | None, gold: float | str) -> bool:
        return prediction is not None and str(prediction).upper() == str(gold).upper()

    def gold_problem(self, gold: object) -> str | None:
        if not isinstance(gold, str) or not gold.strip():
            return f"{gold!r} is not an answer label such as 'B'"
        return None


#: Registered tasks by name.
TASKS: dict[str, type[Task]] = {t.name: t for t in (MGSM, MSVAMP, XCSQA)}


def get_task(task: str | Task) -> Task:
    """A task instance from its name (``"mgsm"``, ``"msvamp"``, ``"xcsqa"``) or a Task."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[str(task).lower()]()
    except KeyError:
        raise InvalidInputError(f"unknown task {task!r}; use one of {sorted(TASKS)}") from None

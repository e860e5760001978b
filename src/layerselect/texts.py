"""Reading the texts to analyse, grouped by language.

A *text spec* names where they are; :func:`load_texts` returns
``{language: [text, ...]}``. Accepted:

- a bundled source by name: ``mgsm`` (the MGSM test questions in 11
  languages, shipped in the package, CC BY 4.0) or ``demo`` (the demo's 20
  questions in 8 languages); a path of the same name, if one exists, wins;
- ``mgsm:DIR``: a folder of ``{lang}.tsv`` or ``mgsm_{lang}.tsv`` files, one
  ``question<TAB>answer`` per line (the question is the text; read by
  :func:`read_mgsm_tsv`, the same reader the MGSM benchmark uses);
- ``txt:DIR``: a folder of line-aligned ``{lang}.txt`` files, one text per line;
- ``jsonl:FILE``: ``{"lang": ..., "text": ...}`` lines, or wide lines with one
  key per language (``{"id": 0, "en": "...", "de": "..."}``, the demo's layout);
- ``hf:DIR``: a Hugging Face dataset saved with ``save_to_disk``: a
  ``DatasetDict`` keyed by language (its first column named ``question``,
  ``text`` or ``inputs`` is the text) or one ``Dataset`` with ``lang`` and
  ``text`` columns; ``hf:NAME`` (e.g. ``hf:juletxara/mgsm``) loads config =
  language, split ``test``, through ``datasets.load_dataset`` (network or
  the local datasets cache).

Without a ``kind:`` prefix the kind of a path is detected.

Example:
    >>> from layerselect.texts import load_texts
    >>> texts = load_texts("mgsm", langs=["en", "de"], limit=2)
    >>> texts["en"][0][:22], len(texts["de"])
    ('Janet’s ducks lay 16 e', 2)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from ._io import iter_jsonl, read_text
from .errors import FormatError, InvalidInputError

__all__ = [
    "load_texts",
    "read_mgsm_tsv",
    "MGSMRow",
    "split_spec",
    "default_data_dir",
    "PAPER_LANGS",
    "TEXT_KINDS",
]

#: The paper's ten MGSM languages, low-resource first as in its tables.
PAPER_LANGS = ("bn", "th", "sw", "ja", "zh", "de", "fr", "ru", "es", "en")

#: The ``kind:`` prefixes :func:`load_texts` accepts.
TEXT_KINDS = ("mgsm", "txt", "jsonl", "hf")

_TSV = re.compile(r"^(?:mgsm_)?([A-Za-z][A-Za-z_-]*)\.tsv$")
_TXT = re.compile(r"^([A-Za-z][A-Za-z_-]*)\.txt$")


def default_data_dir() -> Path | None:
    """``$LAYERSELECT_DATA_DIR``, else ``../shared/data`` from the working directory, if it exists."""
    env = os.environ.get("LAYERSELECT_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path.cwd().parent / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)


def _detect(path: Path) -> str:
    if path.is_file():
        return "jsonl"
    if not path.is_dir():
        raise InvalidInputError(f"data path {path} does not exist")
    names = [p.name for p in path.iterdir()]
    if any(_TSV.match(n) for n in names):
        return "mgsm"
    if any(_TXT.match(n) for n in names):
        return "txt"
    raise InvalidInputError(
        f"{path} holds no {{lang}}.tsv, mgsm_{{lang}}.tsv or {{lang}}.txt files; "
        "pass a folder in one of those layouts or a JSONL file with 'lang' and 'text' fields"
    )


class MGSMRow(NamedTuple):
    """One line of an MGSM TSV file: its 1-based ``line`` number, ``question``, and ``answer`` as written."""

    line: int
    question: str
    answer: str


def read_mgsm_tsv(path: str | os.PathLike[str]) -> list[MGSMRow]:
    """The rows of an MGSM file: one ``question<TAB>answer`` per line; the one MGSM reader.

    The split is at the *last* tab (answers are numbers, so a tab inside a
    question stays in the question). Line *i* is question *i* in every
    language, so a blank line in the middle (it would shift the rest) or a
    line with no tab raises :class:`~layerselect.errors.FormatError` naming
    ``file:line``; blank lines at the end are ignored. ``\\r\\n`` endings are accepted.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "mgsm_en.tsv")
        >>> _ = open(p, "w").write("Tab\\there?\\t5\\n2+2?\\t4\\n\\n")
        >>> [(r.question, r.answer) for r in read_mgsm_tsv(p)]
        [('Tab\\there?', '5'), ('2+2?', '4')]
    """
    lines = [ln.rstrip("\r") for ln in read_text(path).split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            raise FormatError(
                f"{path}:{lineno}: blank line; line i is question i in every language, "
                "so delete it (only blank lines at the end are allowed)"
            )
        if "\t" not in line:
            raise FormatError(f"{path}:{lineno}: expected 'question<TAB>answer', found no tab")
        question, answer = line.rsplit("\t", 1)
        if not question.strip():
            raise FormatError(f"{path}:{lineno}: the question before the tab is empty")
        rows.append(MGSMRow(lineno, question.strip(), answer.strip()))
    return rows


def _read_txt(path: Path) -> list[str]:
    lines = read_text(path).rstrip("\n").splitlines()
    # Line i is the same text in every language: a blank line would shift the rest.
    blank = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    if blank:
        raise InvalidInputError(
            f"{path} has blank lines at {blank[:5]}; line-aligned files need one text per line"
        )
    return [ln.strip() for ln in lines]


def _read_mgsm_questions(path: Path) -> list[str]:
    return [row.question for row in read_mgsm_tsv(path)]


def _read_folder(path: Path, pattern: re.Pattern[str], read: Callable[[Path], list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in sorted(path.iterdir()):
        m = pattern.match(f.name)
        if m:
            out[m.group(1)] = read(f)
    return out


_WIDE_SKIP = frozenset({"id", "answer", "index", "idx"})
_LANG_CODE = re.compile(r"[a-z]{2,3}(?:[_-][A-Za-z0-9]{2,8})?")


def _read_jsonl(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i, row in iter_jsonl(path):
        if isinstance(row, dict) and "lang" not in row and "text" not in row:
            # Wide layout: one key per language, as in the packaged demo prompts.
            langs = {k: v for k, v in row.items() if _LANG_CODE.fullmatch(k) and isinstance(v, str)}
            if langs and all(k in _WIDE_SKIP or k in langs for k in row):
                for lang, text in langs.items():
                    out.setdefault(lang, []).append(text)
                continue
        try:
            lang, text = row["lang"], row["text"]
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(
                f"{path}:{i}: expected a JSON object with 'lang' and 'text', or one text per "
                f"language key ({exc})"
            ) from None
        out.setdefault(str(lang), []).append(str(text))
    return out


_HF_TEXT_COLUMNS = ("text", "question", "inputs", "input", "query")


def _text_column(names: Sequence[str], where: str) -> str:
    for c in _HF_TEXT_COLUMNS:
        if c in names:
            return c
    raise InvalidInputError(
        f"{where} has no text column; looked for {', '.join(_HF_TEXT_COLUMNS)}, found {list(names)}"
    )


def _read_hf(name: str, langs: Sequence[str] | None) -> dict[str, list[str]]:
    """A ``save_to_disk`` folder, or a hub data set with one config per language."""
    try:
        import datasets
    except ImportError as exc:
        raise InvalidInputError(f"hf:{name} needs the 'datasets' package: pip install datasets ({exc})") from exc
    path = Path(name)
    out: dict[str, list[str]] = {}
    if path.exists():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise InvalidInputError(f"hf:{path} is not a folder written by save_to_disk ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            for lang, part in ds.items():
                out[lang] = [str(x) for x in part[_text_column(part.column_names, f"hf:{path}[{lang}]")]]
        else:
            if "lang" not in ds.column_names:
                raise InvalidInputError(
                    f"hf:{path} is one Dataset without a 'lang' column; save a DatasetDict keyed by "
                    f"language or add 'lang' (columns: {ds.column_names})"
                )
            col = _text_column(ds.column_names, f"hf:{path}")
            for lang, text in zip(ds["lang"], ds[col]):
                out.setdefault(str(lang), []).append(str(text))
        return out
    if not langs:
        raise InvalidInputError(f"hf:{name} is a hub data set with one config per language: pass langs")
    for lang in langs:
        try:
            part = datasets.load_dataset(name, lang, split="test")
        except Exception as exc:  # network, unknown config, no cache: all say the same to the user
            raise InvalidInputError(f"could not load hf:{name} config {lang!r} split 'test' ({exc})") from None
        out[lang] = [str(x) for x in part[_text_column(part.column_names, f"hf:{name}[{lang}]")]]
    return out


def split_spec(
    spec: str | os.PathLike[str], kinds: Sequence[str], names: Sequence[str] = ()
) -> tuple[str, Path]:
    """``"kind:PATH"`` -> ``(kind, Path)`` for a known kind, else ``("", Path(spec))`` (kind to detect).

    An unknown ``kind:`` prefix raises, listing ``kinds`` and the bundled source ``names``.

    Example:
        >>> split_spec("txt:corpus", ("mgsm", "txt"))
        ('txt', PosixPath('corpus'))
    """
    text = str(spec)
    kind, sep, rest = text.partition(":")
    if kind in kinds and rest:
        return kind, Path(rest)
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]+", kind) and not Path(text).exists():
        bundled = f"; bundled sources: {', '.join(names)}" if names else ""
        raise InvalidInputError(
            f"unknown data kind {kind!r} in {text!r}; the kinds are {', '.join(kinds)} "
            f"(write KIND:PATH, e.g. {kinds[0]}:{rest or 'DIR'}), or give a plain path{bundled}"
        )
    return "", Path(text)


def load_texts(
    spec: str | os.PathLike[str],
    langs: Sequence[str] | None = None,
    limit: int | None = None,
) -> dict[str, list[str]]:
    """Read texts grouped by language from a text spec (see module docstring).

    ``langs`` keeps (and orders) those languages and fails on a missing one;
    ``limit`` keeps the first N texts of each language (parallel data stays parallel).
    """
    from .resources import NAMED_SOURCES, named_source

    bundled = named_source(str(spec)) if not Path(str(spec)).exists() else None
    if bundled is not None:
        kind, path = bundled
        kind = "mgsm" if kind == "mgsm" else "jsonl"
    else:
        kind, path = split_spec(spec, TEXT_KINDS, names=tuple(NAMED_SOURCES))
    if kind == "hf":
        texts = _read_hf(str(path), langs)
        return _keep(texts, f"hf:{path}", "hf", langs, limit)
    if not path.exists():
        raise InvalidInputError(
            f"data path {path} does not exist; give a path, KIND:PATH with KIND one of "
            f"{', '.join(TEXT_KINDS)}, or a bundled source: {', '.join(NAMED_SOURCES)}"
        )
    kind = kind or _detect(path)
    if kind in ("mgsm", "txt") and not path.is_dir():
        raise InvalidInputError(f"{kind}:{path} must be a folder of {{lang}} files, but it is a file")
    if kind == "jsonl" and not path.is_file():
        raise InvalidInputError(f"jsonl:{path} must be a JSONL file with 'lang' and 'text' fields, but it is a folder")
    if kind == "mgsm":
        texts = _read_folder(path, _TSV, _read_mgsm_questions)
    elif kind == "txt":
        texts = _read_folder(path, _TXT, _read_txt)
    else:
        texts = _read_jsonl(path)
    return _keep(texts, path, kind, langs, limit)


def _keep(
    texts: dict[str, list[str]], path: object, kind: str, langs: Sequence[str] | None, limit: int | None
) -> dict[str, list[str]]:
    if not texts:
        raise InvalidInputError(f"no texts found in {path} (read as {kind})")
    if langs is not None:
        missing = [lang for lang in langs if lang not in texts]
        if missing:
            raise InvalidInputError(
                f"languages {missing} are not in {path}; it has {sorted(texts)}"
            )
        texts = {lang: texts[lang] for lang in langs}
    if limit is not None:
        texts = {k: v[:limit] for k, v in texts.items()}
    return texts

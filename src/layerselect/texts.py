"""Reading the texts to analyse, grouped by language.

A *text spec* names where they are; :func:`load_texts` returns
``{language: [text, ...]}``. Accepted (the kind is detected, or forced with a
``kind:`` prefix such as ``mgsm:DIR``):

- ``mgsm``: a folder of ``{lang}.tsv`` or ``mgsm_{lang}.tsv`` files, one
  ``question<TAB>answer`` per line (the question is the text);
- ``txt``: a folder of line-aligned ``{lang}.txt`` files, one text per line;
- ``jsonl``: a file of ``{"lang": ..., "text": ...}`` lines.

Example:
    >>> from layerselect.texts import load_texts
    >>> texts = load_texts("mgsm:../shared/data/mgsm", langs=["en", "de"], limit=20)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ._io import iter_jsonl, read_text
from .errors import InvalidInputError

__all__ = ["load_texts", "split_spec", "default_data_dir", "PAPER_LANGS"]

#: The paper's ten MGSM languages, low-resource first as in its tables.
PAPER_LANGS = ("bn", "th", "sw", "ja", "zh", "de", "fr", "ru", "es", "en")

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


def _read_folder(path: Path, pattern: re.Pattern[str], column: int | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in sorted(path.iterdir()):
        m = pattern.match(f.name)
        if not m:
            continue
        lines = read_text(f).rstrip("\n").splitlines()
        # Line i is the same text in every language: a blank line would shift the rest.
        blank = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
        if blank:
            raise InvalidInputError(
                f"{f} has blank lines at {blank[:5]}; line-aligned files need one text per line"
            )
        if column is not None:
            lines = [ln.split("\t")[column] for ln in lines]
        out[m.group(1)] = [ln.strip() for ln in lines]
    return out


def _read_jsonl(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i, row in iter_jsonl(path):
        try:
            lang, text = row["lang"], row["text"]
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"{path}:{i}: expected a JSON object with 'lang' and 'text' ({exc})") from None
        out.setdefault(str(lang), []).append(str(text))
    return out


def split_spec(spec: str | os.PathLike[str], kinds: Sequence[str]) -> tuple[str, Path]:
    """``"kind:PATH"`` -> ``(kind, Path)`` for a known kind, else ``("", Path(spec))`` (kind to detect)."""
    text = str(spec)
    kind, sep, rest = text.partition(":")
    if kind in kinds and rest:
        return kind, Path(rest)
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]+", kind) and not Path(text).exists():
        raise InvalidInputError(
            f"unknown data kind {kind!r} in {text!r}; the kinds are {', '.join(kinds)} "
            f"(write KIND:PATH, e.g. {kinds[0]}:{rest or 'DIR'}), or give a plain path"
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
    kind, path = split_spec(spec, ("mgsm", "txt", "jsonl"))
    kind = kind or _detect(path)
    if not path.exists():
        raise InvalidInputError(f"data path {path} does not exist")
    if kind in ("mgsm", "txt") and not path.is_dir():
        raise InvalidInputError(f"{kind}:{path} must be a folder of {{lang}} files, but it is a file")
    if kind == "jsonl" and not path.is_file():
        raise InvalidInputError(f"jsonl:{path} must be a JSONL file with 'lang' and 'text' fields, but it is a folder")
    if kind == "mgsm":
        texts = _read_folder(path, _TSV, column=0)
    elif kind == "txt":
        texts = _read_folder(path, _TXT, column=None)
    else:
        texts = _read_jsonl(path)
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

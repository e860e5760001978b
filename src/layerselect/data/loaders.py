"""Reading X->English pairs: parallel folders, JSONL, Hugging Face datasets, the bundled demo pairs.

Example:
    >>> pairs = load_translation_data("pairs:../shared/data/gsm8kinstruct_question",
    ...                               langs=["de", "sw"], max_pairs=1000)          # doctest: +SKIP
    >>> len(load_translation_data("demo"))
    140
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import iter_jsonl, read_text
from ..errors import InvalidInputError
from ..texts import split_spec
from .prompt import TranslationExample, language_name
from .subsets import first_per_language

__all__ = ["load_parallel_dir", "load_jsonl_pairs", "examples_from_hf", "demo_pairs", "load_translation_data"]


def _read_lines(path: Path) -> list[str]:
    # newline="\n": keep stray \r or \u2028 inside a line from splitting it (alignment!)
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln.rstrip("\r") for ln in lines]


def load_parallel_dir(
    path: str | os.PathLike[str],
    langs: Sequence[str] | None = None,
    split: str = "train",
    max_pairs: int | None = None,
) -> list[TranslationExample]:
    """Read ``{xx}-en/{split}.{xx}`` + ``{split}.en`` folders (line i of one = line i of the other).

    ``langs`` keeps those source languages (missing ones are an error);
    ``max_pairs`` keeps the first N pairs of each language. Files with a
    different number of lines are refused, naming both counts.
    """
    root = Path(path)
    if not root.is_dir():
        raise InvalidInputError(f"translation data folder {root} does not exist")
    found: dict[str, Path] = {}
    for sub in sorted(root.iterdir()):
        m = re.fullmatch(r"([A-Za-z][A-Za-z_]*)-en", sub.name)
        if sub.is_dir() and m and m.group(1) != "en":
            found[m.group(1)] = sub
    if not found:
        raise InvalidInputError(
            f"{root} holds no '{{xx}}-en' folders with {split}.{{xx}} and {split}.en; "
            "expected e.g. de-en/train.de + de-en/train.en"
        )
    if langs is not None:
        for lang in langs:
            language_name(lang)
        missing = [lang for lang in langs if lang not in found]
        if missing:
            raise InvalidInputError(f"languages {missing} are not in {root}; it has {sorted(found)}")
        found = {lang: found[lang] for lang in langs}
    out: list[TranslationExample] = []
    for lang, sub in found.items():
        language_name(lang)
        src_file, tgt_file = sub / f"{split}.{lang}", sub / f"{split}.en"
        for f in (src_file, tgt_file):
            if not f.is_file():
                raise InvalidInputError(f"missing file {f} (expected {split}.{lang} and {split}.en in {sub})")
        src, tgt = _read_lines(src_file), _read_lines(tgt_file)
        if len(src) != len(tgt):
            raise InvalidInputError(
                f"misaligned parallel files: {src_file} has {len(src)} lines but {tgt_file} has {len(tgt)}; "
                "line i of one must translate line i of the other"
            )
        out.extend(TranslationExample(lang, a.strip(), b.strip()) for a, b in zip(src, tgt))
    return first_per_language(out, max_pairs)


def _row_to_example(row: Mapping[str, Any], where: str) -> TranslationExample:
    try:
        lang, source, target = row["lang"], row["source"], row["target"]
    except (KeyError, TypeError) as exc:
        raise InvalidInputError(f"{where}: expected fields 'lang', 'source', 'target' (missing {exc})") from None
    language_name(str(lang))
    return TranslationExample(str(lang), str(source).strip(), str(target).strip())


def load_jsonl_pairs(path: str | os.PathLike[str]) -> list[TranslationExample]:
    """Read ``{"lang", "source", "target"}`` JSON lines (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"translation data file {path} does not exist")
    return [_row_to_example(row, f"{path}:{i}") for i, row in iter_jsonl(path)]


def examples_from_hf(dataset: Any) -> list[TranslationExample]:
    """Examples from a Hugging Face ``datasets.Dataset`` (or any iterable of dicts) with lang/source/target."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        missing = [c for c in ("lang", "source", "target") if c not in names]
        if missing:
            raise InvalidInputError(f"dataset lacks columns {missing}; it has {names}")
    return [_row_to_example(row, f"row {i}") for i, row in enumerate(dataset)]


def demo_pairs() -> list[TranslationExample]:
    """The 140 X->English pairs bundled for the demo and quick runs (``--train-data demo``).

    20 parallel questions written for this project, in 7 languages besides English
    (de fr es ru zh ja sw), each paired with its English version.

    Example:
        >>> len(demo_pairs()), sorted({p.lang for p in demo_pairs()})[:3]
        (140, ['de', 'es', 'fr'])
    """
    from ..resources import demo_prompts_path

    pairs = []
    for _, row in iter_jsonl(demo_prompts_path()):
        for lang, text in row.items():
            if lang not in ("id", "answer", "en"):
                pairs.append(TranslationExample(lang, text, row["en"]))
    return pairs


def load_translation_data(
    spec: str | os.PathLike[str] | Any,
    langs: Sequence[str] | None = None,
    max_pairs: int | None = None,
) -> list[TranslationExample]:
    """Load pairs from ``pairs:DIR``, ``jsonl:FILE``, ``hf:DIR`` (``save_to_disk``), a path, a Dataset,
    or ``"demo"`` (the 140 bundled pairs, :func:`demo_pairs`).

    A bare path is read as a parallel folder if it is a directory holding
    ``{xx}-en`` folders, as a saved dataset if it holds ``dataset_info.json``,
    and as JSONL if it is a file. ``langs`` / ``max_pairs`` (per language)
    apply to every source.
    """
    if not isinstance(spec, (str, os.PathLike)):
        examples = examples_from_hf(spec)
    elif str(spec) == "demo" and not Path("demo").exists():
        examples = demo_pairs()
    else:
        examples = _load_path(spec, langs)
    return first_per_language(_keep_langs(examples, langs), max_pairs)


def _load_path(spec: str | os.PathLike[str], langs: Sequence[str] | None) -> list[TranslationExample]:
    """Pairs from ``pairs:``/``jsonl:``/``hf:`` or a bare path (its kind detected from what is there)."""
    kind, path = split_spec(spec, ("pairs", "jsonl", "hf"))
    if not kind:
        if path.is_file():
            kind = "jsonl"
        elif (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            kind = "hf"
        elif path.is_dir():
            kind = "pairs"
        else:
            raise InvalidInputError(f"translation data path {path} does not exist")
    if not path.exists():
        raise InvalidInputError(f"translation data path {path} does not exist")
    if kind == "pairs":
        return load_parallel_dir(path, langs=langs)  # its own message names the folder's languages
    if kind == "jsonl":
        return load_jsonl_pairs(path)
    import datasets

    return examples_from_hf(datasets.load_from_disk(str(path)))


def _keep_langs(examples: list[TranslationExample], langs: Sequence[str] | None) -> list[TranslationExample]:
    """The pairs of ``langs`` (all for None); a language the data lacks is an error."""
    if langs is None:
        return examples
    for lang in langs:
        language_name(lang)
    have = {ex.lang for ex in examples}
    missing = [lang for lang in langs if lang not in have]
    if missing:
        raise InvalidInputError(f"languages {missing} are not in the data; it has {sorted(have)}")
    keep = set(langs)
    return [ex for ex in examples if ex.lang in keep]

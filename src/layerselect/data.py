"""Translation pairs for one-stage alignment training: loading, filtering, prompting, masking.

SLAM trains on X->English translation of questions with the paper's prompt
(Table 7), and the loss is taken on the English target only::

    Translate this from [German] to [English]:
    [German]: Natalia hat im April ...
    [English]: Natalia sold clips ...

A :class:`TranslationExample` holds one pair; they come from

- ``pairs:DIR``: a folder of ``{xx}-en/train.{xx}`` + ``{xx}-en/train.en``,
  line-aligned (the layout of ``gsm8kinstruct_question``);
- ``jsonl:FILE``: one ``{"lang": ..., "source": ..., "target": ...}`` per line;
- a Hugging Face ``datasets.Dataset`` with those columns
  (:func:`examples_from_hf`), or ``hf:DIR`` for one saved with ``save_to_disk``.

:func:`filter_examples` drops empty, degenerate and length-ratio-outlier pairs
and reports why; :func:`tokenize_example` builds ``input_ids`` / ``labels``
(``-100`` on the prompt) / ``attention_mask``; :class:`TranslationDataset`
does that for a whole list and :class:`TranslationCollator` pads a batch on
the right.

Example:
    >>> from layerselect.data import load_translation_data, filter_examples, TranslationDataset
    >>> pairs = load_translation_data("pairs:../shared/data/gsm8kinstruct_question",
    ...                               langs=["de", "sw"], max_pairs=1000)          # doctest: +SKIP
    >>> pairs, report = filter_examples(pairs); print(report)                      # doctest: +SKIP
    >>> train_ds = TranslationDataset(pairs, tokenizer, max_length=1024)           # doctest: +SKIP
    >>> format_prompt("de", "Hallo Welt")
    'Translate this from [German] to [English]:\\n[German]: Hallo Welt\\n[English]:'
"""

from __future__ import annotations

import math
import os
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import iter_jsonl, read_text
from .errors import InvalidInputError
from .texts import split_spec

__all__ = [
    "LANGUAGE_NAMES",
    "PROMPT_TEMPLATE",
    "TranslationExample",
    "FilterReport",
    "TranslationDataset",
    "TranslationCollator",
    "language_name",
    "format_prompt",
    "load_parallel_dir",
    "load_jsonl_pairs",
    "examples_from_hf",
    "load_translation_data",
    "filter_examples",
    "split_holdout",
    "tokenize_example",
]

#: Language code -> English name used in the prompt. All MGSM / MSVAMP / xCSQA
#: languages plus common others; extend it (or pass a name directly) for more.
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "ru": "Russian",
    "zh": "Chinese", "ja": "Japanese", "th": "Thai", "sw": "Swahili", "bn": "Bengali",
    "te": "Telugu", "ar": "Arabic", "hi": "Hindi", "it": "Italian", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "ur": "Urdu", "vi": "Vietnamese", "ko": "Korean",
    "tr": "Turkish", "id": "Indonesian", "fa": "Persian", "he": "Hebrew", "el": "Greek",
    "uk": "Ukrainian", "cs": "Czech", "sv": "Swedish", "da": "Danish", "fi": "Finnish",
    "no": "Norwegian", "hu": "Hungarian", "ro": "Romanian", "bg": "Bulgarian", "ca": "Catalan",
    "ms": "Malay", "ta": "Tamil", "mr": "Marathi", "gu": "Gujarati", "kn": "Kannada",
    "ml": "Malayalam", "pa": "Punjabi", "ne": "Nepali", "si": "Sinhala", "my": "Burmese",
    "km": "Khmer", "lo": "Lao", "am": "Amharic", "yo": "Yoruba", "ig": "Igbo", "ha": "Hausa",
    "zu": "Zulu", "xh": "Xhosa", "tl": "Tagalog", "jv": "Javanese", "qu": "Quechua",
}

#: The paper's training prompt (Table 7); the loss covers ``{target}`` (and EOS) only.
PROMPT_TEMPLATE = "Translate this from [{source_lang}] to [English]:\n[{source_lang}]: {source}\n[English]: {target}"
_PROMPT_HEAD = PROMPT_TEMPLATE.split(" {target}")[0]


def language_name(code: str) -> str:
    """English name of a language code (``"de"`` -> ``"German"``; ``"zh-CN"`` -> ``"Chinese"``).

    A name that is already one of the known English names is returned as is.
    Unknown codes raise :class:`~layerselect.errors.InvalidInputError`.

    Example:
        >>> language_name("sw"), language_name("pt_BR"), language_name("German")
        ('Swahili', 'Portuguese', 'German')
    """
    key = str(code).strip()
    if key in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[key]
    base = re.split(r"[-_]", key.lower())[0]
    if base in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[base]
    if key in LANGUAGE_NAMES.values():
        return key
    raise InvalidInputError(
        f"unknown language code {code!r}; known: {', '.join(sorted(LANGUAGE_NAMES))} "
        "(add it to layerselect.data.LANGUAGE_NAMES or pass the English name)"
    )


def format_prompt(lang: str, source: str) -> str:
    """The prompt up to (not including) the space before the English target."""
    return _PROMPT_HEAD.format(source_lang=language_name(lang), source=source)


@dataclass(frozen=True)
class TranslationExample:
    """One X->English pair. ``lang`` is the source language code, ``target`` the English text.

    Example:
        >>> ex = TranslationExample("de", "Guten Morgen.", "Good morning.")
        >>> print(ex.text())
        Translate this from [German] to [English]:
        [German]: Guten Morgen.
        [English]: Good morning.
    """

    lang: str
    source: str
    target: str

    def prompt(self) -> str:
        """The masked part: everything before the space that starts the target."""
        return format_prompt(self.lang, self.source)

    def text(self) -> str:
        """The full training text, exactly :data:`PROMPT_TEMPLATE` filled in."""
        return PROMPT_TEMPLATE.format(source_lang=language_name(self.lang), source=self.source, target=self.target)


# ---------------------------------------------------------------------------- loading


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
        pairs = list(zip(src, tgt))[:max_pairs] if max_pairs is not None else zip(src, tgt)
        out.extend(TranslationExample(lang, s.strip(), t.strip()) for s, t in pairs)
    return out


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
    from .resources import demo_prompts_path

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
            return load_parallel_dir(path, langs=langs, max_pairs=max_pairs)
        if kind == "jsonl":
            examples = load_jsonl_pairs(path)
        else:
            import datasets

            examples = examples_from_hf(datasets.load_from_disk(str(path)))
    if langs is not None:
        for lang in langs:
            language_name(lang)
        have = {ex.lang for ex in examples}
        missing = [lang for lang in langs if lang not in have]
        if missing:
            raise InvalidInputError(f"languages {missing} are not in the data; it has {sorted(have)}")
        keep = set(langs)
        examples = [ex for ex in examples if ex.lang in keep]
    if max_pairs is not None:
        seen: Counter[str] = Counter()
        kept = []
        for ex in examples:
            if seen[ex.lang] < max_pairs:
                kept.append(ex)
                seen[ex.lang] += 1
        examples = kept
    return examples


def split_holdout(
    examples: Sequence[TranslationExample], per_lang: int = 200, seed: int = 0
) -> tuple[list[TranslationExample], list[TranslationExample]]:
    """Split off ``per_lang`` random pairs of every language: ``(train, heldout)``.

    Deterministic for a seed; the order within each part follows the input.

    Example:
        >>> ex = [TranslationExample("de", f"s{i}", f"t{i}") for i in range(10)]
        >>> train, held = split_holdout(ex, per_lang=3)
        >>> len(train), len(held)
        (7, 3)
    """
    by_lang: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_lang.setdefault(ex.lang, []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for lang, idx in by_lang.items():
        if len(idx) <= per_lang:
            raise InvalidInputError(f"cannot hold out {per_lang} pairs of {lang!r}: it has only {len(idx)}")
        held.update(rng.sample(idx, per_lang))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    heldout = [ex for i, ex in enumerate(examples) if i in held]
    return train, heldout


# ---------------------------------------------------------------------------- quality filter


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


# ---------------------------------------------------------------------------- tokenization


def tokenize_example(
    example: TranslationExample, tokenizer: Any, max_length: int | None = 1024, add_eos: bool = True
) -> dict[str, list[int]]:
    """``input_ids`` / ``labels`` / ``attention_mask`` for one pair; labels are -100 on the prompt.

    The full text is tokenized in one piece (with the tokenizer's default
    special tokens, e.g. BOS), so the ids are exactly what the model sees at
    inference; a token counts as target when it starts at or after the end of
    ``"[English]:"`` (so the space before the target belongs to the target, as
    the tokenizer attaches it to the first word). EOS is appended and learned.
    With a slow tokenizer (no offsets) prompt and target are tokenized
    separately and concatenated. Sequences longer than ``max_length`` are cut
    on the right (the prompt comes first, so the target shrinks).
    """
    prompt = example.prompt()
    full = example.text()
    eos = tokenizer.eos_token_id if add_eos else None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, return_offsets_mapping=True, add_special_tokens=True)
        ids = list(enc["input_ids"])
        boundary = len(prompt)
        labels = []
        for tok, (start, end) in zip(ids, enc["offset_mapping"]):
            is_target = start >= boundary and end > start
            labels.append(tok if is_target else -100)
    else:
        head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        tail = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids = list(head) + list(tail)
        labels = [-100] * len(head) + list(tail)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


class TranslationDataset(torch.utils.data.Dataset):
    """Tokenized pairs ready for a Trainer (each item: input_ids, labels, attention_mask lists).

    Pairs whose target was cut away entirely by ``max_length`` are skipped and
    counted in ``self.truncated_away``; ``self.truncated`` counts shortened ones.

    Example:
        >>> ds = TranslationDataset(pairs, tokenizer, max_length=1024)   # doctest: +SKIP
        >>> ds[0]["labels"][:5]                                          # doctest: +SKIP
        [-100, -100, -100, -100, -100]
    """

    def __init__(
        self, examples: Iterable[TranslationExample], tokenizer: Any, max_length: int | None = 1024, add_eos: bool = True
    ) -> None:
        self.examples: list[TranslationExample] = []
        self.features: list[dict[str, list[int]]] = []
        self.truncated = 0
        self.truncated_away = 0
        for ex in examples:
            feat = tokenize_example(ex, tokenizer, max_length=None, add_eos=add_eos)
            if max_length is not None and len(feat["input_ids"]) > max_length:
                self.truncated += 1
                feat = {k: v[:max_length] for k, v in feat.items()}
            if all(lab == -100 for lab in feat["labels"]):
                self.truncated_away += 1
                continue
            self.examples.append(ex)
            self.features.append(feat)
        if not self.features:
            raise InvalidInputError(
                "no usable training pairs: the data is empty or every target was truncated away "
                f"(max_length={max_length})"
            )

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.features[i]

    def num_target_tokens(self) -> int:
        return sum(sum(lab != -100 for lab in f["labels"]) for f in self.features)


@dataclass
class TranslationCollator:
    """Pad ``input_ids`` (with ``pad_token_id``), ``labels`` (-100) and ``attention_mask`` (0) on the right.

    Example:
        >>> batch = TranslationCollator(pad_token_id=0)([
        ...     {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
        ...     {"input_ids": [5], "labels": [5], "attention_mask": [1]}])
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[5, 6, 7], [5, 0, 0]], [[-100, 6, 7], [5, -100, -100]])
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    label_pad_id: int = -100

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = n - len(f["input_ids"])
            out["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            out["labels"].append(list(f["labels"]) + [self.label_pad_id] * pad)
            mask = f.get("attention_mask") or [1] * len(f["input_ids"])
            out["attention_mask"].append(list(mask) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> TranslationCollator:
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        return cls(pad_token_id=pad, **kwargs)

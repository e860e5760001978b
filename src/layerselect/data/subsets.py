"""Which pairs to use: the first N of each language, and a random held-out split.

Example:
    >>> ex = [TranslationExample(lang, f"s{i}", f"t{i}") for lang in ("de", "sw") for i in range(5)]
    >>> len(first_per_language(ex, 2))
    4
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence

from ..errors import InvalidInputError
from .prompt import TranslationExample

__all__ = ["first_per_language", "split_holdout"]


def first_per_language(examples: Iterable[TranslationExample], max_pairs: int | None) -> list[TranslationExample]:
    """The first ``max_pairs`` pairs of each source language, in input order (all of them for None).

    The one place ``max_pairs`` / ``--max-pairs`` is applied.

    Example:
        >>> ex = [TranslationExample("de", "a", "a"), TranslationExample("sw", "b", "b"),
        ...       TranslationExample("de", "c", "c")]
        >>> [e.source for e in first_per_language(ex, 1)]
        ['a', 'b']
    """
    if max_pairs is None:
        return list(examples)
    seen: Counter[str] = Counter()
    kept = []
    for ex in examples:
        if seen[ex.lang] < max_pairs:
            kept.append(ex)
            seen[ex.lang] += 1
    return kept


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

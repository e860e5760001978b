"""What the Trainer trains on: translation pairs, HF datasets or token features, as one ``Dataset``.

Example:
    >>> feats = plain_text_features(["Janet has 3 ducks."], tokenizer)   # doctest: +SKIP
    >>> ds = build_train_dataset(pairs, tokenizer, max_length=1024)     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._running import context_length, warn_cut_to_context
from ..data import TranslationDataset, TranslationExample, examples_from_hf
from ..errors import InvalidInputError

__all__ = ["build_train_dataset", "plain_text_features"]


def build_train_dataset(
    data: Any, tokenizer: Any, max_length: int | None = 1024, *, model: Any = None
) -> torch.utils.data.Dataset:
    """Normalise training data: pairs (list of :class:`TranslationExample`), a HF dataset with
    lang/source/target, or an already tokenized dataset (items with ``input_ids``/``labels``).

    With ``model``, pairs that this function tokenizes are cut to the model's positions
    (``config.max_position_embeddings``) when that is shorter than ``max_length``: a
    warning says how many, and ``ds.truncated_to_context`` records it. Already tokenized
    data is used as given.

    Example:
        >>> ds = build_train_dataset([TranslationExample("de", "Hallo.", "Hello.")], tokenizer)   # doctest: +SKIP
        >>> type(ds).__name__                                                                    # doctest: +SKIP
        'TranslationDataset'
    """
    limit = context_length(model) if model is not None else None
    if limit is None or (max_length is not None and max_length <= limit):
        return _build(data, tokenizer, max_length)
    ds = _build(data, tokenizer, limit)
    if isinstance(ds, TranslationDataset) and ds is not data:
        ds.truncated_to_context = ds.truncated  # every cut here is the context's: it is below max_length
        warn_cut_to_context(ds.truncated, len(ds) + ds.truncated_away, limit, ds.longest, "pairs", stacklevel=3)
    return ds


def _build(data: Any, tokenizer: Any, max_length: int | None) -> torch.utils.data.Dataset:
    if isinstance(data, TranslationDataset):
        return data
    if isinstance(data, Sequence) and data and isinstance(data[0], TranslationExample):
        return TranslationDataset(data, tokenizer, max_length=max_length)
    names = getattr(data, "column_names", None)
    if names is not None:
        if "input_ids" in names and "labels" in names:
            return data
        return TranslationDataset(examples_from_hf(data), tokenizer, max_length=max_length)
    if isinstance(data, torch.utils.data.Dataset):
        return data
    if isinstance(data, Sequence) and data and isinstance(data[0], dict) and "input_ids" in data[0]:
        return _FeatureList(data)
    if isinstance(data, Sequence) and not data:
        raise InvalidInputError("the training data is empty")
    raise InvalidInputError(
        f"cannot train on {type(data).__name__}: pass TranslationExample pairs, a TranslationDataset, "
        "or a datasets.Dataset with lang/source/target (or input_ids/labels) columns"
    )


class _FeatureList(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def plain_text_features(texts: Sequence[str], tokenizer: Any, max_length: int | None = 1024) -> list[dict[str, Any]]:
    """Language-modelling features for plain texts (loss on every token after the first).

    Example:
        >>> feats = plain_text_features(["Janet has 3 ducks."], tokenizer)   # doctest: +SKIP
        >>> translation_loss(model, tokenizer, feats)                         # doctest: +SKIP
    """
    out = []
    for text in texts:
        ids = list(tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"])
        out.append({"input_ids": ids, "labels": [-100] + ids[1:], "attention_mask": [1] * len(ids)})
    return out


"""Token ids for training: the whole prompt + target, with ``-100`` labels on the prompt.

Example:
    >>> feat = tokenize_example(TranslationExample("de", "Hallo.", "Hello."), tokenizer)   # doctest: +SKIP
    >>> feat["labels"][:3]                                                              # doctest: +SKIP
    [-100, -100, -100]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import InvalidInputError
from .prompt import TranslationExample

__all__ = ["tokenize_example", "TranslationDataset"]


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
    counted in ``self.truncated_away``; ``self.truncated`` counts shortened ones (those
    too included), ``self.longest`` is the longest pair in tokens before the cut, and
    ``self.truncated_to_context`` how many were cut because ``max_length`` was lowered
    to the model's positions (set by :func:`layerselect.train.build_train_dataset`).

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
        self.truncated_to_context = 0
        self.longest = 0
        for ex in examples:
            feat = tokenize_example(ex, tokenizer, max_length=None, add_eos=add_eos)
            self.longest = max(self.longest, len(feat["input_ids"]))
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

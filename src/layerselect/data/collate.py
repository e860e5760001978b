"""Batches for training: right-padded ``input_ids`` / ``labels`` / ``attention_mask`` tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TranslationCollator"]


# Not transformers' DataCollatorForSeq2Seq, which gives the same batches only for a tokenizer with a
# pad token padding on the right: it pads on tokenizer.padding_side (left for Gemma) and refuses
# tokenizers without a pad token (Llama 3), where we pad right with EOS (tests/test_data_collator.py).
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
        """Pad with the tokenizer's pad token, else its EOS (else 0); always on the right."""
        from .._running import pad_token_id

        return cls(pad_token_id=pad_token_id(tokenizer), **kwargs)

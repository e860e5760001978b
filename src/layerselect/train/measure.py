"""Measuring without training: the mean loss on the English target tokens of translation pairs.

Example:
    >>> translation_loss(model, tokenizer, heldout_pairs, batch_size=8)   # doctest: +SKIP
    1.8734
"""

from __future__ import annotations

from typing import Any

import torch

from .._progress import progress as progress_bar
from ..data import TranslationCollator
from .features import build_train_dataset

__all__ = ["translation_loss", "translation_nll_sum"]


@torch.no_grad()
def translation_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    batch_size: int = 8,
    max_length: int | None = 1024,
    label_only: bool | None = None,
    progress: bool = False,
    desc: str = "translation loss",
    precision: str = "fp32",
) -> float:
    """Mean per-token loss on the target tokens of ``data`` (pairs or a tokenized dataset).

    For plain-text loss, pass items with ``labels == input_ids``. Log-softmax in
    float64; the LM head runs only at target positions unless ``label_only=False``
    (or the family needs the standard path, see :mod:`layerselect.loss`).
    ``progress`` draws a bar labelled ``desc`` on stderr (plain lines when stderr is
    not a terminal). ``precision``: ``"fp32"`` (default: comparable across machines),
    ``"bf16"`` autocast, or ``"auto"`` (bf16 where the hardware is fast at it; see
    :mod:`layerselect.precision`); the sums stay float64 either way.
    """
    total, count = translation_nll_sum(model, tokenizer, data, batch_size, max_length, label_only, progress, desc,
                                       precision)
    return total / max(count, 1)


@torch.no_grad()
def translation_nll_sum(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    batch_size: int = 8,
    max_length: int | None = 1024,
    label_only: bool | None = None,
    progress: bool = False,
    desc: str = "translation loss",
    precision: str = "fp32",
) -> tuple[float, int]:
    """``(summed NLL, target tokens)`` of ``data``: what :func:`translation_loss` divides.

    For summing over pieces (the shards of a distributed measure) before dividing once.
    Runs in eval mode (the model's training flag is restored after) under ``no_grad``.
    """
    from .._running import eval_mode
    from ..loss import label_only_loss
    from ..precision import autocast, model_device, model_dtype

    ds = build_train_dataset(data, tokenizer, max_length, model=model)  # cut to the context, with a warning
    collator = TranslationCollator.for_tokenizer(tokenizer)
    device = model_device(model)
    total, count = 0.0, 0
    with progress_bar(total=len(ds), desc=desc, unit="pair", disable=not progress) as bar, \
            eval_mode(model), autocast(precision, device, model_dtype(model)):
        for i in range(0, len(ds), batch_size):
            batch = collator([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = label_only_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                  label_only=label_only, dtype=torch.float64)
            total += float(out.nll_sum.sum())
            count += int(out.token_count.sum())
            bar.update(min(batch_size, len(ds) - i))
    return total, count

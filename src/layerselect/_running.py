"""Helpers for running a model, one copy each: the pad id, eval mode for a block, padding a batch.

``tokenizer.pad(..., padding_side=...)`` does the padding job but needs
``tokenizer.pad_token`` set; many causal LMs have none, and we never change the
caller's tokenizer, so the pad id is passed in (:func:`pad_token_id`: pad, else EOS).

Example:
    >>> ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .errors import InvalidInputError

__all__ = ["eval_mode", "pad_batch", "pad_token_id"]


def pad_token_id(tokenizer: Any, *, required: bool = False) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0 (an error if ``required``).

    With right padding (or an attention mask) the value never reaches a real token, so 0
    is a safe last resort; ``required=True`` is for callers where it would matter (generation).

    Example:
        >>> class Tok: pad_token_id, eos_token_id = None, 2
        >>> pad_token_id(Tok())
        2
    """
    for pad in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if pad is not None:
            return int(pad)
    if required:
        raise InvalidInputError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return 0


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """``model.eval()`` for the block; its training flag is restored afterwards, even on an error.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2).train()
        >>> with eval_mode(m):
        ...     m.training
        False
        >>> m.training
        True
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        if hasattr(model, "train"):
            model.train(was_training)


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (``[B, T]`` long, CPU) of ``seqs`` padded to the longest.

    ``padding_side="left"`` puts the pads first, so every row ends with its own
    last token (what ``generate`` needs); ``"right"`` puts them last.

    Example:
        >>> pad_batch([[1, 2], [3]], pad_id=9)[0].tolist()
        [[1, 2], [3, 9]]
    """
    if padding_side not in ("right", "left"):
        raise InvalidInputError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    width = max((len(x) for x in seqs), default=0)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, x in enumerate(seqs):
        cols = slice(width - len(x), width) if padding_side == "left" else slice(0, len(x))
        ids[row, cols] = torch.as_tensor(list(x), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask

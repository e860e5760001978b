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
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .errors import InvalidInputError

__all__ = ["context_length", "eval_mode", "pad_batch", "pad_token_id", "warn_cut_to_context"]


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


def context_length(model: Any) -> int | None:
    """The most positions ``model`` was built for: ``config.max_position_embeddings`` (None if unknown).

    Wrappers (a selective-FFN or PEFT model, DDP) are looked through.

    Example:
        >>> class Model: config = type("Config", (), {"max_position_embeddings": 256})()
        >>> context_length(Model())
        256
    """
    from .arch import unwrap_model

    base = unwrap_model(model) if isinstance(model, torch.nn.Module) else model
    config = getattr(base, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:  # multimodal configs keep it in their text part
        limit = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    return limit


def warn_cut_to_context(cut: int, total: int, limit: int, longest: int, what: str, *, stacklevel: int = 3) -> None:
    """Warn that ``cut`` of ``total`` ``what`` were cut to the model's ``limit`` positions (nothing if 0).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_cut_to_context(2, 5, 256, 6800, "texts")
        >>> print(seen[0].message)
        2 of 5 texts are longer than the model's 256 positions (longest 6800 tokens); cut to 256 tokens
    """
    if cut:
        warnings.warn(
            f"{cut} of {total} {what} are longer than the model's {limit} positions "
            f"(longest {longest} tokens); cut to {limit} tokens",
            stacklevel=stacklevel,
        )

"""Padding lists of token ids into one batch: the library's one copy of this step.

``tokenizer.pad(..., padding_side=...)`` does the same job but needs
``tokenizer.pad_token`` set; many causal LMs have none, and we never change the
caller's tokenizer, so the pad id is passed in (usually EOS).

Example:
    >>> ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InvalidInputError

__all__ = ["pad_batch"]


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

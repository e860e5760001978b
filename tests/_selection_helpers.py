"""Hand-built ActivationStats for the selection tests (shared by test_criteria*.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layerselect.stats import ActivationStats


def hand_stats(
    counts: Sequence[Sequence[Sequence[int]]],
    tokens: Sequence[int],
    groups: Sequence[str],
    layers: Sequence[int] | None = None,
    questions: int = 1,
) -> ActivationStats:
    """Stats from ``counts[layer][neuron][group]`` and ``tokens[group]``.

    The per-sample arrays describe ``questions`` equal samples per group whose
    fractions reproduce the count-based activation ratio, so both paths agree.
    """
    c = torch.tensor(counts, dtype=torch.int64)
    t = torch.tensor(tokens, dtype=torch.int64)
    num_layers, _, num_groups = c.shape
    r = (c.double() / t.double()).mean(dim=1)  # [L, G]
    groups_idx = torch.arange(num_groups).repeat_interleave(questions)
    return ActivationStats(
        counts=c,
        tokens=t,
        groups=list(groups),
        layers=list(layers) if layers is not None else list(range(num_layers)),
        sample_fraction=r.T[groups_idx].contiguous(),
        sample_tokens=(t[groups_idx] // questions).clone(),
        sample_group=groups_idx.clone(),
        sample_index=torch.arange(questions).repeat(num_groups),
    )

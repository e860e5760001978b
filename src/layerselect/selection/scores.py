"""Per-layer scores (:data:`SCORES`, :func:`layer_scores`) and the helpers the rules share.

Every score is a ``tensor[L]`` in the row order of ``stats.layers``;
:func:`layer_scores` turns it into ``{model layer id: value}``.

Example:
    >>> layer_scores(stats, "msd")                          # doctest: +SKIP
    {0: 0.0123, 1: 0.0045, ...}
    >>> layer_scores(stats, "divergence", reference="en")   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import InvalidInputError
from ..stats import ActivationStats

__all__ = ["SCORES", "layer_scores"]


def _check_groups(stats: ActivationStats, reference: str | None = None) -> None:
    if len(stats.groups) < 2:
        raise InvalidInputError(
            f"cross-language criteria need at least two languages; these stats have {stats.groups}. "
            "Collect statistics for more languages"
        )
    if reference is not None and reference not in stats.groups:
        raise InvalidInputError(
            f"reference language {reference!r} is not in the statistics (groups: {stats.groups}); "
            f"collect it too or pass reference=<one of {stats.groups}>"
        )


def _order(stats: ActivationStats) -> list[int]:
    """Row indices sorted by model layer id."""
    return sorted(range(len(stats.layers)), key=lambda i: stats.layers[i])


def _nan_check(name: str, values: torch.Tensor, stats: ActivationStats, fix: str) -> None:
    bad = [stats.layers[i] for i in torch.nonzero(torch.isnan(values)).flatten().tolist()]
    if bad:
        raise InvalidInputError(f"{name} is NaN at layers {bad}: {fix}")


def _r_spread(stats: ActivationStats, variant: str = "mean") -> torch.Tensor:
    _check_groups(stats)
    r = stats.activation_ratio(variant)
    return r.max(dim=1).values - r.min(dim=1).values


def _r_std(stats: ActivationStats, variant: str = "mean") -> torch.Tensor:
    _check_groups(stats)
    return stats.msd(variant).sqrt()


def _msd(stats: ActivationStats, variant: str = "mean") -> torch.Tensor:
    _check_groups(stats)
    return stats.msd(variant)


def _divergence(stats: ActivationStats, reference: str = "en", tau: float = 0.5, method: str = "ratio") -> torch.Tensor:
    _check_groups(stats, reference)
    return 1.0 - stats.overlap(reference, tau, method).average


def _lape_density(
    stats: ActivationStats,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Per row: share of neurons that are language-specific by LAPE; also the mask and cut-offs.

    Follows Tang et al. 2024 ("Language-Specific Neurons: The Key to
    Multilingual Capabilities in Large Language Models") and their released
    code: normalise each neuron's activation probabilities over languages,
    ``q_g = p_g / sum_g p_g``, and take the entropy ``LAPE = -sum_g q_g log q_g``.
    Neurons with no language whose probability exceeds the ``filter_rate``
    quantile of all probabilities (0.95) are dismissed; of the rest, the
    ``round(top_rate * all neurons)`` (1%) with the lowest LAPE are
    language-specific (ties broken by layer, then neuron index).
    """
    _check_groups(stats)
    for name, q in (("top_rate", top_rate), ("filter_rate", filter_rate)):
        if not 0.0 < float(q) < 1.0:
            raise InvalidInputError(f"{name} must be in (0, 1), got {q!r}")
    p = stats.activation_probability()  # [L, N, G]
    total = p.sum(dim=2, keepdim=True)
    q = torch.where(total > 0, p / total.clamp_min(1e-300), torch.zeros_like(p))
    ent = -(torch.where(q > 0, q * q.clamp_min(1e-300).log(), torch.zeros_like(q))).sum(dim=2)  # [L, N]
    flat = p.flatten()
    kth = max(1, min(flat.numel(), round(flat.numel() * filter_rate)))
    prob_cut = float(flat.kthvalue(kth).values)
    eligible = (p > prob_cut).any(dim=2)
    ent = torch.where(eligible, ent, torch.full_like(ent, math.inf))
    n_specific = min(round(ent.numel() * top_rate), int(eligible.sum()))
    order = torch.argsort(ent.flatten(), stable=True)[:n_specific]
    specific = torch.zeros(ent.numel(), dtype=torch.bool)
    specific[order] = True
    specific = specific.view_as(ent)
    ent_cut = float(ent.flatten()[order].max()) if n_specific else float("nan")
    density = specific.double().mean(dim=1)
    return density, specific, {"prob_cut": prob_cut, "entropy_cut": ent_cut, "n_specific": n_specific}


#: Named per-layer scores for ``topk`` and the CLI table: name -> (function(stats, **kw) -> tensor[L], doc).
SCORES: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    "msd": (_msd, "MSD of the activation ratio across languages (eq. 5-6)"),
    "r_spread": (_r_spread, "max - min of the activation ratio across languages"),
    "r_std": (_r_std, "standard deviation of the activation ratio across languages (sqrt MSD)"),
    "divergence": (_divergence, "1 - average overlap with the reference language"),
    "lape": (lambda stats, **kw: _lape_density(stats, **kw)[0], "share of language-specific neurons (LAPE)"),
}


def layer_scores(stats: ActivationStats, score: str | Callable[..., Any] = "msd", **kwargs: Any) -> dict[int, float]:
    """A per-layer score as ``{model layer id: value}``.

    ``score`` is a name in :data:`SCORES` (``msd``, ``r_spread``, ``r_std``,
    ``divergence``, ``lape``) or a function ``f(stats) -> sequence[L]`` in
    the row order of ``stats.layers``; ``kwargs`` go to the named score.

    Example:
        >>> layer_scores(stats, "r_spread")                     # doctest: +SKIP
        {0: 0.21, 1: 0.08, 2: 0.05}
    """
    if callable(score):
        values = torch.as_tensor(score(stats, **kwargs), dtype=torch.float64)
    elif score in SCORES:
        values = SCORES[score][0](stats, **kwargs)
    else:
        raise InvalidInputError(f"unknown score {score!r}; use one of {sorted(SCORES)} or a function")
    if values.shape != (len(stats.layers),):
        raise InvalidInputError(f"score {score!r} returned shape {tuple(values.shape)}, expected ({len(stats.layers)},)")
    _nan_check(f"score {score!r}", values, stats, "check the statistics (every group needs tokens)")
    return {stats.layers[i]: float(values[i]) for i in _order(stats)}


# ---------------------------------------------------------------- shared by the rules
def _check_count(name: str, value: Any, available: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    if value > available:
        raise InvalidInputError(f"{name}={value} but only {available} layers are available; use {name} <= {available}")
    return value


def _top(scores: Mapping[int, float], k: int) -> tuple[list[int], float]:
    order = sorted(scores, key=lambda layer: (-scores[layer], layer))
    return sorted(order[:k]), scores[order[k - 1]]

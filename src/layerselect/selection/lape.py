"""``lape``: layers dense in language-specific neurons (Tang et al. 2024, "Language-Specific Neurons").

The neuron-level LAPE test lives in :func:`layerselect.selection.scores._lape_density`
(it is also the ``lape`` per-layer score of ``topk``).

Example:
    >>> from layerselect import select
    >>> sel = select(stats, "lape")                 # doctest: +SKIP
    >>> sel.details["n_specific"], sel.layers       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInputError
from ..stats import ActivationStats
from .registry import register_criterion
from .scores import _check_count, _lape_density, _order, _top
from .value import Selection

__all__ = ["lape_criterion"]


@register_criterion("lape")
def lape_criterion(
    stats: ActivationStats,
    *,
    model: Any = None,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    k: int | None = None,
    max_layer: int | None = None,
) -> Selection:
    """Layers dense in language-specific neurons, found by LAPE (Tang et al. 2024).

    Score per layer = the share of its FFN neurons that are language-specific
    (Tang et al.'s thresholds, see :func:`_lape_density`: a neuron must fire
    with a probability above the ``filter_rate`` = 95% quantile of all
    probabilities in some language, and the ``top_rate`` = 1% of all neurons
    with the lowest activation-probability entropy among those are specific). With ``k=None``
    (default) select the layers whose share is above the mean share over the
    candidate layers (``max_layer`` restricts them); with ``k`` the ``k`` densest.
    When no layer is above the mean (all equal, e.g. no specific neuron at
    all), the densest layer (lowest on ties) is selected and the reason says so.
    """
    density, _, cuts = _lape_density(stats, top_rate, filter_rate)
    scores = {stats.layers[i]: float(density[i]) for i in _order(stats)}
    candidates = {layer: v for layer, v in scores.items() if max_layer is None or layer <= max_layer}
    if not candidates:
        raise InvalidInputError(f"no layer <= max_layer={max_layer}; the statistics cover {stats.layers}")
    params = {"top_rate": top_rate, "filter_rate": filter_rate, "k": k, "max_layer": max_layer}
    cut_text = (
        f"{cuts['n_specific']} neurons: the lowest {top_rate:.0%} by LAPE among those with "
        f"max_g p > {cuts['prob_cut']:.4g}"
    )
    if k is not None:
        k = _check_count("k", k, len(candidates))
        chosen, threshold = _top(candidates, k)
        reason = f"The {k} layers densest in language-specific neurons ({cut_text}): {chosen}."
        fallback = False
    else:
        threshold = sum(candidates.values()) / len(candidates)
        chosen = [layer for layer, v in candidates.items() if v > threshold + 1e-15]
        fallback = not chosen
        if fallback:
            chosen, _ = _top(candidates, 1)
            reason = (
                f"No layer has a share of language-specific neurons ({cut_text}) above the mean "
                f"{threshold:.4g}; falling back to the densest layer {chosen}."
            )
        else:
            reason = (
                f"Layers whose share of language-specific neurons ({cut_text}) is above the mean "
                f"share {threshold:.4g}: {chosen}."
            )
    return Selection(
        layers=chosen,
        scores=scores,
        threshold=threshold,
        criterion="lape",
        params=params,
        reason=reason,
        details={**cuts, "fallback": fallback},
    )

"""Simple rules: ``first_n``, ``all``, ``random`` (the paper's "R" ablation) and ``topk`` (any per-layer score).

``first_n``, ``all`` and ``random`` need only the layer ids, from the
statistics or the model.

Example:
    >>> from layerselect import select
    >>> select(stats, "first_n", n=2).layers             # doctest: +SKIP
    [0, 1]
    >>> select(model=model, criterion="random", k=3, seed=1).layers   # doctest: +SKIP
    >>> select(stats, "topk", k=4, score="lape").layers  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidInputError
from ..stats import ActivationStats
from .registry import register_criterion
from .scores import _check_count, _top, layer_scores
from .value import Selection

__all__ = ["first_n_criterion", "all_criterion", "random_criterion", "topk_criterion"]


def _layer_ids(stats: ActivationStats | None, model: Any) -> list[int]:
    if stats is not None:
        return sorted(stats.layers)
    if model is not None:
        from ..arch import get_layout

        return list(range(get_layout(model).num_layers))
    raise InvalidInputError("pass the statistics or the model so the criterion knows the layers")


@register_criterion("first_n")
def first_n_criterion(stats: ActivationStats | None = None, *, model: Any = None, n: int = 6) -> Selection:
    """The lowest ``n`` layers (by model layer id). Scores: 1 for selected, 0 otherwise; threshold 0.5.

    Works from the statistics or, without them, from the model's layer count.
    ``n`` larger than the number of layers raises InvalidInputError.
    """
    ids = _layer_ids(stats, model)
    n = _check_count("n", n, len(ids))
    chosen = ids[:n]
    return Selection(
        layers=chosen,
        scores={layer: float(layer in chosen) for layer in ids},
        threshold=0.5,
        criterion="first_n",
        params={"n": n},
        reason=f"The {n} lowest layers: {chosen}.",
        notes={layer: ("among" if layer in chosen else "not among") + f" the {n} lowest" for layer in ids},
    )


@register_criterion("all")
def all_criterion(stats: ActivationStats | None = None, *, model: Any = None) -> Selection:
    """Every layer (full-FFN baseline). Scores all 1; no threshold."""
    ids = _layer_ids(stats, model)
    return Selection(
        layers=ids,
        scores={layer: 1.0 for layer in ids},
        criterion="all",
        reason=f"All {len(ids)} layers (baseline).",
    )


@register_criterion("random")
def random_criterion(stats: ActivationStats | None = None, *, model: Any = None, k: int = 6,
                     seed: int = 0) -> Selection:
    """``k`` layers drawn uniformly without replacement with ``torch.Generator().manual_seed(seed)``.

    The paper's "R" ablation. Scores are the uniform draws in [0, 1); the ``k``
    largest are selected and the threshold is the k-th largest draw. The same
    seed and layer list always give the same selection.
    """
    ids = _layer_ids(stats, model)
    k = _check_count("k", k, len(ids))
    gen = torch.Generator().manual_seed(int(seed))
    draws = torch.rand(len(ids), generator=gen, dtype=torch.float64)
    order = sorted(range(len(ids)), key=lambda i: (-float(draws[i]), ids[i]))
    chosen = sorted(ids[i] for i in order[:k])
    return Selection(
        layers=chosen,
        scores={ids[i]: float(draws[i]) for i in range(len(ids))},
        threshold=float(draws[order[k - 1]]),
        criterion="random",
        params={"k": k, "seed": int(seed)},
        reason=f"{k} layers drawn at random with seed {seed}: {chosen}.",
    )


@register_criterion("topk")
def topk_criterion(
    stats: ActivationStats,
    *,
    model: Any = None,
    k: int = 6,
    score: str | Callable[..., Any] = "msd",
    max_layer: int | None = None,
    **score_params: Any,
) -> Selection:
    """The ``k`` layers with the highest per-layer ``score`` (ties: lower layer first).

    ``score`` names one of :data:`SCORES` (``msd``, ``r_spread``, ``r_std``,
    ``divergence`` = 1 - overlap, ``lape``) or is a function ``f(stats) ->
    [L]``; extra keyword parameters go to the score (e.g. ``reference``,
    ``tau``). ``max_layer`` restricts candidates to layers ``<= max_layer``
    (e.g. the lower half). Threshold = the k-th score.
    """
    scores = layer_scores(stats, score, **score_params)
    candidates = {layer: v for layer, v in scores.items() if max_layer is None or layer <= max_layer}
    if not candidates:
        raise InvalidInputError(f"no layer <= max_layer={max_layer}; the statistics cover {stats.layers}")
    k = _check_count("k", k, len(candidates))
    chosen, threshold = _top(candidates, k)
    name = score if isinstance(score, str) else getattr(score, "__name__", "custom score")
    return Selection(
        layers=chosen,
        scores=scores,
        threshold=threshold,
        criterion="topk",
        params={"k": k, "score": name, "max_layer": max_layer, **score_params},
        reason=f"The {k} layers with the highest {name}"
        + (f" among layers <= {max_layer}" if max_layer is not None else "")
        + f": {chosen} (threshold = k-th score {threshold:.6g}).",
        notes={
            layer: ("not a candidate (above max_layer)" if layer not in candidates else
                    ("in the top k" if layer in chosen else "below the top k"))
            for layer in scores
        },
    )

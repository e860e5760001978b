"""The paper's rule, ``msd`` (SLAM sec. 3.2; DESIGN.md "Selection criteria"), the default criterion.

Example:
    >>> from layerselect import select
    >>> sel = select(stats)                      # doctest: +SKIP
    >>> print(sel.explain())                     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..stats import ActivationStats
from .registry import register_criterion
from .scores import _check_groups, _nan_check, _order
from .value import Selection

__all__ = ["msd_criterion", "MSD_ATOL", "OVERLAP_ATOL"]

#: Two MSD values closer than this are a tie (float64 rounding of R is ~1e-17,
#: so of MSD ~1e-19; real per-layer MSD gaps are orders of magnitude larger).
MSD_ATOL = 1e-12
#: Two average overlaps closer than this are a tie (the peak goes to the lowest layer).
OVERLAP_ATOL = 1e-12


@register_criterion("msd")
def msd_criterion(
    stats: ActivationStats,
    *,
    model: Any = None,
    reference: str = "en",
    tau: float = 0.5,
    overlap_method: str = "ratio",
    variant: str = "mean",
) -> Selection:
    """The paper's rule (SLAM sec. 3.2; DESIGN.md "Selection criteria"), the default.

    1. AVG overlap with ``reference`` per layer (``stats.overlap(reference, tau,
       overlap_method).average``); the peak is the layer where it is maximal
       (ties within 1e-12 go to the lowest layer).
    2. ``K`` = the layers strictly before the peak; ``K = {first layer}`` if
       the peak is the first layer (layer 0 on full statistics).
    3. ``theta`` = mean MSD over ``K``; select ``{l in K : MSD[l] > theta}``
       (strictly; MSD differences under 1e-12 are ties).
    4. If that is empty (``K`` has one layer, or all MSD in ``K`` are equal),
       select the layer of ``K`` with the largest MSD (ties: lowest layer) and
       say so in ``reason`` and ``details["fallback"]``.

    Parameters: ``reference`` (language of the overlap), ``tau`` (firing
    probability above which a neuron is "active" for the overlap; never 0),
    ``overlap_method`` (``ratio``, ``jaccard``, ``pearson``), ``variant`` (the
    activation ratio: ``mean`` or ``set@TAU``). Scores are MSD per layer;
    ``threshold`` is theta. Never returns an empty selection.

    Example:
        >>> sel = select(stats, "msd", reference="en", tau=0.5)   # doctest: +SKIP
        >>> sel.details["K"], sel.threshold, sel.layers           # doctest: +SKIP
        ([0, 1, 2], 0.0041, [0, 2])
    """
    _check_groups(stats, reference)
    msd = stats.msd(variant)
    avg = stats.overlap(reference, tau, overlap_method).average
    _nan_check(
        "MSD", msd, stats, "every language needs tokens; re-collect the statistics"
    )
    _nan_check(
        f"the average overlap with {reference!r}",
        avg,
        stats,
        f"the reference has no neuron with firing probability above tau={tau} there; "
        "lower tau or use overlap_method='pearson'",
    )
    order = _order(stats)
    layer_ids = [stats.layers[i] for i in order]
    m = {stats.layers[i]: float(msd[i]) for i in order}
    o = {stats.layers[i]: float(avg[i]) for i in order}
    d = _decide(layer_ids, m, o)
    return Selection(
        layers=d.chosen,
        scores=m,
        threshold=d.theta,
        criterion="msd",
        params={"reference": reference, "tau": tau, "overlap_method": overlap_method, "variant": variant},
        reason=_reason(d, o, reference, tau, overlap_method),
        notes=_notes(d, layer_ids, m, o),
        details={
            "K": d.k_set,
            "peak_layer": d.peak,
            "fallback": d.fallback,
            "overlap_average": {str(k): v for k, v in o.items()},
        },
    )


@dataclass(frozen=True)
class _Decision:
    """The steps of the rule: overlap peak, ``K``, ``theta``, the chosen layers, and the fallback."""

    peak: int
    k_set: list[int]
    theta: float
    chosen: list[int]
    fallback: bool
    fallback_layer: int


def _decide(layer_ids: list[int], m: dict[int, float], o: dict[int, float]) -> _Decision:
    """Apply steps 1-4 of :func:`msd_criterion` to per-layer MSD ``m`` and average overlap ``o``."""
    best = max(o.values())
    peak = next(layer for layer in layer_ids if o[layer] >= best - OVERLAP_ATOL)
    k_set = [layer for layer in layer_ids if layer < peak] or [layer_ids[0]]
    theta = sum(m[layer] for layer in k_set) / len(k_set)
    values_k = [m[layer] for layer in k_set]
    all_equal = max(values_k) - min(values_k) <= MSD_ATOL
    chosen = [] if all_equal else [layer for layer in k_set if m[layer] > theta + MSD_ATOL]
    fallback = not chosen
    top = max(values_k)
    fallback_layer = next(layer for layer in k_set if m[layer] >= top - MSD_ATOL)
    if fallback:
        chosen = [fallback_layer]
    return _Decision(peak, k_set, theta, chosen, fallback, fallback_layer)


def _notes(d: _Decision, layer_ids: list[int], m: dict[int, float], o: dict[int, float]) -> dict[int, str]:
    """Each layer's verdict: after the peak, or in ``K`` with its MSD against ``theta``."""
    notes: dict[int, str] = {}
    for layer in layer_ids:
        if layer not in d.k_set:
            notes[layer] = (
                f"overlap peak ({o[layer]:.4f}); K stops before it" if layer == d.peak
                else "after the overlap peak; not in K"
            )
            continue
        head = f"in K; MSD {m[layer]:.6g}"
        if layer == d.peak:
            head = f"overlap peak ({o[layer]:.4f}) and first layer, so K = {{{layer}}}; MSD {m[layer]:.6g}"
        if d.fallback and layer == d.fallback_layer:
            notes[layer] = head + " is the largest in K (fallback: no layer exceeds theta)"
        elif layer in d.chosen:
            notes[layer] = head + f" > theta {d.theta:.6g}"
        else:
            notes[layer] = head + f" <= theta {d.theta:.6g}"
    return notes


def _reason(d: _Decision, o: dict[int, float], reference: str, tau: float, overlap_method: str) -> str:
    """The one-paragraph account of the decision."""
    reason = (
        f"Average overlap with {reference!r} (tau={tau}, {overlap_method}) peaks at layer {d.peak} "
        f"({o[d.peak]:.4f}); K = {d.k_set}"
        + (" (the peak is the first layer, so K holds it alone)" if d.k_set == [d.peak] else " (layers before the peak)")
        + f"; theta = mean MSD over K = {d.theta:.6g}. "
    )
    if d.fallback:
        why = "K has a single layer" if len(d.k_set) == 1 else "all MSD in K are equal"
        reason += (
            f"No layer of K has MSD above theta ({why}), so the rule falls back to the layer of K "
            f"with the largest MSD: {d.fallback_layer}."
        )
    else:
        reason += f"Selected the layers of K with MSD > theta: {d.chosen}."
    return reason

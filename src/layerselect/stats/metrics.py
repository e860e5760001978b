"""The metrics derived from :class:`~layerselect.stats.ActivationStats`, in float64.

Activation probability, activation ratio (paper eq. 4), MSD (eq. 5-6), overlap
with a reference language, and the per-layer summary table. Every function
takes the statistics and computes on demand; nothing here is stored. A metric
built on another calls it through the statistics' method, so a subclass that
overrides one (the bootstrap's resampled statistics) changes every metric above it.

Example:
    >>> from layerselect.stats.metrics import activation_ratio, msd, overlap
    >>> activation_ratio(stats)          # R[layer, group]        # doctest: +SKIP
    >>> msd(stats)                       # MSD[layer]             # doctest: +SKIP
    >>> overlap(stats, reference="en")   # Overlap(per_group, average)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ..errors import InvalidInputError

if TYPE_CHECKING:  # only for annotations: stats.py imports this module
    from .value import ActivationStats

__all__ = [
    "Overlap", "OVERLAP_METHODS", "activation_probability", "activation_ratio", "msd", "overlap",
    "layer_table", "format_table",
]

OVERLAP_METHODS = ("ratio", "jaccard", "pearson")


class Overlap(NamedTuple):
    """Overlap with the reference language: ``per_group[l, g]`` and ``average[l]``.

    ``average`` is the mean over the non-reference groups (the paper's AVG).
    """

    per_group: torch.Tensor
    average: torch.Tensor


def activation_probability(stats: ActivationStats) -> torch.Tensor:
    """``p[l, n, g] = counts / tokens`` in float64."""
    if (stats.tokens == 0).any():
        empty = [g for g, t in zip(stats.groups, stats.tokens.tolist()) if t == 0]
        raise InvalidInputError(f"groups {empty} have no tokens; collect data for them first")
    return stats.counts.double() / stats.tokens.double()


def activation_ratio(
    stats: ActivationStats,
    variant: str = "mean",
    tau: float = 0.5,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Activation ratio ``R[l, g]`` (paper eq. 4), float64; see :meth:`ActivationStats.activation_ratio`."""
    variant, tau = _parse_variant(variant, tau)
    if sample_weights is not None:
        if variant != "mean":
            raise InvalidInputError("sample_weights only apply to the 'mean' activation ratio")
        return _ratio_from_samples(stats, sample_weights)
    p = stats.activation_probability()
    if variant == "mean":
        return p.mean(dim=1)
    return (p > tau).double().mean(dim=1)


def _ratio_from_samples(stats: ActivationStats, weights: torch.Tensor) -> torch.Tensor:
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (stats.num_samples,):
        raise InvalidInputError(f"sample_weights must have shape ({stats.num_samples},)")
    w = weights * stats.sample_tokens.double()  # token-weighted: R averages over tokens
    g = stats.sample_group.long()
    num = torch.zeros(len(stats.groups), stats.num_layers, dtype=torch.float64)
    num.index_add_(0, g, w[:, None] * stats.sample_fraction.double())
    den = torch.zeros(len(stats.groups), dtype=torch.float64).index_add_(0, g, w)
    return (num / den[:, None]).T


def msd(
    stats: ActivationStats,
    variant: str = "mean",
    tau: float = 0.5,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared deviation of the activation ratio across groups, ``MSD[l]`` (eq. 5-6)."""
    r = stats.activation_ratio(variant, tau, sample_weights)
    return ((r - r.mean(dim=1, keepdim=True)) ** 2).mean(dim=1)


def overlap(stats: ActivationStats, reference: str = "en", tau: float = 0.5, method: str = "ratio") -> Overlap:
    """Overlap of each group's active neurons with the reference group's; see :meth:`ActivationStats.overlap`."""
    if method not in OVERLAP_METHODS:
        raise InvalidInputError(f"unknown overlap method {method!r}; use one of {OVERLAP_METHODS}")
    ref = stats.group_index(reference)
    if len(stats.groups) < 2:
        raise InvalidInputError("overlap needs at least two groups (a reference and another)")
    p = stats.activation_probability()
    if method == "pearson":
        c = p - p.mean(dim=1, keepdim=True)
        num = (c * c[:, :, ref : ref + 1]).sum(dim=1)
        den = (c.pow(2).sum(dim=1) * c[:, :, ref].pow(2).sum(dim=1, keepdim=True)).sqrt()
        per_group = num / den
    else:
        active = p > tau
        inter = (active & active[:, :, ref : ref + 1]).sum(dim=1).double()
        if method == "ratio":
            den = active[:, :, ref].sum(dim=1, keepdim=True).double()
        else:
            den = (active | active[:, :, ref : ref + 1]).sum(dim=1).double()
        per_group = inter / den
    others = [i for i in range(len(stats.groups)) if i != ref]
    return Overlap(per_group, per_group[:, others].mean(dim=1))


def layer_table(stats: ActivationStats, reference: str | None = "en", tau: float = 0.5) -> list[dict[str, float]]:
    """One row per layer: R mean/min/max over groups, overlap average (if the reference exists), MSD."""
    r = stats.activation_ratio()
    spread = stats.msd()
    avg = None
    if reference is not None and reference in stats.groups and len(stats.groups) > 1:
        avg = stats.overlap(reference, tau).average
    rows = []
    for i, layer in enumerate(stats.layers):
        row = {
            "layer": layer,
            "R_mean": float(r[i].mean()),
            "R_min": float(r[i].min()),
            "R_max": float(r[i].max()),
            "MSD": float(spread[i]),
        }
        if avg is not None:
            row["overlap_avg"] = float(avg[i])
        rows.append(row)
    return rows


def format_table(stats: ActivationStats, reference: str | None = "en", tau: float = 0.5) -> str:
    """The per-layer table as aligned text (what ``layerselect analyze`` prints)."""
    rows = layer_table(stats, reference, tau)
    has_overlap = rows and "overlap_avg" in rows[0]
    head = f"{'layer':>5}  {'R mean':>8}  {'R min':>8}  {'R max':>8}  {'MSD':>11}"
    if has_overlap:
        head += f"  {'overlap(' + str(reference) + ')':>12}"
    lines = [head, "-" * len(head)]
    for row in rows:
        line = (
            f"{row['layer']:>5}  {row['R_mean']:>8.4f}  {row['R_min']:>8.4f}  "
            f"{row['R_max']:>8.4f}  {row['MSD']:>11.4e}"
        )
        if has_overlap:
            line += f"  {row['overlap_avg']:>12.4f}"
        lines.append(line)
    return "\n".join(lines)


def _parse_variant(variant: str, tau: float) -> tuple[str, float]:
    if variant.startswith("set@"):
        try:
            return "set", float(variant[4:])
        except ValueError:
            raise InvalidInputError(f"bad activation-ratio variant {variant!r}; e.g. 'set@0.5'") from None
    if variant not in ("mean", "set"):
        raise InvalidInputError(f"unknown activation-ratio variant {variant!r}; use 'mean' or 'set@TAU'")
    return variant, tau

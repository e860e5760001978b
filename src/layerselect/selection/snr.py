"""``snr``: a data-free rule from the FFN weights' spectra (Spectrum, Hartford et al. 2024).

Example:
    >>> from layerselect import select
    >>> sel = select(model=model, criterion="snr", fraction=0.25)   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidInputError
from ..stats import ActivationStats
from .registry import register_criterion
from .scores import _check_count, _top
from .value import Selection

__all__ = ["snr_criterion"]


def _mp_snr(weight: torch.Tensor) -> float:
    """Spectrum's per-matrix SNR: signal/noise of singular values split at the Marchenko-Pastur edge, over sigma_max."""
    s = torch.linalg.svdvals(weight.detach().float().cpu()).double()
    n, m = weight.shape[-2:]
    beta = min(n, m) / max(n, m)
    q75, q25 = torch.quantile(s, 0.75), torch.quantile(s, 0.25)
    sigma = float(q75 - q25) / 1.349  # noise scale from the IQR of the spectrum
    edge = sigma * (1.0 + math.sqrt(beta))  # Marchenko-Pastur bulk edge in singular values
    signal = float(s[s > edge].sum())
    noise = float(s[s <= edge].sum())
    noise = max(noise, 1e-12 * max(signal, 1e-300))  # all singular values above the edge: cap, no inf
    return (signal / noise) / float(s[0])


@register_criterion("snr")
def snr_criterion(
    stats: ActivationStats | None = None,
    *,
    model: Any,
    k: int | None = None,
    fraction: float = 0.25,
    matrices: Sequence[str] = ("gate", "up", "down"),
    max_layer: int | None = None,
) -> Selection:
    """Data-free: layers whose FFN weights carry the most signal (Spectrum, Hartford et al. 2024).

    For each FFN matrix ``W`` (``matrices`` among gate/up/down; a fused
    gate_up matrix is split into its halves) take the singular values ``s``,
    estimate the noise scale ``sigma = IQR(s) / 1.349``, and the
    Marchenko-Pastur bulk edge ``sigma * (1 + sqrt(beta))`` with ``beta`` the
    aspect ratio (short side / long side). SNR = sum of ``s`` above the edge /
    sum below it, divided by ``s_max`` (Spectrum's ``snr_ratio``). A layer's
    score is the mean over its matrices. Select the ``k`` highest layers
    (default ``max(1, round(fraction * layers))``, Spectrum's top 25%),
    among layers ``<= max_layer`` if given; threshold = the k-th score.

    Needs the model, not statistics: ``select(model=model, criterion="snr")``.
    If statistics are passed too, only their layers are considered.
    """
    from ..arch import get_layout

    layout = get_layout(model)
    ids = sorted(stats.layers) if stats is not None else list(range(layout.num_layers))
    for role in matrices:
        if role not in ("gate", "up", "down"):
            raise InvalidInputError(f"unknown FFN matrix {role!r}; use some of ['gate', 'up', 'down']")
    if not matrices:
        raise InvalidInputError("matrices is empty; use some of ['gate', 'up', 'down']")
    scores: dict[int, float] = {}
    for layer in ids:
        ffn = layout.ffn(layer)
        values = []
        for role in matrices:
            if ffn.gate_up is not None and role in ("gate", "up"):
                w = ffn.gate_up.weight
                half = w.shape[0] // 2
                w = w[:half] if role == "gate" else w[half:]
            else:
                w = getattr(ffn, role).weight
            values.append(_mp_snr(w))
        scores[layer] = sum(values) / len(values)
    candidates = {layer: v for layer, v in scores.items() if max_layer is None or layer <= max_layer}
    if not candidates:
        raise InvalidInputError(f"no layer <= max_layer={max_layer}; the model has layers {ids}")
    if k is None:
        if not 0.0 < fraction <= 1.0:
            raise InvalidInputError(f"fraction must be in (0, 1], got {fraction!r}")
        k = max(1, round(fraction * len(candidates)))
    k = _check_count("k", k, len(candidates))
    chosen, threshold = _top(candidates, k)
    return Selection(
        layers=chosen,
        scores=scores,
        threshold=threshold,
        criterion="snr",
        params={"k": k, "fraction": fraction, "matrices": list(matrices), "max_layer": max_layer},
        reason=(
            f"The {k} layers whose FFN matrices ({', '.join(matrices)}) have the highest "
            f"Marchenko-Pastur signal-to-noise ratio (Spectrum): {chosen}."
        ),
        meta={"model_name": getattr(getattr(model, "config", None), "_name_or_path", None) or None},
    )

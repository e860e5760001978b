"""Layer selection: the :class:`Selection` value, a criterion registry, the criteria, stability.

A *criterion* maps :class:`~layerselect.stats.ActivationStats` (and/or a
model's weights) to a :class:`Selection`: the chosen layers, the per-layer
scores the rule used, the threshold, and a human-readable account of why.
Layers are always *model layer ids* (``stats.layers``), never row indices.

Modules, in reading order:

==============  ============================================================
``value``       :class:`Selection` and its JSON file format
``registry``    :class:`Criterion`, :data:`CRITERIA`, :func:`register_criterion`,
                :func:`get_criterion`, :func:`registered_criterion`, :func:`select`
``scores``      per-layer scores (:data:`SCORES`, :func:`layer_scores`)
``msd``         the paper's rule
``baselines``   ``first_n``, ``all``, ``random``, ``topk``
``lape``        ``lape``
``snr``         ``snr`` (data-free)
``bootstrap``   :func:`stability`, :class:`Stability`, :func:`resample_stats`
``emit``        the selection for other trainers (Axolotl, LLaMA-Factory, PEFT):
                :meth:`Selection.to_axolotl`, :meth:`Selection.to_llamafactory`
==============  ============================================================

Built-in criteria (see each function's docstring for its parameters):

============  ==============================================================
``msd``       the paper's rule (default; DESIGN.md "Selection criteria")
``first_n``   the lowest ``n`` layers
``topk``      the ``k`` layers with the highest per-layer score (any score)
``random``    ``k`` layers drawn with a seed (the paper's "R" ablation)
``all``       every layer
``lape``      layers dense in language-specific neurons (Tang et al. 2024)
``snr``       data-free: Spectrum-style signal-to-noise of the FFN weights
============  ==============================================================

Example:
    >>> from layerselect.selection import Selection, register_criterion, select
    >>> sel = select(stats)                      # doctest: +SKIP
    >>> sel.layers, sel.threshold                # doctest: +SKIP
    ([0], 0.000123)
    >>> print(sel.explain())                     # doctest: +SKIP
    >>> sel.save("selection.json"); Selection.load("selection.json")   # doctest: +SKIP
    >>> sel.stability(n_boot=200, seed=0).format_table()               # doctest: +SKIP

    >>> @register_criterion
    ... def lowest_two(stats, *, model=None):    # the one criterion signature
    ...     return sorted(stats.layers)[:2]
    >>> # select(stats, criterion="lowest_two").layers -> the two lowest layers
"""

from __future__ import annotations

# Importing a rule module registers its criteria; msd first, as the default
# (list_criteria() shows the registration order).
# isort: off
from . import msd  # noqa: F401
from . import baselines, lape, snr  # noqa: F401
# isort: on
from .bootstrap import Stability, bootstrap_sample_weights, resample_stats, stability
from .emit import CannotExpressError
from .registry import (
    CRITERIA,
    Criterion,
    get_criterion,
    list_criteria,
    register_criterion,
    registered_criterion,
    select,
)
from .scores import SCORES, layer_scores
from .value import SELECTION_FORMAT_VERSION, Selection

__all__ = [
    "Selection",
    "Stability",
    "Criterion",
    "CRITERIA",
    "register_criterion",
    "get_criterion",
    "registered_criterion",
    "list_criteria",
    "select",
    "stability",
    "layer_scores",
    "bootstrap_sample_weights",
    "resample_stats",
    "SCORES",
    "SELECTION_FORMAT_VERSION",
    "CannotExpressError",
]

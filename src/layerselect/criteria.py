"""Compatibility module: the names of :mod:`layerselect.selection`, where the code now lives.

``layerselect.criteria`` was one module holding the :class:`Selection` value,
the registry, the rules and stability; it is now the package
:mod:`layerselect.selection`. Importing from here keeps working (same objects,
same registry).

Example:
    >>> from layerselect.criteria import CRITERIA, Selection, select
    >>> from layerselect.selection import Selection as S
    >>> S is Selection
    True
"""

from __future__ import annotations

from .selection import (
    CRITERIA,
    SCORES,
    SELECTION_FORMAT_VERSION,
    Criterion,
    Selection,
    Stability,
    bootstrap_sample_weights,
    get_criterion,
    layer_scores,
    list_criteria,
    register_criterion,
    registered_criterion,
    resample_stats,
    select,
    stability,
)
from .selection.baselines import all_criterion, first_n_criterion, random_criterion, topk_criterion
from .selection.lape import lape_criterion
from .selection.msd import MSD_ATOL, OVERLAP_ATOL, msd_criterion
from .selection.snr import snr_criterion

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
    "MSD_ATOL",
    "OVERLAP_ATOL",
    "msd_criterion",
    "first_n_criterion",
    "all_criterion",
    "random_criterion",
    "topk_criterion",
    "lape_criterion",
    "snr_criterion",
]

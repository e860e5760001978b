"""Stage 1, statistics: how often each FFN neuron fires, per language and layer.

``trace`` (hooks that count firing neurons during a forward) -> ``collect``
(tokenize, batch, trace, reduce) -> ``value`` (:class:`ActivationStats`, the
result) with ``files`` (its on-disk format and checks) and ``metrics``
(overlap, MSD, tables).

Example:
    >>> from layerselect.stats import ActivationStats
    >>> stats = ActivationStats.collect(model, tokenizer, {"en": [...], "de": [...]})  # doctest: +SKIP
    >>> stats.overlap(reference="en").average                                        # doctest: +SKIP
"""

from __future__ import annotations

from .files import DEFINITIONS_VERSION, META_FILE, STATS_FORMAT_VERSION, TENSOR_FILE
from .metrics import OVERLAP_METHODS, Overlap
from .value import ActivationStats

__all__ = [
    "ActivationStats", "Overlap", "OVERLAP_METHODS", "STATS_FORMAT_VERSION", "DEFINITIONS_VERSION",
    "META_FILE", "TENSOR_FILE", "collect_stats", "FiringTrace",
]


def __getattr__(name: str):
    # collect and trace pull in the model-side code; load them on first use, as before the split.
    if name == "collect_stats":
        from .collect import collect_stats

        return collect_stats
    if name == "FiringTrace":
        from .trace import FiringTrace

        return FiringTrace
    raise AttributeError(f"module 'layerselect.stats' has no attribute {name!r}")

"""layerselect: selective language alignment (SLAM) for LLMs.

Find the lower layers whose FFN neurons fire most differently across
languages, then fine-tune only those FFN matrices on X->English translation.

Example:
    >>> from layerselect import ActivationStats
    >>> stats = ActivationStats.collect(model, tokenizer, {"en": [...], "de": [...]})  # doctest: +SKIP
    >>> print(stats.format_table())                                                    # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from .criteria import (
    Selection,
    Stability,
    get_criterion,
    layer_scores,
    list_criteria,
    register_criterion,
    select,
    stability,
)
from .errors import (
    BaseModelMismatchError,
    FormatError,
    IncompatibleStatsError,
    InvalidInputError,
    LayerSelectError,
    UnsupportedArchitectureError,
)
from .stats import ActivationStats, Overlap

__all__ = [
    "__version__",
    "ActivationStats",
    "Overlap",
    "select",
    "Selection",
    "Stability",
    "stability",
    "register_criterion",
    "get_criterion",
    "list_criteria",
    "layer_scores",
    "LayerSelectError",
    "UnsupportedArchitectureError",
    "InvalidInputError",
    "IncompatibleStatsError",
    "FormatError",
    "BaseModelMismatchError",
]

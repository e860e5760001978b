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

from .errors import (
    BaseModelMismatchError,
    FormatError,
    IncompatibleStatsError,
    InvalidInputError,
    LayerSelectError,
    NumericalError,
    UnsupportedArchitectureError,
)
from .eval import evaluate
from .selection import (
    Selection,
    Stability,
    get_criterion,
    layer_scores,
    list_criteria,
    register_criterion,
    select,
    stability,
)
from .selective_ffn import (
    SelectiveFFNConfig,
    SelectiveFFNModel,
    get_slam_model,
    load_deltas,
    merge_checkpoint,
)
from .stats import ActivationStats, Overlap

# Training pulls in transformers' Trainer (slow to import): load it on first use.
_LAZY = {
    "train_slam": "layerselect.train",
    "TranslationExample": "layerselect.data",
    "load_translation_data": "layerselect.data",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'layerselect' has no attribute {name!r}")

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
    "SelectiveFFNConfig",
    "SelectiveFFNModel",
    "get_slam_model",
    "load_deltas",
    "merge_checkpoint",
    "train_slam",
    "TranslationExample",
    "load_translation_data",
    "evaluate",
    "LayerSelectError",
    "UnsupportedArchitectureError",
    "InvalidInputError",
    "IncompatibleStatsError",
    "FormatError",
    "BaseModelMismatchError",
    "NumericalError",
]

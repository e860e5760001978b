"""layerselect: selective language alignment (SLAM) for LLMs.

Find the lower layers whose FFN neurons fire most differently across
languages, then fine-tune only those FFN matrices on X->English translation.

The top level holds one name or a few per pipeline stage (stats -> selection ->
selective FFN -> training -> eval); everything else lives in its submodule
(e.g. :class:`layerselect.stats.Overlap`, :func:`layerselect.selection.list_criteria`,
:class:`layerselect.errors.NumericalError`).

Example:
    >>> from layerselect import ActivationStats, select
    >>> stats = ActivationStats.collect(model, tokenizer, {"en": [...], "de": [...]})  # doctest: +SKIP
    >>> print(stats.format_table())                                                    # doctest: +SKIP
    >>> select(stats).layers                                                           # doctest: +SKIP
"""

from __future__ import annotations

import importlib as _importlib
from typing import Any as _Any

from ._version import __version__

# The imports follow the pipeline, not the alphabet.
# isort: off

# Errors: every error the library raises derives from LayerSelectError.
from .errors import FormatError, InvalidInputError, LayerSelectError

# 1. Stats: per-language firing counts of the FFN neurons.
from .stats import ActivationStats

# 2. Selection: which layers to train, and how stable that choice is.
from .selection import Selection, register_criterion, select, stability

# 3. Selective FFN: the model that trains only the selected FFN matrices, and merging its deltas.
from .selective_ffn import SelectiveFFNConfig, SelectiveFFNModel, get_slam_model, merge_checkpoint

# 4. Training: fine-tune the selected matrices on X->English translation pairs. Loaded on
# first use by __getattr__ below (it pulls in transformers' Trainer, slow to import).
_LAZY = {
    "train_slam": "layerselect.train",
    "load_translation_data": "layerselect.data",
}

# 5. Eval: generate answers on reasoning benchmarks and score them per language.
from .eval import evaluate  # noqa: E402

# isort: on

__all__ = [
    "__version__",
    # stats
    "ActivationStats",
    # selection
    "select",
    "Selection",
    "stability",
    "register_criterion",
    # selective FFN
    "SelectiveFFNConfig",
    "SelectiveFFNModel",
    "get_slam_model",
    "merge_checkpoint",
    # training
    "train_slam",
    "load_translation_data",
    # eval
    "evaluate",
    # errors
    "LayerSelectError",
    "InvalidInputError",
    "FormatError",
]


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'layerselect' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, loaded or not (``dir()`` would otherwise miss the lazy ones)."""
    return sorted(set(globals()) | set(__all__))

"""One error family for everything layerselect refuses.

Every message names the offending input and says what to do about it, so a
user can fix the call without reading our source.
"""

from __future__ import annotations

__all__ = [
    "LayerSelectError",
    "UnsupportedArchitectureError",
    "InvalidInputError",
    "IncompatibleStatsError",
    "FormatError",
    "BaseModelMismatchError",
    "NumericalError",
]


class LayerSelectError(Exception):
    """Base class of every error raised on purpose by layerselect."""


class UnsupportedArchitectureError(LayerSelectError):
    """The model has no gated FFN we know how to find."""


class InvalidInputError(LayerSelectError, ValueError):
    """An argument or a data file is not usable as given."""


class IncompatibleStatsError(LayerSelectError):
    """Two statistics (or a statistic and a request) do not describe the same model/layers."""


class FormatError(LayerSelectError):
    """A saved file is corrupt, truncated, or of a format version we cannot read."""


class BaseModelMismatchError(LayerSelectError):
    """An adapter is being applied to a base model it was not trained from."""


class NumericalError(LayerSelectError):
    """A model produced NaN or inf where a measurement needs finite numbers."""

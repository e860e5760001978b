"""Loading delta adapters onto a model: :func:`load_deltas` (validate everything, then apply).

The other pieces have one module each, imported from there (no re-export module):
:mod:`.adapter_file` (names, format version, :func:`read_adapter` and its file
checks), :mod:`.checks` (does an adapter fit a base), :mod:`.delta` (the
reconstruction rule, exact deltas, patches, fingerprints), :mod:`.writing`
(:func:`write_adapter`) and :mod:`.tensorfile` (safetensors reading with errors
that name the file).

An adapter directory holds two files (see ``docs/adapters.md`` for the full format):

- ``layerselect_deltas.safetensors``: one tensor per trained matrix, keyed by the base
  model's own parameter name (``model.layers.3.mlp.up_proj.weight``), holding
  ``delta = W_trained - W_base``;
- ``layerselect_adapter.json``: the :class:`SelectiveFFNConfig` (under ``"config"``) plus the format
  version, the library version, the base model's name, layer count and a
  fingerprint of the targeted base weights, per-tensor shapes/dtypes, the
  reconstruction error, and the SHA-256 of the tensor file.

**Exactness.** Floating point does not guarantee ``W_b + (W_t - W_b) == W_t``: a
float32 difference is exact only when the two values are within a factor of two
(Sterbenz), so weights that change sign or halve would not round-trip. Lossless
deltas (float32, or float64 for float64 weights) are therefore computed from the
exact difference, then *verified* with the very arithmetic used to apply them
(:func:`apply_delta`); any element that does not reconstruct is recorded as a
*patch* (its flat index and the trained bit pattern) in a small side file,
``layerselect_patches.safetensors`` (only written when needed).
Applying with ``scale=1`` therefore reproduces the trained weights bit for bit on
the same base in the same dtype, by construction. Patches are needed only where a
weight crossed zero or shrank below half its base value (float32 deltas on
bf16/fp16 weights: only below 2**-16 of it, i.e. practically never); they cost 12-16
bytes per patched element and are ignored when ``scale != 1``. Lossy bf16/fp16 deltas have no patches; their maximum and relative
reconstruction errors are recorded instead.

**Fingerprint.** Per targeted matrix, the SHA-256 of the weights rounded to
bfloat16 (always through float32: ``w.float().bfloat16()``), plus their norm for
messages. It does not change when the same checkpoint is loaded in float32,
float64 or bfloat16 (the usual checkpoint dtypes bf16/fp16/fp32 hold values that
these loads keep or round identically), and any change to a weight larger than
bf16 rounding changes it. Loading a bf16/fp32 checkpoint in float16 is lossy and
does change it: use ``strict=False`` then.

Example:
    >>> from layerselect.selective_ffn import load_deltas
    >>> load_deltas(model, "adapter/")            # doctest: +SKIP
    >>> load_deltas(model, "adapter/", scale=0.5)  # half-strength  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import InvalidInputError
from .adapter_file import AdapterFile, read_adapter
from .checks import check_base, check_targets_match
from .delta import apply_delta, apply_patch

__all__ = ["apply_adapter_tensors", "load_deltas", "named_weights"]


def named_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of the transformers model inside ``model`` (any wrapper removed), by name."""
    from ..arch import unwrap_model

    return dict(unwrap_model(model).named_parameters())


def apply_adapter_tensors(
    params: Mapping[str, torch.Tensor],
    adapter: AdapterFile,
    deltas: Mapping[str, torch.Tensor],
    scale: float = 1.0,
    patch: bool = True,
) -> None:
    """Apply validated deltas in place (no validation here; call :func:`check_base` first).

    Exactness patches are applied only with ``patch=True`` (the base's fingerprint
    matched) and ``scale == 1``.
    """
    with torch.no_grad():
        for name, delta in deltas.items():
            p = params[name]
            new = apply_delta(p.data, delta, scale)
            if patch and scale == 1.0 and name in adapter.patches:
                apply_patch(new, *adapter.patches[name])
            p.data.copy_(new)


def load_deltas(
    model: nn.Module,
    path: str | os.PathLike[str],
    scale: float = 1.0,
    strict: bool = True,
) -> AdapterFile:
    """Add an adapter's deltas to ``model``'s weights in place: ``W += scale * delta``.

    Everything is validated before any weight changes: the files (checksum,
    header, format version: :class:`FormatError`), then the model (layer count,
    names, shapes and, unless ``strict=False``, the fingerprint of the targeted
    weights: :class:`BaseModelMismatchError`). Returns the :class:`AdapterFile`.

    Example:
        >>> adapter = load_deltas(model, "adapter/")   # doctest: +SKIP
        >>> adapter.config.layers                      # doctest: +SKIP
        [0, 1, 2, 3, 4, 5]
    """
    from ..arch import get_layout

    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidInputError(f"scale must be a finite number, got {scale!r}")
    adapter = read_adapter(path)
    params = named_weights(model)
    check_targets_match(adapter, model)
    same_base = check_base(adapter, params, get_layout(model).num_layers, strict=strict)
    deltas = adapter.load_tensors()
    apply_adapter_tensors(params, adapter, deltas, scale, patch=same_base)
    return adapter

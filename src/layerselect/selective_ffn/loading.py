"""Does an adapter fit a base (:func:`check_base`), and :func:`load_deltas`: validate everything, then apply.

Every entry point (``load_deltas``, ``SelectiveFFNModel.from_pretrained``,
``merge_checkpoint``) runs the checks (layer count, parameter names, shapes, and
the base fingerprint) before changing any weight, so a refused load leaves the
model or checkpoint exactly as it was.

Example:
    >>> from layerselect.selective_ffn import load_deltas
    >>> load_deltas(model, "adapter/")            # doctest: +SKIP
    >>> load_deltas(model, "adapter/", scale=0.5)  # half-strength  # doctest: +SKIP
    >>> adapter = read_adapter("adapter/")                                    # doctest: +SKIP
    >>> params = dict(model.named_parameters())                               # doctest: +SKIP
    >>> check_base(adapter, params, num_layers=model.config.num_hidden_layers)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import BaseModelMismatchError, InvalidInputError
from .adapter_file import AdapterFile, read_adapter, short_list
from .delta import apply_delta, apply_patch, fingerprint_tensor

__all__ = [
    "apply_adapter_tensors",
    "check_base",
    "check_structure",
    "check_targets_match",
    "fingerprint_matches",
    "load_deltas",
    "named_weights",
]


# ----------------------------------------------------------------------------------------
# Does an adapter fit a base?
# ----------------------------------------------------------------------------------------
def _base_name(adapter: AdapterFile) -> str:
    recorded = adapter.meta.get("base_model", {})
    return recorded.get("name_or_path") or adapter.config.base_model_name_or_path or "?"


def check_structure(
    adapter: AdapterFile,
    params: Mapping[str, Any],
    num_layers: int | None,
    what: str = "this model",
) -> None:
    """Refuse a base with another layer count, missing parameters or other shapes.

    ``params`` maps parameter names to anything with a ``.shape``.
    """
    base_name = _base_name(adapter)
    if adapter.num_layers is not None and num_layers is not None and adapter.num_layers != num_layers:
        raise BaseModelMismatchError(
            f"adapter {adapter.directory} was trained on {base_name!r} with {adapter.num_layers} decoder "
            f"layers; {what} has {num_layers}"
        )
    missing = [n for n in adapter.tensors if n not in params]
    if missing:
        raise BaseModelMismatchError(
            f"{what} has no parameter(s) {short_list(missing)} that adapter {adapter.directory} "
            f"(trained on {base_name!r}) modifies; is it the same architecture?"
        )
    bad_shapes = [
        f"{n}: adapter {tuple(info['shape'])} vs base {tuple(params[n].shape)}"
        for n, info in adapter.tensors.items()
        if list(params[n].shape) != list(info["shape"])
    ]
    if bad_shapes:
        raise BaseModelMismatchError(
            f"shape mismatch between adapter {adapter.directory} (trained on {base_name!r}) and {what}: "
            + "; ".join(bad_shapes[:4])
            + (f" and {len(bad_shapes) - 4} more" if len(bad_shapes) > 4 else "")
        )


def fingerprint_matches(
    adapter: AdapterFile,
    params: Mapping[str, torch.Tensor],
    strict: bool = True,
    what: str = "this model",
) -> bool:
    """Compare the targeted weights with the adapter's base fingerprint.

    Returns True on a match; on a mismatch raises :class:`BaseModelMismatchError`
    naming the matrices that differ, or returns False when ``strict=False``.
    """
    expected = adapter.fingerprint
    if not expected:
        if not strict:
            return False
        raise BaseModelMismatchError(
            f"adapter {adapter.directory} records no base fingerprint; pass strict=False to apply it anyway"
        )
    differ = []
    for name in adapter.tensors:
        want = expected.get(name)
        got = fingerprint_tensor(params[name])
        if want is None or want.get("sha256") != got["sha256"]:
            norm = f"norm {got['norm']:.6g} vs {want.get('norm', float('nan')):.6g}" if want else "not fingerprinted"
            differ.append(f"{name} ({norm})")
    if not differ:
        return True
    if not strict:
        return False
    dtype = adapter.meta.get("base_model", {}).get("dtype", "?")
    raise BaseModelMismatchError(
        f"the targeted weights of {what} differ from the base adapter {adapter.directory} was trained on "
        f"({_base_name(adapter)!r}, {dtype}): {len(differ)} of {len(adapter.tensors)} matrices differ "
        f"beyond bfloat16 rounding: {short_list(differ, 3)}. Typical causes: a different checkpoint, a base "
        "that already has this adapter merged, or a float16 load of a bf16/fp32 checkpoint. "
        "Pass strict=False to apply it anyway."
    )


def check_base(
    adapter: AdapterFile,
    params: Mapping[str, torch.Tensor],
    num_layers: int | None,
    strict: bool = True,
    what: str = "this model",
) -> bool:
    """:func:`check_structure` then :func:`fingerprint_matches`; returns whether the fingerprint matched."""
    check_structure(adapter, params, num_layers, what)
    return fingerprint_matches(adapter, params, strict, what)


def check_targets_match(adapter: AdapterFile, model: nn.Module) -> None:
    """The adapter's tensors must be exactly the matrices its config targets on ``model``."""
    from ..arch import get_layout

    arch = get_layout(model)
    try:
        layers = arch.check_layers(adapter.config.layers)
    except InvalidInputError as exc:
        raise BaseModelMismatchError(f"adapter {adapter.directory} does not fit this model: {exc}") from None
    expected = {n for i in layers for n in arch.parameter_names(i, adapter.config.target_modules)}
    if expected != set(adapter.tensors):
        extra, missing = sorted(set(adapter.tensors) - expected), sorted(expected - set(adapter.tensors))
        raise BaseModelMismatchError(
            f"adapter {adapter.directory} holds tensors that do not match what its config targets on this "
            f"{arch.family} model (layers {adapter.config.layers}, targets {adapter.config.target_modules}): "
            + (f"unexpected {short_list(extra)}" if extra else "")
            + ("; " if extra and missing else "")
            + (f"missing {short_list(missing)}" if missing else "")
        )


# ----------------------------------------------------------------------------------------
# Applying
# ----------------------------------------------------------------------------------------
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

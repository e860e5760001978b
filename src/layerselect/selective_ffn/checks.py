"""Does an adapter fit a base? Layer count, parameter names, shapes, and the base fingerprint.

Every entry point (``load_deltas``, ``SelectiveFFNModel.from_pretrained``,
``merge_checkpoint``) runs these before changing any weight, so a refused load
leaves the model or checkpoint exactly as it was.

Example:
    >>> adapter = read_adapter("adapter/")                                    # doctest: +SKIP
    >>> params = dict(model.named_parameters())                               # doctest: +SKIP
    >>> check_base(adapter, params, num_layers=model.config.num_hidden_layers)  # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import BaseModelMismatchError, InvalidInputError
from .adapter_file import AdapterFile, short_list
from .delta import fingerprint_tensor

__all__ = ["check_base", "check_structure", "check_targets_match", "fingerprint_matches"]


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

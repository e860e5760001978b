"""Exact deltas: the one reconstruction rule, deltas verified against it, patches, fingerprints.

**Exactness.** Floating point does not guarantee ``W_b + (W_t - W_b) == W_t``: a
float32 difference is exact only when the two values are within a factor of two
(Sterbenz), so weights that change sign or halve would not round-trip. Lossless
deltas (float32, or float64 for float64 weights) are therefore computed from the
exact difference, then *verified* with the very arithmetic used to apply them
(:func:`apply_delta`); any element that does not reconstruct is recorded as a
*patch* (its flat index and the trained bit pattern), applied by :func:`apply_patch`
and stored in a small side file, ``layerselect_patches.safetensors`` (only written
when needed). Applying with ``scale=1`` therefore reproduces the trained weights bit
for bit on the same base in the same dtype, by construction. Patches are needed only
where a weight crossed zero or shrank below half its base value (float32 deltas on
bf16/fp16 weights: only below 2**-16 of it, i.e. practically never); they cost 12-16
bytes per patched element and are ignored when ``scale != 1``. Lossy bf16/fp16 deltas
have no patches; their maximum and relative reconstruction errors are recorded instead.

**Fingerprint.** Per targeted matrix, the SHA-256 of the weights rounded to
bfloat16 (always through float32: ``w.float().bfloat16()``), plus their norm for
messages. It does not change when the same checkpoint is loaded in float32,
float64 or bfloat16 (the usual checkpoint dtypes bf16/fp16/fp32 hold values that
these loads keep or round identically), and any change to a weight larger than
bf16 rounding changes it. Loading a bf16/fp32 checkpoint in float16 is lossy and
does change it: use ``strict=False`` then.

Example:
    >>> import torch
    >>> base, trained = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    >>> res = compute_delta(trained, base, torch.float32)
    >>> torch.equal(apply_delta(base, res.delta), trained)
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError

__all__ = [
    "DeltaResult",
    "FINGERPRINT_METHOD",
    "apply_delta",
    "apply_patch",
    "compute_delta",
    "dtype_name",
    "fingerprint_digest",
    "fingerprint_tensor",
    "is_lossless",
    "resolve_delta_dtype",
]

FINGERPRINT_METHOD = "sha256 of weights cast float32->bfloat16, per tensor"
# Integer views that compare and store float bit patterns.
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32,
            torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64,
               "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def apply_delta(base: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``base + scale * delta``, computed in float32 (float64 if either is float64), cast back to ``base.dtype``.

    This is *the* reconstruction rule: saving verifies deltas with it, and loading,
    merging and ``SelectiveFFNModel.from_pretrained`` all use it.
    """
    cd = _compute_dtype(base.dtype, delta.dtype)
    d = delta.to(device=base.device, dtype=cd)
    if scale != 1.0:
        d = d * scale
    return (base.to(cd) + d).to(base.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def resolve_delta_dtype(setting: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a ``SelectiveFFNConfig.delta_dtype`` setting stores for weights of ``weight_dtype``."""
    if setting == "auto":
        return torch.float64 if weight_dtype == torch.float64 else torch.float32
    return DTYPE_NAMES[setting]


def is_lossless(delta_dtype: torch.dtype) -> bool:
    return delta_dtype in (torch.float32, torch.float64)


@dataclass
class DeltaResult:
    """A delta ready to store, with patches (lossless) or its reconstruction error (lossy)."""

    delta: torch.Tensor
    patch_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    patch_bits: torch.Tensor | None = None
    mismatched: int = 0  # elements whose reconstruction is not bitwise the trained value (after patches)
    max_abs_error: float = 0.0
    sq_error: float = 0.0
    sq_norm: float = 0.0


def compute_delta(trained: torch.Tensor, base: torch.Tensor, delta_dtype: torch.dtype) -> DeltaResult:
    """Delta such that ``apply_delta(base, delta)`` (plus patches) equals ``trained``.

    Lossless dtypes are verified bitwise and repaired (neighbouring delta, then
    patches); lossy ones report the reconstruction error.
    """
    if trained.shape != base.shape:
        raise InvalidInputError(f"trained shape {tuple(trained.shape)} != base shape {tuple(base.shape)}")
    trained = trained.detach().to("cpu").contiguous()
    base = base.detach().to("cpu", dtype=trained.dtype).contiguous()
    delta = (trained.double() - base.double()).to(delta_dtype)
    rec = apply_delta(base, delta)
    res = DeltaResult(delta=delta)
    bad = (_bits(rec) != _bits(trained)).view(-1)
    if is_lossless(delta_dtype) and bool(bad.any()):
        # Not reachable by any delta of this dtype under this arithmetic (a float32
        # sum of a float32 base and delta lands on a grid too coarse for weights
        # that shrank or crossed zero): record the trained bits instead.
        idx = bad.nonzero().view(-1)
        res.patch_index = idx
        res.patch_bits = _bits(trained).view(-1)[idx].clone()
        rec.view(-1)[idx] = trained.view(-1)[idx]
        bad = (_bits(rec) != _bits(trained)).view(-1)
    res.mismatched = int(bad.sum())
    err = (rec.double() - trained.double())
    res.max_abs_error = float(err.abs().max()) if err.numel() else 0.0
    res.sq_error = float((err * err).sum())
    res.sq_norm = float((trained.double() ** 2).sum())
    return res


def apply_patch(weight: torch.Tensor, index: torch.Tensor, bits: torch.Tensor | None) -> None:
    """Write the trained bit patterns ``bits`` at flat positions ``index`` of ``weight`` (in place)."""
    if bits is None or index.numel() == 0:
        return
    if bits.dtype != INT_VIEW.get(weight.dtype):
        return  # patches restore bits of the training dtype; another dtype cannot be exact anyway
    weight.view(-1)[index.to(weight.device)] = bits.view(weight.dtype).to(weight.device)


def fingerprint_tensor(weight: torch.Tensor) -> dict[str, Any]:
    """``{"sha256": ..., "norm": ...}`` of a weight, independent of the dtype it was loaded in.

    Example:
        >>> import torch
        >>> w = torch.randn(4, 3, dtype=torch.bfloat16)
        >>> fingerprint_tensor(w)["sha256"] == fingerprint_tensor(w.double())["sha256"]
        True
    """
    w = weight.detach().to("cpu").to(torch.float32).to(torch.bfloat16).contiguous()
    h = hashlib.sha256()
    h.update(json.dumps(list(w.shape)).encode())
    h.update(w.view(torch.int16).numpy().tobytes())
    norm = float(w.double().norm()) if w.numel() else 0.0
    return {"sha256": h.hexdigest()[:32], "norm": float(f"{norm:.7g}")}


def fingerprint_digest(per_tensor: Mapping[str, Mapping[str, Any]]) -> str:
    """One digest over the per-tensor fingerprints, in name order."""
    h = hashlib.sha256()
    for name in sorted(per_tensor):
        h.update(f"{name}:{per_tensor[name]['sha256']};".encode())
    return h.hexdigest()[:32]

"""One precision option for everything that runs a model: ``"auto"``, ``"fp32"`` or ``"bf16"``.

``bf16`` is mixed precision, not a bf16 model: the weights (and so the optimizer
state and the saved deltas) stay in their own dtype, usually float32, and
``torch.autocast`` runs the matrix multiplications in bfloat16. That is what the
paper does on its GPUs, and what makes a CPU with native bf16 instructions
(``avx512_bf16`` or AMX) 2.25x faster on a GEMM (AMD EPYC, 2 threads; measured in
``benchmarks/bench_precision.py``). Losses and measures keep their float64
accumulation; only the products inside the model round to bf16.

``"auto"`` picks bf16 where the hardware multiplies it natively, found from the
CPU's own feature flags (``torch.cpu.get_capabilities()``, else ``/proc/cpuinfo``)
or ``torch.cuda.is_bf16_supported()``, never guessed from the OS; fp32 elsewhere
(a CPU that only emulates bf16 is slower in it than in fp32).

Example:
    >>> from layerselect.precision import resolve_precision, autocast
    >>> resolve_precision("fp32")
    'fp32'
    >>> with autocast("fp32", "cpu"):      # a no-op context: plain float32
    ...     pass
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import InvalidInputError

__all__ = ["PRECISIONS", "Precision", "autocast", "fast_bf16", "resolve_precision", "model_device", "model_dtype"]

#: The values every ``--precision`` flag and ``precision=`` argument takes.
PRECISIONS = ("auto", "fp32", "bf16")
Precision = Literal["auto", "fp32", "bf16"]

# x86: the AVX-512 BF16 dot products (Zen 4, Cooper Lake+) or AMX tiles (Sapphire Rapids+);
# Arm: the BF16 extension (Graviton 3, Apple M2+, Neoverse V1+).
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def _cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """Names of the CPU's features that are present, from torch's cpuinfo, else ``cpuinfo`` (Linux)."""
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if callable(get):
        try:
            return {str(k) for k, v in get().items() if v is True}
        except Exception:  # an older or unusual build: fall through to the kernel's view
            pass
    return _cpuinfo_flags(cpuinfo)


def _cpuinfo_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The ``flags`` (x86) / ``Features`` (Arm) words of a Linux ``/proc/cpuinfo``; empty if unreadable."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    return any(f in _cpu_flags() for f in _CPU_BF16_FLAGS)


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """True if ``device`` multiplies bfloat16 natively (so bf16 autocast pays off there).

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer). CPU: the
    ``avx512_bf16`` / ``amx_bf16`` (x86) or ``bf16`` (Arm) feature flags. Other
    device types: False.

    Example:
        >>> isinstance(fast_bf16("cpu"), bool)
        True
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        return _cpu_has_fast_bf16()
    return False


def resolve_precision(
    precision: str | None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> str:
    """``"fp32"`` or ``"bf16"``: what ``precision`` means on ``device`` (None counts as ``"fp32"``).

    ``"auto"`` is ``"bf16"`` where :func:`fast_bf16` says so, else ``"fp32"``; a model
    whose weights are float64 (``dtype``) stays exact: autocast would not touch its
    float64 products anyway. ``"bf16"`` is honoured even without fast hardware (it is
    then only slower).

    Example:
        >>> resolve_precision("bf16"), resolve_precision(None)
        ('bf16', 'fp32')
    """
    if precision is None:
        return "fp32"
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if fast_bf16(device) and dtype != torch.float64 else "fp32"
    return precision


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def model_dtype(model: Any) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter (None for a model without any)."""
    try:
        return next(p.dtype for p in model.parameters() if p.is_floating_point())
    except (StopIteration, AttributeError):
        return None


@contextlib.contextmanager
def autocast(
    precision: str | None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Iterator[str]:
    """Run the block in ``precision`` on ``device``; yields the resolved ``"fp32"``/``"bf16"``.

    ``dtype``: the model's weight dtype, for ``"auto"`` (see :func:`resolve_precision`).

    bf16 is ``torch.autocast(device_type, dtype=torch.bfloat16)``: weights keep their
    dtype, matrix products run in bfloat16. fp32 changes nothing (an enclosing
    autocast, e.g. the Trainer's, stays in charge).

    Example:
        >>> import torch
        >>> with autocast("bf16", "cpu") as used:
        ...     y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
        >>> used, y.dtype
        ('bf16', torch.bfloat16)
    """
    device = torch.device(device)
    resolved = resolve_precision(precision, device, dtype)
    if resolved == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield resolved
    else:
        yield resolved

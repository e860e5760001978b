"""Export a selective-FFN delta adapter as a standard PEFT LoRA adapter (for serving).

Each trained matrix's delta ``D`` (out x in) is factored by SVD,
``D ~= B @ A`` with ``B = U_r sqrt(S_r)`` (out x r) and ``A = sqrt(S_r) V_r^T``
(r x in), keeping the ``r`` largest singular values (Eckart-Young: the best
rank-r approximation in the Frobenius norm). The folder is what
``peft.LoraConfig`` + ``PeftModel.save_pretrained`` write: ``adapter_config.json``
with ``target_modules`` (the FFN matrix names) and ``layers_to_transform`` (the
trained layers), ``lora_alpha = r`` so PEFT's scaling ``alpha / r`` is 1, and
``adapter_model.safetensors`` keyed ``base_model.model.<module>.lora_A.weight``.
``rank="full"`` keeps every singular value: the LoRA model reproduces the merged
model up to float rounding. ``export_report.json`` records each matrix's relative
reconstruction error ``||D - B A||_F / ||D||_F``.

Example:
    >>> from layerselect.selective_ffn import export_lora
    >>> report = export_lora("adapter/", "lora/", rank=64)                      # doctest: +SKIP
    >>> report.max_relative_error                                               # doctest: +SKIP
    >>> from peft import PeftModel; PeftModel.from_pretrained(base, "lora/")    # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._io import atomic_directory, write_json
from ..errors import InvalidInputError
from .adapter_file import TENSOR_NAME, read_adapter

__all__ = ["LoraExport", "export_lora", "lora_factors"]

LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "export_report.json"


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote: the folder, ranks, per-matrix errors and size."""

    path: Path
    rank: int
    errors: dict[str, float] = field(default_factory=dict)  # tensor name -> relative Frobenius error
    ranks: dict[str, int] = field(default_factory=dict)  # tensor name -> rank kept
    size_bytes: int = 0

    @property
    def max_relative_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def format_table(self) -> str:
        """One line per matrix: name, rank, relative error."""
        lines = [f"{'matrix':<48} {'rank':>5} {'rel. error':>11}"]
        for name in sorted(self.errors):
            lines.append(f"{name:<48} {self.ranks[name]:>5} {self.errors[name]:>11.3e}")
        lines.append(f"{len(self.errors)} matrices, rank {self.rank}, max relative error "
                     f"{self.max_relative_error:.3e}, {self.size_bytes / 2**20:.2f} MiB")
        return "\n".join(lines)


def lora_factors(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, relative error)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta``.

    Computed in float64; ``rank=None`` keeps all singular values.

    Example:
        >>> d = torch.outer(torch.arange(3.0), torch.ones(4))  # rank 1
        >>> a, b, err = lora_factors(d, 1)
        >>> a.shape, b.shape, err < 1e-12
        (torch.Size([1, 4]), torch.Size([3, 1]), True)
    """
    d = delta.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = s.numel() if rank is None else min(rank, s.numel())
    root = s[:r].sqrt()
    a = root[:, None] * vh[:r]
    b = u[:, :r] * root[None, :]
    norm = torch.linalg.matrix_norm(d)
    err = float(torch.linalg.matrix_norm(d - b @ a) / norm) if norm > 0 else 0.0
    return a, b, err


def _one_or_list(items: list[str]) -> str | list[str]:
    return items[0] if len(items) == 1 else items


def _parse_rank(rank: int | str) -> int | None:
    if isinstance(rank, str):
        if rank == "full":
            return None
        try:
            rank = int(rank)
        except ValueError:
            raise InvalidInputError(f"rank {rank!r}: give a positive integer or 'full'") from None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidInputError(f"rank {rank!r}: give a positive integer or 'full'")
    return rank


def _factor_deltas(
    deltas: dict[str, torch.Tensor], rank: int | None, dtype: torch.dtype, report: LoraExport
) -> tuple[dict[str, torch.Tensor], set[str], set[str]]:
    """PEFT-keyed LoRA factors of every delta, recording each matrix's rank and error in ``report``.

    Returns ``(tensors, matrix names, layers paths)``.
    """
    tensors: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    prefixes: set[str] = set()
    for name in sorted(deltas):
        m = TENSOR_NAME.match(name)
        if m is None:  # read_adapter already refuses these; kept as a guard
            raise InvalidInputError(f"unexpected tensor name {name} in the adapter")
        a, b, _ = lora_factors(deltas[name], rank)
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        module = name[: -len(".weight")]
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        # The error of the factors as stored (after the cast), against the delta in float64.
        d = deltas[name].to(torch.float64)
        norm = torch.linalg.matrix_norm(d)
        report.errors[name] = float(torch.linalg.matrix_norm(d - b.double() @ a.double()) / norm) if norm > 0 else 0.0
        report.ranks[name] = a.shape[0]
        modules.add(m.group("attr"))
        prefixes.add(m.group("prefix"))
    report.rank = max(report.ranks.values())
    return tensors, modules, prefixes


def _peft_config(
    report: LoraExport, layers: list[int], modules: set[str], prefixes: set[str], base_name: str | None
) -> dict[str, Any]:
    """``adapter_config.json`` as ``peft.LoraConfig`` writes it, with ``lora_alpha = r`` (scaling 1)."""
    r = report.rank
    rank_pattern = {n[: -len(".weight")]: k for n, k in report.ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "target_modules": sorted(modules),
        "layers_to_transform": list(layers),
        "layers_pattern": _one_or_list(sorted({p.rsplit(".", 1)[-1] for p in prefixes})),
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),  # alpha = r per matrix: scaling stays 1
        "modules_to_save": None,
    }


def export_lora(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rank: int | str = "full",
    *,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> LoraExport:
    """Write a PEFT LoRA adapter folder ``out`` equivalent (up to ``rank``) to a delta adapter.

    Args:
        adapter: a layerselect adapter folder (validated as by ``load_deltas``).
        out: the LoRA folder, written whole (a scratch sibling, then swapped in).
        rank: LoRA rank ``r`` (clipped per matrix to its smaller side), or ``"full"``.
        base_model_name_or_path: recorded for PEFT/vLLM (default: the adapter's base name).
        dtype: dtype of the stored factors (computed in float64).
        overwrite: replace an ``out`` that is not an earlier LoRA export.

    Returns:
        a :class:`LoraExport` with each matrix's relative reconstruction error.

    Example:
        >>> export_lora("adapter/", "lora/", rank=64).rank   # doctest: +SKIP
        64
    """
    r_req = _parse_rank(rank)
    src = read_adapter(adapter)
    report = LoraExport(path=Path(out), rank=0)
    tensors, modules, prefixes = _factor_deltas(src.load_tensors(), r_req, dtype, report)
    base_name = base_model_name_or_path or src.config.base_model_name_or_path
    config = _peft_config(report, src.config.layers, modules, prefixes, base_name)
    with atomic_directory(out, LORA_CONFIG_NAME, overwrite=overwrite, what="LoRA export") as tmp:
        save_file(tensors, str(tmp / LORA_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        write_json(tmp / REPORT_NAME, {
            "source_adapter": str(Path(adapter)),
            "rank": "full" if r_req is None else r_req,
            "ranks": report.ranks,
            "relative_error": report.errors,
            "max_relative_error": report.max_relative_error,
        })
        report.size_bytes = (tmp / LORA_WEIGHTS_NAME).stat().st_size
    return report

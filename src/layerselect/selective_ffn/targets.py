"""The matrices a :class:`SelectiveFFNConfig` trains on a given model, resolved to its parameters.

Example:
    >>> targets, layout = resolve_targets(model, SelectiveFFNConfig(layers=[1]))   # doctest: +SKIP
    >>> [t.name for t in targets]                                                  # doctest: +SKIP
    ['model.layers.1.mlp.up_proj.weight', 'model.layers.1.mlp.down_proj.weight']
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..arch import get_layout
from ..errors import InvalidInputError
from .config import SelectiveFFNConfig

__all__ = ["Target", "parameter_numel", "resolve_targets"]


@dataclasses.dataclass
class Target:
    """One trained matrix: its parameter name, the parameter, its layer, and rows kept frozen."""

    name: str
    param: nn.Parameter
    layer: int
    frozen_rows: tuple[slice, ...] | None = None  # fused gate_up / qkv with only some parts targeted

    @property
    def trainable_numel(self) -> int:
        n = parameter_numel(self.param)
        if self.frozen_rows is not None:
            rows = tuple(getattr(self.param, "ds_shape", None) or self.param.shape)[0]  # ZeRO-3: full shape
            per_row = n // rows if rows else 0
            n -= sum(len(range(*part.indices(rows))) for part in self.frozen_rows) * per_row
        return n


def parameter_numel(p: torch.Tensor) -> int:
    # DeepSpeed ZeRO-3 partitions parameters and keeps the full size in ds_numel.
    return int(getattr(p, "ds_numel", 0) or p.numel())


def resolve_targets(model: nn.Module, config: SelectiveFFNConfig) -> tuple[list[Target], Any]:
    """The targets of ``config`` on ``model`` (layers checked against it) and the model's layout."""
    layout = get_layout(model)
    layers = layout.check_layers(config.layers)
    params = dict(layout.model.named_parameters())
    roles = config.target_modules
    targets: list[Target] = []
    for i in layers:
        for name in layout.parameter_names(i, roles):
            if name not in params:
                raise InvalidInputError(f"parameter {name} not found in {type(layout.model).__name__}")
            frozen = None
            parts = layout.fused_rows(i, name.removesuffix(".weight"))
            if parts is not None:  # fused gate_up or qkv: freeze the rows of untargeted roles
                untargeted = tuple(rows for role, rows in parts.items() if role not in roles)
                frozen = untargeted or None
            targets.append(Target(name, params[name], i, frozen))
    return targets, layout

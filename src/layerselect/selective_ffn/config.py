"""What trains: :class:`SelectiveFFNConfig` (which layers' matrices, how deltas are stored)
and :func:`resolve_targets` (that config resolved to a given model's parameters).

Example:
    >>> from layerselect.selective_ffn import SelectiveFFNConfig
    >>> cfg = SelectiveFFNConfig(layers=[0, 1, 2, 3, 4, 5])
    >>> cfg.target_modules
    ['up', 'down']
    >>> SelectiveFFNConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> SelectiveFFNConfig(layers=[0], target_modules=["attn", "ffn"]).target_modules
    ['gate', 'up', 'down', 'q', 'k', 'v', 'o']
    >>> SelectiveFFNConfig(layers=[1, 1])
    Traceback (most recent call last):
    ...
    layerselect.errors.InvalidInputError: duplicate layer indices [1] in SelectiveFFNConfig.layers; list each layer once
    >>> targets, layout = resolve_targets(model, SelectiveFFNConfig(layers=[1]))   # doctest: +SKIP
    >>> [t.name for t in targets]                                                  # doctest: +SKIP
    ['model.layers.1.mlp.up_proj.weight', 'model.layers.1.mlp.down_proj.weight']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .._io import jsonable, read_json
from ..arch import get_layout, normalize_target_modules
from ..errors import FormatError, InvalidInputError

__all__ = [
    "SelectiveFFNConfig",
    "DELTA_DTYPES",
    "HasLayers",
    "Target",
    "parameter_numel",
    "resolve_targets",
]

#: Allowed values of ``SelectiveFFNConfig.delta_dtype``. ``"auto"`` (default) stores
#: float32 deltas for float32/bfloat16/float16 weights and float64 deltas for float64
#: weights: both reproduce the trained weights bit for bit on the same base in the
#: same dtype. ``"bfloat16"``/``"float16"`` are lossy (half the size of float32);
#: their reconstruction error is recorded in ``layerselect_adapter.json``.
DELTA_DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")

# Attributes of a Selection-like object kept as provenance (whatever exists of them).
_PROVENANCE_ATTRS = ("criterion", "name", "threshold", "scores", "why", "reason", "explanation", "meta")


class HasLayers(Protocol):
    """Anything with a ``.layers`` list, e.g. a :class:`layerselect.selection.Selection`."""

    layers: Iterable[int]


def _jsonable_str(value: Any) -> Any:
    """Provenance values as strict JSON (``adapter_config.json`` is read by other tools too)."""
    return jsonable(value, nonfinite="str")


def _selection_provenance(selection: Any) -> dict[str, Any]:
    to_dict = getattr(selection, "to_dict", None)
    if callable(to_dict):
        try:
            out = dict(to_dict())
            out.setdefault("type", type(selection).__name__)
            return _jsonable_str(out)
        except Exception:  # fall back to attributes
            pass
    out: dict[str, Any] = {"type": type(selection).__name__}
    for attr in _PROVENANCE_ATTRS:
        if hasattr(selection, attr):
            value = getattr(selection, attr)
            if not callable(value):
                out[attr] = _jsonable_str(value)
    return out


@dataclass
class SelectiveFFNConfig:
    """Which decoder layers' FFN matrices to fine-tune (PEFT-style config).

    Args:
        layers: decoder-layer indices, or any object with a ``.layers`` attribute
            (e.g. a :class:`layerselect.selection.Selection`); in the latter case its
            criterion, scores and explanation are kept in ``selection`` as provenance.
        target_modules: matrices to train, as roles (``"gate"``, ``"up"``,
            ``"down"``; attention ``"q"``, ``"k"``, ``"v"``, ``"o"``), family names
            (``"up_proj"``, ``"gate_up_proj"``, ``"qkv_proj"``) or groups
            (``"ffn"`` = ``"all"`` = gate+up+down, ``"attn"`` = q+k+v+o; the paper's
            sub-layer ablation). Default ``["up", "down"]``, what the paper's released
            code trains. On fused families (Phi-3 ``gate_up_proj``, ``qkv_proj``) the
            fused matrix is trained, with the gradient of untargeted rows masked.
        base_model_name_or_path: recorded in the adapter; filled from the model's
            ``config.name_or_path`` by :func:`get_slam_model` when left empty.
        delta_dtype: one of :data:`DELTA_DTYPES` (default ``"auto"``: lossless).
        selection: provenance of the layer choice (free-form JSON).
    """

    layers: Iterable[int] | HasLayers = field(
        metadata={"help": "Decoder-layer indices whose matrices train, or a Selection (its .layers are used)."}
    )
    target_modules: str | list[str] = field(
        default_factory=lambda: ["up", "down"],
        metadata={"help": "Matrices to train: roles (gate, up, down, q, k, v, o), family names "
                  "(up_proj, gate_up_proj, qkv_proj...) or groups (ffn/all, attn); stored as canonical roles."},
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Name or path of the base model, recorded in the adapter; filled from the "
                  "model's config.name_or_path by get_slam_model when None."},
    )
    delta_dtype: str = field(
        default="auto",
        metadata={"help": f"How deltas are stored, one of {DELTA_DTYPES}; 'auto' is lossless "
                  "(float32, or float64 for float64 weights), bfloat16/float16 are lossy."},
    )
    selection: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Provenance of the layer choice (free-form JSON), taken from a Selection when given."},
    )

    def __post_init__(self) -> None:
        layers = self.layers
        if not isinstance(layers, (list, tuple, range)) and hasattr(layers, "layers"):
            if self.selection is None:
                self.selection = _selection_provenance(layers)
            layers = layers.layers
        if hasattr(layers, "tolist"):
            layers = layers.tolist()
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise InvalidInputError(
                f"SelectiveFFNConfig.layers must be a list of layer indices or a Selection, got {layers!r}"
            )
        layers = list(layers)
        for x in layers:
            if isinstance(x, bool) or not isinstance(x, int):
                raise InvalidInputError(f"layer index {x!r} in SelectiveFFNConfig.layers is not an integer")
            if x < 0:
                raise InvalidInputError(f"layer index {x} in SelectiveFFNConfig.layers is negative")
        if not layers:
            raise InvalidInputError(
                "SelectiveFFNConfig.layers is empty: select at least one layer to train"
            )
        if len(set(layers)) != len(layers):
            dup = sorted({x for x in layers if layers.count(x) > 1})
            raise InvalidInputError(
                f"duplicate layer indices {dup} in SelectiveFFNConfig.layers; list each layer once"
            )
        self.layers = sorted(int(x) for x in layers)
        self.target_modules = normalize_target_modules(self.target_modules)
        if self.delta_dtype not in DELTA_DTYPES:
            raise InvalidInputError(
                f"SelectiveFFNConfig.delta_dtype={self.delta_dtype!r}; use one of {list(DELTA_DTYPES)}"
            )
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            self.base_model_name_or_path = str(self.base_model_name_or_path)
        if self.selection is not None:
            self.selection = _jsonable_str(self.selection)

    # -- JSON round trip ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        return asdict(self)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The keys :meth:`to_dict` writes and :meth:`from_dict` accepts."""
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectiveFFNConfig:
        """Build from :meth:`to_dict` output; an unknown key is refused by name (a typo, or a newer file).

        Example:
            >>> SelectiveFFNConfig.from_dict({"layers": [0], "target_module": ["up"]})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            layerselect.errors.FormatError: SelectiveFFNConfig has no field 'target_module'; it knows [...]...
        """
        if not isinstance(data, Mapping):
            raise FormatError(f"a SelectiveFFNConfig must be a JSON object, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in cls.field_names())
        if unknown:
            raise FormatError(
                f"SelectiveFFNConfig has no field {unknown[0]!r}" + (f" (nor {unknown[1:]})" if unknown[1:] else "")
                + f"; it knows {sorted(cls.field_names())}. A typo, or a config written by a newer "
                "layerselect: upgrade it to read this one"
            )
        if "layers" not in data:
            raise FormatError("SelectiveFFNConfig JSON has no 'layers' entry")
        return cls(**dict(data))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> SelectiveFFNConfig:
        """Read a config: its own JSON, or an adapter's (a folder or its ``layerselect_adapter.json``).

        Adapter format 3 nests the config under ``"config"``; formats 1-2 spread it among
        the file's metadata (format 1 named the file ``adapter_config.json``).
        """
        path = Path(path)
        if path.is_dir():
            new, legacy = path / "layerselect_adapter.json", path / "adapter_config.json"
            path = legacy if not new.is_file() and legacy.is_file() else new
        if not path.is_file():
            raise FormatError(f"no adapter config at {path}")
        data = read_json(path, "the adapter config")
        if isinstance(data, Mapping) and data.get("format") == "layerselect.selective_ffn":  # adapter_file.FORMAT_NAME
            if isinstance(data.get("format_version"), int) and data["format_version"] >= 3:
                return cls.from_dict(data.get("config"))
            return cls.from_dict({k: v for k, v in data.items() if k in cls.field_names()})
        return cls.from_dict(data)


# ----------------------------------------------------------------------------------------
# The config resolved to a model: its targeted parameters
# ----------------------------------------------------------------------------------------
@dataclass
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

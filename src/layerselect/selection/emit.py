"""A selection in the formats other trainers read: Axolotl, LLaMA-Factory, PEFT.

:meth:`Selection.to_axolotl <layerselect.selection.Selection.to_axolotl>`,
:meth:`~layerselect.selection.Selection.to_llamafactory` and ``layerselect select --emit``
call these. Each needs the real parameter names of the model family, taken from
:mod:`layerselect.arch` on a model: a loaded one, or a weightless skeleton built on the
``meta`` device from its transformers config or its family name (``model_type``).
The matrices are those :func:`~layerselect.selective_ffn.get_slam_model` trains for the
same layers and ``target_modules`` (default ``up``, ``down``).

**Axolotl** (``unfrozen_parameters``), read in axolotl's ``src/axolotl/utils/freeze.py``
(``freeze_layers_except``, ``LayerNamePattern``): every ``.`` not followed by ``+`` is
made a literal dot *before* the pattern is compiled, so patterns are written with plain
dots (an escaped ``\\.`` would become ``\\\\.`` there and match nothing); a pattern
matches with ``re.match`` (from the start; ``$`` anchors the end); and ``[start:end]``
after the ``$`` unfreezes only those rows of the parameter (a gradient hook zeroes the
others). So one pattern per trained matrix, ``^model.layers.0.mlp.up_proj.weight$``, and
half of a fused matrix (Phi-3's ``gate_up_proj`` with only ``up`` targeted) is
``^model.layers.0.mlp.gate_up_proj.weight$[48:96]``, exactly the rows SLAM trains.

**LLaMA-Factory** (``finetuning_type: freeze``), read in ``hiyouga/LLaMA-Factory``:
``src/llamafactory/hparams/finetuning_args.py`` (``FreezeArguments``: "Positive numbers
mean the last n layers are set as trainable, negative numbers mean the first n layers")
and ``src/llamafactory/model/adapter.py`` (``_setup_freeze_tuning``):

- ``freeze_trainable_layers: n`` trains layers ``range(max(0, L - n), L)`` for ``n > 0``
  (the last n) and ``range(min(-n, L))`` for ``n < 0`` (the first ``-n``);
- ``freeze_trainable_modules`` names direct children of a decoder layer (the name after
  ``.0.`` in parameter names: ``mlp``, ``self_attn``, ``input_layernorm`` ...; anything
  else, e.g. ``up_proj``, is refused by LLaMA-Factory as "not found"), comma-separated,
  or ``all``; a parameter trains when its name contains ``.{i}.{module}`` for a trainable
  layer ``i``.

It can therefore express a selection only when the layers are the first (or last) n
and the trained matrices fill whole children of the layer: ``target_modules="ffn"``
(gate, up, down) is ``mlp``; the default ``up``, ``down`` is not (``mlp`` also trains
``gate_proj``), nor is half of a fused matrix. :func:`llamafactory_settings` checks the
result by applying that rule to every parameter name of the model, and otherwise raises
:class:`CannotExpressError` with the reason and the Axolotl list.

**PEFT**: :meth:`~layerselect.selection.Selection.to_peft_config` (``layers_to_transform``)
with :func:`peft_target_modules` as ``target_modules``.

Example:
    >>> from layerselect.selection import Selection
    >>> Selection(layers=[0, 2]).to_axolotl("llama")
    {'unfrozen_parameters': ['^model.layers.0.mlp.up_proj.weight$', '^model.layers.0.mlp.down_proj.weight$', '^model.layers.2.mlp.up_proj.weight$', '^model.layers.2.mlp.down_proj.weight$']}
    >>> Selection(layers=[0, 1]).to_llamafactory("llama", target_modules="ffn")
    {'finetuning_type': 'freeze', 'freeze_trainable_layers': -2, 'freeze_trainable_modules': 'mlp'}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..arch import FAMILIES, get_layout, normalize_target_modules
from ..errors import InvalidInputError

__all__ = [
    "CannotExpressError",
    "TrainedMatrix",
    "axolotl_patterns",
    "llamafactory_rule",
    "llamafactory_settings",
    "model_skeleton",
    "peft_target_modules",
    "source_of",
    "trained_matrices",
    "yaml_text",
]


class CannotExpressError(InvalidInputError):
    """A trainer's format cannot say exactly what the selection trains.

    ``axolotl`` holds the Axolotl settings that can (None when they could not be computed).
    """

    def __init__(self, message: str, axolotl: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.axolotl = axolotl


@dataclass(frozen=True)
class TrainedMatrix:
    """One trained matrix: its parameter name, layer, and the rows that train (None: all of them)."""

    name: str
    layer: int
    rows: tuple[tuple[int, int], ...] | None = None


# ----------------------------------------------------------------------------------------
# The model the names come from
# ----------------------------------------------------------------------------------------
def model_skeleton(source: Any, num_layers: int | None = None) -> Any:
    """A model to read parameter names from: ``source`` itself if it is a model, else one on ``meta``.

    ``source``: an ``nn.Module`` (returned as is), a transformers ``PretrainedConfig``,
    or a family name (``model_type``, e.g. ``"llama"``, ``"phi3"``) whose default config
    is used with ``num_layers`` decoder layers. A skeleton holds no weights (built on the
    ``meta`` device: no memory, no download).
    """
    from torch import nn

    if isinstance(source, nn.Module):
        return source
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(source, str):
        if source not in FAMILIES:
            raise InvalidInputError(
                f"unknown model family {source!r}; give one of {sorted(FAMILIES)}, or the model or its "
                "transformers config (AutoConfig.from_pretrained(DIR))"
            )
        n = {"num_hidden_layers": int(num_layers or 1)}
        config = AutoConfig.for_model(source, **({"text_config": n} if source == "gemma3" else n))
    elif isinstance(source, PretrainedConfig):
        config = source
    else:
        raise InvalidInputError(
            f"cannot read parameter names from a {type(source).__name__}; give the model, its transformers "
            f"config or a family name ({', '.join(sorted(FAMILIES))})"
        )
    import torch
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"cannot build a {config.model_type!r} model from its config: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def source_of(model: Any, meta: Mapping[str, Any]) -> tuple[Any, int | None]:
    """``(model, config or family name; the depth when known)`` for a selection with provenance ``meta``.

    ``model`` None: the ``model_type`` that :func:`~layerselect.selection.select` recorded in
    the selection's ``meta`` (with ``num_model_layers``, the depth); a family name given
    by hand also takes the recorded depth. A family name is only looked up in
    :data:`layerselect.arch.FAMILIES`: nothing is loaded on a file's word.
    """
    recorded = meta.get("num_model_layers")
    recorded = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0 else None
    if model is not None:
        return model, recorded if isinstance(model, str) else None
    family = meta.get("model_type")
    if not isinstance(family, str) or not family:
        raise InvalidInputError(
            "this selection records no model family: pass the model, its transformers config "
            "(AutoConfig.from_pretrained(DIR)) or its family name (e.g. 'llama')"
        )
    return family, recorded


def trained_matrices(
    source: Any, layers: Iterable[int], target_modules: str | Iterable[str] = ("up", "down"),
    *, num_layers: int | None = None,
) -> list[TrainedMatrix]:
    """The matrices ``get_slam_model`` trains for ``layers`` and ``target_modules`` on ``source``.

    ``source`` as in :func:`model_skeleton`. From a family name the rows of a fused matrix
    are unknown (they depend on the model's sizes), so a part of one is refused there.
    """
    layers = list(layers)
    roles = normalize_target_modules(target_modules, "target_modules")
    from_family = isinstance(source, str)
    model = model_skeleton(source, num_layers or (max(layers) + 1 if layers else 1))
    layout = get_layout(model)
    out = []
    for i in layout.check_layers(layers):
        for name in layout.parameter_names(i, roles):
            parts = layout.fused_rows(i, name.removesuffix(".weight"))
            rows = None
            if parts is not None and not set(parts) <= set(roles):
                if from_family:
                    raise InvalidInputError(
                        f"only the {'/'.join(r for r in parts if r in roles)} rows of the fused {name} train, and "
                        f"which rows those are depends on the model's sizes: pass the model or its config, "
                        f"not the family name {source!r}"
                    )
                rows = _merged(parts[r] for r in parts if r in roles)
            out.append(TrainedMatrix(name, i, rows))
    return out


def _merged(slices: Iterable[slice]) -> tuple[tuple[int, int], ...]:
    spans: list[list[int]] = []
    for s in sorted(slices, key=lambda s: s.start):
        if spans and s.start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], s.stop)
        else:
            spans.append([s.start, s.stop])
    return tuple((a, b) for a, b in spans)


# ----------------------------------------------------------------------------------------
# Axolotl
# ----------------------------------------------------------------------------------------
def axolotl_patterns(matrices: Sequence[TrainedMatrix]) -> list[str]:
    """Axolotl ``unfrozen_parameters``: ``^NAME$`` per matrix, plus ``[start:end]`` for a part of one.

    Dots stay plain: Axolotl escapes them itself (see the module docstring).
    """
    out = []
    for m in matrices:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", m.name):
            raise InvalidInputError(f"parameter name {m.name!r} cannot be written as an Axolotl pattern")
        if m.rows is None:
            out.append(f"^{m.name}$")
        else:
            out += [f"^{m.name}$[{a}:{b}]" for a, b in m.rows]
    return out


# ----------------------------------------------------------------------------------------
# LLaMA-Factory
# ----------------------------------------------------------------------------------------
def llamafactory_rule(names: Iterable[str], num_layers: int, trainable_layers: int, modules: str) -> set[str]:
    """The parameter names LLaMA-Factory's freeze tuning trains (its rule, restated; no vision-tower exclusion).

    ``trainable_layers`` > 0: the last n layers, < 0: the first ``-n``; ``modules``: comma-separated
    layer children or ``all``; a name trains when it contains ``.{layer}.{module}``.
    """
    if trainable_layers > 0:
        ids = range(max(0, num_layers - trainable_layers), num_layers)
    else:
        ids = range(min(-trainable_layers, num_layers))
    wanted = [m.strip() for m in modules.split(",") if m.strip()]
    keys = [f".{i}.{'' if m == 'all' else m}" for m in wanted for i in ids]
    return {n for n in names if any(k in n for k in keys)}


def llamafactory_settings(
    source: Any, layers: Iterable[int], target_modules: str | Iterable[str] = ("up", "down"),
    *, num_layers: int | None = None,
) -> dict[str, Any]:
    """LLaMA-Factory freeze settings that train exactly these matrices, or :class:`CannotExpressError`."""
    layers = sorted(layers)
    matrices = trained_matrices(source, layers, target_modules, num_layers=num_layers)
    model = model_skeleton(source, num_layers or (max(layers) + 1 if layers else 1))
    layout = get_layout(model)
    # A skeleton built from a family name does not know the real depth; a model or config does.
    total = num_layers if isinstance(source, str) else layout.num_layers
    names = [n for n, _ in model.named_parameters()]
    reasons = []
    n = len(layers)
    if layers == list(range(n)):
        count: int | None = -n
    elif total is not None and layers == list(range(total - n, total)):
        count = n
    else:
        count = None
        tail = "" if total is not None else " (the model's depth is unknown, so the last n were not checked)"
        reasons.append(f"layers {layers} are not the first n layers nor the last n{tail}")
    partial = [f"{m.name} rows {list(m.rows)}" for m in matrices if m.rows is not None]
    if partial:
        reasons.append(f"only part of a fused matrix trains ({', '.join(partial[:2])})")
    prefix = f"{layout.layers_path}."
    children = sorted({m.name.removeprefix(prefix).split(".")[1] for m in matrices})
    modules = ",".join(children)
    wanted = {m.name for m in matrices}
    if count is not None and not partial:
        got = llamafactory_rule(names, layout.num_layers if total is None else total, count, modules)
        if got != wanted:
            extra = sorted(got - wanted)
            reasons.append(
                f"freeze_trainable_modules names whole children of a layer ({', '.join(children)}): it would also "
                f"train {', '.join(extra[:3])}" + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
                + (" (train gate, up and down together: target_modules='ffn')" if "mlp" in children else "")
            )
    if reasons:
        axolotl = {"unfrozen_parameters": axolotl_patterns(matrices)}
        raise CannotExpressError(
            "LLaMA-Factory cannot express this selection: " + "; ".join(reasons) + ". Its freeze tuning "
            "trains the first or last n layers (freeze_trainable_layers: -n or n) and whole sub-modules of "
            "each (freeze_trainable_modules: mlp, self_attn, ...). Axolotl can; its settings:\n"
            + yaml_text(axolotl).rstrip(),
            axolotl,
        )
    return {"finetuning_type": "freeze", "freeze_trainable_layers": count, "freeze_trainable_modules": modules}


# ----------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------
def peft_target_modules(matrices: Sequence[TrainedMatrix]) -> list[str]:
    """PEFT ``target_modules`` (module names such as ``up_proj``) for these matrices.

    A LoRA on a fused matrix adapts all its rows, so a part of one is refused.
    """
    partial = [m.name for m in matrices if m.rows is not None]
    if partial:
        raise CannotExpressError(
            f"a PEFT adapter on {partial[0]} adapts the whole fused matrix, but only some of its rows train "
            "here; target all of its parts (gate and up, or q, k and v)"
        )
    out: list[str] = []
    for m in matrices:
        leaf = m.name.removesuffix(".weight").rsplit(".", 1)[-1]
        if leaf not in out:
            out.append(leaf)
    return out


# ----------------------------------------------------------------------------------------
# YAML (a subset: string keys; scalars, lists of scalars)
# ----------------------------------------------------------------------------------------
def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(str(value))  # a JSON string is a YAML double-quoted scalar


def yaml_text(data: Mapping[str, Any], comment: str | None = None) -> str:
    """``data`` as YAML (strings double-quoted), with an optional ``#`` comment on top."""
    lines = [f"# {line}" for line in (comment or "").splitlines()]
    for key, value in data.items():
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines += [f"  - {_scalar(v)}" for v in value]
        else:
            lines.append(f"{key}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


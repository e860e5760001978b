"""The :class:`Selection` value: chosen layers, scores, threshold, reasons; its JSON file format.

A selection file (``selection.json``) is one JSON object with ``"format":
"layerselect.selection"`` and ``"format_version"`` (:data:`SELECTION_FORMAT_VERSION`);
per-layer maps use layer ids as string keys. Reading a file never imports code:
the criterion it names is only looked up in the registry (see
:meth:`Selection.stability`).

Example:
    >>> sel = Selection(layers=[1, 0], scores={0: 2.0, 1: 1.5}, criterion="mine")
    >>> sel.layers
    [0, 1]
    >>> Selection.from_json(sel.to_json()) == sel
    True
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import atomic_write_text, check_format_version, jsonable
from ..errors import FormatError, InvalidInputError
from ..stats import ActivationStats

if TYPE_CHECKING:
    from .bootstrap import Stability
    from .registry import Criterion

__all__ = ["Selection", "SELECTION_FORMAT_VERSION"]

#: Version of the ``selection.json`` layout.
SELECTION_FORMAT_VERSION = 1


@dataclass
class Selection:
    """The outcome of a criterion: which layers, by what scores, and why.

    Attributes:
        layers: selected model layer ids, ascending.
        scores: ``{layer id: score}`` for every layer the criterion considered
            (MSD for ``msd``; for rank-free baselines an indicator or a random draw).
        threshold: the cut the scores were compared against (``theta`` for
            ``msd``), or None when the rule has none.
        criterion: the registered name of the criterion.
        params: the parameters it ran with (JSON-able).
        reason: a one-paragraph summary of the decision.
        notes: ``{layer id: why it is in or out}``.
        details: criterion-specific facts (for ``msd``: ``K``, ``peak_layer``,
            ``overlap_average``, ``fallback``).
        meta: provenance (model name, stats run id, library version).

    The statistics (and model) a selection was computed from are attached as
    ``source_stats`` / ``source_model`` (not serialized, not compared) so that
    :meth:`stability` can resample them.

    Example:
        >>> sel = Selection(layers=[0], scores={0: 2.0, 1: 1.0}, threshold=1.5,
        ...                 criterion="custom", reason="layer 0 scores highest")
        >>> Selection.from_json(sel.to_json()) == sel
        True
    """

    layers: list[int]
    scores: dict[int, float] = field(default_factory=dict)
    threshold: float | None = None
    criterion: str = "custom"
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    notes: dict[int, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source_stats: ActivationStats | None = field(default=None, repr=False, compare=False)
    source_model: Any = field(default=None, repr=False, compare=False)
    call_params: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    source_criterion: Criterion | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.layers = _validated_layer_ids(self.layers, "Selection.layers")
        self.scores = {int(k): float(v) for k, v in self.scores.items()}
        self.threshold = None if self.threshold is None else float(self.threshold)
        self.notes = {int(k): str(v) for k, v in self.notes.items()}
        self.params = jsonable(self.params)
        self.details = jsonable(self.details)
        self.meta = jsonable(self.meta)

    # ------------------------------------------------------------------ explain
    def explain(self) -> str:
        """A short human-readable account: the rule, the threshold, and each layer's verdict."""
        lines = [f"criterion {self.criterion!r}" + (f" {self.params}" if self.params else "") + f": selected {self.layers}"]
        if self.reason:
            lines.append(self.reason)
        if self.threshold is not None:
            lines.append(f"threshold = {self.threshold:.6g}")
        for layer in sorted(set(self.scores) | set(self.notes)):
            mark = "in " if layer in self.layers else "out"
            score = f"score {self.scores[layer]:.6g}" if layer in self.scores else ""
            note = self.notes.get(layer, "")
            lines.append(f"  layer {layer:>3} [{mark}] {score}{'; ' if score and note else ''}{note}")
        return "\n".join(lines)

    def to_peft_config(self, peft_config: Any, layers_pattern: str | list[str] | None = None) -> Any:
        """A copy of a PEFT tuner config restricted to these layers (``layers_to_transform``).

        Works with any PEFT config that has ``layers_to_transform`` (LoRA, DoRA via
        ``use_dora``, LoHa, LoKr, VeRA, ...); ``layers_pattern`` is set too when given.
        The original config is not changed.

        Example:
            >>> from peft import LoraConfig                                      # doctest: +SKIP
            >>> cfg = sel.to_peft_config(LoraConfig(r=8, target_modules=["up_proj", "down_proj"]))  # doctest: +SKIP
            >>> cfg.layers_to_transform                                          # doctest: +SKIP
            [0, 1]
        """
        import copy

        if not hasattr(peft_config, "layers_to_transform"):
            raise InvalidInputError(
                f"{type(peft_config).__name__} has no layers_to_transform; use a PEFT tuner config "
                "that restricts layers (LoraConfig, LoHaConfig, LoKrConfig, ...)"
            )
        if not self.layers:
            raise InvalidInputError("the selection is empty: no layers to transform")
        out = copy.deepcopy(peft_config)
        out.layers_to_transform = list(self.layers)
        if layers_pattern is not None:
            out.layers_pattern = layers_pattern
        return out

    def to_axolotl(self, model: Any = None, target_modules: str | Iterable[str] = ("up", "down")) -> dict[str, list[str]]:
        """Axolotl's ``unfrozen_parameters``: one pattern per matrix SLAM trains in these layers.

        ``model``: the model (any device, ``meta`` too), its transformers config, or its family
        name (``"llama"``, ``"phi3"`` ...); None uses the ``model_type`` recorded in
        :attr:`meta` by :func:`~layerselect.selection.select`. ``target_modules`` as in
        :class:`~layerselect.selective_ffn.SelectiveFFNConfig` (default ``up``, ``down``).
        Patterns use plain dots, as Axolotl escapes them itself; a part of a fused matrix
        (Phi-3 ``gate_up_proj`` with only ``up``) carries Axolotl's ``[start:end]`` row range.
        See :mod:`layerselect.selection.emit` for the rules read in Axolotl's source.

        Example:
            >>> Selection(layers=[3]).to_axolotl("llama")["unfrozen_parameters"]
            ['^model.layers.3.mlp.up_proj.weight$', '^model.layers.3.mlp.down_proj.weight$']
        """
        from .emit import axolotl_patterns, source_of, trained_matrices

        source, num_layers = source_of(model, self.meta)
        return {"unfrozen_parameters": axolotl_patterns(
            trained_matrices(source, self._nonempty(), target_modules, num_layers=num_layers))}

    def to_llamafactory(
        self, model: Any = None, target_modules: str | Iterable[str] = ("up", "down"), *, num_layers: int | None = None,
    ) -> dict[str, Any]:
        """LLaMA-Factory freeze-tuning settings that train exactly these layers' matrices.

        In LLaMA-Factory (``hparams/finetuning_args.py``, ``model/adapter.py``)
        ``freeze_trainable_layers: n`` trains the *last* n layers when positive and the
        *first* ``-n`` when negative, and ``freeze_trainable_modules`` names whole children of
        a layer (``mlp``, ``self_attn``), not single matrices. So only a selection of the first
        (or, with the depth known, the last) n layers whose matrices fill those children is
        expressible, e.g. ``target_modules="ffn"`` -> ``mlp``; anything else raises
        :class:`~layerselect.selection.emit.CannotExpressError`, whose message says why and
        gives the Axolotl list (also in its ``axolotl`` attribute). ``model`` as in
        :meth:`to_axolotl`; ``num_layers`` is the model's depth when ``model`` is a family name.

        Example:
            >>> Selection(layers=[0, 1, 2]).to_llamafactory("qwen2", target_modules="ffn")
            {'finetuning_type': 'freeze', 'freeze_trainable_layers': -3, 'freeze_trainable_modules': 'mlp'}
        """
        from .emit import llamafactory_settings, source_of

        source, recorded = source_of(model, self.meta)
        return llamafactory_settings(source, self._nonempty(), target_modules,
                                     num_layers=num_layers if num_layers is not None else recorded)

    def _nonempty(self) -> list[int]:
        if not self.layers:
            raise InvalidInputError("the selection is empty: no layers to train")
        return list(self.layers)

    def __str__(self) -> str:
        return self.explain()

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (layer ids as string keys for the per-layer maps)."""
        from .._version import __version__

        return {
            "format": "layerselect.selection",
            "format_version": SELECTION_FORMAT_VERSION,
            "library_version": __version__,
            "criterion": self.criterion,
            "params": self.params,
            "layers": self.layers,
            "threshold": _finite_or_none(self.threshold),
            "scores": {str(k): jsonable(v, nonfinite="str") for k, v in sorted(self.scores.items())},
            "reason": self.reason,
            "notes": {str(k): v for k, v in sorted(self.notes.items())},
            "details": self.details,
            "meta": self.meta,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Serialize to a JSON string (see :meth:`from_json`)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        """Rebuild from :meth:`to_dict` output; foreign or newer files raise FormatError."""
        if not isinstance(data, Mapping) or data.get("format") != "layerselect.selection":
            raise FormatError("not a layerselect selection (missing format 'layerselect.selection')")
        written_by = data.get("library_version")
        check_format_version(
            data.get("format_version"), SELECTION_FORMAT_VERSION, "selection",
            written_by=written_by if isinstance(written_by, str) else None,
        )
        if not isinstance(data.get("criterion"), str) or not isinstance(data.get("layers"), list):
            raise FormatError("selection JSON needs a 'criterion' name and a 'layers' list")
        try:
            return cls(
                layers=list(data["layers"]),
                scores={int(k): float(v) for k, v in data.get("scores", {}).items()},
                threshold=data.get("threshold"),
                criterion=data["criterion"],
                params=dict(data.get("params", {})),
                reason=data.get("reason", ""),
                notes={int(k): v for k, v in data.get("notes", {}).items()},
                details=dict(data.get("details", {})),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"selection JSON is incomplete or malformed ({exc})") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Selection:
        """Parse a string written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"selection is not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (parents created)."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Selection:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"{path} does not exist; write one with Selection.save or `layerselect select`")
        try:
            return cls.from_json(path.read_bytes())
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None

    # ------------------------------------------------------------------ stability
    def stability(
        self,
        n_boot: int = 200,
        seed: int = 0,
        *,
        stats: ActivationStats | None = None,
        confidence: float = 0.95,
        criterion: str | Criterion | Callable[..., Any] | None = None,
    ) -> Stability:
        """Bootstrap over questions: how often each layer is selected (see :func:`stability`).

        Uses the statistics this selection was computed from; a selection
        loaded from JSON needs ``stats=ActivationStats.load(...)``. The criterion
        is the one that made the selection, or, for a loaded selection, the
        *registered* criterion of the recorded name: a name read from a file is
        only looked up, never imported. Pass ``criterion=`` (a function, or
        ``"module:function"`` to import) to use another.
        """
        from .bootstrap import stability
        from .registry import get_criterion, registered_criterion

        stats = stats if stats is not None else self.source_stats
        if criterion is not None:
            spec = get_criterion(criterion)
        else:
            spec = self.source_criterion or registered_criterion(self.criterion)
        if stats is None and "stats" in spec.required:
            raise InvalidInputError(
                "this Selection has no statistics attached (it was loaded from JSON or built by hand); "
                "pass stats=ActivationStats.load(STATS_DIR)"
            )
        params = self.call_params or self.params
        if criterion is not None and spec.name != self.criterion:
            params = {}  # the recorded parameters belong to another criterion
        return stability(
            stats, spec, n_boot=n_boot, seed=seed, model=self.source_model,
            confidence=confidence, params=params,
        )


def _validated_layer_ids(values: Any, what: str) -> list[int]:
    """Validated layer ids: integers (not bools or floats), non-negative, each once; sorted."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise InvalidInputError(f"{what} must be a list of layer ids, got {type(values).__name__}")
    out = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point() and x.dtype != torch.bool:
                x = int(x)
            else:
                raise InvalidInputError(f"{what}: {x!r} is not an integer layer id")
        if int(x) < 0:
            raise InvalidInputError(f"{what}: layer id {int(x)} is negative")
        out.append(int(x))
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise InvalidInputError(f"{what}: layer ids {dup} appear more than once")
    return sorted(out)


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value

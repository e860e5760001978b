"""Layer selection: the :class:`Selection` value, a criterion registry, and the criteria.

A *criterion* maps :class:`~layerselect.stats.ActivationStats` (and/or a
model's weights) to a :class:`Selection`: the chosen layers, the per-layer
scores the rule used, the threshold, and a human-readable account of why.
Layers are always *model layer ids* (``stats.layers``), never row indices.

Built-in criteria (see each function's docstring for its parameters):

============  ==============================================================
``msd``       the paper's rule (default; DESIGN.md "Selection criteria")
``first_n``   the lowest ``n`` layers
``topk``      the ``k`` layers with the highest per-layer score (any score)
``random``    ``k`` layers drawn with a seed (the paper's "R" ablation)
``all``       every layer
``lape``      layers dense in language-specific neurons (Tang et al. 2024)
``snr``       data-free: Spectrum-style signal-to-noise of the FFN weights
============  ==============================================================

Example:
    >>> from layerselect import select, register_criterion
    >>> sel = select(stats)                      # doctest: +SKIP
    >>> sel.layers, sel.threshold                # doctest: +SKIP
    ([0], 0.000123)
    >>> print(sel.explain())                     # doctest: +SKIP
    >>> sel.save("selection.json"); Selection.load("selection.json")   # doctest: +SKIP
    >>> sel.stability(n_boot=200, seed=0).format_table()               # doctest: +SKIP

    >>> @register_criterion
    ... def lowest_two(stats):
    ...     return sorted(stats.layers)[:2]
    >>> # select(stats, criterion="lowest_two").layers -> the two lowest layers
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import atomic_write_text
from .errors import FormatError, InvalidInputError, LayerSelectError
from .stats import ActivationStats

__all__ = [
    "Selection",
    "Stability",
    "Criterion",
    "CRITERIA",
    "register_criterion",
    "get_criterion",
    "registered_criterion",
    "list_criteria",
    "select",
    "stability",
    "layer_scores",
    "bootstrap_sample_weights",
    "resample_stats",
    "SCORES",
    "SELECTION_FORMAT_VERSION",
]

#: Version of the ``selection.json`` layout.
SELECTION_FORMAT_VERSION = 1

#: Two MSD values closer than this are a tie (float64 rounding of R is ~1e-17,
#: so of MSD ~1e-19; real per-layer MSD gaps are orders of magnitude larger).
MSD_ATOL = 1e-12
#: Two average overlaps closer than this are a tie (the peak goes to the lowest layer).
OVERLAP_ATOL = 1e-12


# ====================================================================== Selection
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
        self.params = _jsonable(self.params)
        self.details = _jsonable(self.details)
        self.meta = _jsonable(self.meta)

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

    def __str__(self) -> str:
        return self.explain()

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (layer ids as string keys for the per-layer maps)."""
        from . import __version__

        return {
            "format": "layerselect.selection",
            "format_version": SELECTION_FORMAT_VERSION,
            "library_version": __version__,
            "criterion": self.criterion,
            "params": self.params,
            "layers": self.layers,
            "threshold": _finite_or_none(self.threshold),
            "scores": {str(k): _json_float(v) for k, v in sorted(self.scores.items())},
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
        version = data.get("format_version")
        if not isinstance(version, int) or version > SELECTION_FORMAT_VERSION:
            raise FormatError(
                f"selection format version {version!r} is not readable by this layerselect "
                f"(reads up to {SELECTION_FORMAT_VERSION}); upgrade layerselect"
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
            raise InvalidInputError(f"{path} does not exist; write one with `layerselect select --out {path}`")
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


# ====================================================================== registry
@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its function and what it takes.

    ``func`` receives the statistics as ``stats`` and/or the model as
    ``model`` (by those parameter names; a function naming neither receives
    the statistics as its first argument) plus keyword parameters, and returns
    a :class:`Selection` or an iterable of model layer ids.
    """

    name: str
    func: Callable[..., Any]
    takes: frozenset[str]  # subset of {"stats", "model"}
    required: frozenset[str]  # inputs without a default
    positional_stats: bool = False
    description: str = ""

    def __call__(self, stats: ActivationStats | None = None, model: Any = None, **params: Any) -> Selection:
        return _run(self, stats, model, params)


#: name -> Criterion. Use :func:`register_criterion` to add to it.
CRITERIA: dict[str, Criterion] = {}


def register_criterion(
    name_or_func: str | Callable[..., Any] | None = None,
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Register a criterion, as a decorator or as a plain call.

    All of these work::

        @register_criterion                     # registered as "my_rule"
        def my_rule(stats, k=2): ...

        @register_criterion("lowest")           # under another name
        def f(stats): ...

        register_criterion("lowest", f)         # plain call
        register_criterion(f, name="lowest")

    The function takes ``stats`` (ActivationStats) and/or ``model`` and keyword
    parameters, and returns a :class:`Selection` or a list of model layer ids.
    Registering an existing name raises unless ``overwrite=True``. Returns the
    function unchanged (so it still works as a decorator).
    """
    if callable(name_or_func):
        return _register(name or name_or_func.__name__, name_or_func, overwrite)
    if name_or_func is not None and name is not None and name != name_or_func:
        raise InvalidInputError(f"two names given ({name_or_func!r}, {name!r}); pass one")
    chosen = name_or_func or name
    if func is not None:
        return _register(chosen or func.__name__, func, overwrite)

    def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
        return _register(chosen or f.__name__, f, overwrite)

    return decorator


def _register(name: str, func: Callable[..., Any], overwrite: bool) -> Callable[..., Any]:
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise InvalidInputError(f"criterion name {name!r} must be a non-empty identifier like 'my_rule'")
    if name in CRITERIA and not overwrite and CRITERIA[name].func is not func:
        raise InvalidInputError(
            f"a criterion named {name!r} is already registered; pick another name or pass overwrite=True"
        )
    CRITERIA[name] = _make_criterion(name, func)
    return func


def _make_criterion(name: str, func: Callable[..., Any]) -> Criterion:
    sig = inspect.signature(func)
    takes = {p for p in ("stats", "model") if p in sig.parameters}
    positional = False
    if not takes:
        first = next(iter(sig.parameters.values()), None)
        if first is None or first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
            raise InvalidInputError(
                f"criterion {name!r} must take the statistics (a parameter named 'stats') or the model ('model')"
            )
        takes, positional = {"stats"}, True
    required = set()
    for p in takes:
        param = sig.parameters.get(p) if not positional else next(iter(sig.parameters.values()))
        if param is not None and param.default is inspect.Parameter.empty:
            required.add(p)
    doc = inspect.getdoc(func) or ""
    return Criterion(name, func, frozenset(takes), frozenset(required), positional, doc.split("\n")[0] if doc else "")


def get_criterion(criterion: str | Criterion | Callable[..., Any]) -> Criterion:
    """Look a criterion up by name, ``"module:function"``, or pass a function/Criterion through.

    ``"package.module:function"`` imports the module and uses ``function``
    (under its registered name if the module registered it). A function that
    is not registered is used as is (not added to the registry).
    """
    if isinstance(criterion, Criterion):
        return criterion
    if callable(criterion):
        for spec in CRITERIA.values():
            if spec.func is criterion:
                return spec
        name = getattr(criterion, "__name__", "")
        return _make_criterion(name if name.isidentifier() else "custom", criterion)
    if not isinstance(criterion, str):
        raise InvalidInputError(f"criterion must be a name or a function, got {type(criterion).__name__}")
    if criterion in CRITERIA:
        return CRITERIA[criterion]
    if ":" in criterion:
        module_name, _, attr = criterion.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InvalidInputError(f"cannot import {module_name!r} for criterion {criterion!r}: {exc}") from None
        func = getattr(module, attr, None)
        if not callable(func):
            raise InvalidInputError(f"{module_name!r} has no function {attr!r}")
        return get_criterion(func)
    raise InvalidInputError(
        f"unknown criterion {criterion!r}; use one of {list_criteria()}, register yours with "
        "register_criterion, or name it as 'module:function'"
    )


def registered_criterion(name: str) -> Criterion:
    """The criterion registered under ``name``; never imports anything.

    Used for names that come from files (a saved selection): a file must not be
    able to make layerselect import a module.
    """
    if isinstance(name, str) and name in CRITERIA:
        return CRITERIA[name]
    raise InvalidInputError(
        f"criterion {name!r} (recorded in the selection) is not registered in this process; "
        f"registered: {list_criteria()}. Import the module that registers it, or pass "
        "criterion=<the function> (or criterion='module:function' to import it explicitly)"
    )


def list_criteria() -> list[str]:
    """Names of the registered criteria."""
    return list(CRITERIA)


# ====================================================================== select
def select(
    stats: ActivationStats | None = None,
    criterion: str | Callable[..., Any] = "msd",
    *,
    model: Any = None,
    **params: Any,
) -> Selection:
    """Run a criterion and return its :class:`Selection` (with the inputs attached for stability).

    Args:
        stats: activation statistics (not needed by data-free criteria such as ``snr``).
        criterion: a registered name (default ``"msd"``), ``"module:function"``, or a function.
        model: the model, for criteria that read the weights (``snr``).
        **params: the criterion's parameters (unknown names raise InvalidInputError).

    Example:
        >>> sel = select(stats)                                   # doctest: +SKIP
        >>> sel = select(stats, "topk", k=4, score="lape")        # doctest: +SKIP
        >>> sel = select(model=model, criterion="snr")            # doctest: +SKIP
    """
    return _run(get_criterion(criterion), stats, model, params)


def _run(spec: Criterion, stats: ActivationStats | None, model: Any, params: dict[str, Any]) -> Selection:
    if stats is not None and not isinstance(stats, ActivationStats):
        raise InvalidInputError(f"stats must be ActivationStats, got {type(stats).__name__}")
    if "stats" in spec.required and stats is None:
        raise InvalidInputError(
            f"criterion {spec.name!r} needs activation statistics: select(stats, criterion={spec.name!r})"
        )
    if "model" in spec.required and model is None:
        raise InvalidInputError(
            f"criterion {spec.name!r} reads the weights and needs the model: "
            f"select(model=model, criterion={spec.name!r})"
        )
    sig = inspect.signature(spec.func)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    inputs = {"stats", "model"}
    if spec.positional_stats:
        inputs.add(next(iter(sig.parameters)))
    if not accepts_any:
        unknown = sorted(set(params) - set(sig.parameters))
        if unknown or (set(params) & inputs):
            bad = unknown or sorted(set(params) & inputs)
            allowed = [p for p in sig.parameters if p not in inputs]
            raise InvalidInputError(f"criterion {spec.name!r} has no parameter(s) {bad}; it accepts {allowed}")
    _check_param_types(spec, sig, params)
    args: list[Any] = []
    kwargs = dict(params)
    if spec.positional_stats:
        args.append(stats)
    else:
        if "stats" in spec.takes:
            kwargs["stats"] = stats
        if "model" in spec.takes:
            kwargs["model"] = model
    try:
        out = spec.func(*args, **kwargs)
    except LayerSelectError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise InvalidInputError(
            f"criterion {spec.name!r} failed with parameters {_describe_params(params)} "
            f"({type(exc).__name__}: {exc}); is it a layer-selection criterion, and are the parameters right?"
        ) from exc
    if isinstance(out, Selection):
        sel = out
    elif isinstance(out, Iterable) and not isinstance(out, (str, bytes, Mapping)):
        layers = _validated_layer_ids(list(out), f"the layers returned by criterion {spec.name!r}")
        sel = Selection(layers=layers, reason=f"layers chosen by the user criterion {spec.name!r}")
    else:
        raise InvalidInputError(
            f"criterion {spec.name!r} returned {type(out).__name__}; return a Selection or a list of layer ids"
        )
    if sel.criterion == "custom" or not sel.criterion:
        sel.criterion = spec.name
    if not sel.params and params:
        sel.params = _jsonable(_describe_params(params))
    for value in sel.scores.values():
        if math.isnan(value):
            raise InvalidInputError(
                f"criterion {spec.name!r} produced NaN scores; check the statistics (every group needs tokens) "
                "or the criterion's parameters"
            )
    if model is not None:
        from .arch import get_adapter

        num = get_adapter(model).num_layers
        outside = [x for x in sel.layers if x >= num]
        if outside:
            raise InvalidInputError(
                f"criterion {spec.name!r} selected layers {outside}, but the model has {num} layers (0..{num - 1})"
            )
    if stats is not None:
        foreign = sorted(set(sel.layers) - set(stats.layers))
        if foreign:
            raise InvalidInputError(
                f"criterion {spec.name!r} selected layers {foreign} that are not in the statistics "
                f"(they cover {stats.layers})"
            )
        sel.meta.setdefault("model_name", stats.model_name)
        if stats.meta.get("run_id"):
            sel.meta.setdefault("stats_run_id", stats.meta.get("run_id"))
        sel.meta.setdefault("groups", list(stats.groups))
    if not sel.layers and "empty" not in sel.reason.lower():
        sel.reason = (sel.reason + " " if sel.reason else "") + "The selection is empty: no layer qualified."
    sel.source_stats = stats
    sel.source_model = model
    sel.call_params = dict(params)
    sel.source_criterion = spec
    return sel


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


def _check_param_types(spec: Criterion, sig: inspect.Signature, params: Mapping[str, Any]) -> None:
    """A parameter whose default is a number, bool or string must get one of the same kind."""
    for key, value in params.items():
        param = sig.parameters.get(key)
        if param is None or param.default is inspect.Parameter.empty or param.default is None:
            continue
        default = param.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            kind = numbers.Integral if isinstance(default, int) else numbers.Real
            ok = isinstance(value, kind) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise InvalidInputError(
                f"criterion {spec.name!r}: parameter {key}={value!r} should be a "
                f"{type(default).__name__} like its default {default!r}"
            )


def _describe_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if not callable(v) else getattr(v, "__name__", repr(v))) for k, v in params.items()}


# ====================================================================== per-layer scores
def _check_groups(stats: ActivationStats, reference: str | None = None) -> None:
    if len(stats.groups) < 2:
        raise InvalidInputError(
            f"cross-language criteria need at least two languages; these stats have {stats.groups}. "
            "Collect statistics for more languages"
        )
    if reference is not None and reference not in stats.groups:
        raise InvalidInputError(
            f"reference language {reference!r} is not in the statistics (groups: {stats.groups}); "
            f"collect it too or pass reference=<one of {stats.groups}>"
        )


def _order(stats: ActivationStats) -> list[int]:
    """Row indices sorted by model layer id."""
    return sorted(range(len(stats.layers)), key=lambda i: stats.layers[i])


def _nan_check(name: str, values: torch.Tensor, stats: ActivationStats, fix: str) -> None:
    bad = [stats.layers[i] for i in torch.nonzero(torch.isnan(values)).flatten().tolist()]
    if bad:
        raise InvalidInputError(f"{name} is NaN at layers {bad}: {fix}")


def _r_spread(stats: ActivationStats, variant: str = "mean") -> torch.Tensor:
    _check_groups(stats)
    r = stats.activation_ratio(variant)
    return r.max(dim=1).values - r.min(dim=1).values


def _r_std(stats: ActivationStats, variant: str = "mean") -> torch.Tensor:
    _check_groups(stats)
    return stats.msd(variant).sqrt()


def _msd(stats: ActivationStats, variant: str = "mean") -> torch.Tensor:
    _check_groups(stats)
    return stats.msd(variant)


def _divergence(stats: ActivationStats, reference: str = "en", tau: float = 0.5, method: str = "ratio") -> torch.Tensor:
    _check_groups(stats, reference)
    return 1.0 - stats.overlap(reference, tau, method).average


#: Named per-layer scores for ``topk`` and the CLI table: name -> (function(stats, **kw) -> tensor[L], doc).
SCORES: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    "msd": (_msd, "MSD of the activation ratio across languages (eq. 5-6)"),
    "r_spread": (_r_spread, "max - min of the activation ratio across languages"),
    "r_std": (_r_std, "standard deviation of the activation ratio across languages (sqrt MSD)"),
    "divergence": (_divergence, "1 - average overlap with the reference language"),
    "lape": (lambda stats, **kw: _lape_density(stats, **kw)[0], "share of language-specific neurons (LAPE)"),
}


def layer_scores(stats: ActivationStats, score: str | Callable[..., Any] = "msd", **kwargs: Any) -> dict[int, float]:
    """A per-layer score as ``{model layer id: value}``.

    ``score`` is a name in :data:`SCORES` (``msd``, ``r_spread``, ``r_std``,
    ``divergence``, ``lape``) or a function ``f(stats) -> sequence[L]`` in
    the row order of ``stats.layers``; ``kwargs`` go to the named score.
    """
    if callable(score):
        values = torch.as_tensor(score(stats, **kwargs), dtype=torch.float64)
    elif score in SCORES:
        values = SCORES[score][0](stats, **kwargs)
    else:
        raise InvalidInputError(f"unknown score {score!r}; use one of {sorted(SCORES)} or a function")
    if values.shape != (len(stats.layers),):
        raise InvalidInputError(f"score {score!r} returned shape {tuple(values.shape)}, expected ({len(stats.layers)},)")
    _nan_check(f"score {score!r}", values, stats, "check the statistics (every group needs tokens)")
    return {stats.layers[i]: float(values[i]) for i in _order(stats)}


# ====================================================================== msd
@register_criterion("msd")
def msd_criterion(
    stats: ActivationStats,
    reference: str = "en",
    tau: float = 0.5,
    overlap_method: str = "ratio",
    variant: str = "mean",
) -> Selection:
    """The paper's rule (SLAM sec. 3.2; DESIGN.md "Selection criteria"), the default.

    1. AVG overlap with ``reference`` per layer (``stats.overlap(reference, tau,
       overlap_method).average``); the peak is the layer where it is maximal
       (ties within 1e-12 go to the lowest layer).
    2. ``K`` = the layers strictly before the peak; ``K = {first layer}`` if
       the peak is the first layer (layer 0 on full statistics).
    3. ``theta`` = mean MSD over ``K``; select ``{l in K : MSD[l] > theta}``
       (strictly; MSD differences under 1e-12 are ties).
    4. If that is empty (``K`` has one layer, or all MSD in ``K`` are equal),
       select the layer of ``K`` with the largest MSD (ties: lowest layer) and
       say so in ``reason`` and ``details["fallback"]``.

    Parameters: ``reference`` (language of the overlap), ``tau`` (firing
    probability above which a neuron is "active" for the overlap; never 0),
    ``overlap_method`` (``ratio``, ``jaccard``, ``pearson``), ``variant`` (the
    activation ratio: ``mean`` or ``set@TAU``). Scores are MSD per layer;
    ``threshold`` is theta. Never returns an empty selection.
    """
    _check_groups(stats, reference)
    msd = stats.msd(variant)
    avg = stats.overlap(reference, tau, overlap_method).average
    _nan_check(
        "MSD", msd, stats, "every language needs tokens; re-collect the statistics"
    )
    _nan_check(
        f"the average overlap with {reference!r}",
        avg,
        stats,
        f"the reference has no neuron with firing probability above tau={tau} there; "
        "lower tau or use overlap_method='pearson'",
    )
    order = _order(stats)
    layer_ids = [stats.layers[i] for i in order]
    m = {stats.layers[i]: float(msd[i]) for i in order}
    o = {stats.layers[i]: float(avg[i]) for i in order}
    best = max(o.values())
    peak = next(layer for layer in layer_ids if o[layer] >= best - OVERLAP_ATOL)
    k_set = [layer for layer in layer_ids if layer < peak] or [layer_ids[0]]
    theta = sum(m[layer] for layer in k_set) / len(k_set)
    values_k = [m[layer] for layer in k_set]
    all_equal = max(values_k) - min(values_k) <= MSD_ATOL
    chosen = [] if all_equal else [layer for layer in k_set if m[layer] > theta + MSD_ATOL]
    fallback = not chosen
    notes: dict[int, str] = {}
    top = max(values_k)
    fallback_layer = next(layer for layer in k_set if m[layer] >= top - MSD_ATOL)
    if fallback:
        chosen = [fallback_layer]
    for layer in layer_ids:
        if layer not in k_set:
            notes[layer] = (
                f"overlap peak ({o[layer]:.4f}); K stops before it" if layer == peak
                else "after the overlap peak; not in K"
            )
            continue
        head = f"in K; MSD {m[layer]:.6g}"
        if layer == peak:
            head = f"overlap peak ({o[layer]:.4f}) and first layer, so K = {{{layer}}}; MSD {m[layer]:.6g}"
        if fallback and layer == fallback_layer:
            notes[layer] = head + " is the largest in K (fallback: no layer exceeds theta)"
        elif layer in chosen:
            notes[layer] = head + f" > theta {theta:.6g}"
        else:
            notes[layer] = head + f" <= theta {theta:.6g}"
    reason = (
        f"Average overlap with {reference!r} (tau={tau}, {overlap_method}) peaks at layer {peak} "
        f"({o[peak]:.4f}); K = {k_set}"
        + (" (the peak is the first layer, so K holds it alone)" if k_set == [peak] else " (layers before the peak)")
        + f"; theta = mean MSD over K = {theta:.6g}. "
    )
    if fallback:
        why = "K has a single layer" if len(k_set) == 1 else "all MSD in K are equal"
        reason += (
            f"No layer of K has MSD above theta ({why}), so the rule falls back to the layer of K "
            f"with the largest MSD: {fallback_layer}."
        )
    else:
        reason += f"Selected the layers of K with MSD > theta: {chosen}."
    return Selection(
        layers=chosen,
        scores=m,
        threshold=theta,
        criterion="msd",
        params={"reference": reference, "tau": tau, "overlap_method": overlap_method, "variant": variant},
        reason=reason,
        notes=notes,
        details={
            "K": k_set,
            "peak_layer": peak,
            "fallback": fallback,
            "overlap_average": {str(k): v for k, v in o.items()},
        },
    )


# ====================================================================== simple baselines
def _layer_ids(stats: ActivationStats | None, model: Any) -> list[int]:
    if stats is not None:
        return sorted(stats.layers)
    if model is not None:
        from .arch import get_adapter

        return list(range(get_adapter(model).num_layers))
    raise InvalidInputError("pass the statistics or the model so the criterion knows the layers")


def _check_count(name: str, value: Any, available: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    if value > available:
        raise InvalidInputError(f"{name}={value} but only {available} layers are available; use {name} <= {available}")
    return value


@register_criterion("first_n")
def first_n_criterion(stats: ActivationStats | None = None, model: Any = None, n: int = 6) -> Selection:
    """The lowest ``n`` layers (by model layer id). Scores: 1 for selected, 0 otherwise; threshold 0.5.

    Works from the statistics or, without them, from the model's layer count.
    ``n`` larger than the number of layers raises InvalidInputError.
    """
    ids = _layer_ids(stats, model)
    n = _check_count("n", n, len(ids))
    chosen = ids[:n]
    return Selection(
        layers=chosen,
        scores={layer: float(layer in chosen) for layer in ids},
        threshold=0.5,
        criterion="first_n",
        params={"n": n},
        reason=f"The {n} lowest layers: {chosen}.",
        notes={layer: ("among" if layer in chosen else "not among") + f" the {n} lowest" for layer in ids},
    )


@register_criterion("all")
def all_criterion(stats: ActivationStats | None = None, model: Any = None) -> Selection:
    """Every layer (full-FFN baseline). Scores all 1; no threshold."""
    ids = _layer_ids(stats, model)
    return Selection(
        layers=ids,
        scores={layer: 1.0 for layer in ids},
        criterion="all",
        reason=f"All {len(ids)} layers (baseline).",
    )


@register_criterion("random")
def random_criterion(stats: ActivationStats | None = None, model: Any = None, k: int = 6, seed: int = 0) -> Selection:
    """``k`` layers drawn uniformly without replacement with ``torch.Generator().manual_seed(seed)``.

    The paper's "R" ablation. Scores are the uniform draws in [0, 1); the ``k``
    largest are selected and the threshold is the k-th largest draw. The same
    seed and layer list always give the same selection.
    """
    ids = _layer_ids(stats, model)
    k = _check_count("k", k, len(ids))
    gen = torch.Generator().manual_seed(int(seed))
    draws = torch.rand(len(ids), generator=gen, dtype=torch.float64)
    order = sorted(range(len(ids)), key=lambda i: (-float(draws[i]), ids[i]))
    chosen = sorted(ids[i] for i in order[:k])
    return Selection(
        layers=chosen,
        scores={ids[i]: float(draws[i]) for i in range(len(ids))},
        threshold=float(draws[order[k - 1]]),
        criterion="random",
        params={"k": k, "seed": int(seed)},
        reason=f"{k} layers drawn at random with seed {seed}: {chosen}.",
    )


def _top(scores: Mapping[int, float], k: int) -> tuple[list[int], float]:
    order = sorted(scores, key=lambda layer: (-scores[layer], layer))
    return sorted(order[:k]), scores[order[k - 1]]


@register_criterion("topk")
def topk_criterion(
    stats: ActivationStats,
    k: int = 6,
    score: str | Callable[..., Any] = "msd",
    max_layer: int | None = None,
    **score_params: Any,
) -> Selection:
    """The ``k`` layers with the highest per-layer ``score`` (ties: lower layer first).

    ``score`` names one of :data:`SCORES` (``msd``, ``r_spread``, ``r_std``,
    ``divergence`` = 1 - overlap, ``lape``) or is a function ``f(stats) ->
    [L]``; extra keyword parameters go to the score (e.g. ``reference``,
    ``tau``). ``max_layer`` restricts candidates to layers ``<= max_layer``
    (e.g. the lower half). Threshold = the k-th score.
    """
    scores = layer_scores(stats, score, **score_params)
    candidates = {layer: v for layer, v in scores.items() if max_layer is None or layer <= max_layer}
    if not candidates:
        raise InvalidInputError(f"no layer <= max_layer={max_layer}; the statistics cover {stats.layers}")
    k = _check_count("k", k, len(candidates))
    chosen, threshold = _top(candidates, k)
    name = score if isinstance(score, str) else getattr(score, "__name__", "custom score")
    return Selection(
        layers=chosen,
        scores=scores,
        threshold=threshold,
        criterion="topk",
        params={"k": k, "score": name, "max_layer": max_layer, **score_params},
        reason=f"The {k} layers with the highest {name}"
        + (f" among layers <= {max_layer}" if max_layer is not None else "")
        + f": {chosen} (threshold = k-th score {threshold:.6g}).",
        notes={
            layer: ("not a candidate (above max_layer)" if layer not in candidates else
                    ("in the top k" if layer in chosen else "below the top k"))
            for layer in scores
        },
    )


# ====================================================================== LAPE
def _lape_density(
    stats: ActivationStats,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Per row: share of neurons that are language-specific by LAPE; also the mask and cut-offs.

    Follows Tang et al. 2024 ("Language-Specific Neurons: The Key to
    Multilingual Capabilities in Large Language Models") and their released
    code: normalise each neuron's activation probabilities over languages,
    ``q_g = p_g / sum_g p_g``, and take the entropy ``LAPE = -sum_g q_g log q_g``.
    Neurons with no language whose probability exceeds the ``filter_rate``
    quantile of all probabilities (0.95) are dismissed; of the rest, the
    ``round(top_rate * all neurons)`` (1%) with the lowest LAPE are
    language-specific (ties broken by layer, then neuron index).
    """
    _check_groups(stats)
    for name, q in (("top_rate", top_rate), ("filter_rate", filter_rate)):
        if not 0.0 < float(q) < 1.0:
            raise InvalidInputError(f"{name} must be in (0, 1), got {q!r}")
    p = stats.activation_probability()  # [L, N, G]
    total = p.sum(dim=2, keepdim=True)
    q = torch.where(total > 0, p / total.clamp_min(1e-300), torch.zeros_like(p))
    ent = -(torch.where(q > 0, q * q.clamp_min(1e-300).log(), torch.zeros_like(q))).sum(dim=2)  # [L, N]
    flat = p.flatten()
    kth = max(1, min(flat.numel(), round(flat.numel() * filter_rate)))
    prob_cut = float(flat.kthvalue(kth).values)
    eligible = (p > prob_cut).any(dim=2)
    ent = torch.where(eligible, ent, torch.full_like(ent, math.inf))
    n_specific = min(round(ent.numel() * top_rate), int(eligible.sum()))
    order = torch.argsort(ent.flatten(), stable=True)[:n_specific]
    specific = torch.zeros(ent.numel(), dtype=torch.bool)
    specific[order] = True
    specific = specific.view_as(ent)
    ent_cut = float(ent.flatten()[order].max()) if n_specific else float("nan")
    density = specific.double().mean(dim=1)
    return density, specific, {"prob_cut": prob_cut, "entropy_cut": ent_cut, "n_specific": n_specific}


@register_criterion("lape")
def lape_criterion(
    stats: ActivationStats,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    k: int | None = None,
    max_layer: int | None = None,
) -> Selection:
    """Layers dense in language-specific neurons, found by LAPE (Tang et al. 2024).

    Score per layer = the share of its FFN neurons that are language-specific
    (Tang et al.'s thresholds, see :func:`_lape_density`: a neuron must fire
    with a probability above the ``filter_rate`` = 95% quantile of all
    probabilities in some language, and the ``top_rate`` = 1% of all neurons
    with the lowest activation-probability entropy among those are specific). With ``k=None``
    (default) select the layers whose share is above the mean share over the
    candidate layers (``max_layer`` restricts them); with ``k`` the ``k`` densest.
    When no layer is above the mean (all equal, e.g. no specific neuron at
    all), the densest layer (lowest on ties) is selected and the reason says so.
    """
    density, _, cuts = _lape_density(stats, top_rate, filter_rate)
    scores = {stats.layers[i]: float(density[i]) for i in _order(stats)}
    candidates = {layer: v for layer, v in scores.items() if max_layer is None or layer <= max_layer}
    if not candidates:
        raise InvalidInputError(f"no layer <= max_layer={max_layer}; the statistics cover {stats.layers}")
    params = {"top_rate": top_rate, "filter_rate": filter_rate, "k": k, "max_layer": max_layer}
    cut_text = (
        f"{cuts['n_specific']} neurons: the lowest {top_rate:.0%} by LAPE among those with "
        f"max_g p > {cuts['prob_cut']:.4g}"
    )
    if k is not None:
        k = _check_count("k", k, len(candidates))
        chosen, threshold = _top(candidates, k)
        reason = f"The {k} layers densest in language-specific neurons ({cut_text}): {chosen}."
        fallback = False
    else:
        threshold = sum(candidates.values()) / len(candidates)
        chosen = [layer for layer, v in candidates.items() if v > threshold + 1e-15]
        fallback = not chosen
        if fallback:
            chosen, _ = _top(candidates, 1)
            reason = (
                f"No layer has a share of language-specific neurons ({cut_text}) above the mean "
                f"{threshold:.4g}; falling back to the densest layer {chosen}."
            )
        else:
            reason = (
                f"Layers whose share of language-specific neurons ({cut_text}) is above the mean "
                f"share {threshold:.4g}: {chosen}."
            )
    return Selection(
        layers=chosen,
        scores=scores,
        threshold=threshold,
        criterion="lape",
        params=params,
        reason=reason,
        details={**cuts, "fallback": fallback},
    )


# ====================================================================== SNR (data-free)
def _mp_snr(weight: torch.Tensor) -> float:
    """Spectrum's per-matrix SNR: signal/noise of singular values split at the Marchenko-Pastur edge, over sigma_max."""
    s = torch.linalg.svdvals(weight.detach().float().cpu()).double()
    n, m = weight.shape[-2:]
    beta = min(n, m) / max(n, m)
    q75, q25 = torch.quantile(s, 0.75), torch.quantile(s, 0.25)
    sigma = float(q75 - q25) / 1.349  # noise scale from the IQR of the spectrum
    edge = sigma * (1.0 + math.sqrt(beta))  # Marchenko-Pastur bulk edge in singular values
    signal = float(s[s > edge].sum())
    noise = float(s[s <= edge].sum())
    noise = max(noise, 1e-12 * max(signal, 1e-300))  # all singular values above the edge: cap, no inf
    return (signal / noise) / float(s[0])


@register_criterion("snr")
def snr_criterion(
    model: Any,
    stats: ActivationStats | None = None,
    k: int | None = None,
    fraction: float = 0.25,
    matrices: Sequence[str] = ("gate", "up", "down"),
    max_layer: int | None = None,
) -> Selection:
    """Data-free: layers whose FFN weights carry the most signal (Spectrum, Hartford et al. 2024).

    For each FFN matrix ``W`` (``matrices`` among gate/up/down; a fused
    gate_up matrix is split into its halves) take the singular values ``s``,
    estimate the noise scale ``sigma = IQR(s) / 1.349``, and the
    Marchenko-Pastur bulk edge ``sigma * (1 + sqrt(beta))`` with ``beta`` the
    aspect ratio (short side / long side). SNR = sum of ``s`` above the edge /
    sum below it, divided by ``s_max`` (Spectrum's ``snr_ratio``). A layer's
    score is the mean over its matrices. Select the ``k`` highest layers
    (default ``max(1, round(fraction * layers))``, Spectrum's top 25%),
    among layers ``<= max_layer`` if given; threshold = the k-th score.

    Needs the model, not statistics: ``select(model=model, criterion="snr")``.
    If statistics are passed too, only their layers are considered.
    """
    from .arch import get_adapter

    adapter = get_adapter(model)
    ids = sorted(stats.layers) if stats is not None else list(range(adapter.num_layers))
    for role in matrices:
        if role not in ("gate", "up", "down"):
            raise InvalidInputError(f"unknown FFN matrix {role!r}; use some of ['gate', 'up', 'down']")
    if not matrices:
        raise InvalidInputError("matrices is empty; use some of ['gate', 'up', 'down']")
    scores: dict[int, float] = {}
    for layer in ids:
        ffn = adapter.ffn(layer)
        values = []
        for role in matrices:
            if ffn.gate_up is not None and role in ("gate", "up"):
                w = ffn.gate_up.weight
                half = w.shape[0] // 2
                w = w[:half] if role == "gate" else w[half:]
            else:
                w = getattr(ffn, role).weight
            values.append(_mp_snr(w))
        scores[layer] = sum(values) / len(values)
    candidates = {layer: v for layer, v in scores.items() if max_layer is None or layer <= max_layer}
    if not candidates:
        raise InvalidInputError(f"no layer <= max_layer={max_layer}; the model has layers {ids}")
    if k is None:
        if not 0.0 < fraction <= 1.0:
            raise InvalidInputError(f"fraction must be in (0, 1], got {fraction!r}")
        k = max(1, round(fraction * len(candidates)))
    k = _check_count("k", k, len(candidates))
    chosen, threshold = _top(candidates, k)
    return Selection(
        layers=chosen,
        scores=scores,
        threshold=threshold,
        criterion="snr",
        params={"k": k, "fraction": fraction, "matrices": list(matrices), "max_layer": max_layer},
        reason=(
            f"The {k} layers whose FFN matrices ({', '.join(matrices)}) have the highest "
            f"Marchenko-Pastur signal-to-noise ratio (Spectrum): {chosen}."
        ),
        meta={"model_name": getattr(getattr(model, "config", None), "_name_or_path", None) or None},
    )


# ====================================================================== stability
@dataclass
class Stability:
    """Bootstrap stability of a criterion's selection.

    Attributes:
        frequency: ``{layer: share of resamples in which it was selected}``.
        score_mean / score_low / score_high: the score's bootstrap mean and
            percentile interval at ``confidence``.
        threshold_low / threshold_high: the same for the threshold (None if none).
        selections: ``[(layers, count), ...]`` of distinct selections, most common first.
        resampled: what the resampling could change (see :func:`stability`).
    """

    criterion: str
    params: dict[str, Any]
    n_boot: int
    seed: int
    confidence: float
    selected: list[int]
    frequency: dict[int, float]
    score_mean: dict[int, float]
    score_low: dict[int, float]
    score_high: dict[int, float]
    threshold_low: float | None
    threshold_high: float | None
    selections: list[tuple[list[int], int]]
    resampled: str
    n_questions: int

    def format_table(self) -> str:
        """Per layer: full-data verdict, selection frequency, score mean and interval."""
        pct = round(self.confidence * 100)
        head = f"{'layer':>5}  {'selected':>8}  {'freq':>6}  {'score mean':>11}  {f'{pct}% interval':>25}"
        lines = [head, "-" * len(head)]
        for layer in sorted(self.frequency):
            lines.append(
                f"{layer:>5}  {'yes' if layer in self.selected else '':>8}  {self.frequency[layer]:>6.3f}  "
                f"{self.score_mean[layer]:>11.4e}  [{self.score_low[layer]:.4e}, {self.score_high[layer]:.4e}]"
            )
        lines.append(
            f"{self.n_boot} bootstrap resamples of {self.n_questions} questions (seed {self.seed}); "
            f"resampled: {self.resampled}"
        )
        if self.threshold_low is not None:
            lines.append(f"threshold {pct}% interval: [{self.threshold_low:.4e}, {self.threshold_high:.4e}]")
        top = ", ".join(f"{layers} x{count}" for layers, count in self.selections[:5])
        lines.append(f"most common selections: {top}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("frequency", "score_mean", "score_low", "score_high"):
            d[key] = {str(k): v for k, v in d[key].items()}
        d["selections"] = [{"layers": layers, "count": count} for layers, count in self.selections]
        return _jsonable(d)


def bootstrap_sample_weights(stats: ActivationStats, generator: torch.Generator) -> torch.Tensor:
    """One bootstrap draw over *questions*: multiplicity of each sample, ``[S]`` int64.

    The distinct question indices (``stats.sample_index``) are drawn with
    replacement once, and every language's sample of question ``q`` gets the
    multiplicity of ``q``, so parallel questions stay aligned across languages.
    """
    _check_parallel(stats)
    questions = torch.unique(stats.sample_index.long())
    draw = torch.randint(len(questions), (len(questions),), generator=generator)
    mult = torch.bincount(draw, minlength=len(questions))
    pos = torch.searchsorted(questions, stats.sample_index.long())
    return mult[pos]


def _check_parallel(stats: ActivationStats) -> None:
    """Resampling questions needs the same questions in every language."""
    per_group = {}
    for g, name in enumerate(stats.groups):
        per_group[name] = set(stats.sample_index[stats.sample_group == g].tolist())
    first = next(iter(per_group.values()), set())
    odd = {name: len(q) for name, q in per_group.items() if q != first}
    if odd:
        counts = ", ".join(f"{name}: {len(q)}" for name, q in per_group.items())
        raise InvalidInputError(
            "bootstrapping resamples the same questions in every language, but the languages hold "
            f"different questions ({counts} texts); collect parallel texts (line i = the same question "
            "in every language) to measure stability"
        )


class _ResampledStats(ActivationStats):
    """ActivationStats of a bootstrap resample whose counts could not be resampled.

    The mean activation ratio (hence MSD) is recomputed from the repeated
    per-sample fractions; count-based metrics keep the full-data counts, so
    their values are shared across resamples through ``_cache``.
    """

    _cache: dict[Any, Any]

    def activation_ratio(self, variant: str = "mean", tau: float = 0.5, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if sample_weights is None and variant == "mean":
            sample_weights = torch.ones(self.num_samples, dtype=torch.float64)
        if sample_weights is None:
            key = ("ratio", variant, tau)
            if key not in self._cache:
                self._cache[key] = super().activation_ratio(variant, tau)
            return self._cache[key]
        return super().activation_ratio(variant, tau, sample_weights)

    def activation_probability(self) -> torch.Tensor:
        if "p" not in self._cache:
            self._cache["p"] = super().activation_probability()
        return self._cache["p"]

    def overlap(self, reference: str = "en", tau: float = 0.5, method: str = "ratio") -> Any:
        key = ("overlap", reference, tau, method)
        if key not in self._cache:
            self._cache[key] = super().overlap(reference, tau, method)
        return self._cache[key]


def resample_stats(
    stats: ActivationStats, weights: torch.Tensor, cache: dict[Any, Any] | None = None
) -> ActivationStats:
    """The statistics of a resample where sample ``s`` appears ``weights[s]`` times (integers).

    With per-sample counts (``analyze --per-sample-counts``) the counts and
    tokens are recomputed exactly, so every metric is resampled. Without
    them only the per-sample quantities are: the mean activation ratio and
    MSD are recomputed from the per-sample fractions, while count-based
    metrics (overlap, ``set@tau`` ratio, LAPE) stay at their full-data values
    (computed once per ``cache`` dict, which callers may share across resamples).
    """
    weights = torch.as_tensor(weights).long()
    if weights.shape != (stats.num_samples,) or (weights < 0).any():
        raise InvalidInputError(f"weights must be {stats.num_samples} non-negative integers")
    idx = torch.repeat_interleave(torch.arange(stats.num_samples), weights)
    group = stats.sample_group.long()[idx]
    missing = sorted(set(range(len(stats.groups))) - set(group.tolist()))
    if missing:
        raise InvalidInputError(f"the resample has no sample of groups {[stats.groups[g] for g in missing]}")
    common = dict(
        groups=list(stats.groups),
        layers=list(stats.layers),
        sample_fraction=stats.sample_fraction[idx],
        sample_tokens=stats.sample_tokens[idx],
        sample_group=stats.sample_group[idx],
        sample_index=stats.sample_index[idx],
        meta={**stats.meta, "bootstrap": True},
    )
    if stats.sample_counts is not None:
        sc = stats.sample_counts[idx].long()  # [S', L, N]
        counts = torch.zeros(len(stats.groups), stats.num_layers, stats.num_neurons, dtype=torch.int64)
        counts.index_add_(0, group, sc)
        tokens = torch.zeros(len(stats.groups), dtype=torch.int64).index_add_(0, group, stats.sample_tokens[idx].long())
        return ActivationStats(counts=counts.permute(1, 2, 0).contiguous(), tokens=tokens, sample_counts=sc, **common)
    out = _ResampledStats(counts=stats.counts, tokens=stats.tokens, **common)
    out._cache = cache if cache is not None else {}
    return out


def stability(
    stats: ActivationStats | None,
    criterion: str | Callable[..., Any] = "msd",
    *,
    n_boot: int = 200,
    seed: int = 0,
    model: Any = None,
    confidence: float = 0.95,
    params: Mapping[str, Any] | None = None,
    **criterion_params: Any,
) -> Stability:
    """How stable a criterion's selection is when the questions are resampled.

    Draws ``n_boot`` bootstrap resamples of the question indices (the same
    draw for every language; :func:`bootstrap_sample_weights`) from a
    ``torch.Generator`` seeded with ``seed``, reruns the criterion on each
    (:func:`resample_stats`) and reports per layer the selection frequency
    and a percentile interval of its score. Reproducible for a given seed.

    Without per-sample counts in the statistics, the overlap (hence ``K`` of
    ``msd``) stays at its full-data value and only R / MSD vary; ``resampled``
    in the result says which. Data-free criteria are not resampled at all.

    The criterion's parameters go in ``params`` (needed for one named like an
    argument of this function, e.g. ``random``'s ``seed``) or as keywords.

    Example:
        >>> st = stability(stats, "msd", n_boot=200, seed=0)   # doctest: +SKIP
        >>> st = stability(stats, "random", params={"k": 2, "seed": 1})   # doctest: +SKIP
        >>> print(st.format_table())                           # doctest: +SKIP
    """
    spec = get_criterion(criterion)
    params = {**(params or {}), **criterion_params}
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InvalidInputError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError(f"confidence must be in (0, 1), got {confidence!r}")
    full = _run(spec, stats, model, dict(params))
    # Criteria with optional statistics (first_n, random, all, snr) only read the layer ids.
    uses_stats = stats is not None and "stats" in spec.required
    if uses_stats and stats.num_samples == 0:
        raise InvalidInputError("the statistics have no per-sample data; re-collect them to bootstrap")
    gen = torch.Generator().manual_seed(int(seed))
    cache: dict[Any, Any] = {}
    runs: list[Selection] = []
    for _ in range(n_boot):
        if uses_stats:
            boot = resample_stats(stats, bootstrap_sample_weights(stats, gen), cache)
            runs.append(_run(spec, boot, model, dict(params)))
        else:
            runs.append(full)
    layers = sorted(full.scores) or sorted(set().union(*(r.layers for r in runs)))
    alpha = (1.0 - confidence) / 2.0
    freq, mean, low, high = {}, {}, {}, {}
    for layer in layers:
        freq[layer] = sum(layer in r.layers for r in runs) / n_boot
        vals = np.array([r.scores.get(layer, float("nan")) for r in runs], dtype=np.float64)
        mean[layer] = float(np.mean(vals))
        low[layer], high[layer] = (float(x) for x in np.quantile(vals, [alpha, 1.0 - alpha]))
    thresholds = [r.threshold for r in runs if r.threshold is not None]
    t_low = t_high = None
    if thresholds:
        t_low, t_high = (float(x) for x in np.quantile(np.array(thresholds), [alpha, 1.0 - alpha]))
    counter = Counter(tuple(r.layers) for r in runs)
    selections = [(list(k), v) for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]
    if not uses_stats:
        resampled = "nothing (the criterion does not read the statistics)"
    elif stats.sample_counts is not None:
        resampled = "everything (per-sample counts present)"
    else:
        resampled = "R and MSD from per-sample fractions; count-based metrics (overlap, hence K) fixed"
    return Stability(
        criterion=spec.name,
        params=full.params,
        n_boot=n_boot,
        seed=int(seed),
        confidence=confidence,
        selected=full.layers,
        frequency=freq,
        score_mean=mean,
        score_low=low,
        score_high=high,
        threshold_low=t_low,
        threshold_high=t_high,
        selections=selections,
        resampled=resampled,
        n_questions=int(torch.unique(stats.sample_index).numel()) if uses_stats else 0,
    )


# ====================================================================== helpers
def _json_float(value: float) -> float | str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _jsonable(obj: Any) -> Any:
    """Normalise to what a JSON round trip gives back (tuples -> lists, numpy/torch scalars -> Python)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return getattr(obj, "__name__", repr(obj))
    return repr(obj)

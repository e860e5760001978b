"""The criterion registry, and :func:`select`, which runs a criterion and checks what it returns.

A criterion has one signature, ``f(stats, *, model=None, **params)``: the
statistics first (None for a data-free rule), the model as a keyword, then its own
keyword parameters; it returns a :class:`Selection` or a list of layer ids. Names given by the caller may be ``"module:function"`` and are
imported (:func:`get_criterion`); names read from a file are only looked up
(:func:`registered_criterion`), never imported.

Example:
    >>> @register_criterion("_lowest_layer")
    ... def lowest_layer(stats, *, model=None):
    ...     return [min(stats.layers)]
    >>> "_lowest_layer" in list_criteria()
    True
    >>> sorted(registered_criterion("_lowest_layer").required)
    ['stats']
    >>> _ = CRITERIA.pop("_lowest_layer")
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._io import jsonable
from ..errors import InvalidInputError, LayerSelectError
from ..stats import ActivationStats
from .value import Selection, _validated_layer_ids

__all__ = [
    "Criterion",
    "CRITERIA",
    "register_criterion",
    "get_criterion",
    "registered_criterion",
    "list_criteria",
    "select",
]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its function, ``f(stats, *, model=None, **params)``, and what it needs.

    ``required`` holds ``"stats"`` when ``stats`` has no default and ``"model"`` when
    ``model`` has none (a rule that reads the weights); ``select`` refuses a call that
    lacks one, by name, before running the rule.

    Example:
        >>> spec = get_criterion("first_n")
        >>> spec.name, spec.required
        ('first_n', frozenset())
    """

    name: str
    func: Callable[..., Any]
    required: frozenset[str]  # inputs without a default: "stats" and/or "model"
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
        def my_rule(stats, *, model=None, k=2): ...

        @register_criterion("lowest")           # under another name
        def f(stats, *, model=None): ...

        register_criterion("lowest", f)         # plain call
        register_criterion(f, name="lowest")

    The function has the one criterion signature ``f(stats, *, model=None, **params)``
    (``stats=None`` for a data-free rule, ``model`` without a default for one that needs
    the weights) and returns a :class:`Selection` or a list of model layer ids. Any other
    signature is refused here, with the expected one in the message.
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


SIGNATURE = "f(stats, *, model=None, **params)"


def _make_criterion(name: str, func: Callable[..., Any]) -> Criterion:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        raise InvalidInputError(f"criterion {name!r} has no inspectable signature; write it as {SIGNATURE}") from None
    params = list(sig.parameters.values())
    first = params[0] if params else None
    model = sig.parameters.get("model")
    if (first is None or first.name != "stats" or first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)
            or model is None or model.kind is not model.KEYWORD_ONLY):
        raise InvalidInputError(
            f"criterion {name!r} has the signature {name}{sig}; a criterion must be {SIGNATURE} "
            "(the statistics first, None for a data-free rule; the model as a keyword-only argument)"
        )
    required = {p.name for p in (first, model) if p.default is inspect.Parameter.empty}
    doc = inspect.getdoc(func) or ""
    return Criterion(name, func, frozenset(required), doc.split("\n")[0] if doc else "")


def get_criterion(criterion: str | Criterion | Callable[..., Any]) -> Criterion:
    """Look a criterion up by name, ``"module:function"``, or pass a function/Criterion through.

    ``"package.module:function"`` imports the module and uses ``function``
    (under its registered name if the module registered it). A function that
    is not registered is used as is (not added to the registry).

    Example:
        >>> get_criterion("msd").name
        'msd'
        >>> get_criterion("layerselect.selection.baselines:first_n_criterion").name
        'first_n'
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

    Example:
        >>> registered_criterion("msd").name
        'msd'
        >>> registered_criterion("os:system")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        layerselect.errors.InvalidInputError: criterion 'os:system' (recorded in the selection) is not registered...
    """
    if isinstance(name, str) and name in CRITERIA:
        return CRITERIA[name]
    raise InvalidInputError(
        f"criterion {name!r} (recorded in the selection) is not registered in this process; "
        f"registered: {list_criteria()}. Import the module that registers it, or pass "
        "criterion=<the function> (or criterion='module:function' to import it explicitly)"
    )


def list_criteria() -> list[str]:
    """Names of the registered criteria, in registration order.

    Example:
        >>> list_criteria()[:3]
        ['msd', 'first_n', 'all']
    """
    return list(CRITERIA)


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
    """Check the inputs, call the criterion, and check and annotate what it returned."""
    args, kwargs = _call_arguments(spec, stats, model, params)
    try:
        out = spec.func(*args, **kwargs)
    except LayerSelectError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise InvalidInputError(
            f"criterion {spec.name!r} failed with parameters {_describe_params(params)} "
            f"({type(exc).__name__}: {exc}); is it a layer-selection criterion, and are the parameters right?"
        ) from exc
    sel = _checked_selection(spec, out, stats, model, params)
    sel.source_stats = stats
    sel.source_model = model
    sel.call_params = dict(params)
    sel.source_criterion = spec
    return sel


def _call_arguments(
    spec: Criterion, stats: ActivationStats | None, model: Any, params: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments for ``spec.func``; missing inputs and bad parameters raise."""
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
    bad = sorted(set(params) & inputs) or ([] if accepts_any else sorted(set(params) - set(sig.parameters)))
    if bad:
        allowed = [p for p in sig.parameters if p not in inputs]
        raise InvalidInputError(f"criterion {spec.name!r} has no parameter(s) {bad}; it accepts {allowed}")
    _check_param_types(spec, sig, params)
    args: list[Any] = [stats]
    kwargs = {**params, "model": model}
    return args, kwargs


def _checked_selection(
    spec: Criterion, out: Any, stats: ActivationStats | None, model: Any, params: dict[str, Any]
) -> Selection:
    """``out`` as a :class:`Selection` whose layers exist in the model and statistics, with provenance."""
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
        sel.params = jsonable(_describe_params(params))
    for value in sel.scores.values():
        if math.isnan(value):
            raise InvalidInputError(
                f"criterion {spec.name!r} produced NaN scores; check the statistics (every group needs tokens) "
                "or the criterion's parameters"
            )
    if model is not None:
        from ..arch import get_layout

        layout = get_layout(model)
        num = layout.num_layers
        outside = [x for x in sel.layers if x >= num]
        if outside:
            raise InvalidInputError(
                f"criterion {spec.name!r} selected layers {outside}, but the model has {num} layers (0..{num - 1})"
            )
        model_type = getattr(getattr(layout.model, "config", None), "model_type", None)
        if isinstance(model_type, str):
            sel.meta.setdefault("model_type", model_type)
        sel.meta.setdefault("num_model_layers", num)
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
        for key in ("model_type", "num_model_layers"):  # what to_axolotl / to_llamafactory need
            if stats.meta.get(key) is not None:
                sel.meta.setdefault(key, stats.meta[key])
    if not sel.layers and "empty" not in sel.reason.lower():
        sel.reason = (sel.reason + " " if sel.reason else "") + "The selection is empty: no layer qualified."
    return sel


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

"""Bootstrap stability of a selection: resample the questions, rerun the criterion, count.

Example:
    >>> from layerselect import select, stability
    >>> st = stability(stats, "msd", n_boot=200, seed=0)      # doctest: +SKIP
    >>> st.frequency                                          # doctest: +SKIP
    {0: 1.0, 1: 0.12, 2: 0.97, ...}
    >>> print(select(stats).stability(n_boot=50).format_table())   # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._io import jsonable
from ..errors import InvalidInputError
from ..stats import ActivationStats
from .registry import _run, get_criterion
from .value import Selection

__all__ = ["Stability", "stability", "resample_stats", "bootstrap_sample_weights"]



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

    Example:
        >>> st = stability(stats, "msd", n_boot=100, seed=0)   # doctest: +SKIP
        >>> st.frequency[0], st.selections[0]                  # doctest: +SKIP
        (1.0, ([0], 97))
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
        return jsonable(d)


def bootstrap_sample_weights(stats: ActivationStats, generator: torch.Generator) -> torch.Tensor:
    """One bootstrap draw over *questions*: multiplicity of each sample, ``[S]`` int64.

    The distinct question indices (``stats.sample_index``) are drawn with
    replacement once, and every language's sample of question ``q`` gets the
    multiplicity of ``q``, so parallel questions stay aligned across languages.

    Example:
        >>> w = bootstrap_sample_weights(stats, torch.Generator().manual_seed(0))   # doctest: +SKIP
        >>> boot = resample_stats(stats, w)                                         # doctest: +SKIP
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

    With per-sample counts (``collect(..., per_sample_counts=True)``) the counts and
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
        **_summarise(runs, layers, confidence),
        resampled=resampled,
        n_questions=int(torch.unique(stats.sample_index).numel()) if uses_stats else 0,
    )


def _summarise(runs: list[Selection], layers: list[int], confidence: float) -> dict[str, Any]:
    """Per layer the selection frequency and the score's mean and percentile interval; same for the threshold."""
    alpha = (1.0 - confidence) / 2.0
    freq, mean, low, high = {}, {}, {}, {}
    for layer in layers:
        freq[layer] = sum(layer in r.layers for r in runs) / len(runs)
        vals = np.array([r.scores.get(layer, float("nan")) for r in runs], dtype=np.float64)
        mean[layer] = float(np.mean(vals))
        low[layer], high[layer] = (float(x) for x in np.quantile(vals, [alpha, 1.0 - alpha]))
    thresholds = [r.threshold for r in runs if r.threshold is not None]
    t_low = t_high = None
    if thresholds:
        t_low, t_high = (float(x) for x in np.quantile(np.array(thresholds), [alpha, 1.0 - alpha]))
    counter = Counter(tuple(r.layers) for r in runs)
    selections = [(list(k), v) for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {
        "frequency": freq,
        "score_mean": mean,
        "score_low": low,
        "score_high": high,
        "threshold_low": t_low,
        "threshold_high": t_high,
        "selections": selections,
    }

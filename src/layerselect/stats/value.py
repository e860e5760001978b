"""ActivationStats: per-language FFN firing counts and the metrics derived from them.

The stored state is the *sufficient statistics* of DESIGN.md, collected in one
streaming pass (see :mod:`layerselect.stats.collect`):

- ``counts[l, n, g]``: tokens of group ``g`` on which neuron ``n`` of layer
  ``layers[l]`` fired (``f(gate(x))[n] > 0``), int64;
- ``tokens[g]``: real tokens seen for group ``g``, int64;
- per sample ``s``: ``sample_fraction[s, l]`` (fraction of layer-``l`` neurons
  firing, averaged over the sample's tokens, float64), ``sample_tokens[s]``,
  ``sample_group[s]`` and ``sample_index[s]`` (position of the text inside its
  group, so parallel questions line up across languages);
- optionally ``sample_counts[s, l, n]`` (per-sample per-neuron counts; large).

Everything else (activation probability, activation ratio, overlap, MSD) is
derived on demand in float64 and never stored (:mod:`layerselect.stats.metrics`);
the file format and the checks every value passes are in :mod:`layerselect.stats.files`.

Example:
    >>> from layerselect import ActivationStats
    >>> stats = ActivationStats.collect(model, tokenizer, {"en": [...], "de": [...]})  # doctest: +SKIP
    >>> stats.activation_ratio()          # R[layer, group]                            # doctest: +SKIP
    >>> per_group, average = stats.overlap(reference="en")                            # doctest: +SKIP
    >>> stats.msd()                       # MSD[layer]                                 # doctest: +SKIP
    >>> stats.save("stats/"); ActivationStats.load("stats/")                          # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, IncompatibleStatsError, InvalidInputError
from . import metrics
from .files import (
    check_invariants,
    read_stats,
    write_stats,
)
from .metrics import Overlap

__all__ = ["ActivationStats"]


@dataclass
class ActivationStats:
    """Firing counts of FFN neurons per layer and language (see module docstring)."""

    counts: torch.Tensor
    tokens: torch.Tensor
    groups: list[str]
    layers: list[int]
    sample_fraction: torch.Tensor
    sample_tokens: torch.Tensor
    sample_group: torch.Tensor
    sample_index: torch.Tensor
    sample_counts: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = list(self.groups)
        self.layers = [int(x) for x in self.layers]
        check_invariants(self)

    # ------------------------------------------------------------------ collect
    @classmethod
    def collect(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        texts: Mapping[str, Sequence[str]],
        **kwargs: Any,
    ) -> ActivationStats:
        """Run the model over ``{group: [text, ...]}`` and count firing neurons.

        See :func:`layerselect.stats.collect.collect_stats` for the keyword arguments
        (``batch_size``, ``layers``, ``max_length``, ``padding_side``,
        ``per_sample_counts``, ``progress``).
        """
        # collect produces ActivationStats, so it imports this module; importing it here, on
        # use, keeps the dependency one-way (collect -> stats) while this method stays the API.
        from .collect import collect_stats

        return collect_stats(model, tokenizer, texts, **kwargs)

    # ------------------------------------------------------------------ shapes
    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def num_neurons(self) -> int:
        return self.counts.shape[1]

    @property
    def num_samples(self) -> int:
        return self.sample_fraction.shape[0]

    @property
    def model_name(self) -> str | None:
        return self.meta.get("model_name")

    def group_index(self, group: str) -> int:
        try:
            return self.groups.index(group)
        except ValueError:
            raise InvalidInputError(
                f"group {group!r} is not in these stats; they have {self.groups}"
            ) from None

    # ------------------------------------------------------------------ derived metrics
    # The computations live in stats.metrics; these methods are the documented API.
    def activation_probability(self) -> torch.Tensor:
        """``p[l, n, g] = counts / tokens`` in float64."""
        return metrics.activation_probability(self)

    def activation_ratio(
        self, variant: str = "mean", tau: float = 0.5, sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Activation ratio ``R[l, g]`` (paper eq. 4), float64.

        ``variant="mean"`` (default): mean over neurons of the activation probability,
        i.e. the average fraction of FFN neurons firing per token.
        ``variant="set"`` (or ``"set@0.3"``): fraction of neurons with ``p > tau``.

        ``sample_weights[s]`` (e.g. bootstrap multiplicities) recomputes the default
        variant from the per-sample fractions instead of the counts; with all-ones
        weights it equals the count-based value up to float rounding.
        """
        return metrics.activation_ratio(self, variant, tau, sample_weights)

    def msd(self, variant: str = "mean", tau: float = 0.5, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared deviation of the activation ratio across groups, ``MSD[l]`` (eq. 5-6)."""
        return metrics.msd(self, variant, tau, sample_weights)

    def overlap(self, reference: str = "en", tau: float = 0.5, method: str = "ratio") -> Overlap:
        """Overlap of each group's active neurons with the reference group's, per layer.

        ``S_g = {n : p[l, n, g] > tau}``. Methods: ``"ratio"`` (default)
        ``|S_g ∩ S_ref| / |S_ref|``; ``"jaccard"`` ``|S_g ∩ S_ref| / |S_g ∪ S_ref|``;
        ``"pearson"`` the correlation of ``p`` across neurons (threshold-free).
        A layer where the denominator is empty gives NaN.
        """
        return metrics.overlap(self, reference, tau, method)

    # ------------------------------------------------------------------ summaries
    def layer_table(self, reference: str | None = "en", tau: float = 0.5) -> list[dict[str, float]]:
        """One row per layer: R mean/min/max over groups, overlap average (if the reference exists), MSD."""
        return metrics.layer_table(self, reference, tau)

    def format_table(self, reference: str | None = "en", tau: float = 0.5) -> str:
        """The per-layer table as aligned text (what ``layerselect analyze`` prints)."""
        return metrics.format_table(self, reference, tau)

    def __repr__(self) -> str:
        return (
            f"ActivationStats(model={self.model_name!r}, layers={len(self.layers)}, "
            f"neurons={self.num_neurons}, groups={self.groups}, tokens={self.tokens.tolist()}, "
            f"samples={self.num_samples})"
        )

    # ------------------------------------------------------------------ combine
    def subset(self, groups: Sequence[str]) -> ActivationStats:
        """The same statistics restricted to (and ordered as) ``groups``."""
        idx = [self.group_index(g) for g in groups]
        remap = torch.full((len(self.groups),), -1, dtype=torch.long)
        remap[idx] = torch.arange(len(idx))
        keep = remap[self.sample_group.long()] >= 0
        return ActivationStats(
            counts=self.counts[:, :, idx].clone(),
            tokens=self.tokens[idx].clone(),
            groups=list(groups),
            layers=list(self.layers),
            sample_fraction=self.sample_fraction[keep].clone(),
            sample_tokens=self.sample_tokens[keep].clone(),
            sample_group=remap[self.sample_group.long()][keep],
            sample_index=self.sample_index[keep].clone(),
            sample_counts=None if self.sample_counts is None else self.sample_counts[keep].clone(),
            meta=dict(self.meta),
        )

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Combine statistics from separate runs of the same model over the same layers.

        Groups present in both are summed; groups in only one are appended.
        Samples of the second run are appended after the first's.
        """
        if not isinstance(other, ActivationStats):
            raise InvalidInputError(f"can only merge ActivationStats, got {type(other).__name__}")
        problems = []
        if self.layers != other.layers:
            problems.append(f"layers {self.layers} vs {other.layers}")
        if self.num_neurons != other.num_neurons:
            problems.append(f"intermediate size {self.num_neurons} vs {other.num_neurons}")
        for key in ("model_name", "num_model_layers", "definitions_version"):
            a, b = self.meta.get(key), other.meta.get(key)
            if a is not None and b is not None and a != b:
                problems.append(f"{key} {a!r} vs {b!r}")
        if problems:
            raise IncompatibleStatsError(
                "cannot merge statistics of different models or layers: " + "; ".join(problems)
            )
        groups = list(self.groups) + [g for g in other.groups if g not in self.groups]
        g_other = torch.tensor([groups.index(g) for g in other.groups], dtype=torch.long)
        counts = torch.zeros(self.num_layers, self.num_neurons, len(groups), dtype=torch.int64)
        counts[:, :, : len(self.groups)] += self.counts
        counts[:, :, g_other] += other.counts
        tokens = torch.zeros(len(groups), dtype=torch.int64)
        tokens[: len(self.groups)] += self.tokens
        tokens[g_other] += other.tokens
        both = self.sample_counts is not None and other.sample_counts is not None
        # A group seen in both runs holds different texts: shift the second run's
        # question indices past the first's so bootstrap never pairs them.
        other_index = other.sample_index.clone()
        for j, g in enumerate(other.groups):
            if g in self.groups:
                mine = self.sample_index[self.sample_group == self.groups.index(g)]
                if len(mine):
                    other_index[other.sample_group == j] += int(mine.max()) + 1
        meta = dict(self.meta)
        meta["merged_from"] = [self.meta.get("run_id"), other.meta.get("run_id")]
        return ActivationStats(
            counts=counts,
            tokens=tokens,
            groups=groups,
            layers=list(self.layers),
            sample_fraction=torch.cat([self.sample_fraction, other.sample_fraction]),
            sample_tokens=torch.cat([self.sample_tokens, other.sample_tokens]),
            sample_group=torch.cat([self.sample_group.long(), g_other[other.sample_group.long()]]),
            sample_index=torch.cat([self.sample_index, other_index]),
            sample_counts=torch.cat([self.sample_counts, other.sample_counts]) if both else None,
            meta=meta,
        )

    __add__ = merge

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ActivationStats):
            return NotImplemented
        same = (
            self.groups == other.groups
            and self.layers == other.layers
            and torch.equal(self.counts, other.counts)
            and torch.equal(self.tokens, other.tokens)
            and torch.equal(self.sample_fraction, other.sample_fraction)
            and torch.equal(self.sample_tokens, other.sample_tokens)
            and torch.equal(self.sample_group, other.sample_group)
            and torch.equal(self.sample_index, other.sample_index)
        )
        if not same or (self.sample_counts is None) != (other.sample_counts is None):
            return False
        return self.sample_counts is None or torch.equal(self.sample_counts, other.sample_counts)

    # ------------------------------------------------------------------ persistence
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "counts": self.counts,
            "tokens": self.tokens,
            "sample_fraction": self.sample_fraction,
            "sample_tokens": self.sample_tokens,
            "sample_group": self.sample_group,
            "sample_index": self.sample_index,
        }
        if self.sample_counts is not None:
            out["sample_counts"] = self.sample_counts
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``stats.safetensors`` + ``stats.json`` as the folder ``directory``, atomically.

        The folder is replaced whole. A folder holding anything other than earlier
        statistics is refused unless ``overwrite=True``.
        """
        return write_stats(directory, self._tensors(), self.groups, self.layers, self.meta, overwrite=overwrite)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ActivationStats:
        """Read statistics written by :meth:`save`; corrupt or foreign files raise FormatError."""
        fields = read_stats(directory)
        try:
            return cls(**fields)
        except FormatError as exc:
            raise FormatError(f"{Path(directory)}: {exc}") from None

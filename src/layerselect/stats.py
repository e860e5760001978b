"""ActivationStats: per-language FFN firing counts and the metrics derived from them.

The stored state is the *sufficient statistics* of DESIGN.md, collected in one
streaming pass (see :mod:`layerselect.collect`):

- ``counts[l, n, g]``: tokens of group ``g`` on which neuron ``n`` of layer
  ``layers[l]`` fired (``f(gate(x))[n] > 0``), int64;
- ``tokens[g]``: real tokens seen for group ``g``, int64;
- per sample ``s``: ``sample_fraction[s, l]`` (fraction of layer-``l`` neurons
  firing, averaged over the sample's tokens, float64), ``sample_tokens[s]``,
  ``sample_group[s]`` and ``sample_index[s]`` (position of the text inside its
  group, so parallel questions line up across languages);
- optionally ``sample_counts[s, l, n]`` (per-sample per-neuron counts; large).

Everything else (activation probability, activation ratio, overlap, MSD) is
derived on demand in float64 and never stored.

Example:
    >>> from layerselect import ActivationStats
    >>> stats = ActivationStats.collect(model, tokenizer, {"en": [...], "de": [...]})  # doctest: +SKIP
    >>> stats.activation_ratio()          # R[layer, group]                            # doctest: +SKIP
    >>> per_group, average = stats.overlap(reference="en")                            # doctest: +SKIP
    >>> stats.msd()                       # MSD[layer]                                 # doctest: +SKIP
    >>> stats.save("stats/"); ActivationStats.load("stats/")                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._io import atomic_directory, check_format_version, read_json, write_json
from .errors import FormatError, IncompatibleStatsError, InvalidInputError

__all__ = ["ActivationStats", "Overlap", "STATS_FORMAT_VERSION", "DEFINITIONS_VERSION"]

#: Version of the on-disk layout (``stats.json`` + ``stats.safetensors``).
STATS_FORMAT_VERSION = 2
#: Version of the *definitions* (what "fired" and "token" mean); bump if they change.
DEFINITIONS_VERSION = 1

TENSOR_FILE = "stats.safetensors"
META_FILE = "stats.json"

OVERLAP_METHODS = ("ratio", "jaccard", "pearson")


class Overlap(NamedTuple):
    """Overlap with the reference language: ``per_group[l, g]`` and ``average[l]``.

    ``average`` is the mean over the non-reference groups (the paper's AVG).
    """

    per_group: torch.Tensor
    average: torch.Tensor


def _library_version() -> str:
    from . import __version__

    return __version__


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
        _check_invariants(self)

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

        See :func:`layerselect.collect.collect_stats` for the keyword arguments
        (``batch_size``, ``layers``, ``max_length``, ``padding_side``,
        ``per_sample_counts``, ``progress``).
        """
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
    def activation_probability(self) -> torch.Tensor:
        """``p[l, n, g] = counts / tokens`` in float64."""
        if (self.tokens == 0).any():
            empty = [g for g, t in zip(self.groups, self.tokens.tolist()) if t == 0]
            raise InvalidInputError(f"groups {empty} have no tokens; collect data for them first")
        return self.counts.double() / self.tokens.double()

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
        variant, tau = _parse_variant(variant, tau)
        if sample_weights is not None:
            if variant != "mean":
                raise InvalidInputError("sample_weights only apply to the 'mean' activation ratio")
            return self._ratio_from_samples(sample_weights)
        p = self.activation_probability()
        if variant == "mean":
            return p.mean(dim=1)
        return (p > tau).double().mean(dim=1)

    def _ratio_from_samples(self, weights: torch.Tensor) -> torch.Tensor:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (self.num_samples,):
            raise InvalidInputError(f"sample_weights must have shape ({self.num_samples},)")
        w = weights * self.sample_tokens.double()  # token-weighted: R averages over tokens
        g = self.sample_group.long()
        num = torch.zeros(len(self.groups), self.num_layers, dtype=torch.float64)
        num.index_add_(0, g, w[:, None] * self.sample_fraction.double())
        den = torch.zeros(len(self.groups), dtype=torch.float64).index_add_(0, g, w)
        return (num / den[:, None]).T

    def msd(self, variant: str = "mean", tau: float = 0.5, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared deviation of the activation ratio across groups, ``MSD[l]`` (eq. 5-6)."""
        r = self.activation_ratio(variant, tau, sample_weights)
        return ((r - r.mean(dim=1, keepdim=True)) ** 2).mean(dim=1)

    def overlap(self, reference: str = "en", tau: float = 0.5, method: str = "ratio") -> Overlap:
        """Overlap of each group's active neurons with the reference group's, per layer.

        ``S_g = {n : p[l, n, g] > tau}``. Methods: ``"ratio"`` (default)
        ``|S_g ∩ S_ref| / |S_ref|``; ``"jaccard"`` ``|S_g ∩ S_ref| / |S_g ∪ S_ref|``;
        ``"pearson"`` the correlation of ``p`` across neurons (threshold-free).
        A layer where the denominator is empty gives NaN.
        """
        if method not in OVERLAP_METHODS:
            raise InvalidInputError(f"unknown overlap method {method!r}; use one of {OVERLAP_METHODS}")
        ref = self.group_index(reference)
        if len(self.groups) < 2:
            raise InvalidInputError("overlap needs at least two groups (a reference and another)")
        p = self.activation_probability()
        if method == "pearson":
            c = p - p.mean(dim=1, keepdim=True)
            num = (c * c[:, :, ref : ref + 1]).sum(dim=1)
            den = (c.pow(2).sum(dim=1) * c[:, :, ref].pow(2).sum(dim=1, keepdim=True)).sqrt()
            per_group = num / den
        else:
            active = p > tau
            inter = (active & active[:, :, ref : ref + 1]).sum(dim=1).double()
            if method == "ratio":
                den = active[:, :, ref].sum(dim=1, keepdim=True).double()
            else:
                den = (active | active[:, :, ref : ref + 1]).sum(dim=1).double()
            per_group = inter / den
        others = [i for i in range(len(self.groups)) if i != ref]
        return Overlap(per_group, per_group[:, others].mean(dim=1))

    # ------------------------------------------------------------------ summaries
    def layer_table(self, reference: str | None = "en", tau: float = 0.5) -> list[dict[str, float]]:
        """One row per layer: R mean/min/max over groups, overlap average (if the reference exists), MSD."""
        r = self.activation_ratio()
        msd = self.msd()
        avg = None
        if reference is not None and reference in self.groups and len(self.groups) > 1:
            avg = self.overlap(reference, tau).average
        rows = []
        for i, layer in enumerate(self.layers):
            row = {
                "layer": layer,
                "R_mean": float(r[i].mean()),
                "R_min": float(r[i].min()),
                "R_max": float(r[i].max()),
                "MSD": float(msd[i]),
            }
            if avg is not None:
                row["overlap_avg"] = float(avg[i])
            rows.append(row)
        return rows

    def format_table(self, reference: str | None = "en", tau: float = 0.5) -> str:
        """The per-layer table as aligned text (what ``layerselect analyze`` prints)."""
        rows = self.layer_table(reference, tau)
        has_overlap = rows and "overlap_avg" in rows[0]
        head = f"{'layer':>5}  {'R mean':>8}  {'R min':>8}  {'R max':>8}  {'MSD':>11}"
        if has_overlap:
            head += f"  {'overlap(' + str(reference) + ')':>12}"
        lines = [head, "-" * len(head)]
        for row in rows:
            line = (
                f"{row['layer']:>5}  {row['R_mean']:>8.4f}  {row['R_min']:>8.4f}  "
                f"{row['R_max']:>8.4f}  {row['MSD']:>11.4e}"
            )
            if has_overlap:
                line += f"  {row['overlap_avg']:>12.4f}"
            lines.append(line)
        return "\n".join(lines)

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
        directory = Path(directory)
        with atomic_directory(directory, META_FILE, overwrite=overwrite, what="stats folder") as tmp:
            save_file(self._tensors(), str(tmp / TENSOR_FILE))
            meta = {
                "format_version": STATS_FORMAT_VERSION,
                "definitions_version": DEFINITIONS_VERSION,
                "library_version": _library_version(),
                "groups": self.groups,
                "layers": self.layers,
                "intermediate_size": self.num_neurons,
                "tensor_sha256": _sha256(tmp / TENSOR_FILE),
                "meta": self.meta,
            }
            meta["checksum"] = _meta_checksum(meta)
            write_json(tmp / META_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ActivationStats:
        """Read statistics written by :meth:`save`; corrupt or foreign files raise FormatError."""
        directory = Path(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSOR_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise FormatError(
                f"{directory} is not an ActivationStats directory (needs {META_FILE} and "
                f"{TENSOR_FILE}); create one with ActivationStats.save or `layerselect analyze`"
            )
        meta = read_json(meta_path)
        if not isinstance(meta, dict):
            raise FormatError(f"{meta_path} is not a JSON object; it was not written by layerselect")
        written_by = meta.get("library_version")
        version = check_format_version(
            meta.get("format_version"), STATS_FORMAT_VERSION, "stats", where=directory,
            written_by=written_by if isinstance(written_by, str) else None,
        )
        recorded = meta.get("tensor_sha256")
        if not isinstance(recorded, str):
            raise FormatError(f"{meta_path} records no tensor_sha256 checksum; the folder was edited or is incomplete")
        if version >= 2 and meta.get("checksum") != _meta_checksum(meta):
            raise FormatError(
                f"{meta_path} does not match its checksum: its metadata (groups, layers, ...) was edited "
                "or the file is corrupt; re-run the analysis"
            )
        if recorded != _sha256(tensor_path):
            raise FormatError(
                f"{tensor_path} does not match the checksum in {META_FILE}: the file is corrupt or "
                "was replaced; re-run the analysis"
            )
        try:
            t = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise FormatError(f"{tensor_path} is not a readable safetensors file ({exc})") from None
        groups, layers = meta.get("groups"), meta.get("layers")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise FormatError(f"{meta_path}: 'groups' must be a list of names, got {groups!r}")
        if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise FormatError(f"{meta_path}: 'layers' must be a list of integers, got {layers!r}")
        if not isinstance(meta.get("meta", {}), dict):
            raise FormatError(f"{meta_path}: 'meta' must be an object")
        try:
            return cls(
                counts=t["counts"],
                tokens=t["tokens"],
                groups=groups,
                layers=layers,
                sample_fraction=t["sample_fraction"],
                sample_tokens=t["sample_tokens"],
                sample_group=t["sample_group"],
                sample_index=t["sample_index"],
                sample_counts=t.get("sample_counts"),
                meta=meta.get("meta", {}),
            )
        except KeyError as exc:
            raise FormatError(f"{directory} lacks the entry {exc}; the files are incomplete") from None
        except FormatError as exc:
            raise FormatError(f"{directory}: {exc}") from None


def _meta_checksum(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the metadata (without its own checksum) in canonical JSON, tensor checksum included."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_invariants(st: ActivationStats) -> None:
    """Shapes, dtypes, unique names and count ranges; FormatError naming what is wrong."""
    for name in ("counts", "tokens", "sample_tokens", "sample_group", "sample_index"):
        t = getattr(st, name)
        if not isinstance(t, torch.Tensor) or t.dtype not in _INT_DTYPES:
            raise FormatError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if st.counts.dim() != 3:
        raise FormatError(f"counts must be [layers, neurons, groups], got shape {tuple(st.counts.shape)}")
    num_layers, _, num_groups = st.counts.shape
    if len(st.groups) != num_groups or st.tokens.shape != (num_groups,):
        raise FormatError(
            f"counts have {num_groups} groups, tokens {tuple(st.tokens.shape)}, "
            f"names {len(st.groups)}: they must agree"
        )
    if len(set(st.groups)) != len(st.groups):
        dup = sorted({g for g in st.groups if st.groups.count(g) > 1})
        raise FormatError(f"group names {dup} appear more than once; each group is one language")
    if len(st.layers) != num_layers:
        raise FormatError(f"counts have {num_layers} layers but {len(st.layers)} layer ids")
    if len(set(st.layers)) != len(st.layers) or any(x < 0 for x in st.layers):
        raise FormatError(f"layer ids {st.layers} must be distinct non-negative integers")
    s = st.sample_fraction.shape[0] if st.sample_fraction.dim() else -1
    for name in ("sample_tokens", "sample_group", "sample_index"):
        if getattr(st, name).shape != (s,):
            raise FormatError(f"{name} has shape {tuple(getattr(st, name).shape)}, expected ({s},)")
    if st.sample_fraction.shape != (s, num_layers):
        raise FormatError(f"sample_fraction has shape {tuple(st.sample_fraction.shape)}, expected ({s}, {num_layers})")
    if bool((st.tokens < 0).any()):
        raise FormatError(f"token counts {st.tokens.tolist()} must not be negative")
    if st.counts.numel():
        if bool((st.counts < 0).any()):
            raise FormatError("counts hold negative values; a neuron fires on 0 or more tokens")
        too_many = st.counts > st.tokens.to(st.counts.dtype)[None, None, :]
        if bool(too_many.any()):
            layer_row, _, g = (int(x) for x in too_many.nonzero()[0])
            raise FormatError(
                f"counts exceed the token count (layer {st.layers[layer_row]}, group {st.groups[g]!r}: "
                f"a neuron cannot fire on more than the {int(st.tokens[g])} tokens seen)"
            )
    if s > 0:
        if bool(((st.sample_group < 0) | (st.sample_group >= num_groups)).any()):
            raise FormatError(f"sample_group holds ids outside 0..{num_groups - 1} ({num_groups} groups)")
        if bool((st.sample_index < 0).any()) or bool((st.sample_tokens < 0).any()):
            raise FormatError("sample_index and sample_tokens must not be negative")
        frac = st.sample_fraction
        if not frac.is_floating_point() or not bool(((frac >= 0) & (frac <= 1)).all()):
            raise FormatError("sample_fraction must hold fractions between 0 and 1")
    if st.sample_counts is not None:
        sc = st.sample_counts
        if sc.shape != (s, num_layers, st.counts.shape[1]) or sc.dtype not in _INT_DTYPES:
            raise FormatError(
                f"sample_counts has shape {tuple(sc.shape)} / {sc.dtype}, expected integers of shape "
                f"({s}, {num_layers}, {st.counts.shape[1]})"
            )
        if sc.numel() and (bool((sc < 0).any()) or bool((sc > st.sample_tokens[:, None, None]).any())):
            raise FormatError("sample_counts must lie between 0 and each sample's token count")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _parse_variant(variant: str, tau: float) -> tuple[str, float]:
    if variant.startswith("set@"):
        try:
            return "set", float(variant[4:])
        except ValueError:
            raise InvalidInputError(f"bad activation-ratio variant {variant!r}; e.g. 'set@0.5'") from None
    if variant not in ("mean", "set"):
        raise InvalidInputError(f"unknown activation-ratio variant {variant!r}; use 'mean' or 'set@TAU'")
    return variant, tau

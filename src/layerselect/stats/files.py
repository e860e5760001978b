"""The on-disk format of :class:`~layerselect.stats.ActivationStats`, and the checks every value passes.

A stats folder holds ``stats.safetensors`` (the tensors) and ``stats.json``
(groups, layers, provenance, the SHA-256 of the tensor file and a checksum of
the metadata itself). Files may be hostile: :func:`read_stats` refuses anything
that is not exactly what :func:`write_stats` wrote, and :func:`check_invariants`
(run by every ``ActivationStats``, loaded or built) refuses inconsistent shapes,
dtypes and counts with a :class:`~layerselect.errors.FormatError` saying what is wrong.

Example:
    >>> from layerselect.stats.files import read_stats
    >>> stats.save("stats/")                                                     # doctest: +SKIP
    >>> ActivationStats(**read_stats("stats/")) == stats   # what load does      # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._io import atomic_directory, check_format_version, read_json, write_json
from ..errors import FormatError

if TYPE_CHECKING:  # only for annotations: stats.py imports this module
    from .value import ActivationStats

__all__ = [
    "STATS_FORMAT_VERSION", "DEFINITIONS_VERSION", "TENSOR_FILE", "META_FILE",
    "write_stats", "read_stats", "check_invariants",
]

#: Version of the on-disk layout (``stats.json`` + ``stats.safetensors``).
STATS_FORMAT_VERSION = 2
#: Version of the *definitions* (what "fired" and "token" mean); bump if they change.
DEFINITIONS_VERSION = 1

TENSOR_FILE = "stats.safetensors"
META_FILE = "stats.json"


def _library_version() -> str:
    from .._version import __version__

    return __version__


def write_stats(
    directory: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    groups: Sequence[str],
    layers: Sequence[int],
    meta: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``stats.safetensors`` + ``stats.json`` as the folder ``directory``, atomically."""
    directory = Path(directory)
    with atomic_directory(directory, META_FILE, overwrite=overwrite, what="stats folder") as tmp:
        save_file(dict(tensors), str(tmp / TENSOR_FILE))
        record = {
            "format_version": STATS_FORMAT_VERSION,
            "definitions_version": DEFINITIONS_VERSION,
            "library_version": _library_version(),
            "groups": list(groups),
            "layers": list(layers),
            "intermediate_size": int(tensors["counts"].shape[1]),
            "tensor_sha256": _sha256(tmp / TENSOR_FILE),
            "meta": meta,
        }
        record["checksum"] = _meta_checksum(record)
        write_json(tmp / META_FILE, record)
    return directory


def read_stats(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The constructor arguments of ``ActivationStats`` stored in ``directory``, checksums verified.

    Corrupt, edited, incomplete or foreign files raise :class:`~layerselect.errors.FormatError`.
    """
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
        required = {name: t[name] for name in _REQUIRED_TENSORS}
    except KeyError as exc:
        raise FormatError(f"{directory} lacks the entry {exc}; the files are incomplete") from None
    return {
        **required,
        "groups": groups,
        "layers": layers,
        "sample_counts": t.get("sample_counts"),
        "meta": meta.get("meta", {}),
    }


_REQUIRED_TENSORS = ("counts", "tokens", "sample_fraction", "sample_tokens", "sample_group", "sample_index")


def _meta_checksum(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the metadata (without its own checksum) in canonical JSON, tensor checksum included."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_invariants(st: ActivationStats) -> None:
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
    _check_count_ranges(st, s, num_groups)


def _check_count_ranges(st: ActivationStats, s: int, num_groups: int) -> None:
    """No negative counts, none above the tokens seen, ids in range, fractions in [0, 1]."""
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
        if sc.shape != (s, st.num_layers, st.counts.shape[1]) or sc.dtype not in _INT_DTYPES:
            raise FormatError(
                f"sample_counts has shape {tuple(sc.shape)} / {sc.dtype}, expected integers of shape "
                f"({s}, {st.num_layers}, {st.counts.shape[1]})"
            )
        if sc.numel() and (bool((sc < 0).any()) or bool((sc > st.sample_tokens[:, None, None]).any())):
            raise FormatError("sample_counts must lie between 0 and each sample's token count")

"""Streaming merge of an adapter into a (sharded) safetensors checkpoint.

``merge_checkpoint(base_dir, adapter_dir, out_dir)`` writes a normal Hugging Face
checkpoint (same shard layout, index, config and tokenizer files) in which the
targeted matrices hold ``apply_delta(W_base, delta)``, the same arithmetic (and
patches) as an in-memory load, so the result equals
``SelectiveFFNModel.from_pretrained(base, adapter).merge_and_unload()`` bit for bit.

Memory: shards are never loaded whole. One shard is open at a time, through
``safetensors.safe_open``; each targeted tensor is read with ``get_tensor``, merged
and written before the next one is read, and untouched tensors are copied in
slices of about 16 MiB (``get_slice``). Peak memory is therefore about the largest
*targeted tensor* (times three: the read, the float32 sum, the result) plus the
adapter's deltas, independent of shard and model size (the open shard is
memory-mapped by safetensors: page cache the OS can drop, not allocated memory).

Example:
    >>> from layerselect.selective_ffn import merge_checkpoint
    >>> merge_checkpoint("llama-2-7b/", "adapter/", "llama-2-7b-slam/")   # doctest: +SKIP

or from the shell: ``layerselect merge --base llama-2-7b/ --adapter adapter/ --out llama-2-7b-slam/``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_directory, check_output_path, contained_file, read_json, write_json
from .._progress import progress as progress_bar
from ..errors import BaseModelMismatchError, FormatError, InvalidInputError
from .adapter_file import AdapterFile, read_adapter
from .delta import apply_delta, apply_patch, dtype_name
from .loading import check_structure, fingerprint_matches
from .tensorfile import (
    TensorInfo,
    iter_tensor_pieces,
    open_safetensors,
    read_safetensors_header,
    tensor_bytes,
    tensor_infos,
    write_safetensors_header,
)

__all__ = ["merge_checkpoint", "checkpoint_shards"]

_CHUNK = 16 << 20
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PROVENANCE = "layerselect_merge.json"

Transform = Callable[[str, torch.Tensor], torch.Tensor]


def checkpoint_shards(base_dir: str | os.PathLike[str]) -> tuple[list[str], dict[str, str], dict[str, Any] | None]:
    """``(shard file names, tensor name -> shard, index json or None)`` of a safetensors checkpoint.

    Example:
        >>> shards, weight_map, index = checkpoint_shards("llama-2-7b/")   # doctest: +SKIP
        >>> shards                                                         # doctest: +SKIP
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    base_dir = Path(base_dir)
    index_path = base_dir / _INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{index_path} is not a valid safetensors index ({exc})") from None
        for tensor, shard in weight_map.items():
            if not isinstance(tensor, str):
                raise FormatError(f"{index_path}: tensor name {tensor!r} is not a string")
            # A shard is a plain file name in the base folder: never a path the index chooses.
            contained_file(base_dir, shard, what=f"shard name for {tensor} in {_INDEX}")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (base_dir / shard).is_file():
                raise FormatError(f"{index_path} lists the shard {shard}, which is not in {base_dir}")
        return shards, weight_map, index
    if (base_dir / _SINGLE).is_file():
        return [_SINGLE], dict.fromkeys(read_safetensors_header(base_dir / _SINGLE), _SINGLE), None
    raise InvalidInputError(
        f"{base_dir} is not a safetensors checkpoint directory (no {_INDEX} or {_SINGLE}); "
        "convert .bin checkpoints with save_pretrained first"
    )


def _num_layers(base_dir: Path) -> int | None:
    try:
        cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(c, dict) and isinstance(c.get("num_hidden_layers"), int):
            return c["num_hidden_layers"]
    return None


class _LazyTensors(Mapping[str, torch.Tensor]):
    """The checkpoint's tensors by name, each read from its shard only when asked for (validation only)."""

    def __init__(self, base_dir: Path, weight_map: Mapping[str, str]):
        self.base_dir, self.weight_map = base_dir, weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        with open_safetensors(self.base_dir / self.weight_map[name]) as fh:
            return fh.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


def _base_infos(base_dir: Path, shards: list[str], weight_map: Mapping[str, str]) -> dict[str, dict[str, TensorInfo]]:
    """Every shard's header, validated (safetensors checks each file's size and byte ranges)."""
    infos = {s: read_safetensors_header(base_dir / s) for s in shards}
    for name, shard in weight_map.items():
        if name not in infos[shard]:
            raise FormatError(f"{base_dir / _INDEX} maps {name} to {shard}, which does not contain it")
    return infos


def _check_paths(base_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if not base_dir.is_dir():
        raise InvalidInputError(f"base checkpoint {base_dir} is not a folder")
    base_real, out_real = base_dir.resolve(), out_dir.resolve()
    if out_real == base_real or base_real.is_relative_to(out_real) or out_real.is_relative_to(base_real):
        raise InvalidInputError(
            f"out_dir {out_dir} must be outside base_dir {base_dir} (and not contain it): the merge writes a "
            "new checkpoint"
        )
    check_output_path(out_dir, _PROVENANCE, overwrite=overwrite, what="merge output")


def _delta_transform(adapter: AdapterFile, scale: float, same_base: bool) -> Transform:
    """``(name, base weight) -> merged weight``, with the same arithmetic and patches as an in-memory load."""
    deltas = adapter.load_tensors()

    def transform(name: str, weight: torch.Tensor) -> torch.Tensor:
        new = apply_delta(weight, deltas[name], scale)
        if same_base and scale == 1.0 and name in adapter.patches:
            apply_patch(new, *adapter.patches[name])
        return new

    return transform


def _write_shard(
    src: Path,
    dst: Path,
    transform: Transform,
    targets: set[str],
    cast: torch.dtype | None,
    advance: Callable[[int], Any] = lambda n: None,
) -> int:
    """Copy one shard tensor by tensor, transforming ``targets`` (and casting floats if asked).

    Returns the size of the written tensor data. ``advance(n)`` is called with the
    bytes of each source piece once it is written.
    """
    with open_safetensors(src) as fh:
        infos = tensor_infos(fh, src)
        if not targets <= set(infos):
            raise FormatError(f"{src} changed during the merge: it no longer holds {sorted(targets - set(infos))}")
        out = {n: TensorInfo(cast if cast is not None and i.dtype.is_floating_point else i.dtype, i.shape)
               for n, i in infos.items()}
        metadata = {**(fh.metadata() or {})}
        metadata.setdefault("format", "pt")
        with open(dst, "wb") as fout:
            total = write_safetensors_header(fout, out, metadata)
            for name, info in infos.items():
                if name in targets:
                    fout.write(tensor_bytes(transform(name, fh.get_tensor(name).to(out[name].dtype))))
                    advance(info.nbytes)
                    continue
                for piece in iter_tensor_pieces(fh, name, info, _CHUNK):
                    fout.write(tensor_bytes(piece.to(out[name].dtype)))
                    advance(piece.numel() * piece.element_size())
    return total


def _finish_output(tmp: Path, base_dir: Path, shards: list[str], index: dict[str, Any] | None,
                   total: int, cast: torch.dtype | None) -> None:
    """The non-tensor files: the base's other files, the index with its new size, the dtype in config.json."""
    for f in base_dir.iterdir():
        if f.is_file() and f.name not in shards and f.name != _INDEX and not f.name.startswith("."):
            shutil.copy2(f, tmp / f.name)
    if index is not None:
        index = dict(index)
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
        write_json(tmp / _INDEX, index)
    if cast is not None and (tmp / "config.json").is_file():
        cfg = read_json(tmp / "config.json", "the base checkpoint's config")
        if not isinstance(cfg, dict):
            raise FormatError(f"{base_dir / 'config.json'} is not a JSON object")
        name = dtype_name(cast)
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = name
        cfg.setdefault("dtype", name)
        write_json(tmp / "config.json", cfg)


def merge_checkpoint(
    base_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    strict: bool = True,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge an adapter into a safetensors checkpoint, streaming tensor by tensor.

    Args:
        base_dir: a Hugging Face checkpoint directory (``model.safetensors`` or
            ``model.safetensors.index.json`` + shards).
        adapter_dir: an adapter written by ``SelectiveFFNModel.save_pretrained``.
        out_dir: where to write the merged checkpoint (atomically; other files of
            ``base_dir`` such as ``config.json`` and tokenizer files are copied).
        scale: multiply the deltas (patches apply only at 1.0).
        strict: check the fingerprint of the base's targeted weights (shapes and
            layer count are always checked).
        dtype: cast floating tensors to this dtype first (e.g. the dtype you trained
            in, so that the merge reproduces the trained weights exactly); default:
            keep the checkpoint's dtypes.
        overwrite: replace an ``out_dir`` that holds something other than an
            earlier merge (an earlier merge is always replaced whole).
        progress: a bar over the bytes of the shards on stderr (plain lines when
            stderr is not a terminal).

    Everything is validated before anything is written; the output folder is
    built next to ``out_dir`` and swapped in whole at the end.
    """
    from ..models import parse_dtype

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _check_paths(base_dir, out_dir, overwrite)
    cast = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if not math.isfinite(scale):
        raise InvalidInputError(f"scale must be finite, got {scale}")
    adapter = read_adapter(adapter_dir)
    shards, weight_map, index = checkpoint_shards(base_dir)
    infos = _base_infos(base_dir, shards, weight_map)
    where = f"checkpoint {base_dir}"
    check_structure(adapter, {n: infos[s][n] for n, s in weight_map.items()}, _num_layers(base_dir), what=where)
    # Reads only the targeted tensors (one at a time) for the fingerprint.
    same_base = fingerprint_matches(adapter, _LazyTensors(base_dir, weight_map), strict=strict, what=where)
    if not set(adapter.tensors) <= set(weight_map):
        raise BaseModelMismatchError(f"checkpoint {base_dir} lacks {sorted(set(adapter.tensors) - set(weight_map))}")
    transform = _delta_transform(adapter, scale, same_base)
    targets_by_shard: dict[str, set[str]] = {}
    for name in adapter.tensors:
        targets_by_shard.setdefault(weight_map[name], set()).add(name)

    size = sum(info.nbytes for shard in infos.values() for info in shard.values())
    with (
        atomic_directory(out_dir, _PROVENANCE, overwrite=overwrite, what="merge output") as tmp,
        progress_bar(total=size, desc="merge", unit="B", unit_scale=True, unit_divisor=1024,
                     disable=not progress) as bar,
    ):
        total = sum(_write_shard(base_dir / shard, tmp / shard, transform, targets_by_shard.get(shard, set()),
                                 cast, bar.update) for shard in shards)
        _finish_output(tmp, base_dir, shards, index, total, cast)
        write_json(tmp / _PROVENANCE, {
            "base": str(base_dir), "adapter": str(adapter.directory), "scale": scale,
            "strict": strict, "adapter_weights_sha256": adapter.meta.get("weights_sha256"),
            "layers": adapter.config.layers, "target_modules": adapter.config.target_modules,
        })
    return out_dir

"""Streaming merge of an adapter into a (sharded) safetensors checkpoint.

``merge_checkpoint(base_dir, adapter_dir, out_dir)`` writes a normal Hugging Face
checkpoint (same shard layout, index, config and tokenizer files) in which the
targeted matrices hold ``apply_delta(W_base, delta)``, the same arithmetic (and
patches) as an in-memory load, so the result equals
``SelectiveFFNModel.from_pretrained(base, adapter).merge_and_unload()`` bit for bit.

Memory: shards are never loaded whole. Each tensor is read from its byte range,
(merged if targeted), and written to the output before the next one is read; untouched
tensors are copied in 16 MiB chunks. Peak memory is therefore about the largest
*targeted tensor* (times three: the read, the float32 sum, the result) plus the
adapter's deltas, independent of shard and model size.

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
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_directory, check_output_path, contained_file, write_json
from .._progress import progress as progress_bar
from ..errors import BaseModelMismatchError, FormatError, InvalidInputError
from .io import (
    ST_DTYPES,
    TORCH_TO_ST,
    _apply_patch,
    apply_delta,
    check_structure,
    fingerprint_matches,
    read_adapter,
    read_safetensors_header,
)

__all__ = ["merge_checkpoint", "checkpoint_shards"]

_CHUNK = 16 << 20
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PROVENANCE = "layerselect_merge.json"


def checkpoint_shards(base_dir: str | os.PathLike[str]) -> tuple[list[str], dict[str, str], dict[str, Any] | None]:
    """``(shard file names, tensor name -> shard, index json or None)`` of a safetensors checkpoint."""
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
        header, _ = read_safetensors_header(base_dir / _SINGLE)
        return [_SINGLE], {k: _SINGLE for k in header if k != "__metadata__"}, None
    raise InvalidInputError(
        f"{base_dir} is not a safetensors checkpoint directory (no {_INDEX} or {_SINGLE}); "
        "convert .bin checkpoints with save_pretrained first"
    )


def _num_layers(base_dir: Path) -> int | None:
    try:
        cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("num_hidden_layers"), int):
            return c["num_hidden_layers"]
    return None


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Read-on-demand view of named tensors across shards (for validation only)."""

    def __init__(self, base_dir: Path, weight_map: Mapping[str, str], headers: Mapping[str, tuple[dict, int]]):
        self.base_dir, self.weight_map, self.headers = base_dir, weight_map, headers

    def __getitem__(self, name: str) -> torch.Tensor:
        shard = self.weight_map[name]
        header, start = self.headers[shard]
        return _read_tensor(self.base_dir / shard, header[name], start)

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def __iter__(self):
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


class _Shape:
    def __init__(self, shape: list[int]):
        self.shape = tuple(shape)


class _HeaderShapes(Mapping[str, Any]):
    """Shapes without reading data (check_base reads .shape first, tensors only if strict)."""

    def __init__(self, lazy: _LazyTensors):
        self.lazy = lazy

    def __getitem__(self, name: str) -> Any:
        shard = self.lazy.weight_map[name]
        return _Shape(self.lazy.headers[shard][0][name]["shape"])

    def __contains__(self, name: object) -> bool:
        return name in self.lazy

    def __iter__(self):
        return iter(self.lazy)

    def __len__(self) -> int:
        return len(self.lazy)


class _TargetsOnly(Mapping[str, torch.Tensor]):
    def __init__(self, lazy: _LazyTensors, names: Mapping[str, Any]):
        self.lazy, self.names = lazy, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.lazy[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _read_tensor(path: Path, info: Mapping[str, Any], start: int) -> torch.Tensor:
    b, e = info["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(start + b)
        buf = bytearray(e - b)
        if fh.readinto(buf) != e - b:
            raise FormatError(f"{path} is truncated while reading a tensor")
    dtype = ST_DTYPES[info["dtype"]]
    if not buf:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def _write_shard(
    src: Path,
    dst: Path,
    header: Mapping[str, Any],
    start: int,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    targets: set[str],
    cast: torch.dtype | None,
    advance: Callable[[int], Any] = lambda n: None,
) -> int:
    """Copy one shard tensor by tensor, transforming ``targets`` (and casting floats if asked).

    ``advance(n)`` is called with the bytes of each source tensor once it is written.
    """
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    out_header: dict[str, Any] = {}
    if header.get("__metadata__") is not None:
        out_header["__metadata__"] = dict(header["__metadata__"])
    out_header.setdefault("__metadata__", {}).setdefault("format", "pt")
    offset = 0
    plan = []
    for name in names:
        info = header[name]
        dtype = ST_DTYPES[info["dtype"]]
        out_dtype = cast if (cast is not None and dtype.is_floating_point) else dtype
        nbytes = math.prod(info["shape"]) * torch.empty((), dtype=out_dtype).element_size()
        out_header[name] = {"dtype": TORCH_TO_ST[out_dtype], "shape": info["shape"],
                            "data_offsets": [offset, offset + nbytes]}
        plan.append((name, info, out_dtype != dtype or name in targets, out_dtype))
        offset += nbytes
    hbytes = json.dumps(out_header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(hbytes)))
        fout.write(hbytes)
        for name, info, convert, out_dtype in plan:
            b, e = info["data_offsets"]
            if convert:
                t = _read_tensor(src, info, start).to(out_dtype)
                if name in targets:
                    t = transform(name, t)
                fout.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                del t
                advance(e - b)
            else:
                fin.seek(start + b)
                left = e - b
                while left:
                    block = fin.read(min(_CHUNK, left))
                    if not block:
                        raise FormatError(f"{src} is truncated")
                    fout.write(block)
                    left -= len(block)
                    advance(len(block))
    return offset


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
    if not base_dir.is_dir():
        raise InvalidInputError(f"base checkpoint {base_dir} is not a folder")
    base_real, out_real = base_dir.resolve(), out_dir.resolve()
    if out_real == base_real or base_real.is_relative_to(out_real) or out_real.is_relative_to(base_real):
        raise InvalidInputError(
            f"--out {out_dir} must be outside --base {base_dir} (and not contain it): the merge writes a new checkpoint"
        )
    check_output_path(out_dir, _PROVENANCE, overwrite=overwrite, what="merge output")
    cast = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if not math.isfinite(scale):
        raise InvalidInputError(f"scale must be finite, got {scale}")
    adapter = read_adapter(adapter_dir)
    shards, weight_map, index = checkpoint_shards(base_dir)
    headers = {s: read_safetensors_header(base_dir / s) for s in shards}
    for name, shard in weight_map.items():
        if name not in headers[shard][0]:
            raise FormatError(f"{base_dir / _INDEX} maps {name} to {shard}, which does not contain it")
    lazy = _LazyTensors(base_dir, weight_map, headers)
    where = f"checkpoint {base_dir}"
    check_structure(adapter, _HeaderShapes(lazy), _num_layers(base_dir), what=where)
    # Reads only the targeted tensors (one at a time) for the fingerprint.
    same_base = fingerprint_matches(adapter, _TargetsOnly(lazy, adapter.tensors), strict=strict, what=where)
    deltas = adapter.load_tensors()

    def transform(name: str, weight: torch.Tensor) -> torch.Tensor:
        new = apply_delta(weight, deltas[name], scale)
        if same_base and scale == 1.0 and name in adapter.patches:
            _apply_patch(new, *adapter.patches[name])
        return new

    targets_by_shard: dict[str, set[str]] = {}
    for name in adapter.tensors:
        targets_by_shard.setdefault(weight_map[name], set()).add(name)
    if not set(adapter.tensors) <= set(weight_map):
        raise BaseModelMismatchError(f"checkpoint {base_dir} lacks {sorted(set(adapter.tensors) - set(weight_map))}")

    size = sum((base_dir / s).stat().st_size - headers[s][1] for s in shards)
    with (
        atomic_directory(out_dir, _PROVENANCE, overwrite=overwrite, what="merge output") as tmp,
        progress_bar(total=size, desc="merge", unit="B", unit_scale=True, unit_divisor=1024,
                     disable=not progress) as bar,
    ):
        total = 0
        for shard in shards:
            header, start = headers[shard]
            total += _write_shard(base_dir / shard, tmp / shard, header, start, transform,
                                  targets_by_shard.get(shard, set()), cast, bar.update)
        for f in base_dir.iterdir():
            if f.is_file() and f.name not in shards and f.name != _INDEX and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        if index is not None:
            index = dict(index)
            index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
            write_json(tmp / _INDEX, index)
        if cast is not None and (tmp / "config.json").is_file():
            cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            name = str(cast).removeprefix("torch.")
            for key in ("dtype", "torch_dtype"):
                if key in cfg:
                    cfg[key] = name
            cfg.setdefault("dtype", name)
            write_json(tmp / "config.json", cfg)
        (tmp / _PROVENANCE).write_text(
            json.dumps({
                "base": str(base_dir), "adapter": str(adapter.directory), "scale": scale,
                "strict": strict, "adapter_weights_sha256": adapter.meta.get("weights_sha256"),
                "layers": adapter.config.layers, "target_modules": adapter.config.target_modules,
            }, indent=2) + "\n", encoding="utf-8")
    return out_dir

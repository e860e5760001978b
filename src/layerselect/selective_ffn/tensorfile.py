"""safetensors files read through ``safetensors.safe_open``, with every error naming the file.

``safe_open`` validates the whole header before anything is read: that it is
JSON, that each tensor's byte range matches its dtype and shape, that the ranges
tile the data section and that the file is exactly as long as the header says
(neither truncated nor padded). This module turns its errors into
:class:`~layerselect.errors.FormatError` messages that name the file, and adds
the one thing safetensors lacks for a merge: writing a file one tensor at a time.
Its own module, not part of :mod:`.adapter_file`: merge reads base-model shards and
training resumes check ``checkpoint-N/`` files with it too, none of them adapters.

Example:
    >>> from layerselect.selective_ffn.tensorfile import read_safetensors_header
    >>> infos = read_safetensors_header("adapter/layerselect_deltas.safetensors")   # doctest: +SKIP
    >>> infos["model.layers.1.mlp.up_proj.weight"]                                  # doctest: +SKIP
    TensorInfo(dtype=torch.float32, shape=(48, 32))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import FormatError

__all__ = [
    "ST_DTYPES",
    "TORCH_TO_ST",
    "TensorInfo",
    "open_safetensors",
    "tensor_infos",
    "read_safetensors_header",
    "load_safetensors",
    "iter_tensor_pieces",
    "write_safetensors_header",
    "tensor_bytes",
    "sha256_file",
]

# safetensors dtype codes <-> torch dtypes (safetensors.torch keeps its own table private).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        ST_DTYPES[_code] = getattr(torch, _name)
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


class TensorInfo(NamedTuple):
    """A tensor's dtype and shape as a safetensors header declares them."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike[str]) -> Iterator[Any]:
    """``safe_open(path, framework="pt")``, its header validated, errors as :class:`FormatError` naming ``path``.

    Example:
        >>> with open_safetensors("model.safetensors") as fh:   # doctest: +SKIP
        ...     w = fh.get_tensor("lm_head.weight")
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise FormatError(f"{path} is not a valid safetensors file ({exc}): corrupt or truncated") from None
    with handle as fh:
        yield fh


def tensor_infos(fh: Any, path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """``{name: TensorInfo}`` of a file opened with :func:`open_safetensors`, in file order."""
    # offset_keys (file order, for sequential reads) is missing from older safetensors releases.
    names = fh.offset_keys() if hasattr(fh, "offset_keys") else fh.keys()
    infos = {}
    for name in names:
        piece = fh.get_slice(name)
        code = piece.get_dtype()
        if code not in ST_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {code}, which torch cannot hold here")
        infos[name] = TensorInfo(ST_DTYPES[code], tuple(int(x) for x in piece.get_shape()))
    return infos


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Validate a safetensors file's header and return ``{tensor name: TensorInfo}`` in file order.

    Reads no tensor data. Raises :class:`FormatError` naming the file when it is
    missing, truncated, padded or otherwise corrupt (see the module docstring).

    Example:
        >>> read_safetensors_header("layerselect_deltas.safetensors")   # doctest: +SKIP
        {'model.layers.1.mlp.up_proj.weight': TensorInfo(dtype=torch.float32, shape=(48, 32)), ...}
    """
    with open_safetensors(path) as fh:
        return tensor_infos(fh, path)


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) safetensors file, on CPU; errors as :class:`FormatError` naming the file."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise FormatError(f"could not read {path}: {exc}") from None


def iter_tensor_pieces(fh: Any, name: str, info: TensorInfo, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """A tensor of an open file in slices of whole rows of about ``chunk_bytes`` (one row at least).

    Copying a large tensor this way never holds more than one slice in memory.
    """
    if not info.shape:
        yield fh.get_tensor(name)
        return
    rows = info.shape[0]
    row_bytes = info.nbytes // rows if rows else 0
    step = max(1, chunk_bytes // max(1, row_bytes))
    piece = fh.get_slice(name)
    for start in range(0, rows, step):
        yield piece[start:start + step]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors_header(fout: IO[bytes], infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> int:
    """Write a safetensors header for tensors that will follow in ``infos`` order; returns the data size.

    Hand-written because safetensors only writes files from tensors all in memory
    (``save_file``, ``serialize_file``); a merge writes one tensor at a time after it.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, info in infos.items():
        header[name] = {"dtype": TORCH_TO_ST[info.dtype], "shape": list(info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    fout.write(struct.pack("<Q", len(raw)))
    fout.write(raw)
    return offset


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()

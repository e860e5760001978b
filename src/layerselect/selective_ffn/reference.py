"""Where a :class:`SelectiveFFNModel` keeps the original targeted matrices: host RAM or a temporary file.

Saving deltas and ``unmerge()`` need the base values of the trained matrices;
the wrapper keeps only those, off the accelerator.

Example:
    >>> import torch
    >>> ref = Reference({"w": torch.ones(2, 2)}, "cpu")
    >>> ref.nbytes, torch.equal(ref.get("w"), torch.ones(2, 2))
    (16, True)
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._dist import gather_full
from ..errors import InvalidInputError

__all__ = ["Reference", "ReferenceMode"]

ReferenceMode = Literal["cpu", "disk"] | None


class Reference:
    """Original values of the targeted matrices, in host RAM or in a temporary file."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], mode: str):
        self.mode = mode
        self.names = list(tensors)
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self._mem: dict[str, torch.Tensor] = {}
        self._file: Path | None = None
        if mode == "cpu":
            self._mem = {n: gather_full(t) for n, t in tensors.items()}  # one at a time if sharded
        elif mode == "disk":
            tmpdir = Path(tempfile.mkdtemp(prefix="layerselect-ref-"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, tmpdir, True)
            self._file = tmpdir / "reference.safetensors"
            # One tensor at a time would need a streaming writer; targets are small next to the model.
            save_file({n: gather_full(t).contiguous() for n, t in tensors.items()}, str(self._file))
        else:
            raise InvalidInputError(f"reference must be 'cpu', 'disk' or None, got {mode!r}")

    def get(self, name: str) -> torch.Tensor:
        if self._file is None:
            return self._mem[name]
        with safe_open(str(self._file), framework="pt") as fh:
            return fh.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.names:
            yield n, self.get(n)

    def close(self) -> None:
        self._mem = {}
        if self._file is not None:
            self._finalizer()
            self._file = None

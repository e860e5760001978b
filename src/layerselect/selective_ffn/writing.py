"""Writing an adapter folder: the delta file, the patches side file, and the JSON that describes them.

Example:
    >>> write_adapter("adapter/", config, results, base_dtypes, base_info, fingerprint)   # doctest: +SKIP
    PosixPath('adapter')
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .adapter_file import (
    ADAPTER_FORMAT_VERSION,
    CONFIG_NAME,
    FORMAT_NAME,
    LEGACY_NAMES,
    PATCHES_NAME,
    WEIGHTS_NAME,
)
from .config import SelectiveFFNConfig
from .delta import FINGERPRINT_METHOD, DeltaResult, dtype_name, fingerprint_digest
from .tensorfile import sha256_file

__all__ = ["write_adapter"]


def _patch_tensors(results: Mapping[str, DeltaResult]) -> dict[str, torch.Tensor]:
    """``{"<name>:index": flat positions, "<name>:bits": trained bit patterns}`` for patched matrices."""
    patches: dict[str, torch.Tensor] = {}
    for name, r in results.items():
        if r.patch_index.numel():
            patches[f"{name}:index"] = r.patch_index.to(torch.int64).contiguous()
            patches[f"{name}:bits"] = r.patch_bits.contiguous()
    return patches


def _reconstruction(results: Mapping[str, DeltaResult]) -> dict[str, Any]:
    """How exactly the stored deltas rebuild the trained weights, over all matrices."""
    sq_err = sum(r.sq_error for r in results.values())
    sq_norm = sum(r.sq_norm for r in results.values())
    mismatched = sum(r.mismatched for r in results.values())
    return {
        "exact": mismatched == 0,
        "mismatched_elements": mismatched,
        "total_elements": sum(r.delta.numel() for r in results.values()),
        "patched_elements": sum(r.patch_index.numel() for r in results.values()),
        "max_abs_error": max((r.max_abs_error for r in results.values()), default=0.0),
        "relative_error": math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0,
    }


def _adapter_meta(
    config: SelectiveFFNConfig,
    results: Mapping[str, DeltaResult],
    base_dtypes: Mapping[str, torch.dtype],
    base_info: Mapping[str, Any],
    fingerprint: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The content of ``layerselect_adapter.json`` before the checksums of the written files."""
    from .._version import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": ADAPTER_FORMAT_VERSION,
        "library": "layerselect",
        "library_version": __version__,
        "config": config.to_dict(),
        "base_model": {
            **dict(base_info),
            "fingerprint": {
                "method": FINGERPRINT_METHOD,
                "digest": fingerprint_digest(fingerprint),
                "tensors": {k: dict(fingerprint[k]) for k in sorted(fingerprint)},
            },
        },
        "tensors": {
            name: {
                "shape": list(results[name].delta.shape),
                "delta_dtype": dtype_name(results[name].delta.dtype),
                "base_dtype": dtype_name(base_dtypes[name]),
                "patched_elements": results[name].patch_index.numel(),
            }
            for name in sorted(results)
        },
        "reconstruction": _reconstruction(results),
        "weights_file": WEIGHTS_NAME,
    }


def write_adapter(
    directory: str | os.PathLike[str],
    config: SelectiveFFNConfig,
    results: Mapping[str, DeltaResult],
    base_dtypes: Mapping[str, torch.dtype],
    base_info: Mapping[str, Any],
    fingerprint: Mapping[str, Mapping[str, Any]],
    *,
    overwrite: bool = False,
    into_existing: bool = False,
) -> Path:
    """Write ``layerselect_adapter.json`` + ``layerselect_deltas.safetensors`` as the folder ``directory``.

    The folder is built whole next to ``directory`` and swapped in at the end, so a
    failure midway (full disk, crash, exception) leaves the previous adapter intact
    and a success leaves no stale file of it. A non-empty folder that is not an
    adapter is refused unless ``overwrite=True``. ``into_existing=True`` (training
    checkpoints, which also hold the Trainer's files) adds the adapter files to the
    folder instead, each by one atomic rename.
    """
    from .._io import atomic_directory, atomic_files, write_json

    deltas = {name: r.delta.contiguous() for name, r in results.items()}
    patches = _patch_tensors(results)
    meta = _adapter_meta(config, results, base_dtypes, base_info, fingerprint)
    writer = (
        atomic_files(directory, remove=[PATCHES_NAME, *LEGACY_NAMES]) if into_existing
        else atomic_directory(directory, CONFIG_NAME, overwrite=overwrite, what="adapter folder")
    )
    with writer as tmp:
        save_file(deltas, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        if patches:
            save_file(patches, str(tmp / PATCHES_NAME), metadata={"format": "pt"})
            meta["patches_file"] = PATCHES_NAME
            meta["patches_sha256"] = sha256_file(tmp / PATCHES_NAME)
        write_json(tmp / CONFIG_NAME, meta)
    return Path(directory)

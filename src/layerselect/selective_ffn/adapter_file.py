"""The adapter folder on disk: its names, format version, :func:`read_adapter` with every file check, :func:`write_adapter`.

An adapter folder holds (see ``docs/adapters.md`` for the full format):

- ``layerselect_deltas.safetensors``: one tensor per trained matrix, keyed by the base
  model's own parameter name (``model.layers.3.mlp.up_proj.weight``), holding
  ``delta = W_trained - W_base``;
- ``layerselect_adapter.json``: the :class:`SelectiveFFNConfig` (under ``"config"``) plus the format
  version, the library version, the base model's name, layer count and a
  fingerprint of the targeted base weights, per-tensor shapes/dtypes, the
  reconstruction error, and the SHA-256 of the tensor file;
- only when needed, ``layerselect_patches.safetensors``: the exactness patches
  (see :mod:`.delta`);
- ``README.md``: the model card (see :mod:`.card`), not covered by the checksums and
  ignored by every reader.

Example:
    >>> from layerselect.selective_ffn.adapter_file import read_adapter, write_adapter
    >>> write_adapter("adapter/", config, results, base_dtypes, base_info, fingerprint)   # doctest: +SKIP
    PosixPath('adapter')
    >>> adapter = read_adapter("adapter/")        # doctest: +SKIP
    >>> adapter.config.layers, sorted(adapter.tensors)[:1]   # doctest: +SKIP
    ([1], ['model.layers.1.mlp.down_proj.weight'])
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._io import check_format_version, read_json
from ..errors import FormatError
from .card import CARD_NAME, reconstruction_facts, render_card, user_card, warn_kept
from .config import SelectiveFFNConfig
from .delta import (
    DTYPE_NAMES,
    FINGERPRINT_METHOD,
    INT_VIEW,
    DeltaResult,
    dtype_name,
    fingerprint_digest,
)
from .tensorfile import load_safetensors, read_safetensors_header, sha256_file

__all__ = [
    "ADAPTER_FORMAT_VERSION",
    "CONFIG_NAME",
    "FORMAT_NAME",
    "LEGACY_NAMES",
    "PATCHES_NAME",
    "TENSOR_NAME",
    "WEIGHTS_NAME",
    "AdapterFile",
    "check_tensor_names",
    "read_adapter",
    "write_adapter",
]

FORMAT_NAME = "layerselect.selective_ffn"
ADAPTER_FORMAT_VERSION = 3
# Own file names, not PEFT's: tools that detect a PEFT adapter by ``adapter_config.json``
# (transformers' from_pretrained, vLLM, peft) would otherwise try to load it as one.
CONFIG_NAME = "layerselect_adapter.json"
WEIGHTS_NAME = "layerselect_deltas.safetensors"
PATCHES_NAME = "layerselect_patches.safetensors"
#: Format version 1 (layerselect 0.1) used PEFT's names; still read, never written.
LEGACY_NAMES = ("adapter_config.json", "adapter_model.safetensors", "adapter_patches.safetensors")

#: ``<layers path>.<layer>.<module>.<matrix>.weight``, e.g. ``model.layers.3.mlp.up_proj.weight``.
TENSOR_NAME = re.compile(
    r"^(?P<prefix>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\.(?P<layer>\d+)"
    r"\.(?P<module>[A-Za-z_][A-Za-z0-9_]*)\.(?P<attr>[A-Za-z_][A-Za-z0-9_]*)\.weight$"
)


def short_list(names: list[str], n: int = 4) -> str:
    """The first ``n`` names and how many more, for messages."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass
class AdapterFile:
    """A validated adapter directory (config parsed, checksum and header verified)."""

    directory: Path
    config: SelectiveFFNConfig
    meta: dict[str, Any]
    tensors: dict[str, dict[str, Any]]  # name -> {"shape", "dtype"}
    patches: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (flat index, trained bits)
    weights_name: str = WEIGHTS_NAME  # LEGACY_NAMES[1] for a format-1 folder

    @property
    def weights_path(self) -> Path:
        return self.directory / self.weights_name

    @property
    def num_layers(self) -> int | None:
        return self.meta.get("base_model", {}).get("num_layers")

    @property
    def fingerprint(self) -> dict[str, dict[str, Any]]:
        return self.meta.get("base_model", {}).get("fingerprint", {}).get("tensors", {})

    def load_tensors(self) -> dict[str, torch.Tensor]:
        out = load_safetensors(self.weights_path)
        if set(out) != set(self.tensors):
            raise FormatError(f"{self.weights_path} changed while reading")
        return out


def read_adapter(path: str | os.PathLike[str], verify_checksum: bool = True) -> AdapterFile:
    """Read and validate an adapter directory without touching any model.

    Raises :class:`FormatError` for a missing/corrupt/truncated file, a checksum
    mismatch, or a format version newer than this library reads.

    Example:
        >>> read_adapter("adapter/").config.target_modules   # doctest: +SKIP
        ['up', 'down']
    """
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    names = _file_names(directory)
    config_name, weights_name, _ = names
    meta, config = _read_config(directory, names)
    weights = directory / weights_name
    if not weights.is_file():
        raise FormatError(f"{directory}: {weights_name} is missing")
    if verify_checksum:
        _check_weights_checksum(directory / config_name, weights, meta.get("weights_sha256"))
    tensors = _declared_tensors(directory / config_name, weights, meta)
    check_tensor_names(config, tensors, where=str(weights))
    patches = _read_patches(directory, meta, tensors, verify_checksum, names)
    return AdapterFile(directory, config, meta, tensors, patches, weights_name)


def _file_names(directory: Path) -> tuple[str, str, str]:
    if not (directory / CONFIG_NAME).is_file() and (directory / LEGACY_NAMES[0]).is_file():
        return LEGACY_NAMES  # format 1; checked by _read_config (a PEFT adapter is refused by its format)
    return CONFIG_NAME, WEIGHTS_NAME, PATCHES_NAME


def _read_config(directory: Path, names: tuple[str, str, str]) -> tuple[dict[str, Any], SelectiveFFNConfig]:
    cfg_path = directory / names[0]
    if not cfg_path.is_file():
        raise FormatError(f"{directory} is not an adapter directory: {CONFIG_NAME} is missing")
    meta = read_json(cfg_path, "the adapter")
    if not isinstance(meta, dict):
        raise FormatError(f"{cfg_path} is not a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{cfg_path} is not a layerselect selective-FFN adapter (format={meta.get('format')!r}, "
            f"expected {FORMAT_NAME!r}); PEFT LoRA adapters load with peft, not layerselect"
        )
    written_by = meta.get("library_version")
    version = check_format_version(
        meta.get("format_version"), ADAPTER_FORMAT_VERSION, "adapter", where=directory,
        written_by=written_by if isinstance(written_by, str) else None,
    )
    if (version >= 2) != (names[0] == CONFIG_NAME):
        raise FormatError(
            f"{cfg_path} says format_version {version}, but format {'2+' if version >= 2 else 1} "
            f"folders name it {CONFIG_NAME if version >= 2 else LEGACY_NAMES[0]}"
        )
    try:
        if version >= 3:  # the config under its own key, checked strictly: a typo is an error
            config = SelectiveFFNConfig.from_dict(meta.get("config"))
        else:  # formats 1-2 spread the config among the file's metadata
            config = SelectiveFFNConfig.from_dict(
                {k: v for k, v in meta.items() if k in SelectiveFFNConfig.field_names()})
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{cfg_path}: invalid config ({exc})") from None
    except FormatError as exc:
        raise FormatError(f"{cfg_path}: {exc}") from None
    return meta, config


def _check_weights_checksum(cfg_path: Path, weights: Path, expected: Any) -> None:
    if not isinstance(expected, str):
        raise FormatError(f"{cfg_path} records no weights_sha256 checksum")
    actual = sha256_file(weights)
    if actual != expected:
        raise FormatError(
            f"{weights} does not match the checksum in {CONFIG_NAME} (sha256 {actual[:12]}... "
            f"!= {expected[:12]}...): the file is corrupt, truncated or was replaced"
        )


def _declared_tensors(cfg_path: Path, weights: Path, meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The tensors of the weights file, which must be exactly those the config lists, with its shapes."""
    stored = read_safetensors_header(weights)
    declared = meta.get("tensors")
    if not isinstance(declared, dict) or not declared:
        raise FormatError(f"{cfg_path} lists no tensors")
    if set(stored) != set(declared):
        raise FormatError(
            f"{weights} holds tensors {sorted(set(stored) ^ set(declared))} that disagree with {CONFIG_NAME}"
        )
    tensors = {}
    for name, info in stored.items():
        shape = list(info.shape)
        said = declared[name].get("shape", []) if isinstance(declared[name], dict) else None
        if not isinstance(said, list) or said != shape:
            raise FormatError(f"{weights}: {name} has shape {shape}, {CONFIG_NAME} says {said}")
        tensors[name] = {"shape": shape, "dtype": info.dtype}
    return tensors


def check_tensor_names(config: SelectiveFFNConfig, names: Iterable[str], where: str = "the adapter") -> None:
    """Refuse tensors that the config does not declare: another layer, another matrix, another model part.

    Each name must be ``<layers path>.<layer>.<ffn>.<matrix>.weight`` with the layer in
    ``config.layers`` and the matrix one of ``config.target_modules`` (under any family's
    name), all under one layers path, and every configured layer must be present.
    A file that is self-consistent but touches e.g. ``model.embed_tokens.weight`` is
    refused here, before any entry point applies it.
    """
    from ..arch import target_parameter_suffixes

    allowed = target_parameter_suffixes(config.target_modules)
    layers = set(config.layers)
    bad, prefixes, seen = [], set(), set()
    for name in names:
        m = TENSOR_NAME.match(name)
        if not m or int(m["layer"]) not in layers or (m["module"], m["attr"]) not in allowed:
            bad.append(name)
            continue
        prefixes.add(m["prefix"])
        seen.add(int(m["layer"]))
    if bad:
        raise FormatError(
            f"{where} holds tensors outside what its config declares (layers {config.layers}, "
            f"targets {config.target_modules}): {short_list(sorted(bad))}; refusing to apply it "
            "(the file is corrupt or was edited)"
        )
    if len(prefixes) > 1:
        raise FormatError(f"{where} mixes tensors of different layer stacks {sorted(prefixes)}; the file is corrupt")
    if seen != layers:
        raise FormatError(f"{where} has no tensors for layers {sorted(layers - seen)} that its config declares")


def _read_patches(
    directory: Path,
    meta: Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, Any]],
    verify: bool,
    names: tuple[str, str, str] = (CONFIG_NAME, WEIGHTS_NAME, PATCHES_NAME),
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    config_name, _, patches_name = names
    name = meta.get("patches_file")
    if not name:
        return {}
    if name != patches_name:
        # File names inside a config are fixed; never a path the file chooses.
        raise FormatError(
            f"{directory / config_name} names the patches file {name!r}; only {patches_name!r} "
            "inside the adapter folder is allowed (the config is corrupt or hostile)"
        )
    path = directory / patches_name
    if not path.is_file():
        raise FormatError(f"{directory}: {name} (exactness patches named in {config_name}) is missing")
    if verify and sha256_file(path) != meta.get("patches_sha256"):
        raise FormatError(f"{path} does not match the checksum in {config_name}: corrupt or truncated")
    raw = load_safetensors(path)
    out = {}
    for key, index in raw.items():
        if key.endswith(":index"):
            tname = key.removesuffix(":index")
            out[tname] = _checked_patch(path, tname, index, raw.get(f"{tname}:bits"), tensors, meta)
    if 2 * len(out) != len(raw):
        raise FormatError(f"{path}: unexpected entries {sorted(raw)}")
    return out


def _checked_patch(
    path: Path,
    tname: str,
    index: torch.Tensor,
    bits: torch.Tensor | None,
    tensors: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    numel = math.prod(tensors[tname]["shape"]) if tname in tensors else 0
    if (
        tname not in tensors or bits is None or index.dtype != torch.int64 or index.dim() != 1
        or bits.shape != index.shape or (index.numel() and not (int(index.min()) >= 0 and int(index.max()) < numel))
    ):
        raise FormatError(f"{path}: invalid patch entry for {tname!r}")
    base_dtype = DTYPE_NAMES.get(str(meta.get("tensors", {}).get(tname, {}).get("base_dtype")))
    if base_dtype is None or bits.dtype != INT_VIEW[base_dtype]:
        raise FormatError(f"{path}: patch bits for {tname!r} are {bits.dtype}, not the {base_dtype} base dtype")
    return index, bits


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
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
    card_facts: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``layerselect_adapter.json`` + ``layerselect_deltas.safetensors`` as the folder ``directory``.

    The folder is built whole next to ``directory`` and swapped in at the end, so a
    failure midway (full disk, crash, exception) leaves the previous adapter intact
    and a success leaves no stale file of it. A non-empty folder that is not an
    adapter is refused unless ``overwrite=True``. ``into_existing=True`` (training
    checkpoints, which also hold the Trainer's files) adds the adapter files to the
    folder instead, each by one atomic rename.

    With ``card_facts`` (see :func:`.card.adapter_facts`) the model card ``README.md`` is
    written too. A README.md of the user's (one without our marker, or our card edited)
    is never replaced: when an adapter is saved over, it is carried into the new folder.
    ``README.md`` is not covered by the checksums and readers ignore it.
    """
    from .._io import atomic_directory, atomic_files, atomic_write_text, write_json

    deltas = {name: r.delta.contiguous() for name, r in results.items()}
    patches = _patch_tensors(results)
    meta = _adapter_meta(config, results, base_dtypes, base_info, fingerprint)
    target = Path(directory)
    # The user's README.md survives a save over an adapter (or into a shared checkpoint folder);
    # a folder that is not an adapter, replaced with overwrite=True, is replaced whole.
    is_adapter = into_existing or (target / CONFIG_NAME).is_file() or (target / LEGACY_NAMES[0]).is_file()
    kept = user_card(target) if is_adapter else None
    kept_link = kept is not None and kept.is_symlink()
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
        if kept is not None:
            # into_existing leaves it where it is. A symbolic link is not followed: its target's content
            # never lands in the adapter folder (and the folder's permission fix-up never reaches it).
            if not into_existing and kept.is_file() and not kept_link:
                shutil.copy2(kept, tmp / CARD_NAME)
        elif card_facts is not None:
            atomic_write_text(tmp / CARD_NAME, render_card({**card_facts, **reconstruction_facts(meta)}))
    if kept is not None and card_facts is not None:
        warn_kept(target, kept_link)
    return Path(directory)

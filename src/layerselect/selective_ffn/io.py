"""Delta adapters on disk: format, fingerprint, exact deltas, validation, ``load_deltas``.

An adapter directory holds two files (see ``docs/adapters.md`` for the full format):

- ``layerselect_deltas.safetensors``: one tensor per trained matrix, keyed by the base
  model's own parameter name (``model.layers.3.mlp.up_proj.weight``), holding
  ``delta = W_trained - W_base``;
- ``layerselect_adapter.json``: the :class:`SelectiveFFNConfig` fields plus the format
  version, the library version, the base model's name, layer count and a
  fingerprint of the targeted base weights, per-tensor shapes/dtypes, the
  reconstruction error, and the SHA-256 of the tensor file.

**Exactness.** Floating point does not guarantee ``W_b + (W_t - W_b) == W_t``: a
float32 difference is exact only when the two values are within a factor of two
(Sterbenz), so weights that change sign or halve would not round-trip. Lossless
deltas (float32, or float64 for float64 weights) are therefore computed from the
exact difference, then *verified* with the very arithmetic used to apply them
(:func:`apply_delta`); any element that does not reconstruct is recorded as a
*patch* (its flat index and the trained bit pattern) in a small side file,
``layerselect_patches.safetensors`` (only written when needed).
Applying with ``scale=1`` therefore reproduces the trained weights bit for bit on
the same base in the same dtype, by construction. Patches are needed only where a
weight crossed zero or shrank below half its base value (float32 deltas on
bf16/fp16 weights: only below 2**-16 of it, i.e. practically never); they cost 12-16
bytes per patched element and are ignored when ``scale != 1``. Lossy bf16/fp16 deltas have no patches; their maximum and relative
reconstruction errors are recorded instead.

**Fingerprint.** Per targeted matrix, the SHA-256 of the weights rounded to
bfloat16 (always through float32: ``w.float().bfloat16()``), plus their norm for
messages. It does not change when the same checkpoint is loaded in float32,
float64 or bfloat16 (the usual checkpoint dtypes bf16/fp16/fp32 hold values that
these loads keep or round identically), and any change to a weight larger than
bf16 rounding changes it. Loading a bf16/fp32 checkpoint in float16 is lossy and
does change it: use ``strict=False`` then.

Example:
    >>> from layerselect.selective_ffn import load_deltas
    >>> load_deltas(model, "adapter/")            # doctest: +SKIP
    >>> load_deltas(model, "adapter/", scale=0.5)  # half-strength  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._io import check_format_version, read_json
from ..errors import BaseModelMismatchError, FormatError, InvalidInputError
from .config import SelectiveFFNConfig

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "LEGACY_NAMES",
    "AdapterFile",
    "apply_delta",
    "compute_delta",
    "fingerprint_tensor",
    "load_deltas",
    "read_adapter",
    "read_safetensors_header",
    "check_base",
    "check_structure",
    "check_targets_match",
    "check_tensor_names",
    "fingerprint_matches",
    "sha256_file",
    "write_adapter",
]

FORMAT_NAME = "layerselect.selective_ffn"
FORMAT_VERSION = 2
# Own file names, not PEFT's: tools that detect a PEFT adapter by ``adapter_config.json``
# (transformers' from_pretrained, vLLM, peft) would otherwise try to load it as one.
CONFIG_NAME = "layerselect_adapter.json"
WEIGHTS_NAME = "layerselect_deltas.safetensors"
FINGERPRINT_METHOD = "sha256 of weights cast float32->bfloat16, per tensor"
PATCHES_NAME = "layerselect_patches.safetensors"
#: Format version 1 (layerselect 0.1) used PEFT's names; still read, never written.
LEGACY_NAMES = ("adapter_config.json", "adapter_model.safetensors", "adapter_patches.safetensors")

# safetensors dtype codes <-> torch dtypes.
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
_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32,
             torch.bfloat16: torch.int16, torch.float16: torch.int16}
_DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64,
                "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------------------
def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def apply_delta(base: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``base + scale * delta``, computed in float32 (float64 if either is float64), cast back to ``base.dtype``.

    This is *the* reconstruction rule: saving verifies deltas with it, and loading,
    merging and ``SelectiveFFNModel.from_pretrained`` all use it.
    """
    cd = _compute_dtype(base.dtype, delta.dtype)
    d = delta.to(device=base.device, dtype=cd)
    if scale != 1.0:
        d = d * scale
    return (base.to(cd) + d).to(base.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def resolve_delta_dtype(setting: str, weight_dtype: torch.dtype) -> torch.dtype:
    if setting == "auto":
        return torch.float64 if weight_dtype == torch.float64 else torch.float32
    return _DTYPE_NAMES[setting]


def is_lossless(delta_dtype: torch.dtype) -> bool:
    return delta_dtype in (torch.float32, torch.float64)


@dataclass
class DeltaResult:
    """A delta ready to store, with patches (lossless) or its reconstruction error (lossy)."""

    delta: torch.Tensor
    patch_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    patch_bits: torch.Tensor | None = None
    mismatched: int = 0  # elements whose reconstruction is not bitwise the trained value (after patches)
    max_abs_error: float = 0.0
    sq_error: float = 0.0
    sq_norm: float = 0.0


def compute_delta(trained: torch.Tensor, base: torch.Tensor, delta_dtype: torch.dtype) -> DeltaResult:
    """Delta such that ``apply_delta(base, delta)`` (plus patches) equals ``trained``.

    Lossless dtypes are verified bitwise and repaired (neighbouring delta, then
    patches); lossy ones report the reconstruction error.
    """
    if trained.shape != base.shape:
        raise InvalidInputError(f"trained shape {tuple(trained.shape)} != base shape {tuple(base.shape)}")
    trained = trained.detach().to("cpu").contiguous()
    base = base.detach().to("cpu", dtype=trained.dtype).contiguous()
    delta = (trained.double() - base.double()).to(delta_dtype)
    rec = apply_delta(base, delta)
    res = DeltaResult(delta=delta)
    bad = (_bits(rec) != _bits(trained)).view(-1)
    if is_lossless(delta_dtype) and bool(bad.any()):
        # Not reachable by any delta of this dtype under this arithmetic (a float32
        # sum of a float32 base and delta lands on a grid too coarse for weights
        # that shrank or crossed zero): record the trained bits instead.
        idx = bad.nonzero().view(-1)
        res.patch_index = idx
        res.patch_bits = _bits(trained).view(-1)[idx].clone()
        rec.view(-1)[idx] = trained.view(-1)[idx]
        bad = (_bits(rec) != _bits(trained)).view(-1)
    res.mismatched = int(bad.sum())
    err = (rec.double() - trained.double())
    res.max_abs_error = float(err.abs().max()) if err.numel() else 0.0
    res.sq_error = float((err * err).sum())
    res.sq_norm = float((trained.double() ** 2).sum())
    return res


# ----------------------------------------------------------------------------------------
# Fingerprint and checksums
# ----------------------------------------------------------------------------------------
def fingerprint_tensor(weight: torch.Tensor) -> dict[str, Any]:
    """``{"sha256": ..., "norm": ...}`` of a weight, independent of the dtype it was loaded in.

    Example:
        >>> import torch
        >>> w = torch.randn(4, 3, dtype=torch.bfloat16)
        >>> fingerprint_tensor(w)["sha256"] == fingerprint_tensor(w.double())["sha256"]
        True
    """
    w = weight.detach().to("cpu").to(torch.float32).to(torch.bfloat16).contiguous()
    h = hashlib.sha256()
    h.update(json.dumps(list(w.shape)).encode())
    h.update(w.view(torch.int16).numpy().tobytes())
    norm = float(w.double().norm()) if w.numel() else 0.0
    return {"sha256": h.hexdigest()[:32], "norm": float(f"{norm:.7g}")}


def fingerprint_digest(per_tensor: Mapping[str, Mapping[str, Any]]) -> str:
    h = hashlib.sha256()
    for name in sorted(per_tensor):
        h.update(f"{name}:{per_tensor[name]['sha256']};".encode())
    return h.hexdigest()[:32]


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header: ``(header, data_start)``.

    Checks that the header is JSON, that every tensor's byte range matches its
    dtype and shape, that ranges tile the data section, and that the file is not
    truncated. Raises :class:`FormatError` otherwise.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path} is truncated ({size} bytes): not a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise FormatError(f"{path} has a header length of {n} bytes but is {size} bytes long: corrupt or truncated")
            header = json.loads(fh.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: the safetensors header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    start = 8 + n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = [int(x) for x in info["shape"]]
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: bad header entry for tensor {name!r}: {info!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if e - b != nbytes:
            raise FormatError(f"{path}: tensor {name!r} spans {e - b} bytes, its dtype and shape need {nbytes}")
        spans.append((b, e))
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            raise FormatError(f"{path}: tensor data is not contiguous (gap or overlap at byte {b}); corrupt file")
        pos = e
    if start + pos != size:
        raise FormatError(
            f"{path} should be {start + pos} bytes from its header but is {size}: truncated or corrupt"
        )
    return header, start


# ----------------------------------------------------------------------------------------
# Reading an adapter
# ----------------------------------------------------------------------------------------
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
        try:
            out = load_file(str(self.weights_path))
        except Exception as exc:  # safetensors raises its own error types
            raise FormatError(f"could not read {self.weights_path}: {exc}") from None
        if set(out) != set(self.tensors):
            raise FormatError(f"{self.weights_path} changed while reading")
        return out


def read_adapter(path: str | os.PathLike[str], verify_checksum: bool = True) -> AdapterFile:
    """Read and validate an adapter directory without touching any model.

    Raises :class:`FormatError` for a missing/corrupt/truncated file, a checksum
    mismatch, or a format version newer than this library reads.
    """
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    names = (CONFIG_NAME, WEIGHTS_NAME, PATCHES_NAME)
    if not (directory / CONFIG_NAME).is_file() and (directory / LEGACY_NAMES[0]).is_file():
        names = LEGACY_NAMES  # format 1; checked below (a PEFT adapter is refused by its format)
    config_name, weights_name, patches_name = names
    cfg_path = directory / config_name
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
        meta.get("format_version"), FORMAT_VERSION, "adapter", where=directory,
        written_by=written_by if isinstance(written_by, str) else None,
    )
    if (version >= 2) != (names[0] == CONFIG_NAME):
        raise FormatError(
            f"{cfg_path} says format_version {version}, but format {'2+' if version >= 2 else 1} "
            f"folders name it {CONFIG_NAME if version >= 2 else LEGACY_NAMES[0]}"
        )
    try:
        config = SelectiveFFNConfig.from_dict(meta)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{cfg_path}: invalid config ({exc})") from None
    weights = directory / weights_name
    if not weights.is_file():
        raise FormatError(f"{directory}: {weights_name} is missing")
    expected = meta.get("weights_sha256")
    if verify_checksum:
        if not isinstance(expected, str):
            raise FormatError(f"{cfg_path} records no weights_sha256 checksum")
        actual = sha256_file(weights)
        if actual != expected:
            raise FormatError(
                f"{weights} does not match the checksum in {CONFIG_NAME} (sha256 {actual[:12]}... "
                f"!= {expected[:12]}...): the file is corrupt, truncated or was replaced"
            )
    header, _ = read_safetensors_header(weights)
    declared = meta.get("tensors")
    if not isinstance(declared, dict) or not declared:
        raise FormatError(f"{cfg_path} lists no tensors")
    stored = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(stored) != set(declared):
        raise FormatError(
            f"{weights} holds tensors {sorted(set(stored) ^ set(declared))} that disagree with {CONFIG_NAME}"
        )
    tensors = {}
    for name, info in stored.items():
        shape = list(info["shape"])
        if list(declared[name].get("shape", [])) != shape:
            raise FormatError(f"{weights}: {name} has shape {shape}, {CONFIG_NAME} says {declared[name].get('shape')}")
        tensors[name] = {"shape": shape, "dtype": ST_DTYPES[info["dtype"]]}
    check_tensor_names(config, tensors, where=str(weights))
    patches = _read_patches(directory, meta, tensors, verify_checksum, names)
    return AdapterFile(directory, config, meta, tensors, patches, weights_name)


_TENSOR_NAME = re.compile(
    r"^(?P<prefix>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\.(?P<layer>\d+)"
    r"\.(?P<module>[A-Za-z_][A-Za-z0-9_]*)\.(?P<attr>[A-Za-z_][A-Za-z0-9_]*)\.weight$"
)


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
        m = _TENSOR_NAME.match(name)
        if not m or int(m["layer"]) not in layers or (m["module"], m["attr"]) not in allowed:
            bad.append(name)
            continue
        prefixes.add(m["prefix"])
        seen.add(int(m["layer"]))
    if bad:
        raise FormatError(
            f"{where} holds tensors outside what its config declares (layers {config.layers}, "
            f"targets {config.target_modules}): {_short(sorted(bad))}; refusing to apply it "
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
    read_safetensors_header(path)
    try:
        raw = load_file(str(path))
    except Exception as exc:
        raise FormatError(f"could not read {path}: {exc}") from None
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, index in raw.items():
        if not key.endswith(":index"):
            continue
        tname = key.removesuffix(":index")
        bits = raw.get(f"{tname}:bits")
        numel = math.prod(tensors[tname]["shape"]) if tname in tensors else 0
        if (
            tname not in tensors or bits is None or index.dtype != torch.int64 or index.dim() != 1
            or bits.shape != index.shape or (index.numel() and not (int(index.min()) >= 0 and int(index.max()) < numel))
        ):
            raise FormatError(f"{path}: invalid patch entry for {tname!r}")
        base_dtype = _DTYPE_NAMES.get(str(meta.get("tensors", {}).get(tname, {}).get("base_dtype")))
        if base_dtype is None or bits.dtype != _INT_VIEW[base_dtype]:
            raise FormatError(f"{path}: patch bits for {tname!r} are {bits.dtype}, not the {base_dtype} base dtype")
        out[tname] = (index, bits)
    if 2 * len(out) != len(raw):
        raise FormatError(f"{path}: unexpected entries {sorted(raw)}")
    return out


# ----------------------------------------------------------------------------------------
# Matching an adapter against a base model
# ----------------------------------------------------------------------------------------
def _short(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_structure(
    adapter: AdapterFile,
    params: Mapping[str, Any],
    num_layers: int | None,
    what: str = "this model",
) -> None:
    """Refuse a base with another layer count, missing parameters or other shapes.

    ``params`` maps parameter names to anything with a ``.shape``.
    """
    base_name = _base_name(adapter)
    if adapter.num_layers is not None and num_layers is not None and adapter.num_layers != num_layers:
        raise BaseModelMismatchError(
            f"adapter {adapter.directory} was trained on {base_name!r} with {adapter.num_layers} decoder "
            f"layers; {what} has {num_layers}"
        )
    missing = [n for n in adapter.tensors if n not in params]
    if missing:
        raise BaseModelMismatchError(
            f"{what} has no parameter(s) {_short(missing)} that adapter {adapter.directory} "
            f"(trained on {base_name!r}) modifies; is it the same architecture?"
        )
    bad_shapes = [
        f"{n}: adapter {tuple(info['shape'])} vs base {tuple(params[n].shape)}"
        for n, info in adapter.tensors.items()
        if list(params[n].shape) != list(info["shape"])
    ]
    if bad_shapes:
        raise BaseModelMismatchError(
            f"shape mismatch between adapter {adapter.directory} (trained on {base_name!r}) and {what}: "
            + "; ".join(bad_shapes[:4])
            + (f" and {len(bad_shapes) - 4} more" if len(bad_shapes) > 4 else "")
        )


def _base_name(adapter: AdapterFile) -> str:
    recorded = adapter.meta.get("base_model", {})
    return recorded.get("name_or_path") or adapter.config.base_model_name_or_path or "?"


def fingerprint_matches(
    adapter: AdapterFile,
    params: Mapping[str, torch.Tensor],
    strict: bool = True,
    what: str = "this model",
) -> bool:
    """Compare the targeted weights with the adapter's base fingerprint.

    Returns True on a match; on a mismatch raises :class:`BaseModelMismatchError`
    naming the matrices that differ, or returns False when ``strict=False``.
    """
    expected = adapter.fingerprint
    if not expected:
        if not strict:
            return False
        raise BaseModelMismatchError(
            f"adapter {adapter.directory} records no base fingerprint; pass strict=False to apply it anyway"
        )
    differ = []
    for name in adapter.tensors:
        want = expected.get(name)
        got = fingerprint_tensor(params[name])
        if want is None or want.get("sha256") != got["sha256"]:
            norm = f"norm {got['norm']:.6g} vs {want.get('norm', float('nan')):.6g}" if want else "not fingerprinted"
            differ.append(f"{name} ({norm})")
    if not differ:
        return True
    if not strict:
        return False
    dtype = adapter.meta.get("base_model", {}).get("dtype", "?")
    raise BaseModelMismatchError(
        f"the targeted weights of {what} differ from the base adapter {adapter.directory} was trained on "
        f"({_base_name(adapter)!r}, {dtype}): {len(differ)} of {len(adapter.tensors)} matrices differ "
        f"beyond bfloat16 rounding: {_short(differ, 3)}. Typical causes: a different checkpoint, a base "
        "that already has this adapter merged, or a float16 load of a bf16/fp32 checkpoint. "
        "Pass strict=False to apply it anyway."
    )


def check_base(
    adapter: AdapterFile,
    params: Mapping[str, torch.Tensor],
    num_layers: int | None,
    strict: bool = True,
    what: str = "this model",
) -> bool:
    """:func:`check_structure` then :func:`fingerprint_matches`; returns whether the fingerprint matched."""
    check_structure(adapter, params, num_layers, what)
    return fingerprint_matches(adapter, params, strict, what)


def named_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from ..arch import unwrap_model

    return dict(unwrap_model(model).named_parameters())


def apply_adapter_tensors(
    params: Mapping[str, torch.Tensor],
    adapter: AdapterFile,
    deltas: Mapping[str, torch.Tensor],
    scale: float = 1.0,
    patch: bool = True,
) -> None:
    """Apply validated deltas in place (no validation here; call :func:`check_base` first).

    Exactness patches are applied only with ``patch=True`` (the base's fingerprint
    matched) and ``scale == 1``.
    """
    with torch.no_grad():
        for name, delta in deltas.items():
            p = params[name]
            new = apply_delta(p.data, delta, scale)
            if patch and scale == 1.0 and name in adapter.patches:
                _apply_patch(new, *adapter.patches[name])
            p.data.copy_(new)


def _apply_patch(weight: torch.Tensor, index: torch.Tensor, bits: torch.Tensor | None) -> None:
    if bits is None or index.numel() == 0:
        return
    if bits.dtype != _INT_VIEW.get(weight.dtype):
        return  # patches restore bits of the training dtype; another dtype cannot be exact anyway
    weight.view(-1)[index.to(weight.device)] = bits.view(weight.dtype).to(weight.device)


def check_targets_match(adapter: AdapterFile, model: nn.Module) -> None:
    """The adapter's tensors must be exactly the matrices its config targets on ``model``."""
    from ..arch import get_layout

    arch = get_layout(model)
    try:
        layers = arch.check_layers(adapter.config.layers)
    except InvalidInputError as exc:
        raise BaseModelMismatchError(f"adapter {adapter.directory} does not fit this model: {exc}") from None
    expected = {n for i in layers for n in arch.parameter_names(i, adapter.config.target_modules)}
    if expected != set(adapter.tensors):
        extra, missing = sorted(set(adapter.tensors) - expected), sorted(expected - set(adapter.tensors))
        raise BaseModelMismatchError(
            f"adapter {adapter.directory} holds tensors that do not match what its config targets on this "
            f"{arch.family} model (layers {adapter.config.layers}, targets {adapter.config.target_modules}): "
            + (f"unexpected {_short(extra)}" if extra else "")
            + ("; " if extra and missing else "")
            + (f"missing {_short(missing)}" if missing else "")
        )


def load_deltas(
    model: nn.Module,
    path: str | os.PathLike[str],
    scale: float = 1.0,
    strict: bool = True,
) -> AdapterFile:
    """Add an adapter's deltas to ``model``'s weights in place: ``W += scale * delta``.

    Everything is validated before any weight changes: the files (checksum,
    header, format version: :class:`FormatError`), then the model (layer count,
    names, shapes and, unless ``strict=False``, the fingerprint of the targeted
    weights: :class:`BaseModelMismatchError`). Returns the :class:`AdapterFile`.

    Example:
        >>> adapter = load_deltas(model, "adapter/")   # doctest: +SKIP
        >>> adapter.config.layers                      # doctest: +SKIP
        [0, 1, 2, 3, 4, 5]
    """
    from ..arch import get_layout

    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidInputError(f"scale must be a finite number, got {scale!r}")
    adapter = read_adapter(path)
    params = named_weights(model)
    check_targets_match(adapter, model)
    same_base = check_base(adapter, params, get_layout(model).num_layers, strict=strict)
    deltas = adapter.load_tensors()
    apply_adapter_tensors(params, adapter, deltas, scale, patch=same_base)
    return adapter


# ----------------------------------------------------------------------------------------
# Writing an adapter
# ----------------------------------------------------------------------------------------
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
    from .. import __version__
    from .._io import atomic_directory, atomic_files, write_json

    deltas = {name: r.delta.contiguous() for name, r in results.items()}
    patches: dict[str, torch.Tensor] = {}
    for name, r in results.items():
        if r.patch_index.numel():
            patches[f"{name}:index"] = r.patch_index.to(torch.int64).contiguous()
            patches[f"{name}:bits"] = r.patch_bits.contiguous()
    metadata = {"format": "pt"}
    sq_err = sum(r.sq_error for r in results.values())
    sq_norm = sum(r.sq_norm for r in results.values())
    mismatched = sum(r.mismatched for r in results.values())
    numel = sum(r.delta.numel() for r in results.values())
    reconstruction = {
        "exact": mismatched == 0,
        "mismatched_elements": mismatched,
        "total_elements": numel,
        "patched_elements": sum(r.patch_index.numel() for r in results.values()),
        "max_abs_error": max((r.max_abs_error for r in results.values()), default=0.0),
        "relative_error": math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0,
    }
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library": "layerselect",
        "library_version": __version__,
        **config.to_dict(),
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
        "reconstruction": reconstruction,
        "weights_file": WEIGHTS_NAME,
    }
    writer = (
        atomic_files(directory, remove=[PATCHES_NAME, *LEGACY_NAMES]) if into_existing
        else atomic_directory(directory, CONFIG_NAME, overwrite=overwrite, what="adapter folder")
    )
    with writer as tmp:
        save_file(deltas, str(tmp / WEIGHTS_NAME), metadata=metadata)
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        if patches:
            save_file(patches, str(tmp / PATCHES_NAME), metadata={"format": "pt"})
            meta["patches_file"] = PATCHES_NAME
            meta["patches_sha256"] = sha256_file(tmp / PATCHES_NAME)
        write_json(tmp / CONFIG_NAME, meta)
    return Path(directory)

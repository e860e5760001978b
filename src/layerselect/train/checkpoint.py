"""Adapter-only training checkpoints: what goes into ``checkpoint-N/``, and checking one before a resume.

A checkpoint holds the adapter files, ``trainable_weights.safetensors`` (the exact
current values of the trained matrices, so a resume is bitwise exact whatever the
delta dtype), ``training_args.bin`` and, from the ``Trainer``, the optimizer /
scheduler / RNG state and ``trainer_state.json`` -- never the whole model.

Example:
    >>> path = resolve_checkpoint(True, "runs/slam", slam)   # doctest: +SKIP
    >>> path.name                                            # doctest: +SKIP
    'checkpoint-500'
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers.trainer import TRAINING_ARGS_NAME

from ..errors import BaseModelMismatchError, FormatError, InvalidInputError

__all__ = [
    "TRAINABLE_WEIGHTS_NAME",
    "trainable_parameters",
    "save_trainable_weights",
    "load_trainable_weights",
    "write_checkpoint_files",
    "resolve_checkpoint",
]

#: Exact trainable tensors in each checkpoint (for bitwise resume).
TRAINABLE_WEIGHTS_NAME = "trainable_weights.safetensors"


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (``requires_grad``), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_trainable_weights(model: torch.nn.Module, path: Path, state_dict: dict | None = None, *,
                           is_main_process: bool = True) -> None:
    """Exact values of the trainable tensors, by name (from ``state_dict`` when the Trainer gathered one).

    On a model sharded with FSDP2 every rank must call it (each tensor is gathered, one at
    a time); only ``is_main_process`` writes.
    """
    from safetensors.torch import save_file

    from .._dist import gather_full, is_sharded_parameter

    tensors = {}
    for name, param in trainable_parameters(model).items():
        value = param
        if state_dict is not None:
            value = state_dict.get(name, next((v for k, v in state_dict.items() if k.endswith("." + name)), param))
        elif is_sharded_parameter(param):
            value = gather_full(param)  # a collective: every rank, same order
        if is_main_process:
            tensors[name] = value.detach().contiguous().cpu()
    if is_main_process:
        save_file(tensors, str(path))


def load_trainable_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy what :func:`save_trainable_weights` wrote back into ``model``; the names must match exactly."""
    from safetensors.torch import load_file

    from ..selective_ffn.tensorfile import read_safetensors_header

    read_safetensors_header(path)  # truncated / corrupt: a FormatError naming the file
    try:
        saved = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise FormatError(f"could not read {path}: {exc}") from None
    params = trainable_parameters(model)
    if set(saved) != set(params):
        raise InvalidInputError(
            f"checkpoint {path.parent} trains {sorted(saved)[:4]}... but this model trains "
            f"{sorted(params)[:4]}...; resume with the same layers and target modules"
        )
    from .._dist import is_sharded_parameter, set_full

    with torch.no_grad():
        for n, p in params.items():
            if is_sharded_parameter(p):
                set_full(p, saved[n])  # each rank keeps its own shard
            else:
                p.copy_(saved[n].to(p.device, p.dtype))


def write_checkpoint_files(
    output_dir: str | os.PathLike[str], model: torch.nn.Module, slam_model: Any, training_args: Any,
    state_dict: dict | None = None, *, is_main_process: bool = True,
) -> None:
    """The model part of a checkpoint: adapter files, exact trainable weights, ``training_args.bin``.

    ``model`` is the module that trains (unwrapped); ``slam_model`` (may be None) writes the
    adapter; ``state_dict`` is the full state a distributed Trainer gathered, if any. On a
    model sharded with FSDP2 every rank calls it (the trained matrices are gathered one at a
    time); only ``is_main_process`` writes.
    """
    out = Path(output_dir)
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if slam_model is not None:
        slam_model.save_pretrained(out, state_dict=state_dict, into_existing=True, is_main_process=is_main_process)
    save_trainable_weights(model, out / TRAINABLE_WEIGHTS_NAME, state_dict, is_main_process=is_main_process)
    if is_main_process:
        torch.save(training_args, out / TRAINING_ARGS_NAME)


def resolve_checkpoint(resume: bool | str | os.PathLike[str], output_dir: str | os.PathLike[str],
                       slam_model: Any = None) -> Path:
    """The checkpoint a resume would load, validated before any training starts.

    ``resume`` is True (the latest ``checkpoint-N`` in ``output_dir``) or a path.
    Refuses, with a :class:`LayerSelectError`: no checkpoint; a folder that is not a
    layerselect checkpoint; truncated or corrupt files (named); and a checkpoint
    trained from another base model than ``slam_model``'s (its adapter's base
    fingerprint differs), which would otherwise yield an adapter labelled for this
    base holding the difference of two models.

    Example:
        >>> resolve_checkpoint(True, "runs/slam")   # doctest: +SKIP
        PosixPath('runs/slam/checkpoint-500')
    """
    path = _find_checkpoint(resume, output_dir)
    _check_files(path)
    if slam_model is not None:
        _check_same_base(path, slam_model)
    return path


def _find_checkpoint(resume: bool | str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> Path:
    from transformers.trainer_utils import get_last_checkpoint

    if resume is True:
        found = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        if found is None:
            raise InvalidInputError(
                f"nothing to resume: {output_dir} holds no checkpoint-N folder; drop --resume to start "
                "training, or give the checkpoint folder"
            )
        path = Path(found)
    else:
        path = Path(resume)
    if not path.is_dir():
        raise InvalidInputError(f"checkpoint {path} does not exist; give a checkpoint-N folder to resume from")
    if not (path / TRAINABLE_WEIGHTS_NAME).is_file():
        raise InvalidInputError(
            f"{path} is not a layerselect checkpoint (no {TRAINABLE_WEIGHTS_NAME}); resume from a "
            "checkpoint-N folder written by layerselect training"
        )
    return path


def _check_files(path: Path) -> None:
    """Every file a resume reads, checked for truncation / corruption before training starts."""
    from ..selective_ffn.tensorfile import read_safetensors_header

    read_safetensors_header(path / TRAINABLE_WEIGHTS_NAME)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", TRAINING_ARGS_NAME):
        _check_torch_file(path / name)
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{state} is not valid JSON ({exc}); the checkpoint is corrupt") from None


def _check_same_base(path: Path, slam_model: Any) -> None:
    """The checkpoint's adapter must fingerprint the same base matrices this run trains."""
    from ..selective_ffn.adapter_file import read_adapter
    from ..selective_ffn.delta import fingerprint_tensor

    adapter = read_adapter(path)
    ref = slam_model._need_reference("check the checkpoint's base model")
    differ = [n for n in slam_model.target_names
              if adapter.fingerprint.get(n, {}).get("sha256") != fingerprint_tensor(ref.get(n))["sha256"]]
    if differ or set(adapter.tensors) != set(slam_model.target_names):
        base = adapter.meta.get("base_model", {}).get("name_or_path") or "?"
        raise BaseModelMismatchError(
            f"checkpoint {path} was trained from another base model ({base!r}) or other layers: "
            + (f"the base weights of {len(differ)} targeted matrices differ (e.g. {differ[0]})" if differ
               else f"it trains {sorted(adapter.tensors)[:3]}..., this run {slam_model.target_names[:3]}...")
            + ". Resume with the base model and layers it was trained with, or start a new --out"
        )


def _check_torch_file(path: Path) -> None:
    """torch.save files are zip archives: a truncated or corrupt one fails its CRC check."""
    if not path.exists():
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FormatError(f"{path} is truncated or corrupt ({exc}); resume from an earlier checkpoint") from None
    if bad is not None:
        raise FormatError(f"{path} is corrupt (member {bad} fails its checksum); resume from an earlier checkpoint")

"""Sharded training (FSDP2, DeepSpeed ZeRO-3) for SLAM: shard, save adapters and checkpoints, resume.

Only the targeted FFN matrices ever leave their shards: saving an adapter or a
checkpoint gathers them *one at a time* (an all-gather of one matrix), never the
whole model, and writes exactly the adapter a single process would write.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as its own
``DTensor``, so one sharded unit (a decoder layer) can hold frozen and trainable
weights side by side: no ``use_orig_params`` flag is needed.

Typical loop (every rank runs all of it; see ``examples/fsdp2_train.py``)::

    slam = get_slam_model(model, SelectiveFFNConfig(layers=[0, 1]))   # before sharding
    shard_slam_model(slam)                                            # fully_shard per layer + root
    opt = torch.optim.AdamW(trainable_parameters(slam), lr=2e-5)
    ...  # forward / backward / opt.step() as usual
    save_checkpoint(slam, "out/checkpoint-100", optimizer=opt, step=100)  # every rank
    slam.save_pretrained("out/adapter", is_main_process=rank == 0)         # every rank

Under FSDP2 / ZeRO-3, ``save_pretrained``, :func:`save_checkpoint` and
:func:`load_checkpoint` are collectives: call them on every rank. Only the
writing rank needs the reference copy of the base weights that
:func:`~layerselect.selective_ffn.get_slam_model` keeps (other ranks may build
the model on the meta device).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The tensor-level pieces live in _dist (stats and selective_ffn need them, below this module).
from ._dist import (
    barrier,
    gather_full,
    is_distributed,
    is_sharded,
    is_sharded_parameter,
    set_full,
    world_size,
)
from ._dist import is_main_process as is_main
from .errors import InvalidInputError

__all__ = [
    "CHECKPOINT_STATE_NAME",
    "gather_full",
    "is_sharded",
    "is_sharded_parameter",
    "load_checkpoint",
    "save_checkpoint",
    "set_full",
    "shard_slam_model",
    "trainable_parameters",
]

#: Step counter and format of a checkpoint written by :func:`save_checkpoint`.
CHECKPOINT_STATE_NAME = "checkpoint_state.json"
_OPTIMIZER_NAME = "optimizer.pt"
_SCHEDULER_NAME = "scheduler.pt"


def _mask_rows_hook(rows: slice) -> Any:
    def pre_forward(module: nn.Module, _args: Any) -> None:
        # Inside forward, FSDP2 has swapped in the unsharded parameter; its gradient is what
        # autograd accumulates (the sharded parameter's .grad is assigned after reduce-scatter,
        # so a tensor hook on the sharded parameter never runs). Hook it once per object.
        weight = module.weight
        if weight.requires_grad and not getattr(weight, "_layerselect_rows_masked", False):
            def mask(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                grad[rows] = 0
                return grad

            weight.register_hook(mask)
            weight._layerselect_rows_masked = True

    return pre_forward


def trainable_parameters(slam: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after :func:`shard_slam_model`: the sharded ones)."""
    return [p for p in slam.parameters() if p.requires_grad]


def _decoder_layers(slam: Any) -> list[nn.Module]:
    from .arch import get_layout

    return list(get_layout(slam.model).layers)


def shard_slam_model(slam: Any, *, mesh: Any = None, reshard_after_forward: bool = True, **fsdp_kwargs: Any) -> Any:
    """Shard a :class:`~layerselect.selective_ffn.SelectiveFFNModel` with FSDP2, in place; returns it.

    ``fully_shard`` is applied to every decoder layer, then to the base model
    (embeddings, final norm, LM head form the root unit). Frozen and trainable
    weights share the layer units. ``mesh`` defaults to all ranks on the
    current device type; extra keyword arguments (``mp_policy``,
    ``offload_policy``) go to ``fully_shard``. Call it after ``get_slam_model``
    (which records the base weights) and before building the optimizer.

    Example:
        >>> slam = shard_slam_model(get_slam_model(model, SelectiveFFNConfig(layers=[0])))  # doctest: +SKIP
    """
    from torch.distributed.fsdp import fully_shard

    from .selective_ffn.model import SelectiveFFNModel

    if not isinstance(slam, SelectiveFFNModel):
        raise InvalidInputError(
            f"shard_slam_model needs a SelectiveFFNModel (from get_slam_model), got {type(slam).__name__}"
        )
    if not is_distributed():
        raise InvalidInputError("shard_slam_model needs torch.distributed initialised (launch with torchrun)")
    if is_sharded(slam.model):
        raise InvalidInputError("the model is already sharded")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next(slam.model.parameters()).device
        mesh = init_device_mesh(device.type, (world_size(),))
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    for layer in _decoder_layers(slam):
        fully_shard(layer, **kwargs)
    fully_shard(slam.model, **kwargs)
    slam._refresh_parameters()
    modules = dict(slam.model.named_modules())
    for t in slam._targets:
        if t.frozen_rows is not None:  # fused gate_up with one half trained: keep the other half frozen
            owner = modules[t.name.removesuffix(".weight")]
            slam._hooks.append(owner.register_forward_pre_hook(_mask_rows_hook(t.frozen_rows)))
    return slam


# ---------------------------------------------------------------------------- checkpoints


def _iter_targets(slam: Any) -> Iterator[tuple[str, nn.Parameter]]:
    for t in slam._targets:
        yield t.name, t.param


def save_checkpoint(
    slam: Any,
    directory: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    is_main_process: bool | None = None,
) -> Path:
    """Write a resumable checkpoint without gathering the model; call on every rank.

    ``directory`` gets the adapter (``layerselect_adapter.json`` +
    ``layerselect_deltas.safetensors``, usable as is), ``trainable_weights.safetensors``
    (exact values of the trained matrices), ``optimizer.pt`` (the full optimizer
    state of the trained matrices only: AdamW holds nothing for frozen weights),
    ``scheduler.pt`` and ``checkpoint_state.json`` (the step). Matrices are
    gathered one at a time; the files do not depend on the number of processes,
    so a run may resume on another world size.
    """
    from safetensors.torch import save_file

    from .train import TRAINABLE_WEIGHTS_NAME

    main = is_main() if is_main_process is None else is_main_process
    out = Path(directory)
    slam.save_pretrained(out, is_main_process=main, into_existing=True)
    exact: dict[str, torch.Tensor] = {}
    for name, param in _iter_targets(slam):
        value = gather_full(param)  # a collective: every rank, same order
        if main:
            exact[name] = value.contiguous()
    optim_state = None
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        optim_state = get_optimizer_state_dict(
            slam.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if main:
        save_file(exact, str(out / TRAINABLE_WEIGHTS_NAME))
        if optim_state is not None:
            torch.save(optim_state, out / _OPTIMIZER_NAME)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), out / _SCHEDULER_NAME)
        state = {"step": int(step), "format": "layerselect.checkpoint", "targets": sorted(exact)}
        (out / CHECKPOINT_STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    barrier()
    return out


def load_checkpoint(
    slam: Any,
    directory: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; call on every rank. Returns ``checkpoint_state.json``.

    Every rank reads the files (a shared filesystem, as for any distributed
    checkpoint), one matrix at a time, and keeps only its own shard.
    """
    from safetensors import safe_open

    from .train import TRAINABLE_WEIGHTS_NAME

    path = Path(directory)
    state_file = path / CHECKPOINT_STATE_NAME
    weights = path / TRAINABLE_WEIGHTS_NAME
    if not state_file.is_file() or not weights.is_file():
        raise InvalidInputError(
            f"{path} is not a layerselect checkpoint (needs {CHECKPOINT_STATE_NAME} and {TRAINABLE_WEIGHTS_NAME})"
        )
    state = json.loads(state_file.read_text(encoding="utf-8"))
    targets = dict(_iter_targets(slam))
    with safe_open(str(weights), framework="pt") as fh:
        stored = set(fh.keys())
        if stored != set(targets):
            raise InvalidInputError(
                f"checkpoint {path} trains {sorted(stored)[:4]}... but this model trains "
                f"{sorted(targets)[:4]}...; resume with the same layers and target modules"
            )
        for name, param in targets.items():
            set_full(param, fh.get_tensor(name))
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        optim_state = torch.load(path / _OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            slam.model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
        )
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / _SCHEDULER_NAME, map_location="cpu", weights_only=True))
    return state

"""Sharded training (FSDP2, DeepSpeed ZeRO-3) for SLAM: shard, save adapters and checkpoints, resume.

Only the targeted FFN matrices ever leave their shards: saving an adapter or a
checkpoint gathers them *one at a time* (an all-gather of one matrix), never the
whole model, and writes exactly the adapter a single process would write.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as its own
``DTensor``, so one sharded unit (a decoder layer) can hold frozen and trainable
weights side by side: no ``use_orig_params`` flag is needed.

Training runs through the library's one loop (every rank runs all of it; see
``examples/fsdp2_train.py``)::

    slam = get_slam_model(model, SelectiveFFNConfig(layers=[0, 1]))   # before sharding
    shard_slam_model(slam)                                            # fully_shard per layer + root
    train_model(slam, tokenizer, pairs, output_dir="out", max_steps=1200, save_steps=200)

``train_model``'s Trainer leaves the sharded model unwrapped (FSDP2 reduces the
gradients) and writes the same ``checkpoint-N/`` folders as on one process, with
the trained matrices and optimizer state gathered whole, so a run resumes on any
number of processes. Under FSDP2 / ZeRO-3, ``save_pretrained`` is a collective:
call it on every rank. Only the writing rank needs the reference copy of the base
weights that :func:`~layerselect.selective_ffn.get_slam_model` keeps (other ranks
may build the model on the meta device).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The tensor-level pieces live in _dist (stats and selective_ffn need them, below this module).
from ._dist import (
    gather_full,
    is_distributed,
    is_sharded,
    is_sharded_parameter,
    set_full,
    world_size,
)
from .errors import InvalidInputError

__all__ = [
    "gather_full",
    "is_sharded",
    "is_sharded_parameter",
    "set_full",
    "shard_slam_model",
    "trainable_parameters",
]


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

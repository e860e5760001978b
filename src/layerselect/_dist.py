"""The process group and sharded tensors as layerselect reads them: world size, rank, barriers, gathers.

``world_size()`` answers from the initialised ``torch.distributed`` group, and
before one exists from the launcher's ``WORLD_SIZE`` (torchrun, accelerate): the
training arguments are built before the Trainer starts the group, yet must
know how many processes will share the batch. Code that splits work across
processes checks :func:`is_distributed` first, since without a group there is
nobody to gather the pieces from.

Example:
    >>> world_size(), rank(), is_distributed()   # a plain single process
    (1, 0, False)
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = [
    "is_distributed", "world_size", "rank", "is_main_process", "barrier",
    "is_dtensor", "is_sharded_parameter", "is_sharded", "gather_full", "set_full",
]


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of processes: the group's size, else the launcher's ``WORLD_SIZE``, else 1."""
    if is_distributed():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank in the group (0 without one)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0, and in a single process."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for in a single process)."""
    if is_distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``DTensor`` (a parameter sharded by FSDP2's ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def is_sharded_parameter(tensor: torch.Tensor) -> bool:
    """True for an FSDP2 ``DTensor`` parameter or a DeepSpeed ZeRO-3 partitioned one."""
    dtensor = _dtensor_type()
    return (dtensor is not None and isinstance(tensor, dtensor)) or hasattr(tensor, "ds_id")


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter of ``module`` is sharded (FSDP2 or ZeRO-3)."""
    return any(is_sharded_parameter(p) for p in module.parameters())


@torch.no_grad()
def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of one parameter, as a new CPU tensor.

    A collective for a sharded parameter (every rank must call it, in the same
    order): FSDP2 all-gathers this one ``DTensor``; ZeRO-3 gathers this one
    parameter. A plain tensor is copied.
    """
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.detach().full_tensor().to("cpu", copy=True)
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            return tensor.detach().to("cpu", copy=True)
    return tensor.detach().to("cpu", copy=True)


@torch.no_grad()
def set_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set a (possibly sharded) parameter from its full value, which every rank holds.

    FSDP2: each rank copies its own shard of ``value`` (no communication);
    ZeRO-3: the parameter is gathered, overwritten and re-partitioned.
    """
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import distribute_tensor

        full = value.to(device=param.device, dtype=param.dtype)
        param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        return
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value.to(param.device, param.dtype))
        return
    param.copy_(value.to(param.device, param.dtype))

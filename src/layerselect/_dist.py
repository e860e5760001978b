"""The process group as layerselect reads it: one place for world size, rank and barriers.

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

__all__ = ["is_distributed", "world_size", "rank", "is_main_process", "barrier"]


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

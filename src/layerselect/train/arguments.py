"""The paper's training hyper-parameters as ``transformers.TrainingArguments``.

Example:
    >>> args = default_training_args("/tmp/x", per_device_train_batch_size=8)   # doctest: +SKIP
    >>> args.gradient_accumulation_steps, args.learning_rate                    # doctest: +SKIP
    (16, 2e-05)
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .._dist import world_size

__all__ = ["EFFECTIVE_BATCH_SIZE", "PAPER_DEFAULTS", "default_training_args", "warmup_arguments"]

#: Effective batch size of the paper (per-device x accumulation x processes).
EFFECTIVE_BATCH_SIZE = 128
#: Our defaults for ``transformers.TrainingArguments`` (see :mod:`layerselect.train`).
#: ``warmup_steps`` below 1 is a fraction of the optimizer steps (3%), on every
#: supported transformers version (:func:`warmup_arguments`).
PAPER_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-5,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "weight_decay": 0.0,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    "remove_unused_columns": False,
    "seed": 42,
}

#: First transformers release whose ``warmup_steps`` in [0, 1) is a ratio of the steps
#: (huggingface/transformers#41326, which also deprecated ``warmup_ratio``).
WARMUP_FRACTION_SINCE = 5


def warmup_arguments(warmup_steps: float, transformers_version: str | None = None) -> dict[str, float]:
    """``TrainingArguments`` keywords for a warmup of ``warmup_steps`` (a fraction of the steps when below 1).

    transformers 5 reads a float in (0, 1) as that fraction of the steps; 4.x takes it as a
    step count (0.03 steps: no warmup at all) and needs ``warmup_ratio`` instead, which 5.2
    removed. Whole step counts pass through unchanged.

    Example:
        >>> warmup_arguments(0.03, "4.56.0"), warmup_arguments(0.03, "5.1.0"), warmup_arguments(10, "4.56.0")
        ({'warmup_ratio': 0.03}, {'warmup_steps': 0.03}, {'warmup_steps': 10})
    """
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    from packaging.version import Version

    if 0 < warmup_steps < 1 and Version(transformers_version).major < WARMUP_FRACTION_SINCE:
        return {"warmup_ratio": warmup_steps}
    return {"warmup_steps": warmup_steps}


def default_training_args(output_dir: str | os.PathLike[str], **overrides: Any):
    """``TrainingArguments`` with :data:`PAPER_DEFAULTS`, bf16 when available, accumulation to batch 128.

    ``gradient_accumulation_steps`` defaults to ``ceil(128 / (per_device x processes))``;
    ``warmup_steps`` below 1 is a fraction of the steps (:func:`warmup_arguments`).

    Example:
        >>> args = default_training_args("/tmp/x", per_device_train_batch_size=8)   # doctest: +SKIP
        >>> args.gradient_accumulation_steps                                        # doctest: +SKIP
        16
    """
    from transformers import TrainingArguments

    kwargs = dict(PAPER_DEFAULTS)
    kwargs.update(overrides)
    if "gradient_accumulation_steps" not in overrides:
        per_step = kwargs["per_device_train_batch_size"] * world_size()
        kwargs["gradient_accumulation_steps"] = max(1, math.ceil(EFFECTIVE_BATCH_SIZE / per_step))
    if not torch.cuda.is_available():
        kwargs.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator
    if "bf16" not in overrides and "fp16" not in overrides:
        kwargs["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if "warmup_ratio" in overrides and "warmup_steps" not in overrides:
        kwargs.pop("warmup_steps")  # the caller's own ratio decides (transformers 4.x)
    else:
        kwargs.update(warmup_arguments(kwargs.pop("warmup_steps")))
    return TrainingArguments(output_dir=str(output_dir), **kwargs)

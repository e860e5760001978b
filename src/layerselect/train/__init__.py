"""One-stage alignment training on Hugging Face ``Trainer``, with adapter-only checkpoints.

:func:`train_slam` takes a model, its tokenizer, X->English pairs and a
:class:`~layerselect.selective_ffn.SelectiveFFNConfig`, freezes everything but
the selected FFN matrices, trains, and returns the adapter directory
(``layerselect_adapter.json`` + ``layerselect_deltas.safetensors`` holding deltas).

Paper defaults (:data:`PAPER_DEFAULTS`; every one can be overridden):

- ``learning_rate=2e-5``, ``lr_scheduler_type="cosine"``, 3% warmup
  (``warmup_steps=0.03``, a fraction of the steps on transformers 4.x and 5.x alike),
  no weight decay, ``num_train_epochs=3``;
- effective batch size 128 = ``per_device_train_batch_size`` x
  ``gradient_accumulation_steps`` x number of processes (the accumulation is
  derived from the other two unless you set it);
- ``max_length=1024`` tokens per example;
- bf16 mixed precision where the hardware multiplies bf16 natively (a CUDA GPU with
  bf16, a CPU with avx512_bf16 or AMX), float32 otherwise (``precision="auto"``;
  see :mod:`layerselect.precision`). Weights, optimizer state and deltas stay float32.

The paper (and QAlign, whose data and trainer it reuses) trains with lr 2e-5,
batch 128 and a cosine schedule; the epoch count is not fixed by the
DESIGN notes, so 3 epochs (the QAlign/Alpaca recipe) is our documented choice.

Checkpoints (``OUT/checkpoint-N/``) hold the adapter files, the exact current
values of the trainable matrices (``trainable_weights.safetensors``, so a
resume is bitwise exact whatever the delta dtype), the optimizer / scheduler /
RNG state and ``trainer_state.json`` -- never the whole model. Pass
``resume_from_checkpoint=True`` (latest) or a path to continue.

Modules, in reading order:

===============  ============================================================
``arguments``    :data:`PAPER_DEFAULTS`, :func:`default_training_args`
``features``     :func:`build_train_dataset`, :func:`plain_text_features`
``checkpoint``   checkpoint contents, :func:`resolve_checkpoint`
``trainer``      :class:`SLAMTrainer` (label-only loss, adapter-only checkpoints)
``reporting``    :class:`TrainerLogCallback`, :func:`save_loss_log`
``run``          :func:`train_slam`
``measure``      :func:`translation_loss`
``retention``    :class:`RetentionGuard` (stop or roll back when a held-out NLL rises)
===============  ============================================================

Example:
    >>> from layerselect.models import load_model
    >>> from layerselect.selective_ffn import SelectiveFFNConfig
    >>> from layerselect.data import load_translation_data
    >>> from layerselect.train import train_slam
    >>> model, tok = load_model("gemma-3-270m")                                     # doctest: +SKIP
    >>> pairs = load_translation_data("pairs:../shared/data/gsm8kinstruct_question",
    ...                               max_pairs=500)                                # doctest: +SKIP
    >>> adapter_dir = train_slam(model, tok, pairs, SelectiveFFNConfig(layers=[0]),
    ...                          output_dir="runs/slam", max_steps=50,
    ...                          per_device_train_batch_size=8,
    ...                          gradient_accumulation_steps=1)                     # doctest: +SKIP
"""

from __future__ import annotations

from .arguments import (
    DATA_ORDERS,
    EFFECTIVE_BATCH_SIZE,
    PAPER_DEFAULTS,
    data_order_arguments,
    default_training_args,
)
from .checkpoint import TRAINABLE_WEIGHTS_NAME, resolve_checkpoint
from .features import build_train_dataset, plain_text_features
from .measure import translation_loss
from .reporting import StepTimeCallback, TrainerLogCallback, save_loss_log
from .retention import RETAIN_MODES, PromptTarget, RetentionGuard, gsm8k_pairs, load_retention_data
from .run import ADAPTER_SUBDIR, MODEL_SUBDIR, train_model, train_slam
from .trainer import SLAMTrainer

__all__ = [
    "PAPER_DEFAULTS",
    "EFFECTIVE_BATCH_SIZE",
    "TRAINABLE_WEIGHTS_NAME",
    "ADAPTER_SUBDIR",
    "resolve_checkpoint",
    "default_training_args",
    "data_order_arguments",
    "DATA_ORDERS",
    "SLAMTrainer",
    "TrainerLogCallback",
    "StepTimeCallback",
    "train_slam",
    "train_model",
    "MODEL_SUBDIR",
    "build_train_dataset",
    "save_loss_log",
    "translation_loss",
    "RetentionGuard",
    "RETAIN_MODES",
    "PromptTarget",
    "gsm8k_pairs",
    "load_retention_data",
    "plain_text_features",
]

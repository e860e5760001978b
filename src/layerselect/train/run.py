"""One training run: :func:`train_slam` wraps the model, trains the selected matrices, writes the adapter.

Example:
    >>> adapter_dir = train_slam(model, tok, pairs, SelectiveFFNConfig(layers=[0]),
    ...                          output_dir="runs/slam", max_steps=50)             # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback

from .._dist import barrier
from .._io import atomic_write_text
from ..data import TranslationCollator
from ..errors import InvalidInputError
from .arguments import default_training_args
from .checkpoint import resolve_checkpoint, trainable_parameters
from .features import build_train_dataset
from .reporting import TrainerLogCallback, save_loss_log
from .trainer import SLAMTrainer

__all__ = ["ADAPTER_SUBDIR", "train_slam"]

#: Where :func:`train_slam` writes the final adapter, under its output folder.
ADAPTER_SUBDIR = "adapter"


def train_slam(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    config: Any = None,
    training_args: Any = None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    max_length: int | None = 1024,
    eval_dataset: Any = None,
    resume_from_checkpoint: bool | str | None = None,
    callbacks: Sequence[Any] | None = None,
    return_trainer: bool = False,
    label_only: bool | None = None,
    **overrides: Any,
) -> Path | tuple[Path, Any]:
    """Train the selected FFN matrices on X->English pairs; return the final adapter directory.

    Args:
        model: a causal LM (wrapped with :func:`get_slam_model` using ``config``)
            or an existing ``SelectiveFFNModel`` (then ``config`` may be None).
        tokenizer: its tokenizer (pads with ``pad_token_id``, else EOS).
        train_dataset: :class:`TranslationExample` pairs, a :class:`TranslationDataset`,
            or a ``datasets.Dataset`` (lang/source/target or input_ids/labels columns).
        config: :class:`SelectiveFFNConfig` (layers, target modules).
        training_args: a full ``TrainingArguments``; if None, :func:`default_training_args`
            builds one from ``output_dir`` and ``overrides`` (e.g. ``max_steps=50``).
        output_dir: where checkpoints, ``adapter/``, ``loss.json``/``loss.png`` and
            ``train_summary.json`` go (default: ``training_args.output_dir``).
        max_length: truncation of tokenized pairs (paper: 1024).
        eval_dataset: optional held-out pairs, evaluated per ``eval_strategy``.
        resume_from_checkpoint: True (latest in ``output_dir``) or a checkpoint path.
        return_trainer: also return the ``Trainer`` (for inspection / tests).
        label_only: compute the LM head only at labelled positions (None: wherever the
            family allows, see :mod:`layerselect.loss`; False: the standard full-logits path).

    Returns:
        ``OUT/adapter``, loadable with ``SelectiveFFNModel.from_pretrained(base, path)``.

    Example:
        >>> train_slam(model, tok, pairs, SelectiveFFNConfig(layers=[0, 1]),
        ...            output_dir="runs/slam", max_steps=100)             # doctest: +SKIP
        PosixPath('runs/slam/adapter')
    """
    training_args = _training_arguments(training_args, output_dir, overrides)
    out = Path(output_dir if output_dir is not None else training_args.output_dir)
    slam = _as_slam_model(model, config)
    trainer = _build_trainer(slam, tokenizer, train_dataset, eval_dataset, training_args,
                             max_length=max_length, callbacks=callbacks, label_only=label_only)
    if resume_from_checkpoint:
        resume_from_checkpoint = str(resolve_checkpoint(resume_from_checkpoint, out, slam))
    train_model = trainer.model  # before train(): FSDP may swap trainer.model for its wrapper
    was_training = train_model.training
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    seconds = time.perf_counter() - start
    train_model.train(was_training)
    adapter_dir = out / ADAPTER_SUBDIR
    if training_args.should_save:
        slam.save_pretrained(adapter_dir)
        save_loss_log(trainer.state.log_history, out)
        summary = _summary(trainer, train_model, slam, config, adapter_dir, result.training_loss, seconds)
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=1) + "\n")
    barrier()  # the other processes wait until the main one has written the adapter
    return (adapter_dir, trainer) if return_trainer else adapter_dir


def _training_arguments(training_args: Any, output_dir: Any, overrides: dict[str, Any]) -> Any:
    if training_args is None:
        if output_dir is None:
            raise InvalidInputError("train_slam needs output_dir (or training_args with an output_dir)")
        return default_training_args(output_dir, **overrides)
    if overrides:
        raise InvalidInputError(
            f"pass either training_args or keyword overrides, not both (got {sorted(overrides)})"
        )
    return training_args


def _as_slam_model(model: Any, config: Any) -> Any:
    """``model`` itself if it is a ``SelectiveFFNModel``, else wrapped with ``config``."""
    from ..selective_ffn.model import SelectiveFFNModel, get_slam_model

    if isinstance(model, SelectiveFFNModel):
        return model
    if config is None:
        raise InvalidInputError("train_slam needs a SelectiveFFNConfig (which layers to train)")
    return get_slam_model(model, config)


def _training_module(slam: Any) -> torch.nn.Module:
    """The module the Trainer should drive: the wrapper if it is a PreTrainedModel, else its base."""
    from transformers import PreTrainedModel

    if isinstance(slam, PreTrainedModel):
        return slam
    for attr in ("model", "base_model"):
        inner = getattr(slam, attr, None)
        if isinstance(inner, PreTrainedModel):
            return inner
    return slam


def _build_trainer(slam: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any, training_args: Any, *,
                   max_length: int | None, callbacks: Sequence[Any] | None, label_only: bool | None) -> SLAMTrainer:
    train_model = _training_module(slam)
    train_ds = build_train_dataset(train_dataset, tokenizer, max_length)
    eval_ds = build_train_dataset(eval_dataset, tokenizer, max_length) if eval_dataset is not None else None
    collator = TranslationCollator.for_tokenizer(tokenizer)
    if not trainable_parameters(train_model):
        raise InvalidInputError("the model has no trainable parameters; check SelectiveFFNConfig.layers")
    trainer = SLAMTrainer(
        model=train_model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        callbacks=list(callbacks or []),
        slam_model=slam,
        label_only=label_only,
    )
    hf_printers = (ProgressCallback, PrinterCallback)
    if not any(issubclass(c, hf_printers) if isinstance(c, type) else isinstance(c, hf_printers)
               for c in callbacks or []):
        # Our log lines (numbers, stderr, plain lines in log files) instead of HF's dicts.
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(TrainerLogCallback(bar=not training_args.disable_tqdm))
    return trainer


def _summary(trainer: SLAMTrainer, train_model: torch.nn.Module, slam: Any, config: Any, adapter_dir: Path,
             train_loss: float, seconds: float) -> dict[str, Any]:
    """``train_summary.json``: what was trained, for how long, and with which batch and schedule."""
    args = trainer.args
    n_train = sum(p.numel() for p in trainable_parameters(train_model).values())
    n_all = sum(p.numel() for p in train_model.parameters())
    return {
        "adapter_dir": str(adapter_dir),
        "layers": list(getattr(getattr(slam, "adapter_config", None) or config, "layers", []) or []),
        "trainable_parameters": n_train,
        "total_parameters": n_all,
        "trainable_percent": 100.0 * n_train / max(n_all, 1),
        "steps": trainer.state.global_step,
        "examples": len(trainer.train_dataset),
        "train_loss": train_loss,
        "seconds": seconds,
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * args.world_size,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
    }

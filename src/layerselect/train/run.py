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
from ..errors import FormatError, InvalidInputError
from .arguments import data_order_of, default_training_args
from .checkpoint import resolve_checkpoint, trainable_parameters
from .features import build_train_dataset
from .reporting import StepTimeCallback, TrainerLogCallback, save_loss_log
from .retention import guard_from, retention_summary
from .trainer import SLAMTrainer

__all__ = ["ADAPTER_SUBDIR", "MODEL_SUBDIR", "train_model", "train_slam"]

#: Where :func:`train_model` writes the final adapter (selective or PEFT), under its output folder.
ADAPTER_SUBDIR = "adapter"
#: Where :func:`train_model` writes a fully fine-tuned model, under its output folder.
MODEL_SUBDIR = "model"


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
    precision: str = "auto",
    retain: Any = None,
    **overrides: Any,
) -> Path | tuple[Path, Any]:
    """Train the selected FFN matrices on X->English pairs; return the final adapter directory.

    :func:`train_model` on ``get_slam_model(model, config)``: the one training loop.

    Args:
        model: a causal LM (wrapped with :func:`get_slam_model` using ``config``)
            or an existing ``SelectiveFFNModel`` (then ``config`` may be None).
        tokenizer: its tokenizer (pads with ``pad_token_id``, else EOS).
        train_dataset: :class:`TranslationExample` pairs, a :class:`TranslationDataset`,
            or a ``datasets.Dataset`` (lang/source/target or input_ids/labels columns).
        config: :class:`SelectiveFFNConfig` (layers, target modules).
        training_args, output_dir, max_length, eval_dataset, resume_from_checkpoint,
            callbacks, label_only, precision, retain, overrides: as in :func:`train_model`.
        return_trainer: also return the ``Trainer`` (for inspection / tests).

    Returns:
        ``OUT/adapter``, loadable with ``SelectiveFFNModel.from_pretrained(base, path)``.

    Example:
        >>> train_slam(model, tok, pairs, SelectiveFFNConfig(layers=[0, 1]),
        ...            output_dir="runs/slam", max_steps=100)             # doctest: +SKIP
        PosixPath('runs/slam/adapter')
    """
    slam = _as_slam_model(model, config)
    adapter_dir, trainer = train_model(
        slam, tokenizer, train_dataset, training_args, output_dir=output_dir, max_length=max_length,
        eval_dataset=eval_dataset, resume_from_checkpoint=resume_from_checkpoint, callbacks=callbacks,
        label_only=label_only, precision=precision, retain=retain, **overrides,
    )
    return (adapter_dir, trainer) if return_trainer else adapter_dir  # type: ignore[return-value]


def train_model(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    training_args: Any = None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    max_length: int | None = 1024,
    eval_dataset: Any = None,
    resume_from_checkpoint: bool | str | None = None,
    callbacks: Sequence[Any] | None = None,
    label_only: bool | None = None,
    precision: str = "auto",
    save_final: bool = True,
    retain: Any = None,
    **overrides: Any,
) -> tuple[Path | None, Any]:
    """The library's one training loop: whatever ``model`` leaves trainable trains.

    Selective FFN, LoRA and full fine-tuning are different models handed to this
    same loop (:class:`SLAMTrainer`: HF ``Trainer``, label-only loss, checkpoints of
    the trainable tensors only):

    - a ``SelectiveFFNModel`` (:func:`get_slam_model`): writes the delta adapter to ``OUT/adapter``;
    - a PEFT model (``get_peft_model``): writes the PEFT adapter to ``OUT/adapter``;
    - a plain model whose ``requires_grad`` you set (all of it: full fine-tuning): writes
      ``OUT/model`` with ``save_pretrained``.

    Args:
        model: the model to train, as above.
        tokenizer, train_dataset, max_length, eval_dataset: as in :func:`train_slam`.
        training_args: a full ``TrainingArguments``; if None, :func:`default_training_args`
            builds one from ``output_dir``, ``precision`` and ``overrides`` (e.g.
            ``max_steps=50``, ``lr_scheduler_type="constant"``, ``data_order="sequential"``).
        output_dir: where checkpoints, the final model, ``loss.json``/``loss.png`` and
            ``train_summary.json`` go (default: ``training_args.output_dir``).
        resume_from_checkpoint: True (latest in ``output_dir``) or a checkpoint path; a
            checkpoint that already reached ``max_steps`` trains no further step.
        callbacks: extra ``TrainerCallback`` objects.
        label_only: compute the LM head only at labelled positions (None: wherever the
            family allows, see :mod:`layerselect.loss`; False: the standard full-logits path).
        precision: ``"auto"`` (bf16 autocast where the hardware is fast at it, else fp32),
            ``"bf16"`` or ``"fp32"``; used when ``training_args`` is None (a full
            ``TrainingArguments`` decides by its own ``bf16``). Weights, optimizer state
            and the saved deltas stay in the model's dtype.
        save_final: write the trained model / adapter at the end (False: only the
            checkpoints the arguments ask for, the loss log and the summary).
        retain: a :class:`~layerselect.train.RetentionGuard`, or the data for one with the
            default options (``"gsm8k"``, a spec, pairs): measure a held-out reference-language
            NLL while training and stop when it rises by more than 1% (see
            :mod:`layerselect.train.retention`). ``train_summary.json`` records it under
            ``"retention"`` (so does a guard passed in ``callbacks``).

    Returns:
        ``(final directory or None, trainer)``.

    Example:
        >>> from peft import LoraConfig, get_peft_model                                  # doctest: +SKIP
        >>> lora = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))  # doctest: +SKIP
        >>> path, trainer = train_model(lora, tok, pairs, output_dir="runs/lora",
        ...                             max_steps=40, lr_scheduler_type="constant")     # doctest: +SKIP
    """
    if training_args is None:  # "auto" decided by the model's own device and dtype
        from ..precision import model_device, model_dtype, resolve_precision

        precision = resolve_precision(precision, model_device(model), model_dtype(model))
    training_args = _training_arguments(training_args, output_dir, precision, overrides)
    out = Path(output_dir if output_dir is not None else training_args.output_dir)
    slam = model if _is_selective(model) else None
    timer = StepTimeCallback()
    guard = guard_from(retain, tokenizer, max_length)
    trainer = _build_trainer(model, tokenizer, train_dataset, eval_dataset, training_args, slam_model=slam,
                             max_length=max_length, callbacks=[*(callbacks or []), *([guard] if guard else []), timer],
                             label_only=label_only)
    if resume_from_checkpoint:
        resume_from_checkpoint = str(resolve_checkpoint(resume_from_checkpoint, out, slam))
    train_module = trainer.model  # before train(): FSDP may swap trainer.model for its wrapper
    was_training = train_module.training
    start = time.perf_counter()
    if resume_from_checkpoint and (_reached_max_steps(resume_from_checkpoint, training_args)
                                   or (guard is not None and guard.stopped_in(resume_from_checkpoint))):
        # finished, or the guard had stopped it there: the Trainer would still run one more step
        train_loss = _restore_finished(trainer, resume_from_checkpoint)
    else:
        train_loss = trainer.train(resume_from_checkpoint=resume_from_checkpoint).training_loss
    seconds = time.perf_counter() - start
    train_module.train(was_training)
    final = _final_dir(model, out) if save_final else None
    if final is not None and trainer.fsdp2_sharded:  # a collective: every process gathers, the main one writes
        model.save_pretrained(final, is_main_process=training_args.should_save)
    if training_args.should_save:
        if final is not None and not trainer.fsdp2_sharded:
            model.save_pretrained(final)
        save_loss_log(trainer.state.log_history, out)
        summary = _summary(trainer, train_module, model, final, train_loss, seconds, timer)
        summary["resumed_from_step"] = _checkpoint_step(resume_from_checkpoint or None)
        summary["retention"] = retention_summary(trainer.callback_handler.callbacks, trainer.state)
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=1) + "\n")
    barrier()  # the other processes wait until the main one has written the adapter
    return final, trainer


def _reached_max_steps(checkpoint: str, args: Any) -> bool:
    """True if ``checkpoint`` already holds ``args.max_steps`` optimizer steps.

    The Trainer would run one more step before it checks (a resume from
    ``checkpoint-2`` with ``max_steps=2`` trained a third), so such a resume trains none.
    """
    if args.max_steps is None or args.max_steps <= 0:
        return False
    step = _checkpoint_step(checkpoint)
    return step is not None and step >= args.max_steps


def _checkpoint_step(checkpoint: str | None) -> int | None:
    """The optimizer steps a checkpoint holds (its ``trainer_state.json``), None without one."""
    from .._io import read_json

    state_file = Path(checkpoint) / "trainer_state.json" if checkpoint else None
    if state_file is None or not state_file.is_file():
        return None
    state = read_json(state_file, "the checkpoint")
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise FormatError(f"{state_file}: global_step is {step!r}, not a step count; the checkpoint is corrupt")
    return step


def _restore_finished(trainer: SLAMTrainer, checkpoint: str) -> float:
    """Load a finished checkpoint's weights and state without training; the mean logged loss."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return sum(losses) / len(losses) if losses else float("nan")


def _is_selective(model: Any) -> bool:
    from ..selective_ffn.model import SelectiveFFNModel

    return isinstance(model, SelectiveFFNModel)


def _final_dir(model: Any, out: Path) -> Path:
    """``OUT/adapter`` for a selective or PEFT model, ``OUT/model`` for a plain one."""
    return out / (ADAPTER_SUBDIR if _is_selective(model) or hasattr(model, "peft_config") else MODEL_SUBDIR)


def _training_arguments(training_args: Any, output_dir: Any, precision: str, overrides: dict[str, Any]) -> Any:
    if training_args is None:
        if output_dir is None:
            raise InvalidInputError("train_slam needs output_dir (or training_args with an output_dir)")
        return default_training_args(output_dir, precision=precision, **overrides)
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

    if isinstance(slam, PreTrainedModel) or hasattr(slam, "peft_config"):
        return slam  # a PEFT model trains as itself, as with plain Trainer
    inner = getattr(slam, "model", None)  # a SelectiveFFNModel trains its wrapped model
    return inner if isinstance(inner, PreTrainedModel) else slam


def _build_trainer(model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any, training_args: Any, *,
                   slam_model: Any, max_length: int | None, callbacks: Sequence[Any] | None,
                   label_only: bool | None) -> SLAMTrainer:
    train_module = _training_module(model)
    # Pairs longer than the model's positions are cut to them, with a warning (counted in the summary).
    train_ds = build_train_dataset(train_dataset, tokenizer, max_length, model=train_module)
    eval_ds = (build_train_dataset(eval_dataset, tokenizer, max_length, model=train_module)
               if eval_dataset is not None else None)
    collator = TranslationCollator.for_tokenizer(tokenizer)
    if not trainable_parameters(train_module):
        raise InvalidInputError("the model has no trainable parameters; check SelectiveFFNConfig.layers "
                                "(or, for a plain model, set requires_grad on what should train)")
    trainer = SLAMTrainer(
        model=train_module,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        callbacks=list(callbacks or []),
        slam_model=slam_model,
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


def _summary(trainer: SLAMTrainer, train_module: torch.nn.Module, model: Any, final: Path | None,
             train_loss: float, seconds: float, timer: StepTimeCallback) -> dict[str, Any]:
    """``train_summary.json``: what was trained, for how long, and with which batch, schedule and precision."""
    args = trainer.args
    n_train = sum(p.numel() for p in trainable_parameters(train_module).values())
    n_all = sum(p.numel() for p in train_module.parameters())
    config = getattr(model, "adapter_config", None)
    return {
        "adapter_dir": str(final) if final is not None else None,
        "kind": "selective" if _is_selective(model) else "peft" if hasattr(model, "peft_config") else "plain",
        "layers": list(getattr(config, "layers", []) or []),
        "trainable_parameters": n_train,
        "total_parameters": n_all,
        "trainable_percent": 100.0 * n_train / max(n_all, 1),
        "steps": trainer.state.global_step,
        "examples": len(trainer.train_dataset),
        "truncated_to_context": getattr(trainer.train_dataset, "truncated_to_context", 0),
        "train_loss": train_loss,
        "seconds": seconds,
        "step_seconds": timer.wall,
        "step_cpu_seconds": timer.cpu,
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * args.world_size,
        "processes": args.world_size,
        "fsdp2_sharded": trainer.fsdp2_sharded,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "max_grad_norm": args.max_grad_norm,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "data_order": data_order_of(args),
    }

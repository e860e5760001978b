"""One-stage alignment training on Hugging Face ``Trainer``, with adapter-only checkpoints.

:func:`train_slam` takes a model, its tokenizer, X->English pairs and a
:class:`~layerselect.selective_ffn.SelectiveFFNConfig`, freezes everything but
the selected FFN matrices, trains, and returns the adapter directory
(``layerselect_adapter.json`` + ``layerselect_deltas.safetensors`` holding deltas).

Paper defaults (:data:`PAPER_DEFAULTS`; every one can be overridden):

- ``learning_rate=2e-5``, ``lr_scheduler_type="cosine"``, 3% warmup,
  no weight decay, ``num_train_epochs=3``;
- effective batch size 128 = ``per_device_train_batch_size`` x
  ``gradient_accumulation_steps`` x number of processes (the accumulation is
  derived from the other two unless you set it);
- ``max_length=1024`` tokens per example;
- bf16 where the hardware has it (a CUDA GPU with bf16), float32 otherwise.

The paper (and QAlign, whose data and trainer it reuses) trains with lr 2e-5,
batch 128 and a cosine schedule; the epoch count is not fixed by the
DESIGN notes, so 3 epochs (the QAlign/Alpaca recipe) is our documented choice.

Checkpoints (``OUT/checkpoint-N/``) hold the adapter files, the exact current
values of the trainable matrices (``trainable_weights.safetensors``, so a
resume is bitwise exact whatever the delta dtype), the optimizer / scheduler /
RNG state and ``trainer_state.json`` -- never the whole model. Pass
``resume_from_checkpoint=True`` (latest) or a path to continue.

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

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from ._io import atomic_write_text
from ._progress import format_log, format_value
from ._progress import progress as progress_bar
from .data import TranslationCollator, TranslationDataset, TranslationExample, examples_from_hf
from .errors import BaseModelMismatchError, FormatError, InvalidInputError

__all__ = [
    "PAPER_DEFAULTS",
    "EFFECTIVE_BATCH_SIZE",
    "TRAINABLE_WEIGHTS_NAME",
    "resolve_checkpoint",
    "default_training_args",
    "SLAMTrainer",
    "TrainerLogCallback",
    "train_slam",
    "build_train_dataset",
    "save_loss_log",
    "translation_loss",
    "plain_text_features",
]

#: Effective batch size of the paper (per-device x accumulation x processes).
EFFECTIVE_BATCH_SIZE = 128
#: Our defaults for ``transformers.TrainingArguments`` (see the module docstring).
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
#: Exact trainable tensors in each checkpoint (for bitwise resume).
TRAINABLE_WEIGHTS_NAME = "trainable_weights.safetensors"
ADAPTER_SUBDIR = "adapter"


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def default_training_args(output_dir: str | os.PathLike[str], **overrides: Any):
    """``TrainingArguments`` with :data:`PAPER_DEFAULTS`, bf16 when available, accumulation to batch 128.

    ``gradient_accumulation_steps`` defaults to ``ceil(128 / (per_device x processes))``.

    Example:
        >>> args = default_training_args("/tmp/x", per_device_train_batch_size=8)   # doctest: +SKIP
        >>> args.gradient_accumulation_steps                                        # doctest: +SKIP
        16
    """
    from transformers import TrainingArguments

    kwargs = dict(PAPER_DEFAULTS)
    kwargs.update(overrides)
    if "gradient_accumulation_steps" not in overrides:
        per_step = kwargs["per_device_train_batch_size"] * _world_size()
        kwargs["gradient_accumulation_steps"] = max(1, math.ceil(EFFECTIVE_BATCH_SIZE / per_step))
    if not torch.cuda.is_available():
        kwargs.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator
    if "bf16" not in overrides and "fp16" not in overrides:
        kwargs["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return TrainingArguments(output_dir=str(output_dir), **kwargs)


def build_train_dataset(data: Any, tokenizer: Any, max_length: int | None = 1024) -> torch.utils.data.Dataset:
    """Normalise training data: pairs (list of :class:`TranslationExample`), a HF dataset with
    lang/source/target, or an already tokenized dataset (items with ``input_ids``/``labels``)."""
    if isinstance(data, TranslationDataset):
        return data
    if isinstance(data, Sequence) and data and isinstance(data[0], TranslationExample):
        return TranslationDataset(data, tokenizer, max_length=max_length)
    names = getattr(data, "column_names", None)
    if names is not None:
        if "input_ids" in names and "labels" in names:
            return data
        return TranslationDataset(examples_from_hf(data), tokenizer, max_length=max_length)
    if isinstance(data, torch.utils.data.Dataset):
        return data
    if isinstance(data, Sequence) and data and isinstance(data[0], dict) and "input_ids" in data[0]:
        return _FeatureList(data)
    if isinstance(data, Sequence) and not data:
        raise InvalidInputError("the training data is empty")
    raise InvalidInputError(
        f"cannot train on {type(data).__name__}: pass TranslationExample pairs, a TranslationDataset, "
        "or a datasets.Dataset with lang/source/target (or input_ids/labels) columns"
    )


class _FeatureList(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def plain_text_features(texts: Sequence[str], tokenizer: Any, max_length: int | None = 1024) -> list[dict[str, Any]]:
    """Language-modelling features for plain texts (loss on every token after the first).

    Example:
        >>> feats = plain_text_features(["Janet has 3 ducks."], tokenizer)   # doctest: +SKIP
        >>> translation_loss(model, tokenizer, feats)                         # doctest: +SKIP
    """
    out = []
    for text in texts:
        ids = list(tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"])
        out.append({"input_ids": ids, "labels": [-100] + ids[1:], "attention_mask": [1] * len(ids)})
    return out


# ---------------------------------------------------------------------------- model plumbing


def _is_slam_model(model: Any) -> bool:
    from .selective_ffn.model import SelectiveFFNModel

    return isinstance(model, SelectiveFFNModel)


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_trainable(model: torch.nn.Module, path: Path, state_dict: dict | None = None) -> None:
    """Exact values of the trainable tensors, by name (from ``state_dict`` when the Trainer gathered one)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, param in _trainable(model).items():
        value = param
        if state_dict is not None:
            value = state_dict.get(name, next((v for k, v in state_dict.items() if k.endswith("." + name)), param))
        tensors[name] = value.detach().contiguous().cpu()
    save_file(tensors, str(path))


def _load_trainable(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    from .selective_ffn.io import read_safetensors_header

    read_safetensors_header(path)  # truncated / corrupt: a FormatError naming the file
    try:
        saved = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise FormatError(f"could not read {path}: {exc}") from None
    params = _trainable(model)
    if set(saved) != set(params):
        raise InvalidInputError(
            f"checkpoint {path.parent} trains {sorted(saved)[:4]}... but this model trains "
            f"{sorted(params)[:4]}...; resume with the same layers and target modules"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))


def resolve_checkpoint(resume: bool | str | os.PathLike[str], output_dir: str | os.PathLike[str],
                       slam_model: Any = None) -> Path:
    """The checkpoint a resume would load, validated before any training starts.

    ``resume`` is True (the latest ``checkpoint-N`` in ``output_dir``) or a path.
    Refuses, with a :class:`LayerSelectError`: no checkpoint; a folder that is not a
    layerselect checkpoint; truncated or corrupt files (named); and a checkpoint
    trained from another base model than ``slam_model``'s (its adapter's base
    fingerprint differs), which would otherwise yield an adapter labelled for this
    base holding the difference of two models.
    """
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
    from .selective_ffn.io import fingerprint_tensor, read_adapter, read_safetensors_header

    read_safetensors_header(path / TRAINABLE_WEIGHTS_NAME)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        _check_torch_file(path / name)
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{state} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if slam_model is not None:
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
    return path


def _check_torch_file(path: Path) -> None:
    """torch.save files are zip archives: a truncated or corrupt one fails its CRC check."""
    import zipfile

    if not path.exists():
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FormatError(f"{path} is truncated or corrupt ({exc}); resume from an earlier checkpoint") from None
    if bad is not None:
        raise FormatError(f"{path} is corrupt (member {bad} fails its checksum); resume from an earlier checkpoint")


class SLAMTrainer(Trainer):
    """``Trainer`` whose checkpoints hold only the adapter (+ exact trainable weights).

    ``slam_model`` is the ``SelectiveFFNModel`` whose ``save_pretrained`` writes
    the delta adapter; ``self.model`` is what trains (the same weights). Each
    ``checkpoint-N/`` gets the adapter files, ``trainable_weights.safetensors``,
    ``training_args.bin`` and (from ``Trainer``) optimizer / scheduler / RNG /
    ``trainer_state.json``; resuming loads the trainable weights back.
    """

    def __init__(self, *args: Any, slam_model: Any = None, label_only: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slam_model = slam_model
        self.label_only = label_only

    def _label_only_off(self, model: Any, inputs: dict[str, Any]) -> str | None:
        """Why this loss computation must take the standard path (None: label-only it is)."""
        from accelerate.utils import DistributedType

        from .loss import label_only_reason

        if self.label_only is False:
            return "label_only=False"
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return "label smoothing or a custom compute_loss_func is set"
        if "labels" not in inputs or "input_ids" not in inputs or set(inputs) - {"input_ids", "labels", "attention_mask"}:
            return "the batch is not plain input_ids/attention_mask/labels"
        if self.accelerator.distributed_type == DistributedType.FSDP:
            return "FSDP (not tested with the label-only path)"
        return label_only_reason(model)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """HF's causal-LM loss, computing the LM head only at labelled positions (:mod:`layerselect.loss`).

        Same normalisation as ``Trainer.compute_loss``: summed NLL / ``num_items_in_batch``
        (target tokens over accumulation steps, and processes) when the model takes loss
        kwargs, else the batch mean; times the process count when tokens are averaged
        across devices. Falls back to ``Trainer.compute_loss`` (full logits) when
        ``label_only=False``, for evaluation (``return_outputs``), or when the model or
        setup does not allow it.
        """
        if return_outputs:  # evaluation wants the logits: the standard path, whatever label_only says
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        reason = self._label_only_off(model, inputs)
        if reason is not None:
            if self.label_only:
                raise InvalidInputError(f"label_only=True is not possible here: {reason}")
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .loss import label_only_loss

        n_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = label_only_loss(model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"),
                               label_only=True, num_items_in_batch=n_items).loss
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and n_items is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if self.slam_model is not None:
            self.slam_model.save_pretrained(output_dir, state_dict=state_dict, into_existing=True)
        _save_trainable(model, Path(output_dir) / TRAINABLE_WEIGHTS_NAME, state_dict)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        path = Path(resume_from_checkpoint) / TRAINABLE_WEIGHTS_NAME
        if not path.is_file():
            raise InvalidInputError(
                f"{resume_from_checkpoint} is not a layerselect checkpoint (no {TRAINABLE_WEIGHTS_NAME})"
            )
        _load_trainable(model, path)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best:
            self._load_from_checkpoint(best)


class TrainerLogCallback(TrainerCallback):
    """Training as a :func:`~layerselect._progress.progress` bar over optimizer steps plus log lines of numbers.

    Replaces ``Trainer``'s ``ProgressCallback`` / ``PrinterCallback`` (dicts of strings on
    stdout, carriage-return streams in log files) with lines such as
    ``step 10/30  loss 1.2345  lr 1.00e-04  grad_norm 0.5312  epoch 0.33``, written to
    ``file`` (default: stderr) on the main process only. :func:`train_slam` installs it.

    Args:
        bar: show a step bar (the log lines are printed either way).
        file: where to write (default: ``sys.stderr`` at print time).
    """

    def __init__(self, bar: bool = True, file: IO[str] | None = None) -> None:
        self.bar_enabled = bar
        self.file = file
        self.bar: tqdm | None = None

    def _stream(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.bar_enabled:
            self.bar = progress_bar(total=state.max_steps, desc="train", unit="step",
                                initial=state.global_step, file=self._stream())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:  # the summary Trainer logs once at the end
            line = (f"trained {state.global_step} steps in {format_value('train_runtime', logs['train_runtime'])}"
                    f"  mean loss {format_value('train_loss', logs.get('train_loss', float('nan')))}")
        else:
            line = format_log(logs, state.global_step, state.max_steps)
        if self.bar is not None:
            self.bar.write(line, file=self._stream())
        else:
            print(line, file=self._stream(), flush=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------- loss log


def save_loss_log(log_history: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """Write ``loss.json`` (step, loss, learning_rate, epoch) and ``loss.png`` (matplotlib, Agg)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {k: e[k] for k in ("step", "loss", "learning_rate", "epoch", "grad_norm") if k in e}
        for e in log_history
        if "loss" in e
    ]
    evals = [{k: e[k] for k in ("step", "eval_loss", "epoch") if k in e} for e in log_history if "eval_loss" in e]
    json_path = out / "loss.json"
    json_path.write_text(json.dumps({"train": rows, "eval": evals}, indent=1) + "\n", encoding="utf-8")
    png_path: Path | None = out / "loss.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (target tokens)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
    except ImportError:
        png_path = None
    return json_path, png_path


# ---------------------------------------------------------------------------- train


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
    """
    from .selective_ffn.model import get_slam_model

    if training_args is None:
        if output_dir is None:
            raise InvalidInputError("train_slam needs output_dir (or training_args with an output_dir)")
        training_args = default_training_args(output_dir, **overrides)
    elif overrides:
        raise InvalidInputError(
            f"pass either training_args or keyword overrides, not both (got {sorted(overrides)})"
        )
    out = Path(output_dir if output_dir is not None else training_args.output_dir)

    if _is_slam_model(model):
        slam = model
    else:
        if config is None:
            raise InvalidInputError("train_slam needs a SelectiveFFNConfig (which layers to train)")
        slam = get_slam_model(model, config)
    train_model = _training_module(slam)
    train_ds = build_train_dataset(train_dataset, tokenizer, max_length)
    eval_ds = build_train_dataset(eval_dataset, tokenizer, max_length) if eval_dataset is not None else None
    collator = TranslationCollator.for_tokenizer(tokenizer)
    if not _trainable(train_model):
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
    if resume_from_checkpoint:
        resume_from_checkpoint = str(resolve_checkpoint(resume_from_checkpoint, out, slam))
    was_training = train_model.training
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    seconds = time.perf_counter() - start
    train_model.train(was_training)
    adapter_dir = out / ADAPTER_SUBDIR
    if training_args.should_save:
        slam.save_pretrained(adapter_dir)
        save_loss_log(trainer.state.log_history, out)
        n_train = sum(p.numel() for p in _trainable(train_model).values())
        n_all = sum(p.numel() for p in train_model.parameters())
        summary = {
            "adapter_dir": str(adapter_dir),
            "layers": list(getattr(getattr(slam, "adapter_config", None) or config, "layers", []) or []),
            "trainable_parameters": n_train,
            "total_parameters": n_all,
            "trainable_percent": 100.0 * n_train / max(n_all, 1),
            "steps": trainer.state.global_step,
            "examples": len(train_ds),
            "train_loss": result.training_loss,
            "seconds": seconds,
            "effective_batch_size": training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size,
            "learning_rate": training_args.learning_rate,
            "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        }
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=1) + "\n")
    if training_args.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return (adapter_dir, trainer) if return_trainer else adapter_dir


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


@torch.no_grad()
def translation_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    batch_size: int = 8,
    max_length: int | None = 1024,
    label_only: bool | None = None,
    progress: bool = False,
    desc: str = "translation loss",
) -> float:
    """Mean per-token loss on the target tokens of ``data`` (pairs or a tokenized dataset).

    For plain-text loss, pass items with ``labels == input_ids``. Log-softmax in
    float64; the LM head runs only at target positions unless ``label_only=False``
    (or the family needs the standard path, see :mod:`layerselect.loss`).
    ``progress`` draws a bar labelled ``desc`` on stderr (plain lines when stderr is
    not a terminal).
    """
    from .loss import label_only_loss

    ds = build_train_dataset(data, tokenizer, max_length)
    collator = TranslationCollator.for_tokenizer(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with progress_bar(total=len(ds), desc=desc, unit="pair", disable=not progress) as bar:
        for i in range(0, len(ds), batch_size):
            batch = collator([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = label_only_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                  label_only=label_only, dtype=torch.float64)
            total += float(out.nll_sum.sum())
            count += int(out.token_count.sum())
            bar.update(min(batch_size, len(ds) - i))
    model.train(was_training)
    return total / max(count, 1)

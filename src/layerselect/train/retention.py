"""The retention guard: watch a held-out reference-language NLL while training; stop, or roll back, when it rises.

Selective alignment should move the other languages towards English without making
English worse. :class:`RetentionGuard` is a ``transformers.TrainerCallback`` that
measures the mean NLL per target token of a held-out set of prompt/target pairs
(by default 200 English GSM8K-train solutions given their question,
:func:`gsm8k_pairs`) once before the first optimizer step (the *baseline*) and
every ``every`` optimizer steps after it (and at the last step). It *fires* at the
first measurement whose NLL exceeds the baseline by more than ``tolerance``
(relative: ``nll > baseline * (1 + tolerance)``; default 1%), or that is not finite.
Then:

- ``mode="stop"`` (the default): training stops at that step. The weights kept are
  those of the step that fired (their retained NLL is just over the tolerance; a
  smaller ``every`` tightens that); the rest of the step budget is not spent.
- ``mode="best"``: training runs to the end; the guard keeps a CPU copy of the
  trainable tensors at the measured step with the lowest retained NLL (the baseline
  excluded: restoring the untrained weights would undo the whole run) and, if it
  fired, restores them when training ends, so the saved adapter / model is that step's.
  If it never fired the final weights are kept.

The measurement is :func:`layerselect.train.translation_loss`'s (the library's one
target-token NLL, :func:`layerselect.loss.label_only_loss`, float64 sums): in eval mode
under ``no_grad``, the model's training flag restored afterwards, in the training's
precision (bf16 autocast when ``args.bf16``, else fp32; ``precision=`` overrides). Under
DDP each process scores its share of the pairs and the sums are all-reduced; a model
sharded with FSDP2 / ZeRO-3 (whose forward is a collective) is scored in full on every
process and rank 0's numbers are broadcast. Either way every process sees the same
NLL, so all of them stop at the same step.

Every measurement is appended to ``state.log_history`` as ``{"step": s, "retain_nll": v}``
(so it is in every checkpoint's ``trainer_state.json`` and a resumed run continues the
same curve against the same baseline); :meth:`RetentionGuard.summary` is what
:func:`~layerselect.train.train_model` writes under ``"retention"`` in ``train_summary.json``.

Example:
    >>> from transformers import Trainer
    >>> from layerselect.train import RetentionGuard
    >>> guard = RetentionGuard("gsm8k", tokenizer, every=20, tolerance=0.01)   # doctest: +SKIP
    >>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[guard]).train()   # doctest: +SKIP
    >>> guard.summary()["fired_step"], guard.curve                             # doctest: +SKIP
    (40, {0: 1.2296, 20: 1.2341, 40: 1.2452})
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from transformers import TrainerCallback

from .._dist import (
    gather_full,
    is_distributed,
    is_sharded,
    is_sharded_parameter,
    rank,
    set_full,
    world_size,
)
from .._io import iter_jsonl
from ..data import TranslationDataset, TranslationExample, load_translation_data
from ..errors import InvalidInputError, NumericalError
from ..precision import PRECISIONS, model_device
from .checkpoint import TRAINABLE_WEIGHTS_NAME, load_trainable_weights, trainable_parameters
from .features import build_train_dataset
from .measure import translation_nll_sum

__all__ = [
    "RETAIN_MODES",
    "DEFAULT_RETAIN_MODE",
    "MATH_PROMPT",
    "PromptTarget",
    "RetentionGuard",
    "gsm8k_pairs",
    "load_retention_data",
]

#: What the guard does when it fires; the first is the default.
RETAIN_MODES = ("stop", "best")
DEFAULT_RETAIN_MODE = "stop"

#: The paper's inference prompt (Table 8), the one the reasoning gap scores solutions in;
#: equal to ``layerselect.eval.generate.PROMPT_TEMPLATE`` (tested; ``eval`` is a later stage
#: of the package than ``train``, so it cannot be imported here).
MATH_PROMPT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{query}\n\n"
    "### Response: Let's think step by step."
)


@dataclass(frozen=True)
class PromptTarget:
    """One prompt/target pair, scored as training scores a pair: the text is ``prefix + " " + target``;
    the tokens from the space before ``target`` on, and EOS, are the targets.

    Example:
        >>> pt = PromptTarget("Q: 2+3?\\nA:", "5")
        >>> pt.prompt(), pt.text()
        ('Q: 2+3?\\nA:', 'Q: 2+3?\\nA: 5')
    """

    prefix: str
    target: str

    def prompt(self) -> str:
        """The part without labels."""
        return self.prefix

    def text(self) -> str:
        """The whole text, tokenized in one piece."""
        return f"{self.prefix} {self.target}"


def gsm8k_pairs(path: str | os.PathLike[str] | None = None, limit: int | None = None) -> list[PromptTarget]:
    """Question -> English solution pairs from GSM8K-style JSON lines, in the paper's inference prompt.

    Each line is an object with non-empty ``"question"`` and ``"solution"`` strings (the
    format of ``gsm8k_train_solutions.jsonl`` and ``mgsm_en_solutions.jsonl``). The prompt
    is :data:`MATH_PROMPT` holding the question; the target is the solution. ``path=None``:
    the bundled set, the last 200 GSM8K-train problems (index 7273-7472,
    ``layerselect.resources.gsm8k_retain_path()``, MIT).

    Example:
        >>> pairs = gsm8k_pairs()
        >>> len(pairs), pairs[0].target.splitlines()[-1].startswith("####")
        (200, True)
    """
    from ..resources import gsm8k_retain_path

    file = Path(path) if path is not None else gsm8k_retain_path()
    if not file.is_file():
        raise InvalidInputError(f"GSM8K-style file {file} does not exist (JSON lines with 'question' and 'solution')")
    out: list[PromptTarget] = []
    for lineno, row in iter_jsonl(file):
        if limit is not None and len(out) >= limit:
            break
        ok = isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip()
                                           for k in ("question", "solution"))
        if not ok:
            raise InvalidInputError(f"{file}:{lineno}: expected an object with non-empty 'question' and "
                                    "'solution' strings")
        out.append(PromptTarget(MATH_PROMPT.format(query=row["question"].strip()), row["solution"].strip()))
    if not out:
        raise InvalidInputError(f"{file} holds no question/solution pairs")
    return out


def load_retention_data(spec: str | os.PathLike[str]) -> list[Any]:
    """The pairs a retention ``SPEC`` names (``--retain SPEC``).

    - ``gsm8k``: the bundled 200 English GSM8K-train problems (:func:`gsm8k_pairs`);
      an existing path called ``gsm8k`` wins, as for every bundled name;
    - ``gsm8k:FILE``: your own GSM8K-style JSON lines (``question``, ``solution``);
    - anything :func:`layerselect.data.load_translation_data` reads: ``jsonl:FILE``
      (``lang``/``source``/``target`` lines), ``pairs:DIR``, ``hf:DIR``, a path, ``demo``:
      scored with the translation prompt, loss on the English target, as in training.

    Example:
        >>> len(load_retention_data("gsm8k")), len(load_retention_data("demo"))
        (200, 140)
    """
    text = str(spec)
    if text == "gsm8k" and not Path(text).exists():
        return gsm8k_pairs()
    if text.startswith("gsm8k:"):
        return gsm8k_pairs(text[len("gsm8k:"):])
    try:
        return load_translation_data(spec)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"retention data {text!r}: {exc}. Give 'gsm8k' (the bundled English math set), gsm8k:FILE "
            "(JSON lines with question/solution) or a translation-pair spec (jsonl:FILE, pairs:DIR, hf:DIR)"
        ) from None


def _as_examples(data: Any) -> Any:
    """Strings (a spec) loaded; ``(prompt, target)`` tuples and ``{"prompt", "target"}`` dicts as :class:`PromptTarget`."""
    if isinstance(data, (str, os.PathLike)):
        return load_retention_data(data)
    if isinstance(data, Sequence) and data and not isinstance(data[0], (TranslationExample, PromptTarget)):
        first = data[0]
        if isinstance(first, tuple) and len(first) == 2 and all(isinstance(x, str) for x in first):
            return [PromptTarget(p, t) for p, t in data]
        if isinstance(first, Mapping) and "prompt" in first and "target" in first:
            return [PromptTarget(str(r["prompt"]), str(r["target"])) for r in data]
    return data


def _check_options(every: Any, tolerance: Any, mode: Any, batch_size: Any, precision: Any) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InvalidInputError(f"the retention guard's every must be a positive number of optimizer steps, got {every!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance < 0:
        raise InvalidInputError(f"the retention tolerance must be a finite relative rise >= 0 (0.01 = 1%), got {tolerance!r}")
    if mode not in RETAIN_MODES:
        raise InvalidInputError(f"the retention mode must be one of {', '.join(RETAIN_MODES)}, not {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"the retention batch_size must be a positive integer, got {batch_size!r}")
    if precision is not None and precision not in PRECISIONS:
        raise InvalidInputError(f"the retention precision must be None (the training's) or one of "
                                f"{', '.join(PRECISIONS)}, not {precision!r}")


def _describe(data: Any) -> str:
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if isinstance(data, Sequence) and data:
        return f"{len(data)} {type(data[0]).__name__} items"
    return type(data).__name__


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class RetentionGuard(TrainerCallback):
    """Measure a held-out NLL every ``every`` optimizer steps; stop (or restore the best step) when it rises.

    See the module docstring for what is measured and how. Add it to any HF ``Trainer``
    (``callbacks=[guard]``) or pass it to :func:`~layerselect.train.train_model` /
    :func:`~layerselect.train.train_slam` as ``retain=guard``.

    Args:
        data: the reference-language pairs: a spec string (:func:`load_retention_data`:
            ``"gsm8k"``, ``"gsm8k:FILE"``, ``"jsonl:FILE"``, ...), a list of
            :class:`PromptTarget` / :class:`~layerselect.data.TranslationExample` /
            ``(prompt, target)`` tuples / ``{"prompt", "target"}`` dicts, a ``datasets.Dataset``
            with lang/source/target, or tokenized items (``input_ids``/``labels``).
        tokenizer: the model's tokenizer (needed unless ``data`` is already tokenized).
        every: measure every N optimizer steps (and at the last step).
        tolerance: relative rise over the baseline that fires the guard (0.01 = 1%).
        mode: ``"stop"`` (default) or ``"best"``, see the module docstring.
        batch_size: pairs per forward pass of a measurement (the result does not depend on it).
        max_length: token limit per pair, as in training (longer pairs are cut on the right).
        precision: None (default: the training's, bf16 if ``args.bf16`` else fp32), or
            ``"fp32"`` / ``"bf16"`` / ``"auto"``.
        label_only: as in :func:`~layerselect.train.translation_loss`.
        name: the key of the measurements in ``state.log_history`` is ``f"{name}_nll"``
            (give each of several guards its own name).
        verbose: print one line per measurement on stderr (main process only).
        file: where those lines go (default: ``sys.stderr``).
        data_name: what the summary calls the data (default: the spec, else a description).

    Attributes (after or during training):
        baseline, baseline_step, curve (``{step: nll}``), fired_step, fired_nll,
        best_step, best_nll, restored_step; :meth:`summary` gathers them.
    """

    def __init__(
        self,
        data: Any,
        tokenizer: Any = None,
        *,
        every: int = 20,
        tolerance: float = 0.01,
        mode: str = DEFAULT_RETAIN_MODE,
        batch_size: int = 8,
        max_length: int | None = 1024,
        precision: str | None = None,
        label_only: bool | None = None,
        name: str = "retain",
        verbose: bool = True,
        file: IO[str] | None = None,
        data_name: str | None = None,
    ) -> None:
        _check_options(every, tolerance, mode, batch_size, precision)
        self.every, self.tolerance, self.mode = every, float(tolerance), mode
        self.batch_size, self.precision, self.label_only = batch_size, precision, label_only
        self.name, self.verbose, self.file = name, verbose, file
        self.data_name = data_name or _describe(data)
        examples = _as_examples(data)
        if isinstance(examples, Sequence) and examples and isinstance(examples[0], (TranslationExample, PromptTarget)):
            if tokenizer is None:
                raise InvalidInputError("RetentionGuard needs the tokenizer to tokenize its pairs")
            dataset: Any = TranslationDataset(examples, tokenizer, max_length=max_length)
        else:
            dataset = build_train_dataset(examples, tokenizer, max_length)
        self.truncated = int(getattr(dataset, "truncated", 0))
        self.truncated_away = int(getattr(dataset, "truncated_away", 0))
        # Longest first: batches of similar length pad less; the mean does not depend on the order.
        self._features = sorted((dataset[i] for i in range(len(dataset))), key=lambda f: -len(f["input_ids"]))
        self.n_pairs = len(self._features)
        self.target_tokens = sum(sum(lab != -100 for lab in f["labels"][1:]) for f in self._features)
        if self.target_tokens == 0:
            raise InvalidInputError(f"the retention data {self.data_name!r} has no target tokens to measure")
        self.tokenizer = tokenizer
        self._reset()

    # -- state ---------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.used_precision: str | None = None
        self.baseline: float | None = None
        self.baseline_step: int | None = None
        self.curve: dict[int, float] = {}
        self.fired_step: int | None = None
        self.fired_nll: float | None = None
        self.best_step: int | None = None
        self.best_nll: float | None = None
        self.restored_step: int | None = None
        self.stopped_at_step: int | None = None
        self.note: str | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._best_checkpoint: Path | None = None

    @property
    def history_key(self) -> str:
        """The key of this guard's measurements in ``state.log_history``."""
        return f"{self.name}_nll"

    @property
    def fired(self) -> bool:
        return self.fired_step is not None

    @property
    def threshold(self) -> float | None:
        """The NLL above which the guard fires: ``baseline * (1 + tolerance)``."""
        return None if self.baseline is None else self.baseline + self.tolerance * abs(self.baseline)

    def rise(self, nll: float) -> float:
        """Relative change of ``nll`` over the baseline (0.01 = 1% higher)."""
        if self.baseline is None:
            raise InvalidInputError("no baseline measured yet")
        if self.baseline == 0:
            return 0.0 if nll == 0 else math.copysign(math.inf, nll)
        return (nll - self.baseline) / abs(self.baseline)

    def _over(self, nll: float) -> bool:
        return not math.isfinite(nll) or nll > self.threshold  # type: ignore[operator]

    # -- measuring -----------------------------------------------------------------------------

    def measure(self, model: torch.nn.Module, precision: str | None = None) -> float:
        """Mean NLL per target token of the retention set on ``model`` (eval mode, ``no_grad``).

        A collective in a process group: every process must call it (see the module docstring).
        """
        many = is_distributed() and world_size() > 1
        split = many and not is_sharded(model)  # a sharded forward is collective: all ranks score everything
        feats = self._features[rank()::world_size()] if split else self._features
        used = precision or self.used_precision or self.precision or "fp32"
        total, count = 0.0, 0
        if feats:
            total, count = translation_nll_sum(model, self.tokenizer, feats, batch_size=self.batch_size,
                                               max_length=None, label_only=self.label_only, precision=used)
        if many:
            both = torch.tensor([total, float(count)], dtype=torch.float64, device=model_device(model))
            if split:
                torch.distributed.all_reduce(both)
            else:
                torch.distributed.broadcast(both, src=0)
            total, count = float(both[0]), int(round(float(both[1])))
        return total / count if count else math.nan

    def _say(self, state: Any, line: str) -> None:
        if self.verbose and state.is_world_process_zero:
            print(line, file=self.file if self.file is not None else sys.stderr, flush=True)

    def _record(self, step: int, nll: float, state: Any, model: Any) -> None:
        """Add one measurement to the curve and decide: baseline, best, fired."""
        self.curve[step] = nll
        state.log_history.append({"step": step, self.history_key: nll})
        if self.baseline is None:
            if not math.isfinite(nll):
                raise NumericalError(f"the retention baseline on {self.data_name!r} is {nll} before training; "
                                     "check the model's dtype and the data")
            self.baseline, self.baseline_step = nll, step
            self._say(state, f"{self.name} step {step}/{state.max_steps}  nll {nll:.4f}  (baseline; fires above "
                             f"{self.threshold:.4f}, +{100 * self.tolerance:.2f}%)")
            return
        self._update(step, nll, model)
        rise = f"{100 * self.rise(nll):+.2f}%" if math.isfinite(nll) else "not finite"
        self._say(state, f"{self.name} step {step}/{state.max_steps}  nll {nll:.4f}  {rise} vs baseline")
        if self.fired_step == step:
            then = "stopping" if self.mode == "stop" else "training on; the best step is restored at the end"
            self._say(state, f"{self.name} guard fired at step {step}: nll {nll:.4f} is {rise} over the baseline "
                             f"{self.baseline:.4f} (tolerance {100 * self.tolerance:.2f}%); {then}")

    def _update(self, step: int, nll: float, model: Any) -> None:
        """Best and fired after a measurement at ``step`` (not the baseline)."""
        if math.isfinite(nll) and (self.best_nll is None or nll < self.best_nll):
            self.best_step, self.best_nll = step, nll
            if self.mode == "best" and model is not None:
                self._best_weights = _snapshot(model)
                self._best_checkpoint = None
        if self.fired_step is None and self._over(nll):
            self.fired_step, self.fired_nll = step, nll

    def _replay(self, state: Any, output_dir: str | os.PathLike[str] | None) -> None:
        """Rebuild the curve of a resumed run from ``state.log_history`` (up to its step)."""
        for entry in state.log_history:
            step, nll = entry.get("step"), entry.get(self.history_key)
            if isinstance(step, int) and isinstance(nll, (int, float)) and step <= state.global_step:
                nll = float(nll)
                self.curve[step] = nll
                if self.baseline is None:
                    self.baseline, self.baseline_step = nll, step
                else:
                    self._update(step, nll, None)
        if self.mode == "best" and self.best_step is not None and output_dir is not None:
            self._best_checkpoint = Path(output_dir) / f"checkpoint-{self.best_step}"

    def stopped_in(self, checkpoint: str | os.PathLike[str]) -> bool:
        """True if ``checkpoint``'s history shows this guard (in stop mode) had fired by its step.

        Such a run is over: resuming it must train no further step (the Trainer checks for a
        stop only after a step). The guard's curve and summary are rebuilt from that history.
        """
        from transformers import TrainerState

        state_file = Path(checkpoint) / "trainer_state.json"
        if self.mode != "stop" or not state_file.is_file():
            return False
        state = TrainerState.load_from_json(str(state_file))
        self._reset()
        self._replay(state, None)
        if self.fired:
            self.stopped_at_step = state.global_step
        return self.fired

    # -- TrainerCallback -------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        self._reset()
        self.used_precision = self.precision or ("bf16" if getattr(args, "bf16", False) else "fp32")
        if state.global_step > 0:
            self._replay(state, args.output_dir)
            if self.baseline is None:
                self.note = (f"no baseline in the resumed checkpoint's history: measured at step "
                             f"{state.global_step}, where this run resumed")
        if self.baseline is None:
            self._record(state.global_step, self.measure(model), state, model)
        if self.mode == "stop" and self.fired:
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        step = state.global_step
        due = step % self.every == 0 or (state.max_steps > 0 and step >= state.max_steps)
        if due and step not in self.curve and self.baseline is not None:
            self._record(step, self.measure(model), state, model)
        if self.mode == "stop" and self.fired:
            self.stopped_at_step = step
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.mode != "best" or not self.fired or self.best_step is None or model is None:
            return control
        last = max(self.curve) if self.curve else None
        if last == state.global_step and self.best_step == last:
            return control  # the weights are already the best step's
        if self._best_weights is not None:
            _restore(model, self._best_weights)
            self.restored_step = self.best_step
        elif self._best_checkpoint is not None and (self._best_checkpoint / TRAINABLE_WEIGHTS_NAME).is_file():
            load_trainable_weights(model, self._best_checkpoint / TRAINABLE_WEIGHTS_NAME)
            self.restored_step = self.best_step
        else:
            self.note = (f"the best step {self.best_step} was before this run resumed and "
                         f"{self._best_checkpoint} holds no {TRAINABLE_WEIGHTS_NAME}: its weights were not restored")
        if self.restored_step is not None:
            self._say(state, f"{self.name} guard: restored the weights of step {self.best_step} "
                             f"(nll {self.best_nll:.4f}, the lowest measured)")
        return control

    # -- report ----------------------------------------------------------------------------------

    def summary(self, state: Any = None) -> dict[str, Any]:
        """What ``train_summary.json`` records under ``"retention"`` (JSON-ready; a non-finite NLL is null).

        ``state``: a ``TrainerState`` to read the curve from when this guard did not run
        (a resume of a finished run trains nothing).
        """
        if not self.curve and state is not None and state.log_history:
            self._replay(state, None)
        last = max(self.curve) if self.curve else None
        return {
            "data": self.data_name,
            "pairs": self.n_pairs,
            "target_tokens": self.target_tokens,
            "truncated": self.truncated,
            "skipped": self.truncated_away,
            "every": self.every,
            "tolerance": self.tolerance,
            "mode": self.mode,
            "precision": self.used_precision,
            "baseline": self.baseline,
            "baseline_step": self.baseline_step,
            "threshold": self.threshold,
            "curve": {str(s): _finite(v) for s, v in sorted(self.curve.items())},
            "final_step": last,
            "final_nll": _finite(self.curve[last]) if last is not None else None,
            "fired": self.fired,
            "fired_step": self.fired_step,
            "fired_nll": _finite(self.fired_nll),
            "stopped_at_step": self.stopped_at_step,
            "best_step": self.best_step,
            "best_nll": self.best_nll,
            "restored_step": self.restored_step,
            "note": self.note,
        }


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the full values of the trainable tensors (gathered when sharded: every rank calls it)."""
    return {n: gather_full(p) for n, p in trainable_parameters(model).items()}


@torch.no_grad()
def _restore(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    for n, p in trainable_parameters(model).items():
        if is_sharded_parameter(p):
            set_full(p, weights[n])
        else:
            p.copy_(weights[n].to(p.device, p.dtype))


def guard_from(retain: Any, tokenizer: Any, max_length: int | None = 1024) -> RetentionGuard | None:
    """``retain=`` of :func:`~layerselect.train.train_model` as a guard: a :class:`RetentionGuard` as is,
    None as None, anything else (a spec such as ``"gsm8k"``, pairs) as a guard with the default options."""
    if retain is None or isinstance(retain, RetentionGuard):
        return retain
    return RetentionGuard(retain, tokenizer, max_length=max_length)


def retention_summary(callbacks: Sequence[Any], state: Any = None) -> dict[str, Any] | list[dict[str, Any]] | None:
    """``train_summary.json``'s ``"retention"``: the guard's :meth:`~RetentionGuard.summary`, a list of
    them when several guards ran, None without one."""
    found = [cb.summary(state) for cb in callbacks if isinstance(cb, RetentionGuard)]
    return None if not found else found[0] if len(found) == 1 else found

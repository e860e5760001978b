"""Causal-LM loss that computes the LM head only where there is a label.

In SLAM training only the English target tokens carry a label; the prompt and the
source sentence do not. The standard path (``model(..., labels=...)``) still
projects every position onto the whole vocabulary and keeps those
``[tokens, vocab]`` logits (and their gradient) alive. On Gemma-3-270M the head
(640 x 262,144) costs more than all 18 decoder layers together.

:func:`label_only_loss` runs the model's forward with ``logits_to_keep=1`` (so the
model's own head projects one position per sequence), takes the trunk's final
hidden states with a forward hook, keeps the positions whose *next* token is
labelled (the causal shift), and computes logits and cross-entropy there in
chunks of ``chunk_size`` tokens with the model's own head weights and its
family's final-logit processing (:data:`layerselect.arch.LM_HEADS`: Gemma-2/3
soft-capping; tied embeddings are just the shared weight). The backward pass is
fused into the forward chunk loop (the gradient with respect to each labelled
hidden state is computed while its chunk of logits exists), so no
``[tokens, vocab]`` tensor of the whole batch is ever held, in the forward or
the backward pass. Going through ``model(...)`` keeps DDP / DeepSpeed / autocast
wrappers in charge of the forward.

The label-only path is exact: the loss equals the full-logits path to rounding
(tested: 1e-12 relative in float64, 1e-6 in float32, gradients 1e-5, on every
family in :data:`~layerselect.arch.LM_HEADS`). It is used automatically when the
model's family is in that table, its output embedding is a plain ``nn.Linear``
and the head is frozen; otherwise (or with ``label_only=False``) the standard
full-logits path runs. :func:`label_only_reason` says why a model cannot use it.

Example:
    >>> import torch
    >>> from layerselect.loss import label_only_loss
    >>> out = label_only_loss(model, batch["input_ids"], batch["labels"],
    ...                       batch["attention_mask"])                     # doctest: +SKIP
    >>> out.loss.backward()           # mean NLL over labelled tokens        # doctest: +SKIP
    >>> out.nll_sum, out.token_count  # per sequence: float64 sums, counts    # doctest: +SKIP
    (tensor([12.31, 9.87], dtype=torch.float64), tensor([7, 6]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import LMHeadSpec, lm_head_spec, unwrap_model
from .errors import InvalidInputError

__all__ = ["LabelNLL", "label_only_loss", "label_only_reason", "DEFAULT_CHUNK_ELEMENTS"]

IGNORE_INDEX = -100
#: Default chunk: about this many logits (``tokens x vocab``) at a time (128 MiB in float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 25


@dataclass
class LabelNLL:
    """Result of :func:`label_only_loss` for one batch.

    Attributes:
        loss: scalar with gradient: the summed NLL of the labelled tokens divided by
            ``num_items_in_batch`` when given, else their mean (as HF's causal-LM loss).
        nll_sum: ``[batch]`` float64, detached: summed NLL of each sequence's labelled tokens.
        token_count: ``[batch]`` int64: labelled tokens per sequence (after the causal shift).
        token_nll: ``[labelled tokens]`` per-token NLL in the compute dtype, row-major
            order (sequence, then position), with gradient.
        label_only: True if the label-only path ran, False for the full-logits path.
    """

    loss: torch.Tensor
    nll_sum: torch.Tensor
    token_count: torch.Tensor
    token_nll: torch.Tensor
    label_only: bool

    @property
    def mean(self) -> float:
        """Mean NLL per labelled token over the batch, from the float64 sums."""
        return float(self.nll_sum.sum() / max(int(self.token_count.sum()), 1))


def label_only_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot use the label-only path, or None if it can.

    Reasons: its family has no entry in :data:`layerselect.arch.LM_HEADS`, its output
    embedding is not a plain ``nn.Linear``, or (only while gradients are enabled) the
    head itself is trainable.

    Example:
        >>> label_only_reason(granite_model)                            # doctest: +SKIP
        "model_type 'granite' has no entry in layerselect.arch.LM_HEADS ..."
    """
    base = unwrap_model(model)
    spec = lm_head_spec(base)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if spec is None:
        return (f"model_type {model_type!r} has no entry in layerselect.arch.LM_HEADS (its final-logit "
                "processing is not known), so the standard full-logits path is used")
    if not isinstance(getattr(base, spec.trunk, None), nn.Module):
        return f"{type(base).__name__} has no decoder trunk at `.{spec.trunk}`"
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or not head.weight.is_floating_point():
        return f"the output embedding is {type(head).__name__}, not a plain floating-point nn.Linear"
    trained = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    if trained and torch.is_grad_enabled():
        return "the LM head is trained (the fused label-only backward assumes a frozen head)"
    return None


def _compute_dtype(dtype: torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    # HF's causal-LM loss upcasts logits with .float(); float64 models keep float64.
    return dtype if dtype is not None else torch.promote_types(model_dtype, torch.float32)


class _HeadNLL(torch.autograd.Function):
    """Per-token NLL of ``softcap(hidden @ W.T + b)``, chunked, with the input gradient fused in.

    The forward pass computes, chunk by chunk, the logits, their log-sum-exp, the
    target's NLL and (when ``hidden`` needs a gradient) ``d nll_i / d hidden_i``;
    only that ``[tokens, hidden]`` gradient is kept for the backward pass, which
    scales it by the incoming per-token gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        softcap: float | None,
        dtype: torch.dtype,
        chunk: int,
    ) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=dtype, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # What autocast would do chunk by chunk, done once: a frozen head is not in autocast's
            # cast cache, and re-casting Gemma's 262k x 640 head per chunk took 19% of a bf16 step.
            low = torch.get_autocast_dtype(device_type)
            weight = weight.to(low)
            bias = bias.to(low) if bias is not None else None
            hidden = hidden.to(low)
        with torch.autocast(device_type, enabled=False):
            _head_chunks(hidden, weight, bias, targets, softcap, dtype, chunk, nll, grad)
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        grad_hidden = None
        if grad is not None:
            grad_hidden = grad * grad_out.unsqueeze(-1).to(grad.dtype)
        return grad_hidden, None, None, None, None, None, None


def _head_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
    dtype: torch.dtype,
    chunk: int,
    nll: torch.Tensor,
    grad: torch.Tensor | None,
) -> None:
    """Fill ``nll`` (and ``grad``, if given) chunk by chunk; see :class:`_HeadNLL`."""
    n = hidden.shape[0]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        y = targets[start:stop]
        z = nn.functional.linear(hidden[start:stop], weight, bias)
        tanh = None
        if softcap is not None:  # same ops, same order as the families' forward
            tanh = torch.tanh(z / softcap)
            z = tanh * softcap
        x = z.to(dtype)
        lse = torch.logsumexp(x, dim=-1)
        nll[start:stop] = lse - x.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if grad is not None:
            # d nll / d x = softmax(x) - onehot(y); back through the cast and soft-capping.
            g = x.sub_(lse.unsqueeze(-1)).exp_()
            g[torch.arange(stop - start, device=g.device), y] -= 1
            g = g.to(z.dtype)
            if tanh is not None:
                g = g * (1 - tanh * tanh)
            grad[start:stop] = g @ weight.to(g.dtype)
        del z, x, lse, tanh


def _finish(
    token_nll: torch.Tensor,
    mask: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
    label_only: bool,
) -> LabelNLL:
    batch = mask.shape[0]
    rows = mask.nonzero()[:, 0]
    nll_sum = torch.zeros(batch, dtype=torch.float64, device=token_nll.device)
    nll_sum.index_add_(0, rows, token_nll.detach().to(torch.float64))
    count = mask.sum(dim=1)
    total = token_nll.sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    else:
        loss = total / count.sum()  # mean; NaN when nothing is labelled, as cross_entropy's mean
    return LabelNLL(loss=loss, nll_sum=nll_sum, token_count=count, token_nll=token_nll, label_only=label_only)


def _standard(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None,
    dtype: torch.dtype | None,
    forward_kwargs: dict[str, Any],
) -> LabelNLL:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
    shift = labels[:, 1:]
    mask = shift != IGNORE_INDEX
    x = logits[:, :-1][mask].to(_compute_dtype(dtype, logits.dtype))
    token_nll = nn.functional.cross_entropy(x, shift[mask], reduction="none")
    return _finish(token_nll, mask, num_items_in_batch, label_only=False)


def label_only_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    label_only: bool | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    **forward_kwargs: Any,
) -> LabelNLL:
    """Causal-LM loss on the labelled tokens, computing the LM head only there.

    Labels follow HF's convention: ``labels[b, t]`` is the token predicted from
    positions ``<= t - 1`` (the shift happens here), ``-100`` means no label.

    Args:
        model: a causal LM (or a wrapper of one: ``SelectiveFFNModel``, PEFT, DDP);
            called as ``model(input_ids=..., attention_mask=..., logits_to_keep=1)``.
        input_ids, labels, attention_mask: ``[batch, length]`` tensors on the model's device.
        label_only: True forces the label-only path (an error if
            :func:`label_only_reason` gives a reason), False forces the standard
            full-logits path, None (default) picks label-only where possible.
        num_items_in_batch: divide the summed NLL by this (HF Trainer's token count
            across accumulation steps and processes) instead of taking the mean.
        dtype: dtype of the log-softmax (default: the logits' dtype promoted to at
            least float32, as HF's loss does; pass ``torch.float64`` for measures).
        chunk_size: labelled tokens per head chunk (default: about
            :data:`DEFAULT_CHUNK_ELEMENTS` logits per chunk).
        forward_kwargs: passed on to the model's forward.

    Returns:
        :class:`LabelNLL`: ``loss`` (with gradient), float64 per-sequence ``nll_sum``,
        ``token_count``, per-token ``token_nll``.

    Example:
        >>> out = label_only_loss(model, ids, labels, mask, dtype=torch.float64)  # doctest: +SKIP
        >>> nll_per_token = out.nll_sum.sum() / out.token_count.sum()           # doctest: +SKIP
    """
    if labels.shape != input_ids.shape:
        raise InvalidInputError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
    reason = label_only_reason(model)
    if label_only and reason is not None:
        raise InvalidInputError(f"label_only=True is not possible: {reason}")
    if label_only is False or reason is not None:
        return _standard(model, input_ids, labels, attention_mask, num_items_in_batch, dtype, forward_kwargs)

    base = unwrap_model(model)
    spec: LMHeadSpec = lm_head_spec(base)  # type: ignore[assignment]
    head: nn.Linear = base.get_output_embeddings()
    softcap = getattr(base.config, spec.softcap, None) if spec.softcap else None
    shift = labels[:, 1:]
    mask = shift != IGNORE_INDEX
    targets = shift[mask]
    chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // head.out_features)
    if chunk < 1:
        raise InvalidInputError(f"chunk_size must be positive, got {chunk_size}")
    found: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        # Runs inside the model's forward, so autocast and wrapper contexts still apply.
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        selected = hidden[:, :-1][mask]
        found["nll"] = _HeadNLL.apply(
            selected, head.weight, head.bias, targets, softcap,
            _compute_dtype(dtype, head.weight.dtype if not torch.is_autocast_enabled(selected.device.type)
                           else torch.get_autocast_dtype(selected.device.type)),
            chunk,
        )

    handle = getattr(base, spec.trunk).register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False,
              **forward_kwargs)
    finally:
        handle.remove()
    if "nll" not in found:
        raise InvalidInputError(f"{type(base).__name__}.{spec.trunk} did not run during the forward pass")
    return _finish(found["nll"], mask, num_items_in_batch, label_only=True)

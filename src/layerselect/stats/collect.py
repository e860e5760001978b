"""The streaming collector behind :meth:`ActivationStats.collect` (the hot path).

:func:`collect_stats` reads as: tokenize each text alone, sort by length and
batch, run each batch under a :class:`~layerselect.stats.trace.FiringTrace` (the
counting hooks; the forward stops after the last requested layer, so upper
layers and the LM head never run), then reduce the accumulators into an
:class:`ActivationStats`. Memory is independent of the number of texts:
accumulators are ``[layers, groups, neurons]`` plus a few numbers per sample.
NaN/inf activations on real tokens are checked once per batch.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._dist import is_distributed, is_sharded, rank, world_size
from .._progress import progress as progress_bar
from .._running import context_length, eval_mode, pad_batch, pad_token_id, warn_cut_to_context
from ..arch import get_layout, unwrap_model
from ..errors import InvalidInputError, NumericalError
from ..precision import autocast, model_dtype
from .files import DEFINITIONS_VERSION
from .trace import FiringTrace
from .value import ActivationStats

__all__ = ["collect_stats", "check_materialized"]


@dataclass
class _Sample:
    group: int
    index: int  # position in its group
    ids: list[int]


def _tokenize(tokenizer: Any, texts: Mapping[str, Sequence[str]], max_length: int | None) -> list[_Sample]:
    if not texts:
        raise InvalidInputError("no groups given; pass {language: [text, ...]}")
    samples: list[_Sample] = []
    for g, (group, items) in enumerate(texts.items()):
        if isinstance(items, str):
            raise InvalidInputError(f"group {group!r} is a single string; pass a list of texts")
        if len(items) == 0:
            raise InvalidInputError(f"group {group!r} has no texts; drop it or add texts")
        for i, text in enumerate(items):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"text {i} of group {group!r} is empty ({text!r}); remove it")
            enc = tokenizer(text, add_special_tokens=True, truncation=max_length is not None, max_length=max_length)
            ids = list(enc["input_ids"])
            if not ids:
                raise InvalidInputError(f"text {i} of group {group!r} tokenizes to nothing: {text[:60]!r}")
            samples.append(_Sample(g, i, ids))
    return samples


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose weights are on the meta device (built without loading them).

    Models dispatched by accelerate with offloading also keep meta parameters, but
    their hooks bring the weights in for each forward: those are fine.
    """
    base = unwrap_model(model)
    if getattr(base, "hf_device_map", None) or any(hasattr(m, "_hf_hook") for m in base.modules()):
        return
    meta = [n for n, p in base.named_parameters() if p.device.type == "meta"]
    if meta:
        raise InvalidInputError(
            f"{len(meta)} parameters of the model (e.g. {meta[0]}) are on the meta device: the weights "
            "were never loaded. Load the model with from_pretrained (or load_model) before measuring it"
        )


def _cut_to_context(model: nn.Module, samples: Sequence[_Sample]) -> int:
    """Cut every text to the model's positions (``max_position_embeddings``); warn and return how many.

    Tokens past the context come from positions the model was never trained on:
    counting them would measure something else (6,800 tokens were counted on a
    256-position model before this cut).
    """
    limit = context_length(model)
    if limit is None:
        return 0
    longer = [len(s.ids) for s in samples if len(s.ids) > limit]
    for s in samples:
        del s.ids[limit:]
    warn_cut_to_context(len(longer), len(samples), limit, max(longer, default=0), "texts", stacklevel=4)
    return len(longer)


def _dist_info() -> tuple[int, int]:
    # Only a live group splits the work: a WORLD_SIZE with no group has nobody to gather from.
    return (rank(), world_size()) if is_distributed() else (0, 1)


def collect_stats(
    model: nn.Module,
    tokenizer: Any,
    texts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 16,
    layers: Sequence[int] | None = None,
    max_length: int | None = None,
    padding_side: str = "right",
    per_sample_counts: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    precision: str = "fp32",
) -> ActivationStats:
    """Count, per layer and group, the tokens on which each FFN neuron fires.

    Args:
        model: a transformers causal LM with a gated FFN (any family :mod:`layerselect.arch`
            knows), on any device or dispatched with ``device_map``.
        tokenizer: its tokenizer; each text is encoded alone with default special tokens.
        texts: ``{group: [text, ...]}``, e.g. one group per language.
        batch_size: texts per forward pass (texts are sorted by length first).
        layers: decoder layer indices to measure (default: all); the forward
            stops after the last one.
        max_length: truncate longer texts to this many tokens (default: the model's
            ``config.max_position_embeddings``). Texts longer than the model's positions are
            always cut to them, with a warning; ``meta["truncated_to_context"]`` records how many.
        padding_side: ``"right"`` (default) or ``"left"`` (position ids come from the
            mask and pad rows are zeroed so they cannot leak NaN into real tokens).
        per_sample_counts: also keep ``sample_counts[s, l, n]`` (large: S x L x N).
        progress: show a bar on stderr (rank 0 only; plain lines when not a terminal).
        model_name: recorded in the metadata (default: the model's ``name_or_path``).
        precision: ``"fp32"`` (default) or ``"bf16"`` autocast (``"auto"``: bf16 where the
            hardware is fast at it). Counts are signs of pre-activations, and bf16 rounds
            the ones near zero: on Gemma-3-270M (20 MGSM questions x 10 languages) 71% of
            the per-neuron counts moved, by at most 29 tokens, 0.3% of all firings, and the
            msd selection stayed [0] (``benchmarks/bench_precision.py``). Recorded in
            ``meta["precision"]``.

    Under ``torch.distributed`` each rank takes every world_size-th batch of texts and
    the counts are all-reduced, so every rank returns the same statistics.

    Example:
        >>> stats = collect_stats(model, tokenizer, {"en": ["Hello."], "de": ["Hallo."]},   # doctest: +SKIP
        ...                       layers=[0, 1, 2], progress=False)
        >>> stats.counts.shape   # [layers, neurons, groups]                             # doctest: +SKIP
    """
    _check_options(padding_side, batch_size, max_length)
    check_materialized(model)
    layout = get_layout(model)
    layer_ids = layout.check_layers(list(layers) if layers is not None else range(layout.num_layers))
    if not layer_ids:
        raise InvalidInputError("layers is empty; pass at least one layer index or None for all")
    groups = list(texts.keys())
    samples = _tokenize(tokenizer, texts, max_length)
    cut = _cut_to_context(model, samples)
    rank, world = _dist_info()
    my_batches, padded = _plan_batches(samples, batch_size, rank, world, sharded=world > 1 and is_sharded(model))
    started = time.time()
    trace = FiringTrace(
        layout, layer_ids, num_groups=len(groups), num_samples=len(samples),
        left_padding=padding_side == "left", keep_per_sample=per_sample_counts,
    )
    base = unwrap_model(model)
    device = base.get_input_embeddings().weight.device
    with autocast(precision, device, model_dtype(base)) as used:
        sample_counts = _trace_batches(
            model, tokenizer, trace, samples, groups, my_batches=my_batches, padded=padded,
            padding_side=padding_side, per_sample=per_sample_counts, show_progress=progress and rank == 0,
        )
    meta = _run_meta(model, layout, model_name, padding_side, batch_size, max_length, world, started)
    meta.update(precision=used, truncated_to_context=cut)
    return _reduce(trace, samples, groups, layer_ids, sample_counts, world, meta=meta)


def _trace_batches(
    model: nn.Module,
    tokenizer: Any,
    trace: FiringTrace,
    samples: Sequence[_Sample],
    groups: Sequence[str],
    *,
    my_batches: Sequence[list[int]],
    padded: Sequence[list[int]],
    padding_side: str,
    per_sample: bool,
    show_progress: bool,
) -> torch.Tensor | None:
    """Run every batch of ``padded`` under ``trace``, counting the first ``len(my_batches)`` (this rank's own).

    Returns the per-sample counts ``[S, L, N]`` when ``per_sample`` (else None);
    NaN/inf activations on real tokens raise NumericalError after their batch.
    """
    pad_id = pad_token_id(tokenizer)
    input_device = unwrap_model(model).get_input_embeddings().weight.device
    base_dtype = next(unwrap_model(model).parameters()).dtype
    sample_counts = _sample_count_buffer(samples, len(trace.layer_ids), trace.num_neurons) if per_sample else None
    total_tokens = sum(len(samples[s].ids) for b in my_batches for s in b)
    bar = progress_bar(total=total_tokens, unit="tok", desc="collect", disable=not show_progress)
    with eval_mode(model), torch.inference_mode(), trace, bar:
        for step, batch in enumerate(padded):
            ids, mask = pad_batch([samples[s].ids for s in batch], pad_id, padding_side)
            extra = {}
            if padding_side == "left":
                extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(input_device)
            counted = step < len(my_batches)
            trace.forward(
                model, ids.to(input_device), mask.to(input_device),
                group_ids=torch.tensor([samples[s].group for s in batch]), sample_ids=torch.tensor(batch),
                count=counted, **extra,
            )
            if not counted:
                continue
            _raise_if_nonfinite(trace.nonfinite_layers(), base_dtype, [samples[s] for s in batch], groups)
            if sample_counts is not None:
                idx = torch.tensor(batch)
                for slot in range(len(trace.layer_ids)):
                    sample_counts[idx, slot] = trace.per_sample[slot].cpu().to(sample_counts.dtype)
            bar.update(int(mask.sum()))
    return sample_counts


def _sample_count_buffer(samples: Sequence[_Sample], num_layers: int, num_neurons: int) -> torch.Tensor:
    """Zeros ``[S, L, N]`` in the narrowest integer type that holds the longest text's token count."""
    longest = max(len(s.ids) for s in samples)
    dtype = torch.int16 if longest <= torch.iinfo(torch.int16).max else torch.int32
    return torch.zeros(len(samples), num_layers, num_neurons, dtype=dtype)


def _reduce(
    trace: FiringTrace,
    samples: Sequence[_Sample],
    groups: list[str],
    layer_ids: list[int],
    sample_counts: torch.Tensor | None,
    world: int,
    *,
    meta: dict[str, Any],
) -> ActivationStats:
    """The trace's accumulators (summed over ranks) as :class:`ActivationStats`."""
    count_tensor = trace.group_counts()  # [L, N, G]
    sample_tokens = torch.tensor([len(s.ids) for s in samples], dtype=torch.int64)
    sample_fraction = trace.sample_fired() / (sample_tokens[:, None].double() * trace.num_neurons)
    sample_group = torch.tensor([s.group for s in samples], dtype=torch.int64)
    sample_index = torch.tensor([s.index for s in samples], dtype=torch.int64)
    tokens = torch.zeros(len(groups), dtype=torch.int64).index_add_(0, sample_group, sample_tokens)
    if world > 1:
        count_tensor, sample_fraction, sample_counts = _all_reduce(count_tensor, sample_fraction, sample_counts)
    return ActivationStats(
        counts=count_tensor,
        tokens=tokens,
        groups=groups,
        layers=layer_ids,
        sample_fraction=sample_fraction,
        sample_tokens=sample_tokens,
        sample_group=sample_group,
        sample_index=sample_index,
        sample_counts=sample_counts,
        meta=meta,
    )


def _check_options(padding_side: str, batch_size: int, max_length: int | None) -> None:
    if padding_side not in ("right", "left"):
        raise InvalidInputError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, not {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise InvalidInputError(f"max_length must be a positive integer or None, not {max_length!r}")


def _plan_batches(
    samples: Sequence[_Sample], batch_size: int, rank: int, world: int, *, sharded: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """This rank's batches of sample indices (longest texts first), and the batches it runs.

    A sharded model (FSDP2 / ZeRO-3) gathers weights inside every forward: all ranks must run
    the same number of forwards, so ranks with one batch fewer repeat a batch without counting it.
    """
    order = sorted(range(len(samples)), key=lambda s: -len(samples[s].ids))
    batches = [order[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    mine = batches[rank::world]
    if not sharded:
        return mine, mine
    return mine, mine + batches[: -(-len(batches) // world) - len(mine)]


def _run_meta(model: nn.Module, layout: Any, model_name: str | None, padding_side: str, batch_size: int,
              max_length: int | None, world: int, started: float) -> dict[str, Any]:
    """The provenance recorded in ``ActivationStats.meta``."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    return {
        "model_name": model_name or getattr(config, "name_or_path", None) or type(base).__name__,
        "model_type": getattr(config, "model_type", None),
        "family": layout.family,
        "num_model_layers": layout.num_layers,
        "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
        "padding_side": padding_side,
        "batch_size": batch_size,
        "max_length": max_length,
        "definitions_version": DEFINITIONS_VERSION,
        "world_size": world,
        "seconds": round(time.time() - started, 3),
        "run_id": uuid.uuid4().hex[:12],
    }


def _raise_if_nonfinite(bad: Sequence[int], dtype: torch.dtype, batch: Sequence[_Sample], groups: Sequence[str]) -> None:
    """Refuse a batch whose activations held NaN/inf on real tokens at layers ``bad``."""
    if not bad:
        return
    where = ", ".join(sorted({f"{groups[s.group]}[{s.index}]" for s in batch})[:6])
    hint = (
        "float16 overflows easily: load the model in bfloat16 or float32"
        if dtype == torch.float16 else "check the model's weights (a broken checkpoint or conversion)"
    )
    raise NumericalError(
        f"the FFN activations of layer {bad[0]} hold NaN or inf on real tokens (layers {bad}; texts {where}); "
        f"counting them as 'not fired' would give wrong statistics. The model runs in "
        f"{str(dtype).removeprefix('torch.')}: {hint}"
    )


def _all_reduce(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Sum each tensor over ranks (per-sample rows are zero on ranks that did not see them)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        # gloo and NCCL have no int16 sum: reduce small ints (per-sample counts) as int32.
        wide = torch.int32 if t.dtype in (torch.int8, torch.uint8, torch.int16) else t.dtype
        buf = t.to(device, wide)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out.append(buf.cpu().to(t.dtype))
    return out

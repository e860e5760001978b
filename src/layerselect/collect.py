"""The streaming collector behind :meth:`ActivationStats.collect` (the hot path).

One forward pass per batch; a forward hook on each requested layer's activation
module turns ``f(gate(x))`` into per-sample per-neuron firing counts with one
comparison and one batched mat-vec against the attention mask (padding never
counts, and no ``[tokens, neurons]`` tensor is kept). The forward stops after
the last requested layer, so upper layers and the LM head never run. Memory is
independent of the number of texts: accumulators are ``[layers, groups,
neurons]`` plus a few numbers per sample.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._progress import progress as progress_bar
from .arch import get_adapter, unwrap_model
from .distributed import is_sharded
from .errors import InvalidInputError, NumericalError
from .stats import DEFINITIONS_VERSION, ActivationStats

__all__ = ["collect_stats", "check_materialized"]


class _StopForward(Exception):
    """Raised by a hook once the last requested layer has run."""


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


def _warn_if_too_long(model: nn.Module, samples: Sequence[_Sample]) -> None:
    limit = getattr(getattr(unwrap_model(model), "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    longer = [len(s.ids) for s in samples if len(s.ids) > limit]
    if longer:
        warnings.warn(
            f"{len(longer)} of {len(samples)} texts are longer than the model's {limit} positions "
            f"(longest {max(longer)} tokens); the statistics of those tokens come from positions the model "
            "was not trained on. Pass max_length to truncate them.",
            stacklevel=3,
        )


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
        max_length: truncate longer texts to this many tokens (default: no truncation).
        padding_side: ``"right"`` (default) or ``"left"`` (position ids come from the
            mask and pad rows are zeroed so they cannot leak NaN into real tokens).
        per_sample_counts: also keep ``sample_counts[s, l, n]`` (large: S x L x N).
        progress: show a bar on stderr (rank 0 only; plain lines when not a terminal).
        model_name: recorded in the metadata (default: the model's ``name_or_path``).

    Under ``torch.distributed`` each rank takes every world_size-th batch of texts and
    the counts are all-reduced, so every rank returns the same statistics.
    """
    if padding_side not in ("right", "left"):
        raise InvalidInputError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, not {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise InvalidInputError(f"max_length must be a positive integer or None, not {max_length!r}")
    check_materialized(model)
    adapter = get_adapter(model)
    layer_ids = adapter.check_layers(list(layers) if layers is not None else range(adapter.num_layers))
    if not layer_ids:
        raise InvalidInputError("layers is empty; pass at least one layer index or None for all")
    groups = list(texts.keys())
    samples = _tokenize(tokenizer, texts, max_length)
    _warn_if_too_long(model, samples)
    num_samples, num_groups = len(samples), len(groups)
    num_neurons = adapter.intermediate_size
    rank, world = _dist_info()

    order = sorted(range(num_samples), key=lambda s: -len(samples[s].ids))
    batches = [order[i : i + batch_size] for i in range(0, num_samples, batch_size)]
    my_batches = batches[rank::world]
    # A sharded model (FSDP2 / ZeRO-3) gathers weights inside every forward: all ranks must run
    # the same number of forwards, so ranks with one batch fewer repeat a batch without counting it.
    padded = my_batches
    if world > 1 and is_sharded(model):
        padded = my_batches + batches[: -(-len(batches) // world) - len(my_batches)]

    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    input_device = unwrap_model(model).get_input_embeddings().weight.device

    # Accumulators, created lazily on the device of each layer's activations.
    counts: dict[int, torch.Tensor] = {}
    sample_fired: dict[int, torch.Tensor] = {}  # slot -> [S] fired neuron-token totals
    sample_counts = None
    if per_sample_counts:
        longest = max(len(s.ids) for s in samples)
        sc_dtype = torch.int16 if longest <= torch.iinfo(torch.int16).max else torch.int32
        sample_counts = torch.zeros(num_samples, len(layer_ids), num_neurons, dtype=sc_dtype)

    state: dict[str, torch.Tensor] = {}
    nonfinite: dict[int, torch.Tensor] = {}  # slot -> device flag, checked once per batch

    def count_hook(slot: int):
        def hook(_module: nn.Module, _inputs: Any, act: torch.Tensor) -> None:
            if "skip" in state:
                return
            mask = state["mask"]
            if mask.device != act.device:
                mask = state.setdefault(f"mask@{act.device}", mask.to(act.device))
            # fired[b, t, n] as 0/1 floats; float32 sums of 0/1 are exact below 2**24.
            fired = (act > 0).to(torch.float32)
            # NaN > 0 is False: without this check a numerical blow-up would read as "never fires".
            bad = (~torch.isfinite(act)).any(dim=-1)
            flag = nonfinite.get(slot)
            if flag is None:
                flag = nonfinite[slot] = torch.zeros((), dtype=torch.bool, device=act.device)
            flag |= (bad & state["mask_bool"].to(act.device)).any()
            per_sample = torch.bmm(mask[:, None, :], fired).squeeze(1)  # [B, N]
            group_ids = state["group_ids"].to(act.device)
            acc = counts.get(slot)
            if acc is None:
                acc = counts[slot] = torch.zeros(num_groups, num_neurons, dtype=torch.int64, device=act.device)
            acc.index_add_(0, group_ids, per_sample.to(torch.int64))
            # Per-sample totals stay on the device: no host sync per layer and batch.
            fired = sample_fired.get(slot)
            if fired is None:
                fired = sample_fired[slot] = torch.zeros(num_samples, dtype=torch.float64, device=act.device)
            fired.index_copy_(0, state["sample_ids"].to(act.device), per_sample.to(torch.float64).sum(dim=1))
            if sample_counts is not None:
                state[f"per_sample{slot}"] = per_sample

        return hook

    def stop_hook(*_: Any) -> None:
        raise _StopForward

    def zero_pad_rows(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        # Left padding: fully masked pad rows can turn to NaN and reach real
        # tokens through 0 x NaN in attention; zero them after every layer.
        keep = state["mask_bool"]
        if isinstance(output, tuple):
            h = output[0]
            return (torch.where(keep.to(h.device)[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device)), *output[1:])
        return torch.where(keep.to(output.device)[..., None], output, torch.zeros((), dtype=output.dtype, device=output.device))

    handles = []
    for slot, layer in enumerate(layer_ids):
        handles.append(adapter.ffn(layer).act.register_forward_hook(count_hook(slot)))
    if padding_side == "left":
        for layer in range(layer_ids[-1] + 1):
            handles.append(adapter.layers[layer].register_forward_hook(zero_pad_rows))
    handles.append(adapter.layers[layer_ids[-1]].register_forward_hook(stop_hook))

    base_dtype = next(unwrap_model(model).parameters()).dtype
    total_tokens = sum(len(samples[s].ids) for b in my_batches for s in b)
    bar = progress_bar(total=total_tokens, unit="tok", desc="collect", disable=not progress or rank != 0)
    started = time.time()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for step, batch in enumerate(padded):
                seqs = [samples[s].ids for s in batch]
                width = max(len(x) for x in seqs)
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for row, x in enumerate(seqs):
                    sl = slice(width - len(x), width) if padding_side == "left" else slice(0, len(x))
                    ids[row, sl] = torch.tensor(x)
                    mask[row, sl] = 1
                kwargs: dict[str, Any] = {"input_ids": ids.to(input_device), "attention_mask": mask.to(input_device)}
                if padding_side == "left":
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(input_device)
                state.clear()
                state["mask"] = mask.to(input_device, torch.float32)
                state["mask_bool"] = mask.bool().to(input_device)
                state["group_ids"] = torch.tensor([samples[s].group for s in batch])
                state["sample_ids"] = torch.tensor(batch)
                if step >= len(my_batches):
                    state["skip"] = torch.ones(())
                try:
                    model(**kwargs, use_cache=False)
                except _StopForward:
                    pass
                if "skip" in state:
                    continue
                _raise_if_nonfinite(nonfinite, layer_ids, base_dtype, [samples[s] for s in batch], groups)
                if sample_counts is not None:
                    idx = torch.tensor(batch)
                    for slot in range(len(layer_ids)):
                        sample_counts[idx, slot] = state[f"per_sample{slot}"].cpu().to(sample_counts.dtype)
                bar.update(int(mask.sum()))
    finally:
        for h in handles:
            h.remove()
        bar.close()
        model.train(was_training)

    count_tensor = torch.stack(
        [counts[s].cpu() if s in counts else torch.zeros(num_groups, num_neurons, dtype=torch.int64) for s in range(len(layer_ids))]
    ).permute(0, 2, 1).contiguous()  # [L, N, G]
    sample_tokens = torch.tensor([len(s.ids) for s in samples], dtype=torch.int64)
    sample_fraction = torch.stack(
        [sample_fired[s].cpu() if s in sample_fired else torch.zeros(num_samples, dtype=torch.float64) for s in range(len(layer_ids))],
        dim=1,
    ) / (sample_tokens[:, None].double() * num_neurons)
    sample_group = torch.tensor([s.group for s in samples], dtype=torch.int64)
    sample_index = torch.tensor([s.index for s in samples], dtype=torch.int64)
    tokens = torch.zeros(num_groups, dtype=torch.int64).index_add_(0, sample_group, sample_tokens)

    if world > 1:
        count_tensor, sample_fraction, sample_counts = _all_reduce(count_tensor, sample_fraction, sample_counts)

    base = unwrap_model(model)
    config = getattr(base, "config", None)
    meta = {
        "model_name": model_name or getattr(config, "name_or_path", None) or type(base).__name__,
        "model_type": getattr(config, "model_type", None),
        "family": adapter.family,
        "num_model_layers": adapter.num_layers,
        "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
        "padding_side": padding_side,
        "batch_size": batch_size,
        "max_length": max_length,
        "definitions_version": DEFINITIONS_VERSION,
        "world_size": world,
        "seconds": round(time.time() - started, 3),
        "run_id": uuid.uuid4().hex[:12],
    }
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


def _raise_if_nonfinite(flags: Mapping[int, torch.Tensor], layer_ids: Sequence[int], dtype: torch.dtype,
                        batch: Sequence[_Sample], groups: Sequence[str]) -> None:
    bad = [layer_ids[slot] for slot, flag in sorted(flags.items()) if bool(flag)]
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

""":class:`FiringTrace`: the counting hooks of :mod:`layerselect.stats.collect` as a self-cleaning context manager.

In the style of baukit's ``nethook.Trace``: entering installs a forward hook on
the activation module ``f(gate(x))`` of each requested layer (plus, with left
padding, one per decoder layer that zeroes pad rows), and a hook after the last
requested layer that stops the forward, so upper layers and the LM head never
run; leaving removes every hook, also when the block raises.

Each hook turns the activations into per-sample per-neuron firing counts with
one comparison and one batched mat-vec against the attention mask (padding
never counts, no ``[tokens, neurons]`` tensor is kept) and adds them to
accumulators on the activation's own device: no host sync per layer. A NaN/inf
flag per layer is kept on the device too; the caller reads it once per batch.

Example:
    >>> from layerselect.arch import get_layout
    >>> with FiringTrace(get_layout(model), [0, 1], num_groups=2, num_samples=4) as trace:   # doctest: +SKIP
    ...     trace.forward(model, ids, mask, group_ids=torch.tensor([0, 1]), sample_ids=torch.tensor([0, 1]))
    >>> trace.group_counts().shape   # [layers, neurons, groups]                               # doctest: +SKIP
    torch.Size([2, 8192, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

__all__ = ["FiringTrace"]


class _StopForward(Exception):
    """Raised by the hook after the last requested layer."""


class FiringTrace:
    """Count FFN neuron firings per layer, group and sample while the ``with`` block runs.

    Args:
        adapter: the model's architecture layout (:func:`layerselect.arch.get_layout`).
        layer_ids: decoder layers to count, ascending; the forward stops after the last.
        num_groups: number of groups (languages) the samples belong to.
        num_samples: number of samples overall (rows of :meth:`sample_fired`).
        left_padding: zero fully masked pad rows after every layer (left padding
            can turn them to NaN, which would reach real tokens through 0 x NaN).
        keep_per_sample: keep the last batch's ``[B, N]`` counts per layer in
            :attr:`per_sample` (for ``per_sample_counts``).

    Example:
        >>> with FiringTrace(layout, [0, 1, 2], num_groups=2, num_samples=10) as trace:   # doctest: +SKIP
        ...     for ids, mask, groups, rows in batches:
        ...         trace.forward(model, ids, mask, group_ids=groups, sample_ids=rows)
        ...         trace.nonfinite_layers()   # [] unless some activation was NaN/inf
        >>> trace.group_counts()                                                           # doctest: +SKIP
    """

    def __init__(
        self,
        layout: Any,
        layer_ids: Sequence[int],
        *,
        num_groups: int,
        num_samples: int,
        left_padding: bool = False,
        keep_per_sample: bool = False,
    ) -> None:
        self.layout = layout
        self.layer_ids = list(layer_ids)
        self.num_groups = num_groups
        self.num_samples = num_samples
        self.num_neurons = layout.intermediate_size
        self.left_padding = left_padding
        self.keep_per_sample = keep_per_sample
        #: slot -> ``[G, N]`` int64 counts, on the device of that layer's activations.
        self.counts: dict[int, torch.Tensor] = {}
        #: slot -> ``[S]`` float64 fired neuron-token totals per sample.
        self.fired: dict[int, torch.Tensor] = {}
        #: slot -> 0-dim bool flag: a real token's activation was NaN or inf.
        self.nonfinite: dict[int, torch.Tensor] = {}
        #: slot -> ``[B, N]`` counts of the last batch (with ``keep_per_sample``).
        self.per_sample: dict[int, torch.Tensor] = {}
        self._batch: dict[str, Any] = {}
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ hooks in, hooks out
    def __enter__(self) -> FiringTrace:
        try:
            for slot, layer in enumerate(self.layer_ids):
                self._handles.append(self.layout.ffn(layer).act.register_forward_hook(self._count_hook(slot)))
            if self.left_padding:
                for layer in range(self.layer_ids[-1] + 1):
                    self._handles.append(self.layout.layers[layer].register_forward_hook(self._zero_pad_rows))
            self._handles.append(self.layout.layers[self.layer_ids[-1]].register_forward_hook(_stop))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this trace installed (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self._batch.clear()

    # ------------------------------------------------------------------ one batch
    def forward(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        group_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        count: bool = True,
        **model_kwargs: Any,
    ) -> None:
        """Run ``model`` on one batch up to the last traced layer, counting its real tokens.

        ``attention_mask`` (1 = real token) must be on the model's input device;
        ``group_ids`` / ``sample_ids`` (``[B]``) say which group and sample each row
        is. With ``count=False`` the forward runs but nothing is counted (a rank
        of a sharded model repeating a batch so that all ranks run alike).
        """
        self._batch = {
            "mask": attention_mask.to(torch.float32),
            "mask_bool": attention_mask.bool(),
            "group_ids": group_ids,
            "sample_ids": sample_ids,
            "count": count,
        }
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs, use_cache=False)
        except _StopForward:
            pass

    def nonfinite_layers(self) -> list[int]:
        """Layer ids whose activations held NaN or inf on a real token so far (one host read per layer)."""
        return [self.layer_ids[slot] for slot, flag in sorted(self.nonfinite.items()) if bool(flag)]

    # ------------------------------------------------------------------ results
    def group_counts(self) -> torch.Tensor:
        """``counts[l, n, g]`` on the CPU, int64 (zeros for a layer that never ran)."""
        shape = (self.num_groups, self.num_neurons)
        per_slot = [
            self.counts[s].cpu() if s in self.counts else torch.zeros(shape, dtype=torch.int64)
            for s in range(len(self.layer_ids))
        ]
        return torch.stack(per_slot).permute(0, 2, 1).contiguous()

    def sample_fired(self) -> torch.Tensor:
        """``[S, L]`` float64: per sample and layer, the number of (token, neuron) pairs that fired."""
        per_slot = [
            self.fired[s].cpu() if s in self.fired else torch.zeros(self.num_samples, dtype=torch.float64)
            for s in range(len(self.layer_ids))
        ]
        return torch.stack(per_slot, dim=1)

    # ------------------------------------------------------------------ the hooks
    def _on(self, key: str, device: torch.device) -> torch.Tensor:
        """The batch tensor ``key`` on ``device`` (moved once per batch and device)."""
        value = self._batch[key]
        if value.device == device:
            return value
        return self._batch.setdefault(f"{key}@{device}", value.to(device))

    def _count_hook(self, slot: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, act: torch.Tensor) -> None:
            if not self._batch["count"]:
                return
            device = act.device
            mask = self._on("mask", device)
            # fired[b, t, n] as 0/1 floats; float32 sums of 0/1 are exact below 2**24.
            fired = (act > 0).to(torch.float32)
            # NaN > 0 is False: without this check a numerical blow-up would read as "never fires".
            # A token's row sum is non-finite iff one of its activations is (a float32/64 sum of
            # finite fp16/bf16/fp32 values cannot overflow), and it costs ~1/40 of an isfinite pass.
            wide = torch.float64 if act.dtype == torch.float64 else torch.float32
            bad = ~torch.isfinite(act.sum(dim=-1, dtype=wide))
            flag = self.nonfinite.get(slot)
            if flag is None:
                flag = self.nonfinite[slot] = torch.zeros((), dtype=torch.bool, device=device)
            flag |= (bad & self._on("mask_bool", device)).any()
            # counts[b, n] = sum_t mask[b, t] fired[b, t, n]. Not einops.einsum: on the shared 2-core machine
            # bench_stats could not show it within 1.05x of a plain forward (median 1.11x vs bmm's 1.04x).
            per_sample = torch.bmm(mask[:, None, :], fired).squeeze(1)  # [B, N]
            acc = self.counts.get(slot)
            if acc is None:
                acc = self.counts[slot] = torch.zeros(
                    self.num_groups, self.num_neurons, dtype=torch.int64, device=device
                )
            acc.index_add_(0, self._on("group_ids", device), per_sample.to(torch.int64))
            totals = self.fired.get(slot)
            if totals is None:
                totals = self.fired[slot] = torch.zeros(self.num_samples, dtype=torch.float64, device=device)
            totals.index_copy_(0, self._on("sample_ids", device), per_sample.to(torch.float64).sum(dim=1))
            if self.keep_per_sample:
                self.per_sample[slot] = per_sample

        return hook

    def _zero_pad_rows(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        keep = self._on("mask_bool", h.device)[..., None]
        h = torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device))
        return (h, *output[1:]) if isinstance(output, tuple) else h


def _stop(*_: Any) -> None:
    raise _StopForward

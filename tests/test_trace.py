"""FiringTrace: installs its hooks on entry, removes them all on exit (also on error), stops early."""

from __future__ import annotations

import pytest
import torch

from layerselect.arch import get_layout
from layerselect.stats.trace import FiringTrace
from tiny import tiny_model, tiny_tokenizer


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("left", [False, True])
def test_hooks_are_removed_on_exit_and_on_error(left):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    layout = get_layout(model)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    mask = torch.ones_like(ids)
    before = _hook_count(model)
    with FiringTrace(layout, [0, 1], num_groups=1, num_samples=1, left_padding=left) as trace:
        assert _hook_count(model) > before
        trace.forward(model, ids, mask, group_ids=torch.tensor([0]), sample_ids=torch.tensor([0]))
    assert _hook_count(model) == before
    assert trace.group_counts().shape == (2, layout.intermediate_size, 1)
    assert int(trace.group_counts().sum()) == int(trace.sample_fired().sum())
    assert trace.nonfinite_layers() == []
    with pytest.raises(RuntimeError, match="boom"), FiringTrace(layout, [1], num_groups=1, num_samples=1):
        raise RuntimeError("boom")
    assert _hook_count(model) == before


def test_forward_stops_after_the_last_traced_layer():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    layout = get_layout(model)
    ran = []
    handles = [layer.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, layer in enumerate(layout.layers)]
    ids = torch.tensor([tok("hello")["input_ids"]])
    try:
        with FiringTrace(layout, [0], num_groups=1, num_samples=1) as trace:
            trace.forward(model, ids, torch.ones_like(ids), group_ids=torch.tensor([0]), sample_ids=torch.tensor([0]),
                          count=False)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0] and layout.num_layers > 1
    assert trace.counts == {}  # count=False: the forward ran, nothing was counted

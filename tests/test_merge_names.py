"""``layerselect merge --base`` takes the same model names as the other commands."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from layerselect.cli import main
from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model
from tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


def test_merge_base_takes_a_bundled_model_name(tmp_path, monkeypatch):
    # A converted "smollm2-135m" in a private cache: resolve_model finds it by name, no download.
    monkeypatch.setenv("LAYERSELECT_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "smollm2-135m"
    base = tiny_model("llama", dtype=torch.float32)
    base.save_pretrained(cached)
    tiny_tokenizer().save_pretrained(cached)
    slam = get_slam_model(tiny_model("llama", dtype=torch.float32), SelectiveFFNConfig(layers=[2]))
    with torch.no_grad():
        dict(slam.named_parameters())[next(n for n, _ in slam.named_parameters() if "layers.2.mlp.up_proj" in n)].add_(0.25)
    slam.save_pretrained(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)  # no folder called smollm2-135m here
    assert main(["merge", "--base", "smollm2-135m", "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    orig = load_file(str(cached / "model.safetensors"))
    name = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], orig[name] + 0.25, rtol=0, atol=1e-6)
    other = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(merged[other], orig[other])

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


def test_merge_base_takes_a_model_id_from_the_hugging_face_cache(tmp_path, monkeypatch):
    # A model id laid out as the hub cache does (models--org--name/snapshots/<rev>/), found offline.
    hub = tmp_path / "hub"
    snapshot = hub / "models--someorg--tiny-llama" / "snapshots" / ("0" * 40)
    base = tiny_model("llama", dtype=torch.float32)
    base.save_pretrained(snapshot)
    (hub / "models--someorg--tiny-llama" / "refs").mkdir(parents=True)
    (hub / "models--someorg--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    slam = get_slam_model(tiny_model("llama", dtype=torch.float32), SelectiveFFNConfig(layers=[1]))
    slam.save_pretrained(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "--base", "someorg/tiny-llama", "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_merge_base_that_is_nothing_known_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    rc = main(["merge", "--base", "nobody/nothing", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "local Hugging Face cache" in err and err.count("\n") == 1


def test_train_data_demo_is_the_bundled_pairs():
    from layerselect.data import load_translation_data
    from layerselect.resources import demo_prompts_path

    rows = [line for line in demo_prompts_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = load_translation_data("demo")
    assert len(pairs) == 7 * len(rows) == 140
    assert {p.lang for p in pairs} == {"de", "fr", "es", "ru", "zh", "ja", "sw"}
    assert all(p.target.isascii() for p in pairs)  # the English side

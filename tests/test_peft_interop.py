"""Adapters and the PEFT ecosystem: no false PEFT detection, legacy folders, LoRA export, Selection -> PEFT."""

from __future__ import annotations

import json
import os

import pytest
import torch

from layerselect.errors import FormatError
from layerselect.selective_ffn import (
    SelectiveFFNConfig,
    SelectiveFFNModel,
    get_slam_model,
    load_deltas,
)
from layerselect.selective_ffn.adapter_file import (
    CONFIG_NAME,
    LEGACY_NAMES,
    PATCHES_NAME,
    WEIGHTS_NAME,
)
from tiny import IDS, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _trained(layers=(1, 3), targets=("up", "down"), seed=0):
    base = tiny_model("llama", dtype=torch.float32)
    slam = get_slam_model(tiny_model("llama", dtype=torch.float32), SelectiveFFNConfig(layers=list(layers),
                                                                                         target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in slam.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return base, slam


def test_adapter_folder_is_not_taken_for_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _, slam = _trained()
    slam.save_pretrained(tmp_path / "ad")
    files = sorted(os.listdir(tmp_path / "ad"))
    assert CONFIG_NAME in files and WEIGHTS_NAME in files
    assert "adapter_config.json" not in files and "adapter_model.safetensors" not in files
    assert "peft_type" not in json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    # PEFT: its own clear "no adapter config here" error, before any hub access.
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        peft.PeftConfig.from_pretrained(str(tmp_path / "ad"), local_files_only=True)
    # transformers: not a model folder (no config.json), not a PEFT adapter to chase a base for.
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "ad"), local_files_only=True)


def test_format_1_folders_with_peft_names_still_load(tmp_path):
    base, slam = _trained()
    slam.save_pretrained(tmp_path / "ad")
    d = tmp_path / "ad"
    meta = json.loads((d / CONFIG_NAME).read_text())
    meta.update(meta.pop("config"))  # formats 1-2 kept the config fields among the metadata
    meta["format_version"] = 1
    (d / CONFIG_NAME).unlink()
    (d / LEGACY_NAMES[0]).write_text(json.dumps(meta))
    (d / WEIGHTS_NAME).rename(d / LEGACY_NAMES[1])
    if (d / PATCHES_NAME).exists():
        (d / PATCHES_NAME).rename(d / LEGACY_NAMES[2])
    load_deltas(base, d)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=IDS).logits, slam(input_ids=IDS).logits, rtol=0, atol=0)
    # A new-named config that claims format 1 is inconsistent: refused.
    meta["format_version"] = 1
    (d / LEGACY_NAMES[0]).rename(d / CONFIG_NAME)
    with pytest.raises(FormatError, match="format_version 1"):
        SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=torch.float32), d)


def _merged_logits(slam):
    with torch.no_grad():
        return slam(input_ids=IDS).logits


def test_export_lora_full_rank_reproduces_the_merged_model(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from layerselect.cli import main

    base, slam = _trained(layers=(0, 2), targets=("gate", "up", "down"))
    slam.config.base_model_name_or_path = "tiny-llama"
    slam.save_pretrained(tmp_path / "ad")
    assert main(["export-lora", "--adapter", str(tmp_path / "ad"), "--rank", "full",
                 "--out", str(tmp_path / "lora")]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.2.mlp.down_proj.weight" in printed and "max relative error" in printed
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["layers_to_transform"] == [0, 2]
    assert cfg["lora_alpha"] == cfg["r"] == 32  # hidden size: min(32, 48)
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    report = json.loads((tmp_path / "lora" / "export_report.json").read_text())
    assert report["max_relative_error"] < 1e-6

    lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    lora.eval()
    # LoRA modules exist only on the exported layers and matrices.
    wrapped = sorted(n for n, _ in lora.named_modules() if n.endswith("lora_A.default"))
    assert len(wrapped) == 6 and all(".layers.0." in n or ".layers.2." in n for n in wrapped)
    with torch.no_grad():
        got = lora(input_ids=IDS).logits
    torch.testing.assert_close(got, _merged_logits(slam), rtol=1e-4, atol=1e-4)


def test_export_lora_low_rank_error_is_the_svd_tail(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from layerselect.selective_ffn import export_lora

    base, slam = _trained(layers=(1,))
    slam.save_pretrained(tmp_path / "ad")
    deltas = load_file(str(tmp_path / "ad" / WEIGHTS_NAME))
    rep = export_lora(tmp_path / "ad", tmp_path / "lora4", rank=4)
    assert rep.rank == 4 and set(rep.ranks.values()) == {4}
    for name, d in deltas.items():
        s = torch.linalg.svdvals(d.double())  # Eckart-Young: error = tail of the spectrum
        want = float(s[4:].square().sum().sqrt() / s.square().sum().sqrt())
        assert rep.errors[name] == pytest.approx(want, rel=1e-6)
    # The stored factors multiply back to the rank-4 approximation PEFT applies.
    w = load_file(str(tmp_path / "lora4" / "adapter_model.safetensors"))
    for name, d in deltas.items():
        mod = name[: -len(".weight")]
        ba = w[f"base_model.model.{mod}.lora_B.weight"].double() @ w[f"base_model.model.{mod}.lora_A.weight"].double()
        rel = float(torch.linalg.matrix_norm(d.double() - ba) / torch.linalg.matrix_norm(d.double()))
        assert rel == pytest.approx(rep.errors[name], rel=1e-4)
    lora = peft.PeftModel.from_pretrained(tiny_model("llama", dtype=torch.float32), str(tmp_path / "lora4"))
    assert sum(1 for n, _ in lora.named_modules() if n.endswith("lora_A.default")) == 2
    with pytest.raises(Exception, match="rank"):
        export_lora(tmp_path / "ad", tmp_path / "bad", rank=0)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FormatError):  # a PEFT folder is not a layerselect adapter
        export_lora(tmp_path / "lora4", tmp_path / "again")


def test_selection_to_peft_config_puts_lora_on_selected_layers_only():
    peft = pytest.importorskip("peft")
    from layerselect import Selection

    sel = Selection(layers=[1, 3], scores={0: 0.1, 1: 0.5, 2: 0.2, 3: 0.6}, criterion="custom", reason="test")
    original = peft.LoraConfig(r=4, target_modules=["up_proj", "down_proj"])
    cfg = sel.to_peft_config(original)
    assert cfg.layers_to_transform == [1, 3] and original.layers_to_transform is None
    model = peft.get_peft_model(tiny_model("llama", dtype=torch.float32), cfg)
    wrapped = sorted(n for n, _ in model.named_modules() if n.endswith("lora_A.default"))
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in wrapped})
    assert layers == [1, 3] and len(wrapped) == 4
    loha = sel.to_peft_config(peft.LoHaConfig(r=2, target_modules=["up_proj", "down_proj"]))
    m2 = peft.get_peft_model(tiny_model("llama", dtype=torch.float32), loha)
    loha_layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n, _ in m2.named_parameters()
                          if "hada_w1_a" in n})
    assert loha_layers == [1, 3]
    with pytest.raises(Exception, match="layers_to_transform"):
        sel.to_peft_config(peft.IA3Config(target_modules=["up_proj"], feedforward_modules=[]))

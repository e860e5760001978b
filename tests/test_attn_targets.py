"""Attention projections as targets (the paper's sub-layer ablation): roles, fused qkv, counts, adapters, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from layerselect.arch import (
    ATTN_ROLES,
    TARGET_ROLES,
    AttnSpec,
    _infer_attention,
    get_layout,
    normalize_target_modules,
)
from layerselect.errors import (
    BaseModelMismatchError,
    InvalidInputError,
    UnsupportedArchitectureError,
)
from layerselect.selective_ffn import (
    SelectiveFFNConfig,
    SelectiveFFNModel,
    get_slam_model,
    merge_checkpoint,
)
from tiny import FAMILIES, IDS, tiny_model, tiny_tokenizer


def _train(model, steps=3, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_target_names_normalise():
    assert TARGET_ROLES == ("gate", "up", "down", "q", "k", "v", "o")
    assert normalize_target_modules("attn") == list(ATTN_ROLES)
    assert normalize_target_modules(["ffn", "attn"]) == list(TARGET_ROLES)
    assert normalize_target_modules(["o_proj", "q", "up_proj"]) == ["up", "q", "o"]
    assert normalize_target_modules("qkv_proj") == ["q", "k", "v"]
    assert normalize_target_modules("all") == ["gate", "up", "down"]  # unchanged meaning: every FFN matrix
    with pytest.raises(InvalidInputError, match="unknown target 'wq'"):
        SelectiveFFNConfig(layers=[0], target_modules=["wq"])


# Llama-2 counts from the issue: layers 0-5 on the meta device (no weights allocated).
@pytest.mark.parametrize(
    "h, i, n, targets, trainable, total, pct",
    [
        (4096, 11008, 32, ["attn"], 402_653_184, 6_738_415_616, "5.9755"),
        (4096, 11008, 32, ["attn", "ffn"], 1_214_251_008, 6_738_415_616, "18.0198"),
        (5120, 13824, 40, ["attn"], 629_145_600, 13_015_864_320, "4.8337"),
    ],
)
def test_llama2_attention_parameter_counts(capsys, h, i, n, targets, trainable, total, pct):
    # hand check: q,k,v,o are h x h each (no GQA in Llama-2 7B/13B); gate/up/down are h x i
    per_layer = 4 * h * h + (3 * h * i if "ffn" in targets else 0)
    assert trainable == 6 * per_layer
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                         num_attention_heads=n, vocab_size=32000)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = get_slam_model(base, SelectiveFFNConfig(layers=range(6), target_modules=targets))
    assert model.get_nb_trainable_parameters() == (trainable, total)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct}"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_names_in_every_family(family):
    model = tiny_model(family, dtype=torch.float32)
    layout = get_layout(model)
    names = layout.parameter_names(2, ["q", "k", "v", "o"])
    params = dict(model.named_parameters())
    assert all(n in params for n in names)
    if family == "phi3":
        assert names == ["model.layers.2.self_attn.qkv_proj.weight", "model.layers.2.self_attn.o_proj.weight"]
    else:
        assert names == [f"model.layers.2.self_attn.{r}_proj.weight" for r in "qkvo"]


def test_only_attention_of_selected_layers_trains_and_round_trips(tmp_path):
    base = tiny_model("llama", dtype=torch.float32)
    before = copy.deepcopy(base.state_dict())
    model = get_slam_model(base, SelectiveFFNConfig(layers=[1, 2], target_modules=["attn", "down"]))
    expected = {f"model.layers.{i}.self_attn.{r}_proj.weight" for i in (1, 2) for r in "qkvo"}
    expected |= {f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)}
    assert set(model.target_names) == expected
    _train(model)
    changed = {k for k, v in base.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == expected
    model.save_pretrained(tmp_path / "adapter")
    deltas = load_file(str(tmp_path / "adapter" / "layerselect_deltas.safetensors"))
    assert set(deltas) == expected
    trained = {k: v.clone() for k, v in base.state_dict().items()}

    # load onto a fresh base: every weight bit for bit equal to the trained model
    fresh = tiny_model("llama", dtype=torch.float32)
    loaded = SelectiveFFNModel.from_pretrained(fresh, tmp_path / "adapter")
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with loaded.disable_adapter():
        assert torch.equal(fresh.model.layers[1].self_attn.q_proj.weight, before["model.layers.1.self_attn.q_proj.weight"])

    # the streaming merge of a saved base gives the same weights
    tiny_model("llama", dtype=torch.float32).save_pretrained(tmp_path / "base")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for k in expected:
        assert torch.equal(merged[k], trained[k]), k

    # a base whose attention differs is refused (fingerprint), never silently patched
    other = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        other.model.layers[2].self_attn.k_proj.weight.add_(0.01)
    with pytest.raises(BaseModelMismatchError, match="k_proj"):
        SelectiveFFNModel.from_pretrained(other, tmp_path / "adapter")


@pytest.mark.parametrize("roles, trained_rows", [(["k"], (32, 48)), (["q", "v"], None), (["qkv"], (0, 64))])
def test_fused_qkv_masks_untargeted_rows(tmp_path, roles, trained_rows):
    # tiny phi3: 4 heads x head_dim 8 = 32 query rows, 2 kv heads x 8 = 16 key rows, 16 value rows
    base = tiny_model("phi3", dtype=torch.float32)
    before = base.model.layers[1].self_attn.qkv_proj.weight.detach().clone()
    model = get_slam_model(base, SelectiveFFNConfig(layers=[1], target_modules=roles))
    assert model.target_names == ["model.layers.1.self_attn.qkv_proj.weight"]
    n_rows = {"k": 16, "qv": 48, "qkv": 64}["".join(r for r in "qkv" if r in normalize_target_modules(roles))]
    assert model.get_nb_trainable_parameters()[0] == n_rows * 32
    _train(model)
    after = base.model.layers[1].self_attn.qkv_proj.weight.detach()
    changed_rows = (after != before).any(dim=1).nonzero()[:, 0]
    if trained_rows is None:  # q and v: rows 0-31 and 48-63 change, the key rows 32-47 do not
        assert torch.equal(after[32:48], before[32:48])
        assert set(changed_rows.tolist()) <= set(range(32)) | set(range(48, 64)) and len(changed_rows) > 40
    else:
        lo, hi = trained_rows
        assert torch.equal(after[:lo], before[:lo]) and torch.equal(after[hi:], before[hi:])
        assert len(changed_rows) == hi - lo
    model.save_pretrained(tmp_path / "a")
    fresh = tiny_model("phi3", dtype=torch.float32)
    SelectiveFFNModel.from_pretrained(fresh, tmp_path / "a")
    assert torch.equal(fresh.model.layers[1].self_attn.qkv_proj.weight, after)


def test_attention_found_by_introspection():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(4, 4) for _ in range(4))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attn()

    assert _infer_attention(Layer(), "layers") == AttnSpec(attn="attention", q="wq", k="wk", v="wv", o="wo")
    with pytest.raises(UnsupportedArchitectureError, match="attention projections"):
        _infer_attention(nn.Module(), "layers")


def test_tokenizer_unused_but_gap_sees_attention_adapter():
    """An attention-only adapter changes the reasoning-gap NLL (end to end with the new targets)."""
    from layerselect.eval import reasoning_gap

    base = tiny_model("llama", max_position_embeddings=512)
    qs = {"en": ["What is 2 + 3?"], "de": ["Was ist 2 + 3?"]}
    before = reasoning_gap(base, tiny_tokenizer(), qs, ["2 + 3 = 5"], bootstrap=0)["nll"]["de"]
    model = get_slam_model(base, SelectiveFFNConfig(layers=[0], target_modules="o"))
    with torch.no_grad():
        base.model.layers[0].self_attn.o_proj.weight.mul_(2.0)
    after = reasoning_gap(model, tiny_tokenizer(), qs, ["2 + 3 = 5"], bootstrap=0)["nll"]["de"]
    assert after != pytest.approx(before, rel=1e-6)
    with model.disable_adapter():
        assert reasoning_gap(model, tiny_tokenizer(), qs, ["2 + 3 = 5"], bootstrap=0)["nll"]["de"] == before

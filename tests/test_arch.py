import pytest
import torch

from layerselect.arch import FAMILIES as ADAPTER_TABLE
from layerselect.arch import get_layout
from layerselect.errors import InvalidInputError, UnsupportedArchitectureError
from tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_gated_ffn(family):
    model = tiny_model(family)
    layout = get_layout(model)
    assert layout.family == family
    assert layout.num_layers == 4
    assert layout.intermediate_size == 48
    ffn = layout.ffn(2)
    x = torch.randn(3, 32, dtype=torch.float64)
    # The activation module really computes f(W_gate x): compare to the MLP's output.
    if layout.spec.fused:
        gate, up = ffn.gate_up(x).chunk(2, dim=-1)
    else:
        gate, up = ffn.gate(x), ffn.up(x)
    expected = ffn.down(ffn.act(gate) * up)
    torch.testing.assert_close(ffn.mlp(x), expected, rtol=0, atol=0)
    names = layout.parameter_names(2, ["up", "down"])
    params = dict(model.named_parameters())
    assert all(n in params for n in names)
    assert names[-1] == "model.layers.2.mlp.down_proj.weight"


def test_fused_family_names_the_fused_matrix_once():
    layout = get_layout(tiny_model("phi3"))
    assert layout.parameter_names(0, ["gate", "up"]) == ["model.layers.0.mlp.gate_up_proj.weight"]


def _tiny_gemma3_multimodal():
    """Gemma-3 as transformers builds it from a ``gemma3`` config: text decoder inside an image-text model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny import tiny_config

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = AutoConfig.for_model("gemma3", text_config=tiny_config("gemma3_text").to_dict(),
                                  vision_config=vision, mm_tokens_per_image=4)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"])
def test_every_required_family_is_known_not_inferred(family):
    # A family missing from the table (or whose entry names the wrong modules) is only inferred.
    model = _tiny_gemma3_multimodal() if family == "gemma3" else tiny_model(family)
    layout = get_layout(model)
    assert layout.family == family
    assert layout.spec is ADAPTER_TABLE[family]
    assert (layout.num_layers, layout.intermediate_size) == (4, 48)


def test_unknown_family_with_usual_names_is_inferred():
    model = tiny_model("llama")
    model.config.model_type = "my_new_llama"
    layout = get_layout(model)
    assert layout.family == "my_new_llama (inferred)"
    assert layout.parameter_names(0, ["gate"]) == ["model.layers.0.mlp.gate_proj.weight"]


def test_model_without_gated_ffn_is_refused_with_what_was_found():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="c_fc"):
        get_layout(model)


def test_model_without_layers_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="decoder layers"):
        get_layout(torch.nn.Linear(2, 2))


def test_check_layers():
    layout = get_layout(tiny_model("llama"))
    assert layout.check_layers([3, 0]) == [0, 3]
    with pytest.raises(InvalidInputError, match="out of range.*4 decoder layers"):
        layout.check_layers([4])
    with pytest.raises(InvalidInputError, match="duplicate"):
        layout.check_layers([1, 1])
    with pytest.raises(InvalidInputError, match="not an integer"):
        layout.check_layers([1.0])


def test_the_names_of_an_unreleased_draft_are_gone():
    import layerselect.arch as arch

    for old in ("get_adapter", "ModelAdapter"):  # get_layout / ModelLayout; no release ever had them
        assert not hasattr(arch, old)

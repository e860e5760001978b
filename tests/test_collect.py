"""ActivationStats.collect against independent computations."""

import pytest
import torch

from layerselect import ActivationStats
from layerselect.arch import get_layout
from layerselect.errors import InvalidInputError, UnsupportedArchitectureError
from tiny import FAMILIES, tiny_model, tiny_texts, tiny_tokenizer


def reference_counts(model, tokenizer, texts):
    """Slow, obvious recomputation: run each text alone, capture what enters each MLP,
    and recompute f(gate(x)) token by token (no layerselect hooks involved)."""
    layout = get_layout(model)
    spec = layout.spec
    n_layers, n_neurons = layout.num_layers, layout.intermediate_size
    counts = torch.zeros(n_layers, n_neurons, len(texts), dtype=torch.int64)
    fractions = []
    captured = {}
    handles = [
        layout.ffn(i).mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach()))
        for i in range(n_layers)
    ]
    try:
        for g, items in enumerate(texts.values()):
            for text in items:
                ids = tokenizer(text)["input_ids"]
                with torch.no_grad():
                    model(input_ids=torch.tensor([ids]))
                per_layer = []
                for i in range(n_layers):
                    mlp = getattr(layout.layers[i], spec.mlp)
                    act = getattr(mlp, spec.act)
                    fired_fraction = 0.0
                    for t in range(len(ids)):
                        x = captured[i][0, t]
                        if spec.fused:
                            gate = getattr(mlp, spec.gate_up)(x)[:n_neurons]
                        else:
                            gate = getattr(mlp, spec.gate)(x)
                        fired = act(gate) > 0
                        counts[i, :, g] += fired.long()
                        fired_fraction += fired.double().mean().item()
                    per_layer.append(fired_fraction / len(ids))
                fractions.append(per_layer)
    finally:
        for h in handles:
            h.remove()
    return counts, torch.tensor(fractions, dtype=torch.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_equal_independent_token_by_token_computation(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    texts = tiny_texts(3)
    stats = ActivationStats.collect(model, tok, texts, batch_size=5, progress=False)
    expected, fractions = reference_counts(model, tok, texts)
    assert torch.equal(stats.counts, expected)
    assert stats.counts.dtype == torch.int64
    lengths = {g: sum(len(tok(t)["input_ids"]) for t in items) for g, items in texts.items()}
    assert stats.tokens.tolist() == [lengths[g] for g in texts]
    # Samples are in input order: group by group, text by text.
    torch.testing.assert_close(stats.sample_fraction, fractions, rtol=0, atol=1e-12)
    assert stats.sample_group.tolist() == [g for g, items in enumerate(texts.values()) for _ in items]
    assert stats.sample_index.tolist() == [i for items in texts.values() for i in range(len(items))]


@pytest.mark.parametrize(
    ("family", "attn"), [("llama", "eager"), ("llama", "sdpa"), ("gemma3_text", "sdpa"), ("phi3", "eager")]
)
def test_batch_size_and_padding_side_are_bitwise_invariant_in_float64(family, attn):
    model, tok = tiny_model(family), tiny_tokenizer()
    model.config._attn_implementation = attn
    texts = tiny_texts(5)
    base = ActivationStats.collect(model, tok, texts, batch_size=1, progress=False)
    for batch_size, side in [(16, "right"), (16, "left"), (5, "left")]:
        other = ActivationStats.collect(model, tok, texts, batch_size=batch_size, padding_side=side, progress=False)
        assert torch.equal(base.counts, other.counts), (batch_size, side)
        assert torch.equal(base.tokens, other.tokens)
        torch.testing.assert_close(base.sample_fraction, other.sample_fraction, rtol=0, atol=1e-12)
        assert not other.sample_fraction.isnan().any()


def test_float32_batching_only_flips_values_near_zero():
    model, tok = tiny_model("llama", dtype=torch.float32), tiny_tokenizer()
    texts = tiny_texts(5)
    a = ActivationStats.collect(model, tok, texts, batch_size=1, progress=False)
    b = ActivationStats.collect(model, tok, texts, batch_size=16, padding_side="left", progress=False)
    diff = (a.counts - b.counts).abs()
    # float32 matmuls in other shapes round differently; only pre-activations within
    # rounding of zero may flip (reference: 200 of 5.1e8 counts on SmolLM2-135M).
    assert diff.max() <= 1
    assert diff.sum() <= max(2, a.counts.numel() // 1000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_collect_close_to_float64(dtype):
    tok, texts = tiny_tokenizer(), tiny_texts(4)
    ref = ActivationStats.collect(tiny_model("llama"), tok, texts, progress=False)
    low = ActivationStats.collect(tiny_model("llama").to(dtype), tok, texts, progress=False)
    assert low.counts.dtype == torch.int64
    assert torch.equal(low.tokens, ref.tokens)
    # Same model in lower precision: activation ratios agree to a few percent.
    torch.testing.assert_close(low.activation_ratio(), ref.activation_ratio(), rtol=0, atol=0.05)


def test_layer_subset_matches_full_run_and_stops_early():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = tiny_texts(3)
    full = ActivationStats.collect(model, tok, texts, progress=False)
    calls = {"layer3": 0, "head": 0}
    layout = get_layout(model)
    h1 = layout.layers[3].register_forward_hook(lambda *a: calls.__setitem__("layer3", calls["layer3"] + 1))
    h2 = model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    try:
        part = ActivationStats.collect(model, tok, texts, layers=[2, 0], progress=False)
        ActivationStats.collect(model, tok, texts, progress=False)  # all layers: still no LM head
    finally:
        h1.remove()
        h2.remove()
    assert part.layers == [0, 2]
    assert torch.equal(part.counts, full.counts[[0, 2]])
    assert calls["head"] == 0
    assert calls["layer3"] == 1  # only from the all-layers run: 12 texts make one batch
    assert torch.equal(part.sample_fraction, full.sample_fraction[:, [0, 2]])


def test_per_sample_counts_sum_to_group_counts():
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    texts = tiny_texts(4)
    stats = ActivationStats.collect(model, tok, texts, per_sample_counts=True, batch_size=3, progress=False)
    sc = stats.sample_counts
    assert sc.shape == (16, 4, 48) and sc.dtype == torch.int16
    for g in range(4):
        summed = sc[stats.sample_group == g].long().sum(0)  # [L, N]
        assert torch.equal(summed, stats.counts[:, :, g])
    frac = sc.double().sum(-1) / (stats.sample_tokens[:, None].double() * 48)
    torch.testing.assert_close(frac, stats.sample_fraction, rtol=0, atol=1e-12)


def test_merge_of_two_runs_equals_one_run():
    model, tok = tiny_model("mistral"), tiny_tokenizer()
    texts = tiny_texts(6)
    first = {g: t[:3] for g, t in texts.items()}
    second = {g: t[3:] for g, t in texts.items() if g != "zh"}
    second = {"xx": ["Ein ganz anderer Text."], **second}
    both = ActivationStats.collect(model, tok, first, progress=False) + ActivationStats.collect(
        model, tok, second, progress=False
    )
    assert both.groups == ["en", "de", "sw", "zh", "xx"]
    direct = ActivationStats.collect(
        model, tok, {g: texts[g] for g in ("en", "de", "sw")} | {"zh": texts["zh"][:3], "xx": second["xx"]},
        progress=False,
    )
    assert torch.equal(both.counts, direct.counts)
    assert torch.equal(both.tokens, direct.tokens)
    assert both.num_samples == direct.num_samples
    # Question indices stay distinct within a group (texts 3.. of "en" follow 0..2).
    en = both.sample_index[both.sample_group == 0].tolist()
    assert en == [0, 1, 2, 3, 4, 5]


def test_sample_weights_reproduce_count_based_ratio():
    model, tok = tiny_model("gemma"), tiny_tokenizer()
    stats = ActivationStats.collect(model, tok, tiny_texts(5), progress=False)
    ones = torch.ones(stats.num_samples)
    torch.testing.assert_close(stats.activation_ratio(sample_weights=ones), stats.activation_ratio(), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.msd(sample_weights=ones), stats.msd(), rtol=0, atol=1e-15)
    # Doubling every sample of one group is the same as counting it twice.
    w = torch.where(stats.sample_group == 1, 2.0, 1.0).double()
    torch.testing.assert_close(stats.activation_ratio(sample_weights=w), stats.activation_ratio(), rtol=0, atol=1e-12)


class _EmptyTokenizer:
    pad_token_id = 0

    def __call__(self, text, **kwargs):
        return {"input_ids": []}


def test_clear_errors():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(InvalidInputError, match="group 'de' has no texts"):
        ActivationStats.collect(model, tok, {"en": ["a b"], "de": []}, progress=False)
    with pytest.raises(InvalidInputError, match="text 1 of group 'en' is empty"):
        ActivationStats.collect(model, tok, {"en": ["a b", "  "]}, progress=False)
    with pytest.raises(InvalidInputError, match="tokenizes to nothing"):
        ActivationStats.collect(model, _EmptyTokenizer(), {"en": ["a b"]}, progress=False)
    with pytest.raises(InvalidInputError, match="single string"):
        ActivationStats.collect(model, tok, {"en": "a b"}, progress=False)
    with pytest.raises(InvalidInputError, match="out of range"):
        ActivationStats.collect(model, tok, {"en": ["a"]}, layers=[7], progress=False)
    with pytest.raises(InvalidInputError, match="padding_side"):
        ActivationStats.collect(model, tok, {"en": ["a"]}, padding_side="middle", progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=400))
    with pytest.raises(UnsupportedArchitectureError):
        ActivationStats.collect(gpt2, tok, {"en": ["a"]}, progress=False)


def test_models_dispatched_with_accelerate_offload_give_the_same_counts(tmp_path):
    from accelerate import dispatch_model

    tok, texts = tiny_tokenizer(), tiny_texts(3)
    ref = ActivationStats.collect(tiny_model("llama"), tok, texts, progress=False)
    device_map = {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
        "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu",
    }
    dispatched = dispatch_model(tiny_model("llama"), device_map=device_map, offload_dir=str(tmp_path))
    assert hasattr(dispatched.model.layers[1], "_hf_hook")  # weights stream in from disk per forward
    got = ActivationStats.collect(dispatched, tok, texts, progress=False)
    assert torch.equal(got.counts, ref.counts)
    torch.testing.assert_close(got.sample_fraction, ref.sample_fraction, rtol=0, atol=1e-12)

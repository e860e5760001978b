"""The label-only loss (layerselect.loss) against an independent full-logits computation.

The reference is always the plain model's full ``logits`` with a log-softmax over
the whole vocabulary at every labelled position (float64 models: float64
throughout; float32 models: also HF's own ``model(..., labels=...).loss``).
"""

from __future__ import annotations

import pytest
import torch

from layerselect.arch import LM_HEADS
from layerselect.data import TranslationExample
from layerselect.errors import InvalidInputError
from layerselect.loss import label_only_loss, label_only_reason
from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model
from layerselect.train import train_slam, translation_loss
from tiny import FAMILIES, IDS, tiny_model, tiny_tokenizer

# Tiny matmuls: threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("single_thread")


def _labels() -> torch.Tensor:
    labels = IDS.clone()
    labels[0, :4] = -100  # a prompt of 4 tokens
    labels[1, :6] = -100  # a prompt of 6 tokens
    labels[1, 8] = -100  # and a hole in the target
    return labels


MASK = torch.ones_like(IDS)
MASK[1, -1] = 0  # one right pad (its label is ignored too)

# Every family in the table; soft-capping set low so it bites on the tiny model's logits.
CASES = [(f, {"final_logit_softcapping": 2.0} if f in ("gemma2", "gemma3_text") else {}) for f in FAMILIES]
CASES += [("llama", {"tie_word_embeddings": True}), ("gemma3_text", {"tie_word_embeddings": True,
                                                                      "final_logit_softcapping": 2.0})]


def _reference(model, labels, dtype=torch.float64):
    """Per-token NLL from the full logits of the plain forward (independent of layerselect.loss)."""
    logits = model(input_ids=IDS, attention_mask=MASK).logits
    labels = labels.masked_fill(torch.nn.functional.pad(MASK[:, 1:] == 0, (1, 0)), -100)
    shift = labels[:, 1:]
    keep = shift != -100
    logp = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)
    nll = -logp.gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll, keep, labels


def _slam(family, dtype, **overrides):
    model = tiny_model(family, dtype=dtype, **overrides)
    get_slam_model(model, SelectiveFFNConfig(layers=[1, 2]))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".mlp." in n for n in trained)
    return model, trained


def _grads(params):
    out = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_supported_family_is_in_the_test_cases():
    assert set(LM_HEADS) <= set(FAMILIES)


@pytest.mark.parametrize("family,overrides", CASES, ids=[f"{f}-{'-'.join(o) or 'plain'}" for f, o in CASES])
def test_float64_loss_per_sequence_sums_and_gradients_match_full_logits(family, overrides):
    model, trained = _slam(family, torch.float64, **overrides)
    assert label_only_reason(model) is None
    nll, keep, labels = _reference(model, _labels())
    ref_loss = nll[keep].mean()
    ref_loss.backward()
    ref_grads = _grads(trained)

    out = label_only_loss(model, IDS, labels, MASK, label_only=True, chunk_size=3)
    assert out.label_only
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-12 * ref_loss.item()
    assert out.nll_sum.dtype == torch.float64
    torch.testing.assert_close(out.nll_sum, (nll * keep).sum(1), rtol=1e-12, atol=0)
    assert out.token_count.tolist() == keep.sum(1).tolist()
    torch.testing.assert_close(out.token_nll, nll[keep], rtol=1e-12, atol=0)
    out.loss.backward()
    for name, g in _grads(trained).items():
        assert _rel(g, ref_grads[name]) <= 1e-10, name


@pytest.mark.parametrize("family,overrides", CASES, ids=[f"{f}-{'-'.join(o) or 'plain'}" for f, o in CASES])
def test_float32_loss_and_gradients_match_hf_standard_path(family, overrides):
    model, trained = _slam(family, torch.float32, **overrides)
    labels = _reference(model, _labels())[2]
    std = model(input_ids=IDS, attention_mask=MASK, labels=labels).loss  # HF's own causal-LM loss
    std.backward()
    ref_grads = _grads(trained)
    out = label_only_loss(model, IDS, labels, MASK)
    assert out.label_only
    assert abs(out.loss.item() - std.item()) <= 1e-6 * std.item()
    out.loss.backward()
    for name, g in _grads(trained).items():
        assert _rel(g, ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("family,overrides", CASES, ids=[f"{f}-{'-'.join(o) or 'plain'}" for f, o in CASES])
def test_bf16_autocast_loss_and_gradients_match_hf_standard_path_under_the_same_autocast(family, overrides):
    # The head runs in bf16 as autocast would run it (cast once per call instead of per chunk).
    model, trained = _slam(family, torch.float32, **overrides)
    labels = _reference(model, _labels())[2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        std = model(input_ids=IDS, attention_mask=MASK, labels=labels).loss
    std.backward()
    ref_grads = _grads(trained)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = label_only_loss(model, IDS, labels, MASK, chunk_size=3)
    assert out.label_only and out.token_nll.dtype == torch.float32
    assert abs(out.loss.item() - std.item()) <= 1e-3 * std.item()
    out.loss.backward()
    for name, g in _grads(trained).items():
        assert g.dtype == torch.float32
        assert _rel(g, ref_grads[name]) <= 3e-2, name
    # and it is really bf16: the fp32 loss differs beyond fp32 rounding
    fp32 = label_only_loss(model, IDS, labels, MASK).loss.item()
    assert abs(out.loss.item() - fp32) > 1e-6 * fp32


def test_softcapping_and_chunking_are_really_exercised():
    """The soft-capped loss differs from an uncapped head, and every chunk size gives the same result."""
    model = tiny_model("gemma3_text", final_logit_softcapping=2.0).requires_grad_(False)
    labels = _labels()
    capped = label_only_loss(model, IDS, labels, MASK, chunk_size=1)
    assert capped.label_only
    model.config.final_logit_softcapping = None
    uncapped = label_only_loss(model, IDS, labels, MASK)
    assert abs(float(capped.loss) - float(uncapped.loss)) > 1e-2
    model.config.final_logit_softcapping = 2.0
    for chunk in (2, 5, 1000):
        torch.testing.assert_close(label_only_loss(model, IDS, labels, MASK, chunk_size=chunk).token_nll,
                                   capped.token_nll, rtol=1e-14, atol=0)


def test_num_items_in_batch_divides_the_sum():
    model = tiny_model("llama").requires_grad_(False)
    labels = _labels()
    out = label_only_loss(model, IDS, labels, MASK, label_only=True, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(out.loss, out.nll_sum.sum() / 40, rtol=1e-14, atol=0)
    assert out.mean == pytest.approx(float(out.nll_sum.sum() / out.token_count.sum()), rel=1e-15)


def test_unknown_family_falls_back_to_the_full_logits_path():
    """Granite scales its logits (``logits_scaling``); it is not in LM_HEADS, so the standard path runs."""
    model = tiny_model("granite", logits_scaling=4.0)
    reason = label_only_reason(model)
    assert reason is not None and "granite" in reason
    labels = _labels()
    nll, keep, labels = _reference(model, labels)
    out = label_only_loss(model, IDS, labels, MASK)
    assert not out.label_only
    torch.testing.assert_close(out.token_nll, nll[keep], rtol=1e-12, atol=0)
    with pytest.raises(InvalidInputError, match="granite"):
        label_only_loss(model, IDS, labels, MASK, label_only=True)


def test_trained_head_falls_back_and_label_only_false_forces_the_standard_path():
    model = tiny_model("llama")
    assert "trained" in label_only_reason(model)  # tiny_model leaves every weight trainable
    with torch.no_grad():  # no gradient, so a trainable head does not matter
        assert label_only_reason(model) is None
        assert label_only_loss(model, IDS, _labels(), MASK).label_only
    model.requires_grad_(False)
    assert label_only_reason(model) is None
    assert not label_only_loss(model, IDS, _labels(), MASK, label_only=False).label_only


def _pairs(n: int = 12) -> list[TranslationExample]:
    return [TranslationExample("de", f"Janet hat {i} Enten.", f"Janet has {i} ducks.") for i in range(n)]


def test_translation_loss_label_only_equals_standard():
    # A freshly loaded model (every weight trainable), as in the demo and the CLI: no_grad allows label-only.
    tok, model = tiny_tokenizer(), tiny_model("gemma2", final_logit_softcapping=2.0)
    fast = translation_loss(model, tok, _pairs(), batch_size=5, label_only=True)
    slow = translation_loss(model, tok, _pairs(), batch_size=5, label_only=False)
    assert fast == pytest.approx(slow, rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_slam_trainer_label_only_matches_standard_with_grad_accumulation(tmp_path, family):
    """Two optimizer steps of 2 x 3 pairs: the trained weights and logged losses match the HF path."""
    tok = tiny_tokenizer()
    args = dict(max_steps=2, per_device_train_batch_size=3, gradient_accumulation_steps=2, learning_rate=1e-2,
                warmup_steps=0, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1)
    results = {}
    for mode in (True, False):
        model = tiny_model(family, final_logit_softcapping=2.0) if family == "gemma3_text" else tiny_model(family)
        _, trainer = train_slam(model, tok, _pairs(), SelectiveFFNConfig(layers=[1]), output_dir=tmp_path / str(mode),
                                return_trainer=True, label_only=mode, **args)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        results[mode] = ({n: p.detach().clone() for n, p in model.named_parameters() if ".1.mlp." in n}, losses)
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-6)
    for name, value in results[True][0].items():
        # HF's loss runs in float32 even for float64 models; the label-only path keeps float64.
        assert _rel(value, results[False][0][name]) <= 1e-6, name


def test_slam_trainer_evaluation_with_label_only_true_takes_the_standard_path(tmp_path):
    """Evaluation asks compute_loss for outputs: it runs the full-logits path even with label_only=True."""
    tok = tiny_tokenizer()
    _, trainer = train_slam(tiny_model("llama"), tok, _pairs(), SelectiveFFNConfig(layers=[1]), output_dir=tmp_path,
                            return_trainer=True, label_only=True, eval_dataset=_pairs(4), max_steps=1,
                            per_device_train_batch_size=4, gradient_accumulation_steps=1, save_strategy="no",
                            eval_strategy="steps", eval_steps=1, use_cpu=True, disable_tqdm=True, report_to="none")
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) >= 1
    model = trainer.model
    assert evals[-1] == pytest.approx(translation_loss(model, tok, _pairs(4), label_only=True), rel=1e-5)

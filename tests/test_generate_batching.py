"""The one padding helper, and generation through transformers' own stop strings."""

from __future__ import annotations

import pytest
import torch

from layerselect._running import pad_batch
from layerselect.errors import InvalidInputError
from layerselect.eval import DEFAULT_STOP, TransformersGenerator, build_prompt, truncate_at_stop
from tiny import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_batch_matches_the_tokenizers_own_padding(side):
    tok = tiny_tokenizer()  # has a pad token, so tokenizer.pad can be the independent reference
    texts = ["a", "Janet has 16 ducks and sells eggs", "two words"]
    seqs = tok(texts)["input_ids"]
    ids, mask = pad_batch(seqs, tok.pad_token_id, padding_side=side)
    ref = tok.pad({"input_ids": seqs}, padding_side=side, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert tok.padding_side == "right"  # the tokenizer is never changed


def test_pad_batch_edges():
    ids, mask = pad_batch([[], [4, 5]], pad_id=7, padding_side="left")
    assert ids.tolist() == [[7, 7], [4, 5]] and mask.tolist() == [[0, 0], [1, 1]]
    ids, mask = pad_batch([], pad_id=0)
    assert ids.shape == (0, 0) and mask.shape == (0, 0)
    with pytest.raises(InvalidInputError, match="padding_side"):
        pad_batch([[1]], 0, padding_side="middle")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", dtype=torch.float32, max_position_embeddings=512), tiny_tokenizer()


def _first_word_piece(text: str) -> str:
    """The first two letters in a row of ``text`` (the tiny model also emits bytes that decode to junk)."""
    return next(text[i : i + 2] for i in range(len(text) - 1) if text[i : i + 2].isalpha() and text[i : i + 2].isascii())


def test_stop_strings_stop_early_and_the_text_is_cut_before_them(tiny):
    model, tok = tiny
    prompts = [build_prompt(q) for q in ("Half of 8?", "Tom has 3 apples and buys 4 more.", "2 + 2?")]
    free = TransformersGenerator(model, tok, batch_size=3, max_new_tokens=16, stop=())(prompts)
    stop = tuple(_first_word_piece(f) for f in free)  # a stop string each row produces
    gen = TransformersGenerator(model, tok, batch_size=3, max_new_tokens=16, stop=stop)
    new_tokens = []
    real_generate = model.generate

    def counting_generate(**kw):
        out = real_generate(**kw)
        new_tokens.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    model.generate = counting_generate
    try:
        cut = gen(prompts)
    finally:
        del model.generate
    # Each response is the free one cut before the first stop string (greedy: same tokens up to there).
    assert cut == [truncate_at_stop(f, stop) for f in free]
    assert all(len(c) < len(f) for c, f in zip(cut, free))
    assert len(new_tokens) == 1 and new_tokens[0] < 16  # every row stopped, so generate ended early


def test_default_stop_cuts_a_new_instruction_block():
    text = " 9 * 2 = 18. The answer is 18.\n\n### Instruction:\nWrite a poem"
    assert truncate_at_stop(text, DEFAULT_STOP) == " 9 * 2 = 18. The answer is 18."


def test_pad_token_id_falls_back_to_eos_then_zero_or_refuses():
    from types import SimpleNamespace

    from layerselect._running import pad_token_id
    from layerselect.errors import InvalidInputError

    assert pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    with pytest.raises(InvalidInputError, match="neither a pad nor an EOS"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None), required=True)


def test_eval_mode_restores_the_training_flag_even_on_an_error():
    import torch

    from layerselect._running import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not model[1].training
        raise RuntimeError("boom")
    assert model.training and model[1].training
    frozen = torch.nn.Linear(2, 2).eval()
    with eval_mode(frozen):
        pass
    assert not frozen.training  # a model in eval mode stays there

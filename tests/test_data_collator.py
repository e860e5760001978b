"""TranslationCollator against transformers' DataCollatorForSeq2Seq on real tokenized pairs.

Where both apply (a pad token, right padding) the batches are identical; the two cases where
they differ are why layerselect keeps its own collator (see layerselect/data/collate.py).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from layerselect.data import TranslationCollator, TranslationDataset, demo_pairs
from layerselect.models import cache_dir
from tiny import tiny_tokenizer


def _tokenizer(name: str, padding_side: str | None = None):
    if name == "tiny":
        tok = copy.deepcopy(tiny_tokenizer())
        if padding_side:
            tok.padding_side = padding_side
        return tok
    path = cache_dir() / "models" / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{name} is not cached at {path}")
    return _load(path, padding_side)


@functools.cache
def _load(path, padding_side: str | None):  # a real tokenizer takes seconds to load
    return AutoTokenizer.from_pretrained(path, **({"padding_side": padding_side} if padding_side else {}))


def _features(tok, truncate: bool = False) -> list[dict[str, list[int]]]:
    pairs = demo_pairs()[::5]  # 28 pairs, 7 languages: many different lengths
    ds = TranslationDataset(pairs, tok, max_length=None)
    if truncate:  # cut the longer half at an odd length
        lengths = sorted(len(f["input_ids"]) for f in ds.features)
        ds = TranslationDataset(pairs, tok, max_length=lengths[len(lengths) // 2] | 1)
        assert ds.truncated > 0
    feats = [ds[i] for i in range(len(ds))]
    lengths = {len(f["input_ids"]) for f in feats}
    assert len(lengths) > 5 and any(n % 2 for n in lengths)
    return feats


@pytest.mark.parametrize("name", ["tiny", "gemma-3-270m", "smollm2-135m"])
@pytest.mark.parametrize("multiple", [None, 8, 3])
def test_same_batches_as_datacollatorforseq2seq_with_right_padding(name, multiple):
    tok = _tokenizer(name, padding_side="right")
    feats = _features(tok, truncate=multiple == 3)
    ours = TranslationCollator.for_tokenizer(tok, pad_to_multiple_of=multiple)
    hf = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, pad_to_multiple_of=multiple, return_tensors="pt")
    for batch in (feats[:1], feats[:5], feats[3:11], feats):
        a, b = ours(batch), hf(batch)
        assert set(a) == set(b) == {"input_ids", "labels", "attention_mask"}
        for key in a:
            assert a[key].dtype == b[key].dtype == torch.long, key
            assert torch.equal(a[key], b[key]), (name, multiple, key)
        if multiple:
            assert a["input_ids"].shape[1] % multiple == 0


def test_gemma_pads_left_in_datacollatorforseq2seq_but_right_in_ours():
    tok = _tokenizer("gemma-3-270m")  # as it loads: padding_side "left"
    assert tok.padding_side == "left"
    feats = _features(tok)[:4]
    ours = TranslationCollator.for_tokenizer(tok)(feats)
    hf = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, return_tensors="pt")(feats)
    shortest = min(range(4), key=lambda i: len(feats[i]["input_ids"]))
    n = len(feats[shortest]["input_ids"])
    assert ours["input_ids"][shortest, :n].tolist() == feats[shortest]["input_ids"]
    assert hf["input_ids"][shortest, -n:].tolist() == feats[shortest]["input_ids"]
    assert not torch.equal(ours["input_ids"], hf["input_ids"])


def test_without_a_pad_token_ours_pads_with_eos_where_datacollatorforseq2seq_refuses():
    tok = _tokenizer("tiny", padding_side="right")
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id == 2
    feats = _features(tok)[:3]
    batch = TranslationCollator.for_tokenizer(tok)(feats)
    for i, f in enumerate(feats):
        pad = batch["input_ids"].shape[1] - len(f["input_ids"])
        assert batch["input_ids"][i].tolist() == f["input_ids"] + [2] * pad
        assert batch["labels"][i].tolist() == f["labels"] + [-100] * pad
        assert batch["attention_mask"][i].tolist() == [1] * len(f["input_ids"]) + [0] * pad
    with pytest.raises(ValueError, match="padding token"):
        DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, return_tensors="pt")(feats)

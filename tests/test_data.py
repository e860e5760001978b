"""Translation data: loading, prompt, label masking, filter, collator."""

from __future__ import annotations

import json

import pytest

from layerselect.data import (
    PROMPT_TEMPLATE,
    TranslationCollator,
    TranslationDataset,
    TranslationExample,
    demo_pairs,
    examples_from_hf,
    filter_examples,
    first_per_language,
    format_prompt,
    language_name,
    load_parallel_dir,
    load_translation_data,
    split_holdout,
    tokenize_example,
)
from layerselect.errors import InvalidInputError
from tiny import tiny_tokenizer


def test_prompt_is_the_papers_template():
    ex = TranslationExample("de", "Hallo Welt.", "Hello world.")
    assert PROMPT_TEMPLATE == (
        "Translate this from [{source_lang}] to [English]:\n[{source_lang}]: {source}\n[English]: {target}"
    )
    assert ex.text() == "Translate this from [German] to [English]:\n[German]: Hallo Welt.\n[English]: Hello world."
    assert ex.text() == ex.prompt() + " " + ex.target
    assert format_prompt("zh", "x").startswith("Translate this from [Chinese]")


def test_language_names():
    for code, name in [("sw", "Swahili"), ("bn", "Bengali"), ("th", "Thai"), ("te", "Telugu"), ("ja", "Japanese"),
                       ("zh-CN", "Chinese"), ("ru", "Russian"), ("es", "Spanish"), ("fr", "French")]:
        assert language_name(code) == name
    with pytest.raises(InvalidInputError, match="unknown language code 'xx'"):
        language_name("xx")


@pytest.mark.parametrize("lang,source,target", [
    ("de", "Janet hat 16 Enten.", "Janet has 16 ducks."),
    ("zh", "珍妮有3只鸭子", "Janet has 3 ducks and sells eggs."),
    ("sw", "Janet ana bata", "x"),
])
def test_label_masking_token_by_token(lang, source, target):
    tok = tiny_tokenizer()
    ex = TranslationExample(lang, source, target)
    feat = tokenize_example(ex, tok, max_length=1024)
    # independent tokenization: the whole text (with BOS) + EOS, and the prompt head alone
    full = tok(ex.text())["input_ids"] + [tok.eos_token_id]
    head = tok(ex.prompt())["input_ids"]
    assert feat["input_ids"] == full
    assert feat["attention_mask"] == [1] * len(full)
    assert full[: len(head)] == head  # the head's tokens are a prefix of the full text's
    for i, (tid, lab) in enumerate(zip(feat["input_ids"], feat["labels"])):
        if i < len(head):
            assert lab == -100, (i, tok.convert_ids_to_tokens(tid))
        else:
            assert lab == tid, (i, tok.convert_ids_to_tokens(tid))
    target_ids = [lab for lab in feat["labels"] if lab != -100]
    assert target_ids[-1] == tok.eos_token_id
    assert tok.decode(target_ids[:-1]) == " " + target


def test_truncation_and_dataset_drops_targetless():
    tok = tiny_tokenizer()
    ex = TranslationExample("de", "Janet hat 16 Enten.", "Janet has 16 ducks.")
    n_head = len(tok(ex.prompt())["input_ids"])
    feat = tokenize_example(ex, tok, max_length=n_head + 2)
    assert len(feat["input_ids"]) == n_head + 2 and sum(lab != -100 for lab in feat["labels"]) == 2
    ds = TranslationDataset([ex, TranslationExample("de", "Janet hat 16 Enten und verkauft viele Eier.", "x")],
                            tok, max_length=n_head + 1)
    assert len(ds) == 1 and ds.truncated_away == 1  # the long prompt left no target token


def test_dataset_all_truncated_raises():
    tok = tiny_tokenizer()
    ex = TranslationExample("de", "Janet hat 16 Enten.", "Janet has 16 ducks.")
    with pytest.raises(InvalidInputError, match="truncated away"):
        TranslationDataset([ex], tok, max_length=4)
    long_ex = TranslationExample("de", "Janet hat 16 Enten.", "Janet has 16 ducks. " * 5)
    n = len(tokenize_example(ex, tok)["input_ids"])
    ds = TranslationDataset([ex, long_ex], tok, max_length=n)
    assert len(ds) == 2 and ds.truncated == 1 and ds.truncated_away == 0
    assert [len(f["input_ids"]) for f in ds.features] == [n, n]


def test_filter_report_counts():
    good = [TranslationExample("de", f"Janet hat {i} Enten und verkauft Eier.", f"Janet has {i} ducks and sells eggs.")
            for i in range(20)]
    bad = [
        TranslationExample("de", "   ", "Janet has ducks."),                       # empty
        TranslationExample("de", "Janet hat Enten.", ""),                          # empty
        TranslationExample("de", "Janet hat Enten." + " ja" * 40, "Janet has ducks."),  # repetition
        TranslationExample("de", "Enten", "Janet has many ducks and sells their eggs every single day at "
                                          "the busy farmers market in the town."),  # length ratio
        TranslationExample("de", "Janet hat viele Enten und verkauft jeden Tag ihre Eier auf dem belebten "
                                 "Bauernmarkt in der Stadt.", "Ducks."),           # length ratio
    ]
    zh = [TranslationExample("zh", f"珍妮有{i}只鸭子", f"Janet has {i} ducks.") for i in range(5)]
    kept, report = filter_examples(good + bad + zh)
    assert report.total == 30 and report.kept == 25 and len(kept) == 25
    assert report.dropped == {"empty": 2, "repetition": 1, "length_ratio": 2}
    assert report.dropped_by_lang == {"de": {"empty": 2, "repetition": 1, "length_ratio": 2}}
    # numbers like 1000000 are not degenerate; zh's short character ratio is normal for zh
    kept2, report2 = filter_examples([TranslationExample("de", "Er hat 1000000 Euro.", "He has 1000000 euros.")] + zh)
    assert report2.kept == 6
    assert "dropped 5" in str(report)


def _write_pairs(root, lang, src, tgt):
    d = root / f"{lang}-en"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"train.{lang}").write_text("".join(s + "\n" for s in src), encoding="utf-8")
    (d / "train.en").write_text("".join(t + "\n" for t in tgt), encoding="utf-8")


def test_parallel_folder_loading(tmp_path):
    _write_pairs(tmp_path, "de", ["a1", "a2", "a3"], ["e1", "e2", "e3"])
    _write_pairs(tmp_path, "sw", ["s1", "s2"], ["f1", "f2"])
    ex = load_translation_data(f"pairs:{tmp_path}")
    assert [(e.lang, e.source, e.target) for e in ex] == [
        ("de", "a1", "e1"), ("de", "a2", "e2"), ("de", "a3", "e3"), ("sw", "s1", "f1"), ("sw", "s2", "f2")]
    ex = load_translation_data(tmp_path, langs=["sw", "de"], max_pairs=1)
    assert [(e.lang, e.source) for e in ex] == [("sw", "s1"), ("de", "a1")]
    with pytest.raises(InvalidInputError, match=r"languages \['fr'\] are not in"):
        load_translation_data(f"pairs:{tmp_path}", langs=["fr"])
    with pytest.raises(InvalidInputError, match="unknown language code 'qq'"):
        load_translation_data(f"pairs:{tmp_path}", langs=["qq"])
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_translation_data(f"pairs:{tmp_path}/nope")


def test_misaligned_files_refused_with_line_counts(tmp_path):
    _write_pairs(tmp_path, "de", ["a1", "a2", "a3"], ["e1", "e2"])
    with pytest.raises(InvalidInputError, match=r"train\.de has 3 lines but .*train\.en has 2"):
        load_translation_data(f"pairs:{tmp_path}")


def test_jsonl_and_hf_dataset(tmp_path):
    rows = [{"lang": "fr", "source": "Bonjour", "target": "Hello"}, {"lang": "ja", "source": "猫", "target": "cat"}]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    ex = load_translation_data(f"jsonl:{f}")
    assert ex == [TranslationExample("fr", "Bonjour", "Hello"), TranslationExample("ja", "猫", "cat")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"lang": "fr", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:1: expected fields"):
        load_translation_data(bad)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(rows)
    assert examples_from_hf(ds) == ex
    assert load_translation_data(ds, langs=["ja"]) == ex[1:]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_translation_data(f"hf:{tmp_path / 'saved'}") == ex
    with pytest.raises(InvalidInputError, match="lacks columns"):
        examples_from_hf(datasets.Dataset.from_list([{"lang": "fr", "text": "x"}]))


def test_max_pairs_keeps_the_first_n_of_each_language_from_every_source(tmp_path):
    _write_pairs(tmp_path / "dir", "de", ["a1", "a2", "a3"], ["e1", "e2", "e3"])
    _write_pairs(tmp_path / "dir", "sw", ["s1", "s2", "s3"], ["f1", "f2", "f3"])
    rows = [{"lang": lang, "source": f"{lang}{i}", "target": f"e{i}"} for i in range(3) for lang in ("de", "sw")]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    folder = load_translation_data(f"pairs:{tmp_path / 'dir'}", max_pairs=2)
    assert [(e.lang, e.source) for e in folder] == [("de", "a1"), ("de", "a2"), ("sw", "s1"), ("sw", "s2")]
    assert load_parallel_dir(tmp_path / "dir", max_pairs=2) == folder
    lines = load_translation_data(f"jsonl:{f}", max_pairs=2)  # interleaved languages keep their order
    assert [e.source for e in lines] == ["de0", "sw0", "de1", "sw1"]
    demo = load_translation_data("demo", max_pairs=3)
    assert len(demo) == 3 * len({e.lang for e in demo_pairs()})
    everything = load_translation_data(f"jsonl:{f}")
    assert first_per_language(everything, None) == everything
    assert first_per_language(everything, 2) == lines
    assert load_translation_data(f"jsonl:{f}", max_pairs=10) == everything


def test_split_holdout_is_deterministic_and_disjoint():
    ex = [TranslationExample(lang, f"{lang}{i}", f"e{i}") for lang in ("de", "sw") for i in range(30)]
    train, held = split_holdout(ex, per_lang=5, seed=1)
    assert len(held) == 10 and len(train) == 50 and not set(held) & set(train)
    assert split_holdout(ex, per_lang=5, seed=1) == (train, held)
    with pytest.raises(InvalidInputError, match="only 30"):
        split_holdout(ex, per_lang=30)


def test_collator_pads_right():
    batch = TranslationCollator(pad_token_id=0, pad_to_multiple_of=4)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
        {"input_ids": [5], "labels": [5], "attention_mask": [1]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [5, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_real_data_loads(data_dir):
    ex = load_translation_data(f"pairs:{data_dir / 'gsm8kinstruct_question'}", langs=["de", "zh"], max_pairs=50)
    assert len(ex) == 100 and ex[0].target.startswith("Natalia")
    kept, report = filter_examples(ex)
    assert report.total == 100 and report.kept >= 95

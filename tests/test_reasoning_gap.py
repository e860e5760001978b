"""reasoning_gap: targets from offsets, NLL vs a direct token-by-token computation, batching, bootstrap, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from layerselect.cli import main
from layerselect.errors import FormatError, InvalidInputError
from layerselect.eval import PROMPT_TEMPLATE, gap_item, load_solutions, reasoning_gap
from tiny import tiny_model, tiny_tokenizer

QUESTIONS = {
    "en": ["Tom has 3 apples and buys 4 more. How many?", "What is 10 minus 3?", "Half of 8?",
           "Janet sells 9 eggs at $2. How much?", "2 + 2?"],
    "de": ["Tom hat 3 Äpfel und kauft 4. Wie viele?", "Was ist 10 minus 3?", "Die Hälfte von 8?",
           "Janet verkauft 9 Eier zu 2 $. Wie viel?", "2 + 2?"],
    "zh": ["汤姆有3个苹果,又买了4个。一共几个?", "10减3是多少?", "8的一半?", "珍妮以2美元卖9个鸡蛋。多少钱?", "2 + 2?"],
}
SOLUTIONS = ["3 + 4 = 7\n#### 7", "10 - 3 = 7\n#### 7", "8 / 2 = 4\n#### 4",
             "Janet makes 9 * 2 = $18.\n#### 18", "2+2=4\n#### 4"]
GOLDS = ["7", "7", "4", "18", "4"]


def direct_nll(model, tokenizer, question: str, solution: str) -> tuple[float, int]:
    """Independent computation: one text, full logits, walk the tokens one by one."""
    head = PROMPT_TEMPLATE.format(query=question)
    enc = tokenizer(head + " " + solution, return_offsets_mapping=True)
    ids = enc["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        start, end = enc["offset_mapping"][t]
        if end > len(head) and end > start:  # overlaps " " + solution
            total += -float(torch.log_softmax(logits[t - 1], -1)[ids[t]])
            n += 1
    return total, n


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_targets_are_exactly_the_space_and_solution(tok):
    for q, s in zip(QUESTIONS["de"], SOLUTIONS):
        ids, target = gap_item(tok, q, s)
        assert ids == tok(PROMPT_TEMPLATE.format(query=q) + " " + s)["input_ids"]  # one piece, BOS included
        assert ids[0] == tok.bos_token_id and not target[0]
        assert tok.decode([i for i, t in zip(ids, target) if t]) == " " + s
        first = target.index(True)
        assert all(target[first:]) and not any(target[:first])  # one contiguous tail, no EOS added
        assert ids[-1] != tok.eos_token_id


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: final logit softcapping
def test_nll_equals_direct_token_by_token(tok, family):
    model = tiny_model(family, max_position_embeddings=512)
    res = reasoning_gap(model, tok, QUESTIONS, SOLUTIONS, batch_size=2, bootstrap=0)
    for lang, qs in QUESTIONS.items():
        per = [direct_nll(model, tok, q, s) for q, s in zip(qs, SOLUTIONS)]
        total, n = sum(p[0] for p in per), sum(p[1] for p in per)
        assert res["tokens"][lang] == n
        assert res["nll"][lang] == pytest.approx(total / n, rel=1e-12)
        # token-weighted, not the mean of per-question means
        assert res["per_question"][lang]["tokens"] == [p[1] for p in per]
        np.testing.assert_allclose(res["per_question"][lang]["nll_sum"], [p[0] for p in per], rtol=1e-12)
    assert res["gap"]["en"] == 0.0
    assert res["gap"]["de"] == pytest.approx(res["nll"]["de"] - res["nll"]["en"], rel=1e-12)
    assert res["avg_gap"] == pytest.approx((res["gap"]["de"] + res["gap"]["zh"]) / 2, rel=1e-12)


def test_uniform_model_gives_log_vocab(tok):
    """Hand-checked value: a zero output head gives every token probability 1/V."""
    model = tiny_model("llama", max_position_embeddings=512)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    res = reasoning_gap(model, tok, QUESTIONS, SOLUTIONS, bootstrap=50)
    for lang in QUESTIONS:
        assert res["nll"][lang] == pytest.approx(math.log(model.config.vocab_size), rel=1e-14)
        assert res["gap"][lang] == pytest.approx(0.0, abs=1e-13)


def test_batch_size_and_padding_change_nothing(tok):
    model = tiny_model("llama", max_position_embeddings=512)
    one = reasoning_gap(model, tok, QUESTIONS, SOLUTIONS, batch_size=1, bootstrap=0)
    for bs in (2, 3, 8):
        other = reasoning_gap(model, tok, QUESTIONS, SOLUTIONS, batch_size=bs, bootstrap=0)
        for lang in QUESTIONS:
            assert other["nll"][lang] == pytest.approx(one["nll"][lang], rel=1e-9)
            np.testing.assert_allclose(other["per_question"][lang]["nll_sum"],
                                       one["per_question"][lang]["nll_sum"], rtol=1e-9)


def test_bootstrap_uses_one_resample_for_every_language(tok):
    model = tiny_model("llama", max_position_embeddings=512)
    qs = {"en": QUESTIONS["en"], "copy": list(QUESTIONS["en"]), "de": QUESTIONS["de"]}
    res = reasoning_gap(model, tok, qs, SOLUTIONS, bootstrap=200, seed=3)
    # identical texts: with one shared resample the gap is exactly 0 in every replicate
    assert res["interval"]["copy"] == [0.0, 0.0]
    lo, hi = res["interval"]["de"]
    assert lo <= res["gap"]["de"] <= hi and lo < hi
    # recompute the interval by hand from the per-question sums
    s = {g: np.array(res["per_question"][g]["nll_sum"]) for g in qs}
    c = {g: np.array(res["per_question"][g]["tokens"]) for g in qs}
    idx = np.random.default_rng(3).integers(0, 5, size=(200, 5))
    boot = {g: s[g][idx].sum(1) / c[g][idx].sum(1) for g in qs}
    assert res["interval"]["de"] == pytest.approx(list(np.percentile(boot["de"] - boot["en"], [2.5, 97.5])))
    avg = np.mean([boot["copy"] - boot["en"], boot["de"] - boot["en"]], axis=0)
    assert res["avg_gap_interval"] == pytest.approx(list(np.percentile(avg, [2.5, 97.5])))
    again = reasoning_gap(model, tok, qs, SOLUTIONS, bootstrap=200, seed=3)
    assert again["interval"] == res["interval"]


def test_refusals(tok, tmp_path):
    model = tiny_model("llama", max_position_embeddings=512)
    with pytest.raises(InvalidInputError, match="reference language 'en'"):
        reasoning_gap(model, tok, {"de": QUESTIONS["de"]}, SOLUTIONS)
    with pytest.raises(InvalidInputError, match="line-aligned"):
        reasoning_gap(model, tok, {"en": QUESTIONS["en"][:3]}, SOLUTIONS)
    bad = tmp_path / "s.jsonl"
    bad.write_text(json.dumps({"index": 1, "solution": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(FormatError, match="index 1 but this is solution 0"):
        load_solutions(bad)
    bad.write_text('{"solution": ""}\n', encoding="utf-8")
    with pytest.raises(FormatError, match="non-empty 'solution'"):
        load_solutions(bad)


def test_real_solutions_file_loads(data_dir):
    path = data_dir / "mgsm_solutions" / "mgsm_en_solutions.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    sols = load_solutions(path)
    assert len(sols) == 250 and sols[0].startswith("Janet sells 16 - 3 - 4 = 9") and sols[0].endswith("#### 18")
    assert load_solutions(path, limit=7) == sols[:7]


# -- CLI -------------------------------------------------------------------------------


@pytest.fixture
def gap_files(tmp_path: Path):
    d = tmp_path / "mgsm"
    d.mkdir()
    for lang, qs in QUESTIONS.items():
        (d / f"mgsm_{lang}.tsv").write_text("".join(f"{q}\t{a}\n" for q, a in zip(qs, GOLDS)), encoding="utf-8")
    sol = tmp_path / "solutions.jsonl"
    sol.write_text("".join(json.dumps({"index": i, "solution": s}) + "\n" for i, s in enumerate(SOLUTIONS)),
                   encoding="utf-8")
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return d, sol, model_dir, model


def test_cli_base_adapter_and_merged(gap_files, tmp_path, capsys):
    from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model

    data, sol, model_dir, model = gap_files
    tok = tiny_tokenizer()
    args = ["eval", "--metric", "nll", "--task", "mgsm", "--data", str(data), "--solutions", str(sol),
            "--langs", "en,de,zh", "--bootstrap", "100", "--precision", "fp32", "--quiet"]
    assert main([*args, "--model", str(model_dir), "--out", str(tmp_path / "base")]) == 0
    assert json.loads((tmp_path / "base" / "reasoning_gap.json").read_text())["precision"] == "fp32"
    out = capsys.readouterr().out
    assert "| de |" in out and "avg (non-en)" in out
    base = json.loads((tmp_path / "base" / "reasoning_gap.json").read_text())
    want = reasoning_gap(model, tok, QUESTIONS, SOLUTIONS, bootstrap=100)
    for lang in QUESTIONS:
        assert base["nll"][lang] == pytest.approx(want["nll"][lang], rel=1e-6)
    assert base["interval"]["de"] == pytest.approx(want["interval"]["de"], rel=1e-5)

    # an adapter that changes layer 1's FFN: --adapter and the merged checkpoint agree with the in-memory model
    slam = get_slam_model(model, SelectiveFFNConfig(layers=[1]))
    with torch.no_grad():
        slam.model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    slam.save_pretrained(tmp_path / "adapter")
    trained = reasoning_gap(slam, tok, QUESTIONS, SOLUTIONS, bootstrap=0)
    assert abs(trained["nll"]["de"] - want["nll"]["de"]) > 1e-3
    assert main([*args, "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "ad")]) == 0
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--base", str(model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(merged_dir)]) == 0
    assert main([*args, "--model", str(merged_dir), "--out", str(tmp_path / "mg")]) == 0
    ad = json.loads((tmp_path / "ad" / "reasoning_gap.json").read_text())
    mg = json.loads((tmp_path / "mg" / "reasoning_gap.json").read_text())
    for lang in QUESTIONS:
        assert ad["nll"][lang] == pytest.approx(trained["nll"][lang], rel=1e-6)
        assert mg["nll"][lang] == ad["nll"][lang]


def test_cli_refuses_misaligned_solutions(gap_files, tmp_path, capsys):
    data, sol, model_dir, _ = gap_files
    sol.write_text(json.dumps({"solution": "x"}) + "\n", encoding="utf-8")
    rc = main(["eval", "--metric", "nll", "--model", str(model_dir), "--data", str(data), "--solutions", str(sol),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "5 mgsm questions in 'en' but 1 solutions" in capsys.readouterr().err

"""Tasks, generation (left padding, stop strings), resumable evaluate, rescore, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerselect.cli import main
from layerselect.errors import FormatError, InvalidInputError
from layerselect.eval import (
    MGSM,
    MSVAMP,
    PROMPT_TEMPLATE,
    XCSQA,
    TransformersGenerator,
    build_prompt,
    evaluate,
    read_records,
    records_path,
    rescore,
)
from tiny import tiny_model, tiny_tokenizer

QUESTIONS = {
    "en": ["Tom has 3 apples and buys 4 more. How many?", "What is 10 minus 3?", "Half of 8?",
           "Janet sells 9 eggs at $2. How much?", "2 + 2?"],
    "de": ["Tom hat 3 Äpfel und kauft 4. Wie viele?", "Was ist 10 minus 3?", "Die Hälfte von 8?",
           "Janet verkauft 9 Eier zu 2 $. Wie viel?", "2 + 2?"],
}
GOLDS = ["7", "7", "4", "18", "4"]


@pytest.fixture
def mgsm_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mgsm"
    d.mkdir()
    for lang, qs in QUESTIONS.items():
        (d / f"mgsm_{lang}.tsv").write_text(
            "".join(f"{q}\t{a}\n" for q, a in zip(qs, GOLDS)), encoding="utf-8"
        )
    return d


# float32, not the float64 default: transformers' eager attention takes the softmax in
# float32, so float64's mask minimum becomes -inf there and fully masked (left-padding)
# rows turn into NaN that leaks into real tokens. float32/bf16 models are unaffected.
@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", dtype=torch.float32, max_position_embeddings=512), tiny_tokenizer()


# -- tasks ---------------------------------------------------------------------------


def test_mgsm_task_loads_tsv(mgsm_dir):
    task = MGSM()
    ex = task.load(mgsm_dir, "de", limit=3)
    assert [e.id for e in ex] == ["0", "1", "2"]
    assert ex[0].question.startswith("Tom hat") and ex[0].answer == 7.0
    assert task.available_langs(mgsm_dir) == ["de", "en"]
    with pytest.raises(InvalidInputError, match="languages found there: de, en"):
        task.load(mgsm_dir, "sw")
    with pytest.raises(InvalidInputError, match="positive"):
        task.load(mgsm_dir, "de", limit=0)


def test_mgsm_real_data_aligned(data_dir):
    task = MGSM()
    langs = task.available_langs(data_dir / "mgsm")
    assert {"en", "de", "zh", "bn", "th"} <= set(langs)
    en = task.load(data_dir / "mgsm", "en")
    bn = task.load(data_dir / "mgsm", "bn")
    assert len(en) == len(bn) == 250
    assert [e.id for e in en] == [e.id for e in bn]
    assert [e.answer for e in en] == [e.answer for e in bn]
    assert 114200.0 in {e.answer for e in en} | {e.answer for e in bn}  # "114,200" in the files


def test_msvamp_common_field_names(tmp_path):
    (tmp_path / "msvamp_fr.jsonl").write_text(
        json.dumps({"m_query": "Combien font 2 + 3 ?", "response": "5"}) + "\n"
        + json.dumps({"id": "x9", "Body": "Paul a 1,200 billes.", "Question": "Combien ?", "Answer": 1200.0})
        + "\n",
        encoding="utf-8",
    )
    (tmp_path / "es.jsonl").write_text(json.dumps({"question": "¿2+2?", "answer": 4}) + "\n", encoding="utf-8")
    task = MSVAMP()
    fr = task.load(tmp_path, "fr")
    assert [(e.id, e.question, e.answer) for e in fr] == [
        ("0", "Combien font 2 + 3 ?", 5.0),
        ("x9", "Paul a 1,200 billes. Combien ?", 1200.0),
    ]
    assert task.load(tmp_path, "es")[0].answer == 4.0
    (tmp_path / "msvamp_sw.jsonl").write_text(json.dumps({"text": "no fields"}) + "\n", encoding="utf-8")
    with pytest.raises(FormatError, match="needs a question"):
        task.load(tmp_path, "sw")


def test_xcsqa_nested_and_flat(tmp_path):
    nested = {
        "id": "a1",
        "question": {"stem": "Where do fish live?",
                     "choices": [{"label": "A", "text": "sky"}, {"label": "B", "text": "water"}]},
        "answerKey": "B",
    }
    flat = {"id": "a2", "question": "Color of snow?", "choices": ["white", "black"], "answer": "a"}
    (tmp_path / "xcsqa_en.jsonl").write_text(json.dumps(nested) + "\n" + json.dumps(flat) + "\n")
    task = XCSQA()
    ex = task.load(tmp_path, "en")
    assert ex[0].answer == "B" and ex[1].answer == "A"
    assert task.format_query(ex[0]) == "Where do fish live?\nAnswer Choices: (A) sky (B) water"
    assert task.is_correct(task.extract("so the answer is (b)"), ex[0].answer)


def test_prompt_is_the_papers():
    assert build_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nQ?\n\n### Response: Let's think step by step."
    )


# -- generation ----------------------------------------------------------------------


def test_batched_left_padding_matches_batch_one(tiny):
    model, tok = tiny
    prompts = ["2 + 2?", "Tom has 3 apples and buys 4 more. How many apples?", "Half of 8?"]
    prompts = [build_prompt(p) for p in prompts]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) == 3  # really padded
    one = TransformersGenerator(model, tok, batch_size=1, max_new_tokens=8, stop=())(prompts)
    three = TransformersGenerator(model, tok, batch_size=3, max_new_tokens=8, stop=())(prompts)
    assert one == three
    assert any(one)
    # The generator pads by hand: the tokenizer's own padding side neither matters nor changes.
    side = tok.padding_side
    try:
        for setting in ("left", "right"):
            tok.padding_side = setting
            assert TransformersGenerator(model, tok, batch_size=3, max_new_tokens=8, stop=())(prompts) == three
            assert tok.padding_side == setting
    finally:
        tok.padding_side = side


def test_stop_string_ends_generation(tiny):
    model, tok = tiny
    prompt = build_prompt("Half of 8?")
    free = TransformersGenerator(model, tok, max_new_tokens=12, stop=())([prompt])[0]
    assert len(free) > 6
    stop = free[3:6]  # a string the model will produce
    cut = TransformersGenerator(model, tok, max_new_tokens=12, stop=(stop,))([prompt])[0]
    assert cut == free[: free.index(stop)]


# -- evaluate: resume, repair, rescore -------------------------------------------------------


class Interrupt(Exception):
    pass


def _interrupting(gen, after_calls: int):
    calls = {"n": 0}

    def wrapped(prompts):
        if calls["n"] == after_calls:
            raise Interrupt
        calls["n"] += 1
        return gen(prompts)

    return wrapped


def test_resume_after_interruption_gives_same_jsonl(tiny, mgsm_dir, tmp_path):
    model, tok = tiny
    gen = TransformersGenerator(model, tok, batch_size=2, max_new_tokens=3)
    kw = dict(langs=["en", "de"], data=mgsm_dir, batch_size=2, max_new_tokens=3,
              model_name="tiny", verbose=False)

    full = evaluate(model, tok, "mgsm", out_dir=tmp_path / "full", generator=gen, **kw)

    # 4 batches of 2 done (en: 3 batches, de: 1 batch) then a crash in de
    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        evaluate(model, tok, "mgsm", out_dir=part, generator=_interrupting(gen, 4), **kw)
    assert len(read_records(records_path(part, "mgsm", "de"))) == 2
    # and a crash mid-write leaves half a line
    with open(records_path(part, "mgsm", "de"), "a", encoding="utf-8") as fh:
        fh.write('{"id": "4", "lang": "de", "quest')

    prompts_seen: list[str] = []

    def counting(prompts):
        prompts_seen.extend(prompts)
        return gen(prompts)

    resumed = evaluate(model, tok, "mgsm", out_dir=part, generator=counting, **kw)
    assert len(prompts_seen) == 3  # only the missing de questions
    for lang in ("en", "de"):
        a = records_path(tmp_path / "full", "mgsm", lang).read_bytes()
        b = records_path(part, "mgsm", lang).read_bytes()
        assert a == b
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["pcr"] == full["pcr"]
    assert set(full["pcr"]) == {"de"}
    assert json.loads((part / "results.json").read_text())["accuracy"] == full["accuracy"]
    assert (part / "results.md").read_text().startswith("| mgsm | en | de | Avg |")

    # a finished run resumes to nothing
    prompts_seen.clear()
    evaluate(model, tok, "mgsm", out_dir=part, generator=counting, **kw)
    assert prompts_seen == []


def test_rescore_and_settings_check(tiny, mgsm_dir, tmp_path):
    model, tok = tiny
    out = tmp_path / "out"
    evaluate(model, tok, "mgsm", langs=["en"], data=mgsm_dir, out_dir=out, batch_size=5,
             max_new_tokens=3, model_name="tiny", verbose=False)
    path = records_path(out, "mgsm", "en")
    records = read_records(path)
    # pretend the model answered questions 0 and 3 correctly: rescoring must see it
    records[0]["response"] = " 3 + 4 = 7. The answer is 7."
    records[3]["response"] = " 9 * $2 = $18."
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    table = rescore(out, verbose=False)
    assert table["accuracy"]["en"] >= 0.4
    new = read_records(path)
    assert new[0]["prediction"] == 7.0 and new[0]["correct"] is True
    assert new[3]["prediction"] == 18.0 and new[3]["correct"] is True
    assert table["pcr"] == {}  # English only

    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        evaluate(model, tok, "mgsm", langs=["en"], data=mgsm_dir, out_dir=out,
                 max_new_tokens=5, model_name="tiny", verbose=False)


def test_corrupt_middle_line_is_an_error(tmp_path):
    p = tmp_path / "mgsm_en.jsonl"
    p.write_text('{"id": "0"}\nnot json\n{"id": "1"}\n')
    with pytest.raises(FormatError, match="line 2"):
        read_records(p)


def test_vllm_backend_needs_vllm(mgsm_dir, tmp_path):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed")
    with pytest.raises(InvalidInputError, match="pip install vllm"):
        evaluate("some/checkpoint", None, "mgsm", langs=["en"], data=mgsm_dir, out_dir=tmp_path,
                 backend="vllm", verbose=False)


# -- CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny):
    model, tok = tiny
    d = tmp_path_factory.mktemp("tiny_ckpt")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_round_trip(saved_tiny, mgsm_dir, tmp_path, capsys):
    out = tmp_path / "res"
    args = ["eval", "--model", str(saved_tiny), "--task", "mgsm", "--data", str(mgsm_dir),
            "--langs", "en,de", "--limit", "3", "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", "2", "--dtype", "float32", "--precision", "fp32", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| mgsm | en | de | Avg |" in printed and "| PCR | – |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == {"en": 3, "de": 3}
    run = json.loads((out / "run.json").read_text())
    assert run["prompt_template"] == PROMPT_TEMPLATE and run["max_new_tokens"] == 4
    recs = read_records(out / "mgsm_de.jsonl")
    assert [r["id"] for r in recs] == ["0", "1", "2"]
    assert all(set(r) >= {"response", "prediction", "correct", "gold"} for r in recs)

    # same outputs as the Python API on the loaded model (greedy is deterministic)
    model, tok = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512), tiny_tokenizer()
    gen = TransformersGenerator(model, tok, max_new_tokens=4)
    assert [r["response"] for r in recs] == gen([build_prompt(r["question"]) for r in recs])

    # re-scoring needs no model
    assert main(["eval", "--task", "mgsm", "--out", str(out), "--rescore", "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["accuracy"] == results["accuracy"]
    assert "precision" not in run  # fp32, as every run before the option

    # --precision bf16: recorded, the same answers as the Python API in bf16, and a resume in
    # another precision is refused (greedy answers can differ)
    low = tmp_path / "res16"
    assert main([*args[:-3], "--precision", "bf16", "--quiet", "--out", str(low)]) == 0
    assert json.loads((low / "run.json").read_text())["precision"] == "bf16"
    from layerselect.models import load_model

    loaded, loaded_tok = load_model(str(saved_tiny), dtype="float32")  # as the CLI loads it: bf16 tells apart
    gen16 = TransformersGenerator(loaded, loaded_tok, max_new_tokens=4, precision="bf16", batch_size=2)
    recs16 = read_records(low / "mgsm_de.jsonl")
    assert [r["response"] for r in recs16] == gen16([build_prompt(r["question"]) for r in recs16])
    capsys.readouterr()
    assert main([*args[:-3], "--precision", "fp32", "--quiet", "--out", str(low)]) == 2
    assert "precision" in capsys.readouterr().err

    # errors are one line, exit 2
    assert main(args[:8] + ["sw"] + args[9:]) == 2
    assert "no mgsm data for language 'sw'" in capsys.readouterr().err


def test_cli_adapter_is_merged(saved_tiny, mgsm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import layerselect.selective_ffn as sfm  # part of the package: a failing import is a failure, not a skip

    base = AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.float32).eval()
    wrapped = sfm.get_slam_model(base, sfm.SelectiveFFNConfig(layers=[0, 1]))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in (0, 1):
            mlp = base.model.layers[layer].mlp
            mlp.up_proj.weight.add_(torch.randn_like(mlp.up_proj.weight))
    adapter = tmp_path / "adapter"
    wrapped.save_pretrained(adapter)
    tuned = wrapped.merge_and_unload()

    out = tmp_path / "res"
    args = ["eval", "--model", str(saved_tiny), "--adapter", str(adapter), "--task", "mgsm",
            "--data", str(mgsm_dir), "--langs", "en", "--limit", "3", "--out", str(out),
            "--max-new-tokens", "4", "--dtype", "float32", "--quiet"]
    assert main(args) == 0
    recs = read_records(out / "mgsm_en.jsonl")
    prompts = [build_prompt(r["question"]) for r in recs]
    tok = tiny_tokenizer()
    assert [r["response"] for r in recs] == TransformersGenerator(tuned, tok, max_new_tokens=4)(prompts)
    assert json.loads((out / "run.json").read_text())["model"].endswith(f"+{adapter}")


def test_mismatched_questions_refused_before_generating(mgsm_dir, tmp_path):
    lines = (mgsm_dir / "mgsm_de.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (mgsm_dir / "mgsm_de.tsv").write_text("".join(lines[:3]), encoding="utf-8")

    def never(prompts):
        raise AssertionError("must not generate")

    with pytest.raises(InvalidInputError, match="same questions"):
        evaluate(None, None, "mgsm", langs=["en", "de"], data=mgsm_dir, out_dir=tmp_path,
                 generator=never, verbose=False)
    # without English there is no PCR and nothing to compare
    table = evaluate(None, None, "mgsm", langs=["de"], data=mgsm_dir, generator=lambda p: ["7"] * len(p),
                     verbose=False)
    assert table["accuracy"] == {"de": pytest.approx(2 / 3)} and table["pcr"] == {}


def test_no_languages_is_a_clear_error(tmp_path, capsys):
    # An empty language list (e.g. --data pointing at a folder without task files) says so.
    with pytest.raises(InvalidInputError, match="no languages to evaluate"):
        evaluate(None, None, "mgsm", langs=[], data=tmp_path, generator=lambda p: ["1"] * len(p), verbose=False)
    assert main(["eval", "--model", str(tmp_path / "unused"), "--task", "mgsm", "--data", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "res")]) == 2
    assert "no mgsm data files found" in capsys.readouterr().err

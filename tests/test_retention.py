"""The retention guard (issue 21): it fires on a rising held-out NLL and stops (or restores the best step),
stays quiet when the NLL does not rise, measures what a plain forward pass measures, works in a plain HF
Trainer, across a resume, under DDP and from the command line; and the bundled GSM8K retention set."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerselect.cli import main
from layerselect.data import TranslationCollator, TranslationDataset, TranslationExample
from layerselect.errors import InvalidInputError
from layerselect.selective_ffn import SelectiveFFNConfig, SelectiveFFNModel
from layerselect.train import (
    RETAIN_MODES,
    PromptTarget,
    RetentionGuard,
    gsm8k_pairs,
    load_retention_data,
    train_model,
    train_slam,
)
from tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: What training teaches: German -> English duck sentences.
PAIRS = [TranslationExample("de", f"Janet hat {i} Enten.", f"Janet has {i} ducks.") for i in range(16)]
#: The reference set the model "knows" before training (the English math skill in the real use).
RETAIN = [TranslationExample("fr", f"Les canards de Janet pondent {i} oeufs.", f"Janet's ducks lay {i} eggs per day.")
          for i in range(8)]


def _args(**kw):
    base = dict(max_steps=12, per_device_train_batch_size=4, gradient_accumulation_steps=1, warmup_steps=0,
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, precision="fp32",
                lr_scheduler_type="constant")
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def knows():
    """State dict of a tiny float64 Llama fully fine-tuned on RETAIN (its NLL there: ~0.05 from ~6.6)."""
    import tempfile

    model = tiny_model("llama", dtype=torch.float64).requires_grad_(True)
    with tempfile.TemporaryDirectory() as d:
        train_model(model, tiny_tokenizer(), RETAIN, output_dir=d, save_final=False,
                    **_args(max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _model(knows, dtype=torch.float64):
    model = tiny_model("llama", dtype=dtype)
    model.load_state_dict(knows)
    return model


def _summary(out):
    return json.loads((Path(out) / "train_summary.json").read_text())


# ---------------------------------------------------------------------------- firing and not firing


def test_a_high_learning_rate_fires_and_stops_training(knows, tmp_path):
    guard = RetentionGuard(RETAIN, tiny_tokenizer(), every=2, tolerance=0.01, verbose=False)
    assert guard.mode == "stop" == RETAIN_MODES[0]  # the documented default
    train_slam(_model(knows), tiny_tokenizer(), PAIRS, SelectiveFFNConfig(layers=[1]), output_dir=tmp_path,
               retain=guard, **_args(learning_rate=1.0))
    s = _summary(tmp_path)
    r = s["retention"]
    assert s["steps"] == 2 < 12  # stopped at the first measurement after the baseline
    assert r["fired"] and r["fired_step"] == 2 and r["stopped_at_step"] == 2 and r["mode"] == "stop"
    assert list(r["curve"]) == ["0", "2"] and r["baseline_step"] == 0
    assert r["baseline"] == r["curve"]["0"] < 0.1 and r["fired_nll"] == r["curve"]["2"] > r["threshold"]
    assert r["threshold"] == pytest.approx(1.01 * r["baseline"], rel=1e-15)
    assert r["pairs"] == 8 and r["precision"] == "fp32" and r["tolerance"] == 0.01 and r["every"] == 2
    assert r["data"] == "8 TranslationExample items"
    # the adapter written is the one of the step that fired
    adapter = SelectiveFFNModel.from_pretrained(_model(knows), tmp_path / "adapter")
    assert guard.measure(adapter.model) == pytest.approx(r["fired_nll"], rel=1e-12)
    assert len(json.loads((tmp_path / "loss.json").read_text())["train"]) == 2


@pytest.mark.parametrize("lr", [0.0, 1e-4])
def test_a_sane_or_zero_learning_rate_does_not_fire(knows, tmp_path, lr):
    guard = RetentionGuard(RETAIN, tiny_tokenizer(), every=4, verbose=False)
    train_slam(_model(knows), tiny_tokenizer(), PAIRS, SelectiveFFNConfig(layers=[1]), output_dir=tmp_path,
               retain=guard, **_args(learning_rate=lr))
    s = _summary(tmp_path)
    r = s["retention"]
    assert s["steps"] == 12 and not r["fired"] and r["fired_step"] is None and r["stopped_at_step"] is None
    assert list(r["curve"]) == ["0", "4", "8", "12"] and r["final_step"] == 12
    assert all(v <= r["threshold"] for v in r["curve"].values())
    if lr == 0.0:  # nothing changed: every measurement is the baseline, bit for bit
        assert set(r["curve"].values()) == {r["baseline"]}


def test_best_mode_trains_on_and_restores_the_lowest_step(knows, tmp_path):
    model = _model(knows)
    guard = RetentionGuard(RETAIN, tiny_tokenizer(), every=2, mode="best", verbose=False)
    train_slam(model, tiny_tokenizer(), PAIRS, SelectiveFFNConfig(layers=[1]), output_dir=tmp_path,
               retain=guard, **_args(learning_rate=0.1))
    s = _summary(tmp_path)
    r = s["retention"]
    assert s["steps"] == 12 and r["fired_step"] == 2 and r["stopped_at_step"] is None
    trained = {int(k): v for k, v in r["curve"].items() if int(k) > 0}
    best = min(trained, key=trained.get)
    assert r["best_step"] == best != 12 and r["restored_step"] == best and r["best_nll"] == trained[best]
    # the live model and the saved adapter hold the best step's weights
    assert guard.measure(model) == pytest.approx(r["best_nll"], rel=1e-12)
    adapter = SelectiveFFNModel.from_pretrained(_model(knows), tmp_path / "adapter")
    assert guard.measure(adapter.model) == pytest.approx(r["best_nll"], rel=1e-12)


def test_a_plain_hf_trainer_takes_the_guard(knows, tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = tiny_tokenizer()
    model = _model(knows).requires_grad_(True)
    guard = RetentionGuard(RETAIN, tok, every=1, verbose=False)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4,
                             learning_rate=1.0, save_strategy="no", use_cpu=True, disable_tqdm=True,
                             report_to=[], lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=TranslationDataset(PAIRS, tok),
                      data_collator=TranslationCollator.for_tokenizer(tok), callbacks=[guard])
    trainer.train()
    assert guard.fired_step == 1 and trainer.state.global_step == 1 and list(guard.curve) == [0, 1]
    assert [e["retain_nll"] for e in trainer.state.log_history if "retain_nll" in e] == list(guard.curve.values())
    assert model.training  # the measurement restored train mode


# ---------------------------------------------------------------------------- what is measured


def _plain_nll(model, tok, examples) -> float:
    """The obvious computation: one pair at a time, the model's plain forward, -log softmax at each target."""
    total, count = 0.0, 0
    for ex in examples:
        prompt, text = ex.prompt(), ex.text()
        enc = tok(text, return_offsets_mapping=True)
        ids = list(enc["input_ids"]) + [tok.eos_token_id]
        offsets = list(enc["offset_mapping"]) + [(len(text), len(text) + 1)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].to(torch.float64)
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(1, len(ids)):
            start, end = offsets[t]
            if start >= len(prompt) and end > start:
                total -= float(logp[t - 1, ids[t]])
                count += 1
    return total / count


@pytest.mark.parametrize("kind", ["translation", "prompt_target"])
def test_the_measure_equals_a_plain_forward_loop(knows, kind):
    tok = tiny_tokenizer()
    model = _model(knows)
    if kind == "translation":
        examples = RETAIN
    else:
        examples = [PromptTarget(f"Question {i}: how many eggs?", f"Janet's ducks lay {i} eggs per day.")
                    for i in range(5)]
    want = _plain_nll(model, tok, examples)
    seen = []
    handle = model.model.layers[0].register_forward_hook(
        lambda m, a, o: seen.append((m.training, torch.is_grad_enabled())))
    model.train()
    try:
        got = RetentionGuard(examples, tok, batch_size=3).measure(model)
    finally:
        handle.remove()
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert seen and all(s == (False, False) for s in seen)  # eval mode, no_grad
    assert model.training  # train mode restored
    # (prompt, target) tuples and {"prompt", "target"} dicts are the same PromptTarget pairs
    if kind == "prompt_target":
        tuples = [(e.prefix, e.target) for e in examples]
        dicts = [{"prompt": e.prefix, "target": e.target} for e in examples]
        assert RetentionGuard(tuples, tok).measure(model) == got == RetentionGuard(dicts, tok).measure(model)


def test_bf16_precision_runs_under_autocast(knows):
    tok = tiny_tokenizer()
    model = _model(knows, dtype=torch.float32)
    guard = RetentionGuard(RETAIN, tok)
    seen = []
    handle = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        fp32, bf16 = guard.measure(model, precision="fp32"), guard.measure(model, precision="bf16")
    finally:
        handle.remove()
    assert seen == [False] + [True]  # one batch each
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=0.2, abs=0.05)


def test_the_guard_measures_in_the_trainings_precision(knows, tmp_path):
    guard = RetentionGuard(RETAIN, tiny_tokenizer(), every=1, verbose=False)
    train_slam(_model(knows, dtype=torch.float32), tiny_tokenizer(), PAIRS, SelectiveFFNConfig(layers=[1]),
               output_dir=tmp_path, retain=guard, **_args(max_steps=1, learning_rate=0.0, precision="bf16"))
    r = _summary(tmp_path)["retention"]
    assert _summary(tmp_path)["precision"] == "bf16" == r["precision"]
    assert r["baseline"] == pytest.approx(guard.measure(_model(knows, torch.float32), precision="bf16"), rel=1e-12)


def test_a_resumed_run_continues_the_curve_against_the_first_baseline(knows, tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 4:
                control.should_training_stop = True

    kw = _args(max_steps=6, learning_rate=0.3, save_strategy="steps", save_steps=2)
    cfg = SelectiveFFNConfig(layers=[1])
    straight = RetentionGuard(RETAIN, tiny_tokenizer(), every=2, tolerance=1e9, verbose=False)
    train_slam(_model(knows), tiny_tokenizer(), PAIRS, cfg, output_dir=tmp_path / "a", retain=straight, **kw)
    first = RetentionGuard(RETAIN, tiny_tokenizer(), every=2, tolerance=1e9, verbose=False)
    train_slam(_model(knows), tiny_tokenizer(), PAIRS, cfg, output_dir=tmp_path / "b", retain=first,
               callbacks=[StopAt()], **kw)
    assert list(first.curve) == [0, 2, 4]
    resumed = RetentionGuard(RETAIN, tiny_tokenizer(), every=2, tolerance=1e9, verbose=False)
    train_slam(_model(knows), tiny_tokenizer(), PAIRS, cfg, output_dir=tmp_path / "b", retain=resumed,
               resume_from_checkpoint=True, **kw)
    r = _summary(tmp_path / "b")["retention"]
    assert r["baseline_step"] == 0 and r["note"] is None  # not re-measured at the resume
    assert list(r["curve"]) == ["0", "2", "4", "6"]
    for step, nll in _summary(tmp_path / "a")["retention"]["curve"].items():
        assert r["curve"][step] == pytest.approx(nll, rel=1e-12), step


def test_resuming_a_run_the_guard_stopped_trains_no_further_step(knows, tmp_path):
    kw = _args(learning_rate=1.0, save_strategy="steps", save_steps=2)
    cfg = SelectiveFFNConfig(layers=[1])
    train_slam(_model(knows), tiny_tokenizer(), PAIRS, cfg, output_dir=tmp_path, **kw,
               retain=RetentionGuard(RETAIN, tiny_tokenizer(), every=2, verbose=False))
    assert _summary(tmp_path)["steps"] == 2  # fired and stopped at step 2, checkpoint-2 written
    stopped = (tmp_path / "adapter" / "layerselect_deltas.safetensors").read_bytes()
    guard = RetentionGuard(RETAIN, tiny_tokenizer(), every=2, verbose=False)
    train_slam(_model(knows), tiny_tokenizer(), PAIRS, cfg, output_dir=tmp_path, resume_from_checkpoint=True,
               retain=guard, **kw)
    s = _summary(tmp_path)
    assert s["steps"] == 2 and s["resumed_from_step"] == 2  # the Trainer alone would have run a third step
    assert s["retention"]["fired_step"] == 2 and s["retention"]["stopped_at_step"] == 2
    assert (tmp_path / "adapter" / "layerselect_deltas.safetensors").read_bytes() == stopped


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,message", [
    (dict(every=0), "every must be a positive"),
    (dict(every=2.5), "every must be a positive"),
    (dict(tolerance=-0.01), "tolerance must be a finite relative rise >= 0"),
    (dict(tolerance=math.nan), "tolerance must be a finite"),
    (dict(mode="keep"), "mode must be one of stop, best"),
    (dict(batch_size=0), "batch_size must be a positive"),
    (dict(precision="fp8"), "precision must be None"),
])
def test_bad_options_are_refused(kw, message):
    with pytest.raises(InvalidInputError, match=message):
        RetentionGuard(RETAIN, tiny_tokenizer(), **kw)


def test_bad_data_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown data kind 'csv'.*'gsm8k'"):
        load_retention_data("csv:x.csv")
    with pytest.raises(InvalidInputError, match="does not exist.*gsm8k"):
        load_retention_data(f"jsonl:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_retention_data(f"gsm8k:{tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "solution": "2"}\n{"question": "2+2?"}\n', encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:2: expected an object with non-empty 'question'"):
        load_retention_data(f"gsm8k:{bad}")
    with pytest.raises(InvalidInputError, match="needs the tokenizer"):
        RetentionGuard(RETAIN)
    with pytest.raises(InvalidInputError, match="empty"):
        RetentionGuard([], tiny_tokenizer())


def test_own_gsm8k_style_file(tmp_path):
    f = tmp_path / "dev.jsonl"
    f.write_text('{"question": "What is 2+3?", "solution": "2+3=5\\n#### 5"}\n\n', encoding="utf-8")
    (pair,) = load_retention_data(f"gsm8k:{f}")
    assert pair.target == "2+3=5\n#### 5" and "### Instruction:\nWhat is 2+3?\n\n### Response:" in pair.prompt()


# ---------------------------------------------------------------------------- the bundled set


def test_the_bundled_gsm8k_set():
    from layerselect.eval.generate import PROMPT_TEMPLATE
    from layerselect.resources import data_dir, gsm8k_retain_path
    from layerselect.train.retention import MATH_PROMPT

    pairs = load_retention_data("gsm8k")
    assert len(pairs) == 200 and pairs == gsm8k_pairs()
    rows = [json.loads(x) for x in gsm8k_retain_path().read_text("utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(7273, 7473))  # the last 200 of GSM8K-train
    assert MATH_PROMPT == PROMPT_TEMPLATE  # the reasoning gap's prompt
    assert pairs[0].prompt() == PROMPT_TEMPLATE.format(query=rows[0]["question"])
    assert pairs[-1].target == rows[-1]["solution"] and pairs[-1].target.endswith("#### " + rows[-1]["answer"])
    folder = gsm8k_retain_path().parent
    assert "MIT License" in (folder / "LICENSE").read_text() and "2021 OpenAI" in (folder / "LICENSE").read_text()
    assert "gsm8k_retain/" in (data_dir() / "NOTICE.md").read_text()
    digest = hashlib.sha256(gsm8k_retain_path().read_bytes()).hexdigest()
    assert digest in (folder / "README.md").read_text()  # the note that says how it was made


@pytest.mark.skipif(not (SHARED / "gsm8k_train").is_dir(), reason="../shared/data is not present")
def test_the_bundled_gsm8k_set_is_the_shared_files_last_200_lines():
    from layerselect.resources import gsm8k_retain_path

    lines = (SHARED / "gsm8k_train" / "gsm8k_train_solutions.jsonl").read_bytes().splitlines(keepends=True)
    assert gsm8k_retain_path().read_bytes() == b"".join(lines[-200:])
    assert (gsm8k_retain_path().parent / "LICENSE").read_bytes() == (SHARED / "gsm8k_train" / "LICENSE").read_bytes()


# ---------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_files(knows, tmp_path_factory):
    """The model that knows RETAIN (saved float64), the training pairs, and RETAIN as jsonl:FILE."""
    root = tmp_path_factory.mktemp("cli")
    _model(knows).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    folder = root / "pairs" / "de-en"
    folder.mkdir(parents=True)
    (folder / "train.de").write_text("".join(p.source + "\n" for p in PAIRS), encoding="utf-8")
    (folder / "train.en").write_text("".join(p.target + "\n" for p in PAIRS), encoding="utf-8")
    rows = [{"lang": p.lang, "source": p.source, "target": p.target} for p in RETAIN]
    (root / "retain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def _cli(root, out, *extra):
    return main(["train", "--model", str(root / "model"), "--dtype", "float64", "--layers", "1",
                 "--train-data", f"pairs:{root / 'pairs'}", "--max-steps", "12", "--batch-size", "4",
                 "--grad-accum", "1", "--device", "cpu", "--precision", "fp32", "--out", str(out), *extra])


def test_cli_retain_fires_and_stops(cli_files, tmp_path, capsys):
    rc = _cli(cli_files, tmp_path / "run", "--lr", "1.0", "--retain", f"jsonl:{cli_files / 'retain.jsonl'}",
              "--retain-every", "2", "--retain-tolerance", "0.01")
    out, err = capsys.readouterr()
    assert rc == 0, err
    s = _summary(tmp_path / "run")
    r = s["retention"]
    assert s["steps"] == 2 and r["fired_step"] == 2 and r["stopped_at_step"] == 2 and r["pairs"] == 8
    assert r["data"] == f"jsonl:{cli_files / 'retain.jsonl'}"
    assert "retention set: 8 pairs" in err and "retain guard fired at step 2" in err
    assert "retention:" in out and "fired at step 2, stopped at step 2" in out


def test_cli_retain_best_mode_and_defaults(cli_files, tmp_path, capsys):
    rc = _cli(cli_files, tmp_path / "run", "--lr", "1e-4", "--retain", f"jsonl:{cli_files / 'retain.jsonl'}",
              "--retain-mode", "best", "--max-steps", "3")
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = _summary(tmp_path / "run")["retention"]
    assert (r["mode"], r["every"], r["tolerance"]) == ("best", 20, 0.01)
    assert list(r["curve"]) == ["0", "3"] and not r["fired"]  # baseline and the last step
    assert "within +1.00%" in out


@pytest.mark.parametrize("extra,message", [
    (["--retain", "nosuch:spec"], "unknown data kind 'nosuch'"),
    (["--retain", "missing-folder"], "retention data 'missing-folder'"),
    (["--retain", "gsm8k", "--retain-tolerance", "-0.5"], "--retain-tolerance must be a relative rise >= 0"),
    (["--retain", "gsm8k", "--retain-tolerance", "inf"], "--retain-tolerance must be"),
    (["--retain", "gsm8k", "--retain-every", "0"], "--retain-every must be a positive"),
    (["--retain-every", "5"], "--retain-every needs --retain SPEC"),
    (["--retain", ""], "--retain needs a SPEC"),
])
def test_cli_retain_errors(cli_files, tmp_path, capsys, extra, message):
    assert _cli(cli_files, tmp_path / "run", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- DDP

WORKER = Path(__file__).with_name("_retention_dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_ddp_processes_measure_together_and_stop_together(knows, tmp_path):
    torch.save(knows, tmp_path / "knows.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(tmp_path / "knows.pt"), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same curve to the last bit, the same decision
    r = ranks[0]
    assert r["global_step"] == 2 and r["fired_step"] == 2 and r["stopped_at_step"] == 2
    assert r["measured_pairs"] == [4, 4]  # each process scored its half
    # the all-reduced baseline is the single-process NLL of the whole set
    single = RetentionGuard(RETAIN, tiny_tokenizer()).measure(_model(knows))
    assert r["curve"]["0"] == pytest.approx(single, rel=1e-12)

"""Progress and quiet output: bars on stderr, plain sparse lines off a terminal, Trainer logs as numbers."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from transformers.utils import logging as hf_logging

import layerselect._progress as prog
from layerselect._progress import format_log, progress, quiet_libraries
from layerselect.cli import build_parser, main
from layerselect.data import TranslationExample
from layerselect.selective_ffn.config import SelectiveFFNConfig
from layerselect.train import train_slam, translation_loss
from tiny import tiny_model, tiny_texts, tiny_tokenizer

# Tiny matmuls: threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("single_thread")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _pairs(n: int = 8) -> list[TranslationExample]:
    return [TranslationExample("de", f"Janet hat {i} Enten.", f"Janet has {i} ducks.") for i in range(n)]


def test_off_a_terminal_a_bar_prints_a_few_plain_lines():
    log = io.StringIO()
    for _ in progress(range(5000), desc="work", file=log):
        pass
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 1 <= len(lines) <= 3, lines  # first and last (one per PLAIN_INTERVAL in between)
    assert lines[-1].startswith("work: 100%") and "5000/5000" in lines[-1]


def test_off_a_terminal_each_refresh_is_its_own_distinct_line(monkeypatch):
    monkeypatch.setattr(prog, "PLAIN_INTERVAL", 0.0)
    log = io.StringIO()
    with progress(total=4, desc="steps", file=log, miniters=1) as bar:
        for _ in range(4):
            bar.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == len(set(lines)) and 2 <= len(lines) <= 6
    assert [int(re.search(r"(\d)/4", x).group(1)) for x in lines] == sorted(
        int(re.search(r"(\d)/4", x).group(1)) for x in lines
    )


def test_off_a_terminal_lines_are_at_least_an_interval_apart(monkeypatch):
    import time

    monkeypatch.setattr(prog, "PLAIN_INTERVAL", 0.3)
    log = io.StringIO()
    start = time.monotonic()
    for _ in progress(range(20), desc="slow", file=log):
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    lines = log.getvalue().splitlines()
    assert 3 <= len(lines) <= elapsed / 0.3 + 2, (elapsed, lines)


def test_on_a_terminal_the_bar_updates_in_place():
    term = _Terminal()
    for _ in progress(range(10), desc="work", file=term):
        pass
    assert "\r" in term.getvalue()


def test_format_log_prints_fixed_formats():
    line = format_log({"loss": "1.234567", "learning_rate": 0.0001, "grad_norm": 0.53125, "epoch": 1 / 3},
                      step=10, max_steps=30)
    assert line == "step 10/30  loss 1.2346  lr 1.00e-04  grad_norm 0.5312  epoch 0.33"


def test_train_slam_logs_numbers_on_stderr_and_nothing_on_stdout(tmp_path, capsys):
    tok = tiny_tokenizer()
    model = tiny_model("llama", dtype=torch.float32)
    train_slam(model, tok, _pairs(), SelectiveFFNConfig(layers=[1]), output_dir=tmp_path, max_steps=4,
               per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2,
               warmup_steps=0, save_strategy="no", use_cpu=True, logging_steps=1, seed=0)
    out, err = capsys.readouterr()
    assert out == ""
    assert "\r" not in err and "{'loss'" not in err
    pattern = re.compile(r"^step (\d+)/4  loss (\d+\.\d{4})  lr (\d\.\d{2}e[-+]\d{2})  grad_norm (\d+\.\d{4})"
                         r"  epoch (\d+\.\d{2})$")
    rows = [m.groups() for m in map(pattern.match, err.splitlines()) if m]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    logged = json.loads((tmp_path / "loss.json").read_text())["train"]
    assert [float(r[1]) for r in rows] == pytest.approx([x["loss"] for x in logged], abs=5e-5)
    assert [float(r[2]) for r in rows] == pytest.approx([x["learning_rate"] for x in logged], rel=1e-2)
    assert re.search(r"^trained 4 steps in \d+\.\ds  mean loss \d+\.\d{4}$", err, re.M)
    assert 1 <= sum(x.startswith("train:") for x in err.splitlines()) <= 3  # the step bar, sparse


def test_a_caller_who_asks_for_hf_progress_gets_it(tmp_path, capsys):
    from transformers import ProgressCallback

    from layerselect.train import TrainerLogCallback

    _, trainer = train_slam(tiny_model("llama", dtype=torch.float32), tiny_tokenizer(), _pairs(4),
                            SelectiveFFNConfig(layers=[1]), output_dir=tmp_path, max_steps=1,
                            per_device_train_batch_size=4, save_strategy="no", use_cpu=True,
                            callbacks=[ProgressCallback], return_trainer=True)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert ProgressCallback in kinds and TrainerLogCallback not in kinds


def test_translation_loss_bar_is_optional_and_changes_nothing(capsys):
    tok = tiny_tokenizer()
    model = tiny_model("llama", dtype=torch.float32)
    quiet = translation_loss(model, tok, _pairs(), batch_size=3)
    assert capsys.readouterr() == ("", "")
    shown = translation_loss(model, tok, _pairs(), batch_size=3, progress=True, desc="loss before")
    out, err = capsys.readouterr()
    assert shown == quiet and out == ""
    lines = err.splitlines()
    assert 1 <= len(lines) <= 3 and "8/8" in lines[-1] and lines[-1].startswith("loss before")


def test_eval_bar_per_language_and_only_the_table_on_stdout(capsys):
    from layerselect.eval import evaluate

    table = evaluate(None, None, "mgsm", langs=["en", "de"], limit=5, model_name="fake",
                     generator=lambda prompts: ["The answer is 7."] * len(prompts))
    out, err = capsys.readouterr()
    assert out.strip() == table["markdown"].strip()
    assert "\r" not in err
    for lang in ("en", "de"):
        lines = [x for x in err.splitlines() if x.startswith(f"eval mgsm {lang}")]
        assert 1 <= len(lines) <= 3 and "5/5" in lines[-1]


def test_quiet_libraries_is_scoped():
    was = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    with quiet_libraries():
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    assert (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()) == was
    with quiet_libraries(quiet=False):
        assert hf_logging.is_progress_bar_enabled() == was[0]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", dtype=torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_cli_is_quiet_by_default_and_verbose_on_request(saved_model, tmp_path, capsys):
    txt = tmp_path / "txt"
    txt.mkdir()
    for lang, items in tiny_texts(3).items():
        (txt / f"{lang}.txt").write_text("\n".join(items) + "\n", encoding="utf-8")
    args = ["analyze", "--model", str(saved_model), "--data", f"txt:{txt}", "--layers", "0-1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "Loading weights" not in out + err and "\r" not in out + err
    assert out.splitlines()[0].startswith("layer") and "analyzing" not in out  # stdout: the table first
    assert "collect" not in out and any(x.startswith("collect:") for x in err.splitlines())
    assert hf_logging.is_progress_bar_enabled()  # restored after the command
    assert main([*args, "--out", str(tmp_path / "b"), "--verbose"]) == 0
    assert "Loading weights" in capsys.readouterr().err


def test_cli_verbose_goes_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["demo"]).verbose is False
    assert parser.parse_args(["--verbose", "demo"]).verbose is True
    assert parser.parse_args(["demo", "-v"]).verbose is True


def test_demo_writes_outside_the_clone_and_keeps_no_optimizer_state_by_default(monkeypatch, tmp_path):
    from layerselect.demo import default_demo_dir

    monkeypatch.setenv("LAYERSELECT_CACHE", str(tmp_path))
    assert default_demo_dir() == tmp_path / "demo"
    args = build_parser().parse_args(["demo"])
    assert args.out is None and args.keep_checkpoints is False
    assert build_parser().parse_args(["demo", "--keep-checkpoints"]).keep_checkpoints is True


def test_merge_shows_one_bar_over_all_shards(tmp_path, capsys):
    from layerselect.selective_ffn import merge_checkpoint
    from layerselect.selective_ffn.model import get_slam_model

    base = tiny_model("llama", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    get_slam_model(base, SelectiveFFNConfig(layers=[1])).save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and "\r" not in err
    assert 1 <= len(lines) <= 3 and all(x.startswith("merge:") for x in lines) and "100%" in lines[-1]
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert capsys.readouterr() == ("", "")

"""Hostile and broken inputs for training (resume, arguments) and evaluation (reruns, rescoring)."""

from __future__ import annotations

import json

import pytest
import torch

from _hostile import assert_error, snapshot
from layerselect.cli import main
from layerselect.data import TranslationExample
from layerselect.errors import BaseModelMismatchError, FormatError, InvalidInputError
from layerselect.eval import evaluate, read_records, records_path, rescore
from layerselect.selective_ffn.config import SelectiveFFNConfig
from layerselect.selective_ffn.model import get_slam_model
from layerselect.train import TRAINABLE_WEIGHTS_NAME, resolve_checkpoint, train_slam
from tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


def _pairs(n=8):
    return [TranslationExample("de", f"Janet hat {i} Enten.", f"Janet has {i} ducks.") for i in range(n)]


def _args(**kw):
    base = dict(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2,
                warmup_steps=0, save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True, seed=0,
                report_to=[])
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_slam(tiny_model("llama", dtype=torch.float32), tiny_tokenizer(), _pairs(),
               SelectiveFFNConfig(layers=[1]), output_dir=out, **_args())
    return out


def test_resume_on_another_base_model_is_refused(run_dir):
    other = get_slam_model(tiny_model("llama", dtype=torch.float32, seed=9), SelectiveFFNConfig(layers=[1]))
    with pytest.raises(BaseModelMismatchError) as exc:
        resolve_checkpoint(True, run_dir, other)
    assert_error(exc, "another base model", "checkpoint-2")
    same = get_slam_model(tiny_model("llama", dtype=torch.float32), SelectiveFFNConfig(layers=[1]))
    assert resolve_checkpoint(True, run_dir, same).name == "checkpoint-2"


def test_resume_with_other_layers_is_refused(run_dir):
    other = get_slam_model(tiny_model("llama", dtype=torch.float32), SelectiveFFNConfig(layers=[2]))
    with pytest.raises(BaseModelMismatchError, match="other layers"):
        resolve_checkpoint(True, run_dir, other)


def test_train_slam_refuses_the_resume_before_training(run_dir, tmp_path):
    model = tiny_model("llama", dtype=torch.float32, seed=9)
    before = snapshot(run_dir)
    with pytest.raises(BaseModelMismatchError):
        train_slam(model, tiny_tokenizer(), _pairs(), SelectiveFFNConfig(layers=[1]), output_dir=run_dir,
                   resume_from_checkpoint=True, **_args(max_steps=4))
    assert snapshot(run_dir) == before


def test_nothing_to_resume_is_clear(tmp_path):
    with pytest.raises(InvalidInputError, match="nothing to resume"):
        resolve_checkpoint(True, tmp_path)
    with pytest.raises(InvalidInputError, match="does not exist"):
        resolve_checkpoint(tmp_path / "checkpoint-7", tmp_path)
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(InvalidInputError, match="not a layerselect checkpoint"):
        resolve_checkpoint(tmp_path / "checkpoint-1", tmp_path)


@pytest.mark.parametrize("victim", [TRAINABLE_WEIGHTS_NAME, "optimizer.pt", "scheduler.pt", "trainer_state.json"])
def test_truncated_checkpoint_files_are_named(run_dir, tmp_path, victim):
    import shutil

    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(run_dir / "checkpoint-2", ckpt)
    data = (ckpt / victim).read_bytes()
    (ckpt / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError) as exc:
        resolve_checkpoint(ckpt, tmp_path)
    assert_error(exc, victim)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_model("llama", dtype=torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    pairs = d.parent / "pairs" / "de-en"
    pairs.mkdir(parents=True)
    (pairs / "train.de").write_text("".join(f"Janet hat {i} Enten.\n" for i in range(6)))
    (pairs / "train.en").write_text("".join(f"Janet has {i} ducks.\n" for i in range(6)))
    return d


@pytest.mark.parametrize(
    ("extra", "words"),
    [(["--batch-size", "0"], ["--batch-size", "positive"]), (["--max-steps", "0"], ["--max-steps"]),
     (["--grad-accum", "-1"], ["--grad-accum"]), (["--lr", "0"], ["--lr"]),
     (["--resume"], ["nothing to resume"]), (["--resume", "/no/such/checkpoint"], ["does not exist"])],
    ids=["batch-0", "steps-0", "accum-negative", "lr-0", "resume-nothing", "resume-missing"],
)
def test_cli_train_bad_arguments_fail_fast_in_one_line(saved_model, tmp_path, capsys, extra, words):
    rc = main(["train", "--model", str(saved_model), "--train-data", f"pairs:{saved_model.parent / 'pairs'}",
               "--layers", "0", "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_cli_train_out_that_is_a_file(saved_model, tmp_path, capsys):
    (tmp_path / "run").write_text("keep")
    rc = main(["train", "--model", str(saved_model), "--train-data", f"pairs:{saved_model.parent / 'pairs'}",
               "--layers", "0", "--out", str(tmp_path / "run")])
    assert rc == 2 and "existing file" in capsys.readouterr().err
    assert (tmp_path / "run").read_text() == "keep"


# ---------------------------------------------------------------------------- eval


def _mgsm(folder, questions):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mgsm_en.tsv").write_text("".join(f"{q}\t{a}\n" for q, a in questions), encoding="utf-8")
    return folder


def _echo(prompts):
    return [" The answer is 7." for _ in prompts]


def test_rerun_with_other_data_is_refused_and_keeps_the_generations(tmp_path):
    data = _mgsm(tmp_path / "a", [("What is 3+4?", 7), ("What is 1+1?", 2)])
    out = tmp_path / "out"
    kw = dict(langs=["en"], out_dir=out, generator=_echo, model_name="m", verbose=False)
    evaluate(None, None, "mgsm", data=data, **kw)
    before = snapshot(out)
    other = _mgsm(tmp_path / "b", [("What is 5+5?", 10), ("What is 2+2?", 4)])
    with pytest.raises(InvalidInputError) as exc:
        evaluate(None, None, "mgsm", data=other, **kw)
    assert_error(exc, "questions of ['en'] changed", "overwrite")
    assert snapshot(out) == before
    table = evaluate(None, None, "mgsm", data=other, overwrite=True, **kw)
    assert table["accuracy"]["en"] == 0.0  # regenerated for the new questions, not reused


def test_rerun_with_other_weights_under_the_same_name_is_refused(tmp_path):
    data = _mgsm(tmp_path / "a", [("What is 3+4?", 7)])
    tok = tiny_tokenizer()
    kw = dict(langs=["en"], data=data, out_dir=tmp_path / "out", max_new_tokens=2, model_name="same-name",
              verbose=False)
    evaluate(tiny_model("llama", dtype=torch.float32), tok, "mgsm", **kw)
    changed = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight.add_(0.01)  # e.g. an adapter merged in
    with pytest.raises(InvalidInputError, match="model_fingerprint"):
        evaluate(changed, tok, "mgsm", **kw)


def test_rescore_of_records_missing_fields_is_clear(tmp_path):
    data = _mgsm(tmp_path / "a", [("What is 3+4?", 7)])
    out = tmp_path / "out"
    evaluate(None, None, "mgsm", langs=["en"], data=data, out_dir=out, generator=_echo, model_name="m", verbose=False)
    path = records_path(out, "mgsm", "en")
    rec = read_records(path)[0]
    del rec["response"]
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(FormatError) as exc:
        rescore(out, verbose=False)
    assert_error(exc, "record 1", "response")


def test_non_utf8_mgsm_file_names_the_line(tmp_path):
    d = tmp_path / "mgsm"
    d.mkdir()
    (d / "mgsm_en.tsv").write_bytes(b"What is 3+4?\t7\nW\xe4s ist 1+1?\t2\n")
    with pytest.raises(InvalidInputError) as exc:
        evaluate(None, None, "mgsm", langs=["en"], data=d, generator=_echo, verbose=False)
    assert_error(exc, "mgsm_en.tsv:2", "utf-8")


def test_eval_out_that_is_a_file(tmp_path):
    data = _mgsm(tmp_path / "a", [("What is 3+4?", 7)])
    (tmp_path / "out").write_text("keep")
    with pytest.raises(InvalidInputError, match="existing file"):
        evaluate(None, None, "mgsm", langs=["en"], data=data, out_dir=tmp_path / "out", generator=_echo,
                 verbose=False)
    assert (tmp_path / "out").read_text() == "keep"

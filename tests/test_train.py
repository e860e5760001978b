"""train_slam on a tiny model: loss falls, only the selected matrices change, adapter-only checkpoints,
bitwise resume, and the ``layerselect train`` command."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from layerselect.cli import main
from layerselect.data import TranslationExample
from layerselect.selective_ffn.config import SelectiveFFNConfig
from layerselect.selective_ffn.model import SelectiveFFNModel
from layerselect.train import TRAINABLE_WEIGHTS_NAME, train_slam, translation_loss
from tiny import tiny_model, tiny_tokenizer

# Tiny matmuls: threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("single_thread")


SELECTED = {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def _pairs(n: int = 16) -> list[TranslationExample]:
    de = [TranslationExample("de", f"Janet hat {i} Enten.", f"Janet has {i} ducks.") for i in range(n // 2)]
    sw = [TranslationExample("sw", f"Janet ana bata {i}.", f"Janet has {i} ducks.") for i in range(n - n // 2)]
    return de + sw


def _args(**kw):
    base = dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2,
                warmup_steps=0, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return base


def test_training_changes_only_selected_matrices_and_loss_falls(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", dtype=torch.float32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = _pairs()
    before = translation_loss(model, tok, pairs)
    adapter = train_slam(model, tok, pairs, SelectiveFFNConfig(layers=[1]), output_dir=tmp_path,
                         **_args(max_steps=8, save_strategy="steps", save_steps=4))
    after = translation_loss(model, tok, pairs)
    assert after < before - 0.1, (before, after)
    log = json.loads((tmp_path / "loss.json").read_text())["train"]
    assert len(log) == 8 and log[-1]["loss"] < log[0]["loss"]
    assert (tmp_path / "loss.png").stat().st_size > 0
    changed = set()
    for name, value in model.state_dict().items():
        if not torch.equal(value, original[name]):
            changed.add(name)
    assert changed == SELECTED
    # adapter holds exactly the selected deltas and reloads onto a fresh base bit for bit
    assert set(load_file(str(adapter / "layerselect_deltas.safetensors"))) == SELECTED
    fresh = SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=torch.float32), adapter)
    fresh_sd = fresh.model.state_dict()
    for name in SELECTED:
        key = next(k for k in fresh_sd if k.endswith(name))
        assert torch.equal(fresh_sd[key], model.state_dict()[name])
    # checkpoints hold the adapter + trainer state, not the model
    ckpt = tmp_path / "checkpoint-4"
    names = set(os.listdir(ckpt))
    assert {"layerselect_adapter.json", "layerselect_deltas.safetensors", TRAINABLE_WEIGHTS_NAME,
            "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names
    assert not any(n.startswith(("model", "pytorch_model")) for n in names), names
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["layers"] == [1]
    assert summary["trainable_parameters"] == 2 * 32 * 48


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_from_adapter_checkpoint_is_bitwise_identical(tmp_path):
    tok = tiny_tokenizer()
    pairs = _pairs(20)
    cfg = SelectiveFFNConfig(layers=[0, 2])
    kw = _args(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
               gradient_accumulation_steps=2)
    straight = train_slam(tiny_model("llama", dtype=torch.float32), tok, pairs, cfg, output_dir=tmp_path / "a", **kw)
    train_slam(tiny_model("llama", dtype=torch.float32), tok, pairs, cfg, output_dir=tmp_path / "b",
               callbacks=[_StopAt(2)], **kw)
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "checkpoint-4").exists()
    resumed = train_slam(tiny_model("llama", dtype=torch.float32), tok, pairs, cfg, output_dir=tmp_path / "b",
                         resume_from_checkpoint=True, **kw)
    a = load_file(str(straight / "layerselect_deltas.safetensors"))
    b = load_file(str(resumed / "layerselect_deltas.safetensors"))
    assert set(a) == set(b) and len(a) == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a[k], torch.zeros_like(a[k]))
    log = json.loads((tmp_path / "b" / "loss.json").read_text())["train"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def _write_pairs(root, lang, n):
    d = root / f"{lang}-en"
    d.mkdir(parents=True)
    (d / f"train.{lang}").write_text("".join(f"Janet hat {i} Enten.\n" for i in range(n)), encoding="utf-8")
    (d / "train.en").write_text("".join(f"Janet has {i} ducks.\n" for i in range(n)), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama", dtype=torch.float32).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    _write_pairs(root / "pairs", "de", 12)
    _write_pairs(root / "pairs", "sw", 12)
    texts = root / "texts"
    texts.mkdir()
    (texts / "en.txt").write_text("Janet has 3 ducks.\nThe fox jumps.\n", encoding="utf-8")
    (texts / "de.txt").write_text("Janet hat 3 Enten.\nDer Fuchs springt.\n", encoding="utf-8")
    (texts / "zh.txt").write_text("珍妮有3只鸭子\n狐狸跳过了懒狗\n", encoding="utf-8")
    return root


def _cli(root, out, *extra):
    return main(["train", "--model", str(root / "model"), "--train-data", f"pairs:{root / 'pairs'}",
                 "--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2",
                 "--device", "cpu", "--out", str(out), *extra])


def test_cli_train_tiny(tiny_checkpoint, tmp_path, capsys):
    rc = _cli(tiny_checkpoint, tmp_path / "run", "--layers", "0-1", "--holdout", "2")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "layers:               [0, 1]" in out and "trainable parameters:" in out and "held-out loss" in out
    for name in ("loss.json", "loss.png", "train_summary.json", "adapter/layerselect_deltas.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["heldout_pairs"] == 4 and summary["layers"] == [0, 1]


def test_cli_max_pairs_caps_each_language_after_the_holdout(tiny_checkpoint, tmp_path, capsys):
    rc = _cli(tiny_checkpoint, tmp_path / "run", "--layers", "1", "--holdout", "2", "--max-pairs", "5",
              "--no-filter", "--max-steps", "1")
    assert rc == 0, capsys.readouterr().err
    assert "training pairs: 10 in 2 languages" in capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["examples"] == 10 and summary["heldout_pairs"] == 4  # 12 per language: 2 held out, 5 of 10 kept


def test_cli_train_auto_selects(tiny_checkpoint, tmp_path, capsys):
    rc = _cli(tiny_checkpoint, tmp_path / "run", "--layers", "auto",
              "--analysis-data", f"txt:{tiny_checkpoint / 'texts'}", "--max-steps", "1")
    out = capsys.readouterr().out
    assert rc == 0, out
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert sel["layers"] and f"layers:               {sel['layers']}" in out


@pytest.mark.parametrize("extra,message", [
    (["--layers", "0-9"], "layer 4 is out of range"),
    (["--layers", "x"], "bad layer spec"),
    (["--layers", "0", "--langs", "fr"], "languages ['fr'] are not in"),
    (["--layers", "0", "--langs", "qq"], "unknown language code 'qq'"),
    (["--layers", "auto"], "--layers auto needs --analysis-data"),
])
def test_cli_train_errors(tiny_checkpoint, tmp_path, capsys, extra, message):
    assert _cli(tiny_checkpoint, tmp_path / "run", *extra) == 2
    assert message in capsys.readouterr().err


def test_cli_train_bad_data_path(tiny_checkpoint, tmp_path, capsys):
    rc = main(["train", "--model", str(tiny_checkpoint / "model"), "--layers", "0",
               "--train-data", f"pairs:{tmp_path / 'missing'}", "--out", str(tmp_path / "run")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_cli_train_auto_with_a_weight_criterion_passes_the_model(tiny_checkpoint, tmp_path):
    # --layers auto --criterion snr --analysis-data ...: snr reads the weights, so the model must reach it.
    import argparse

    from layerselect.commands.train import _resolve_layers
    from layerselect.models import load_model

    model, tokenizer = load_model(str(tiny_checkpoint / "model"))
    args = argparse.Namespace(selection=None, layers="auto", criterion="snr", model="tiny",
                              analysis_data=f"txt:{tiny_checkpoint / 'texts'}", analysis_limit=None)
    layers, selection = _resolve_layers(args, model, tokenizer, tmp_path)
    assert selection.criterion == "snr" and layers == selection.layers and layers

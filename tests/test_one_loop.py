"""``layerselect.train.train_model``: one loop for selective, LoRA and full fine-tuning.

Checked against an independent hand-written loop (same order, token-weighted loss over the
accumulation, clipping at 1, AdamW), and for what each kind of model leaves behind.
"""

from __future__ import annotations

import json

import pytest
import torch

from layerselect.cli import main
from layerselect.data import TranslationDataset, TranslationExample
from layerselect.selective_ffn.config import SelectiveFFNConfig
from layerselect.selective_ffn.model import get_slam_model
from layerselect.train import MODEL_SUBDIR, train_model
from tiny import tiny_cli_files, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, BATCH, ACCUM, LR = 3, 2, 2, 5e-3


def _pairs(n: int = 12) -> list[TranslationExample]:
    tails = ["", " und zwei Eier", " und drei Eier am Tag", " heute"]
    return [TranslationExample("de", f"Janet hat {i} Enten{tails[i % 4]}.", f"Janet has {i} ducks{tails[i % 4]}.")
            for i in range(n)]


def _loop_args(**kw):
    base = dict(max_steps=STEPS, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                optim="adamw_torch", logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                precision="fp32", data_order="sequential")
    base.update(kw)
    return base


def _hand_loop(model, features, params):
    """The reference: batches in order, summed target NLL / target tokens of the whole accumulation."""
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    pad = tiny_tokenizer().pad_token_id
    for step in range(STEPS):
        micro = [features[(step * ACCUM + a) * BATCH:(step * ACCUM + a + 1) * BATCH] for a in range(ACCUM)]
        tokens = sum(sum(1 for y in f["labels"][1:] if y != -100) for m in micro for f in m)
        for m in micro:
            width = max(len(f["input_ids"]) for f in m)
            ids = torch.tensor([f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in m])
            mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in m])
            labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in m])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
            target = labels[:, 1:]
            keep = target != -100
            nll = -torch.log_softmax(logits, -1)[keep].gather(-1, target[keep].unsqueeze(-1)).sum()
            (nll / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_sequential_loop_matches_an_independent_loop(tmp_path):
    tok = tiny_tokenizer()
    ds = TranslationDataset(_pairs(), tok)
    features = [ds[i] for i in range(len(ds))]
    ours = get_slam_model(tiny_model("llama"), SelectiveFFNConfig(layers=[1]))
    train_model(ours, tok, features, output_dir=tmp_path, **_loop_args())
    reference = tiny_model("llama")
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    for n, p in reference.named_parameters():
        p.requires_grad_(n in names)
    _hand_loop(reference, features, [p for n, p in reference.named_parameters() if n in names])
    got = ours.get_base_model().state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.equal(got[names[0]], tiny_model("llama").state_dict()[names[0]])  # it did train
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["kind"] == "selective" and summary["data_order"] == "sequential" and summary["steps"] == STEPS
    assert summary["lr_scheduler_type"] == "constant" and summary["max_grad_norm"] == 1.0
    assert len(summary["step_seconds"]) == STEPS and all(t > 0 for t in summary["step_seconds"])


def test_lora_trains_in_the_same_loop_and_writes_a_peft_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    tok = tiny_tokenizer()
    base = tiny_model("llama", dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lora_before = {n: v.clone() for n, v in lora.state_dict().items() if "lora_" in n}
    final, trainer = train_model(lora, tok, _pairs(), output_dir=tmp_path, **_loop_args())
    assert final == tmp_path / "adapter" and (final / "adapter_config.json").is_file()
    assert all(not torch.equal(lora.state_dict()[n], v) for n, v in lora_before.items())  # every LoRA matrix trained
    frozen = {k: v for k, v in lora.get_base_model().state_dict().items() if "lora_" not in k}
    for k, v in frozen.items():  # the base weights never moved
        assert torch.equal(v, before[k.replace(".base_layer", "")]), k
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        fresh = PeftModel.from_pretrained(tiny_model("llama", dtype=torch.float32), final)
        torch.testing.assert_close(fresh(input_ids=ids).logits, want)
    assert json.loads((tmp_path / "train_summary.json").read_text())["kind"] == "peft"


def test_full_fine_tuning_trains_in_the_same_loop_and_saves_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    model = tiny_model("llama", dtype=torch.float32).requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    final, _ = train_model(model, tok, _pairs(), output_dir=tmp_path, **_loop_args())
    assert final == tmp_path / MODEL_SUBDIR
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.layers.1.mlp.down_proj.weight" in moved
    again = AutoModelForCausalLM.from_pretrained(final)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["kind"] == "plain" and summary["trainable_parameters"] == summary["total_parameters"]


def test_resume_from_a_checkpoint_at_max_steps_trains_no_more(tmp_path):
    """`layerselect train --resume .../checkpoint-2 --max-steps 2` used to train a third step."""
    model_dir, train_data = tiny_cli_files(tmp_path, pairs=16)
    out = tmp_path / "run"
    common = ["train", "--model", str(model_dir), "--layers", "1", "--train-data", train_data,
              "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--save-steps", "1", "--lr", "1e-2",
              "--precision", "fp32", "--device", "cpu", "--no-filter", "--out", str(out)]
    assert main(common) == 0
    adapter = (out / "adapter" / "layerselect_deltas.safetensors").read_bytes()
    assert main([*common, "--resume", str(out / "checkpoint-2")]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["step_seconds"] == []  # nothing trained
    assert (out / "adapter" / "layerselect_deltas.safetensors").read_bytes() == adapter
    assert not (out / "checkpoint-3").exists()
    # a hostile trainer_state.json (a step that is no number) is refused by name, nothing trained
    state = out / "checkpoint-2" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "global_step": "2"}))
    assert main([*common, "--resume", str(out / "checkpoint-2")]) == 2
    assert (out / "adapter" / "layerselect_deltas.safetensors").read_bytes() == adapter

"""SelectiveFFNConfig and the SelectiveFFNModel wrapper: what trains, counts, state, trainers."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from layerselect.errors import InvalidInputError
from layerselect.selective_ffn import SelectiveFFNConfig, SelectiveFFNModel, get_slam_model
from tiny import IDS, tiny_model

# Tiny models run faster single-threaded, especially on a busy machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def _train(model, steps=3, lr=0.05, opt_cls=torch.optim.SGD, **opt_kw):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt_cls(params, lr=lr, **opt_kw)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------
def test_config_defaults_and_json_round_trip(tmp_path):
    cfg = SelectiveFFNConfig(layers=[5, 0, 3])
    assert cfg.layers == [0, 3, 5]
    assert cfg.target_modules == ["up", "down"]
    assert cfg.delta_dtype == "auto"
    back = SelectiveFFNConfig.from_dict(json.loads(cfg.to_json_string()))
    assert back == cfg
    (tmp_path / "adapter_config.json").write_text(cfg.to_json_string())
    assert SelectiveFFNConfig.from_json_file(tmp_path) == cfg
    assert SelectiveFFNConfig(layers=[0], target_modules="all").target_modules == ["gate", "up", "down"]
    assert SelectiveFFNConfig(layers=[0], target_modules=["down_proj", "gate_up_proj"]).target_modules == [
        "gate", "up", "down"]


def test_config_fields_carry_help_and_the_saved_json_keeps_its_keys():
    cfg = SelectiveFFNConfig(layers=[2], base_model_name_or_path="m", delta_dtype="bfloat16")
    for f in dataclasses.fields(SelectiveFFNConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name
    # the adapter JSON written by earlier versions: same keys, same values
    assert json.loads(cfg.to_json_string()) == {
        "layers": [2], "target_modules": ["up", "down"], "base_model_name_or_path": "m",
        "delta_dtype": "bfloat16", "selection": None,
    }


class _FakeSelection:
    """Shaped like layerselect.selection.Selection (not imported on purpose)."""

    def __init__(self):
        self.layers = [1, 0]
        self.scores = torch.tensor([0.5, 0.25, 0.0, 0.0])
        self.criterion = "msd"
        self.why = "layers 0, 1 have MSD above the mean of K"


def test_config_accepts_a_selection_and_keeps_provenance():
    cfg = SelectiveFFNConfig(layers=_FakeSelection())
    assert cfg.layers == [0, 1]
    assert cfg.selection["criterion"] == "msd"
    assert cfg.selection["scores"] == [0.5, 0.25, 0.0, 0.0]
    assert "MSD" in cfg.selection["why"]
    assert SelectiveFFNConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=[]), "empty"),
        (dict(layers=[1, 2, 1]), r"duplicate layer indices \[1\]"),
        (dict(layers=[-1]), "negative"),
        (dict(layers=[0.5]), "not an integer"),
        (dict(layers="0,1"), "list of layer indices"),
        (dict(layers=[0], target_modules=["w_q"]), "unknown target 'w_q'"),
        (dict(layers=[0], target_modules=[]), "empty"),
        (dict(layers=[0], delta_dtype="int8"), "delta_dtype"),
    ],
)
def test_config_refuses_bad_input(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        SelectiveFFNConfig(**kwargs)


def test_layers_out_of_range_name_the_model():
    with pytest.raises(InvalidInputError, match=r"layer 4 is out of range.*4 decoder layers"):
        get_slam_model(tiny_model("llama"), SelectiveFFNConfig(layers=[0, 4]))


# ----------------------------------------------------------------------------------------
# Parameter counts: the paper's 8.0% / 6.5% on Llama-2 7B / 13B (meta device, no weights)
# ----------------------------------------------------------------------------------------
def _llama2_count(h: int, i: int, n_layers: int, vocab: int = 32000) -> int:
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q,k,v,o + gate,up,down + two RMSNorms
    return 2 * vocab * h + n_layers * per_layer + h  # embeddings + lm_head (untied) + final norm


@pytest.mark.parametrize(
    "h, i, n, trainable, total, pct",
    [
        (4096, 11008, 32, 541_065_216, 6_738_415_616, "8.0296"),
        (5120, 13824, 40, 849_346_560, 13_015_864_320, "6.5255"),
    ],
)
def test_print_trainable_parameters_llama2(capsys, h, i, n, trainable, total, pct):
    assert trainable == 6 * 2 * h * i  # six layers, up + down
    assert total == _llama2_count(h, i, n)
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                         num_attention_heads=n, vocab_size=32000)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = get_slam_model(base, SelectiveFFNConfig(layers=[0, 1, 2, 3, 4, 5]))
    assert model.get_nb_trainable_parameters() == (trainable, total)
    model.print_trainable_parameters()
    out = capsys.readouterr().out.strip()
    assert out == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct}"
    assert round(100 * trainable / total, 1) == {4096: 8.0, 5120: 6.5}[h]


# ----------------------------------------------------------------------------------------
# What trains
# ----------------------------------------------------------------------------------------
def test_only_targeted_matrices_train_even_with_weight_decay():
    base = tiny_model("llama", dtype=torch.float32)
    before = copy.deepcopy(base.state_dict())
    model = get_slam_model(base, SelectiveFFNConfig(layers=[1, 3], target_modules=["gate", "down"]))
    expected = {f"model.layers.{i}.mlp.{m}_proj.weight" for i in (1, 3) for m in ("gate", "down")}
    assert {n for n, p in base.named_parameters() if p.requires_grad} == expected
    assert set(model.target_names) == expected
    assert model.model is base  # no copy of the model
    _train(model, opt_cls=torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    after = base.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected


def test_wrapped_model_is_model_and_old_state_dicts_still_load():
    base = tiny_model("llama", dtype=torch.float32)
    slam = get_slam_model(base, SelectiveFFNConfig(layers=[1]))
    assert slam.model is base and slam.get_base_model() is base
    assert slam.base_model is base.model  # transformers' meaning (the trunk), forwarded; no alias of ours
    # state dicts keyed the old way (base_model.<name>) still load into the wrapper
    with torch.no_grad():
        base.model.layers[1].mlp.up_proj.weight.add_(1.0)
    saved = {k.replace("model.", "base_model.", 1): v.clone() for k, v in slam.state_dict().items()}
    assert all(k.startswith("base_model.model.") or k.startswith("base_model.lm_head") for k in saved)
    other = get_slam_model(tiny_model("llama", dtype=torch.float32), SelectiveFFNConfig(layers=[1]))
    other.load_state_dict(saved)
    assert torch.equal(other.model.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)


def test_fused_gate_up_partial_target_masks_the_other_half():
    base = tiny_model("phi3", dtype=torch.float32)
    fused = "model.layers.0.mlp.gate_up_proj.weight"
    w0 = dict(base.named_parameters())[fused].detach().clone()
    model = get_slam_model(base, SelectiveFFNConfig(layers=[0]))  # up + down
    inter, hidden = 48, 32
    assert model.get_nb_trainable_parameters()[0] == inter * hidden + hidden * inter
    _train(model, lr=0.1)
    w1 = dict(base.named_parameters())[fused].detach()
    assert torch.equal(w1[:inter], w0[:inter])  # gate rows untouched
    assert not torch.equal(w1[inter:], w0[inter:])  # up rows trained


def test_disable_adapter_unmerge_and_merge_and_unload():
    base = tiny_model("qwen2", dtype=torch.float32)
    fresh = copy.deepcopy(base)
    model = get_slam_model(base, SelectiveFFNConfig(layers=[0, 2]))
    _train(model, lr=0.1)
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
        base_logits = fresh(input_ids=IDS).logits
        assert not torch.equal(trained, base_logits)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=IDS).logits, base_logits)
        assert torch.equal(model(input_ids=IDS).logits, trained)
        model.unmerge()
        assert not model.merged
        assert torch.equal(model(input_ids=IDS).logits, base_logits)
        model.merge()
        assert torch.equal(model(input_ids=IDS).logits, trained)
    plain = model.merge_and_unload()
    assert isinstance(plain, PreTrainedModel) and type(plain) is type(fresh)
    assert all(p.requires_grad for p in plain.parameters())  # restored to the pre-wrap flags (all True)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, trained)


def test_generate_and_attribute_delegation():
    base = tiny_model("llama", dtype=torch.float32)
    model = get_slam_model(base, SelectiveFFNConfig(layers=[0]))
    assert model.config is base.config and model.device == base.device
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS[:1], **kw), base.generate(IDS[:1], **kw))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = get_slam_model(tiny_model("llama", dtype=torch.float64), SelectiveFFNConfig(layers=[0, 1]))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for n in grads[0]:
        assert grads[1][n].abs().sum() > 0
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-12)


def test_bf16_autocast_training_step():
    model = get_slam_model(tiny_model("gemma", dtype=torch.float32), SelectiveFFNConfig(layers=[1]))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_reference_on_disk_gives_the_same_adapter(tmp_path):
    outs = {}
    for mode in ("cpu", "disk"):
        model = get_slam_model(tiny_model("llama", dtype=torch.float32), SelectiveFFNConfig(layers=[0]), reference=mode)
        assert model.reference_nbytes == (2 * 32 * 48 * 4 if mode == "cpu" else 0)
        _train(model, lr=0.1)
        model.save_pretrained(tmp_path / mode)
        with safe_open(str(tmp_path / mode / "layerselect_deltas.safetensors"), "pt") as fh:
            outs[mode] = ({k: fh.get_tensor(k) for k in list(fh.keys())}, fh.metadata())
    assert outs["cpu"][1] == outs["disk"][1]
    assert outs["cpu"][0].keys() == outs["disk"][0].keys()
    assert all(torch.equal(outs["cpu"][0][k], outs["disk"][0][k]) for k in outs["cpu"][0])


def test_hf_trainer_trains_and_saves(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = tiny_model("llama", dtype=torch.float32)
    before = copy.deepcopy(base.state_dict())
    model = get_slam_model(base, SelectiveFFNConfig(layers=[0, 3]))
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in IDS.repeat(4, 1)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
        report_to=[], save_strategy="no", use_cpu=True, gradient_checkpointing=True,
        logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    after = base.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(model.target_names)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, trained)

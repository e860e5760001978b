"""Selections for other trainers: Axolotl's unfrozen_parameters, LLaMA-Factory's freeze settings, PEFT; `select --emit`.

The trainers' own rules are restated here independently of layerselect.selection.emit:
Axolotl's ``LayerNamePattern`` (src/axolotl/utils/freeze.py) and LLaMA-Factory's
``_setup_freeze_tuning`` (src/llamafactory/model/adapter.py).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from layerselect.cli import main
from layerselect.errors import InvalidInputError
from layerselect.selection import Selection, select
from layerselect.selection.emit import CannotExpressError
from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model
from layerselect.stats import ActivationStats
from tiny import FAMILIES, IDS, tiny_model, tiny_texts, tiny_tokenizer

TARGETS = [("up", "down"), "ffn", "attn", ["k"], ["up"], ["gate", "down", "o"], ["q", "v"]]


# ------------------------------------------------------------------------------------------
# The trainers' rules, restated from their sources
# ------------------------------------------------------------------------------------------
def axolotl_unfrozen(patterns: list[str], params: dict[str, torch.Tensor]) -> dict[str, list[tuple[int, int]] | None]:
    """Axolotl's freeze_layers_except: which parameters unfreeze, and (for ranged patterns) which rows."""
    matched: dict[str, list[tuple[int, int]]] = {}
    for raw in patterns:
        m = re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$", raw)
        name_pattern, span = (raw, None) if not m else (m.group(1), (int(m.group(2) or 0), int(m.group(3))))
        regex = re.compile(re.sub(r"\.(?!\+)", "\\.", name_pattern))  # Axolotl makes dots literal itself
        for name in params:
            if regex.match(name):
                matched.setdefault(name, []).extend([span] if span else [])
    return {name: spans or None for name, spans in matched.items()}  # ranges, if any, restrict the rows


def llamafactory_trainable(names: list[str], num_layers: int, freeze_trainable_layers: int, modules: str) -> set[str]:
    """LLaMA-Factory's _setup_freeze_tuning (no use_llama_pro, no extra modules): the names that stay trainable."""
    if freeze_trainable_layers > 0:  # the last n layers
        layer_ids = range(max(0, num_layers - freeze_trainable_layers), num_layers)
    else:  # the first -n layers
        layer_ids = range(min(-freeze_trainable_layers, num_layers))
    hidden_modules = set()
    for name in names:
        if ".0." in name:
            hidden_modules.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden_modules.add(name.split(".1.")[-1].split(".")[0])
    trainable_layers = []
    for module in modules.split(","):
        assert module == "all" or module in hidden_modules, f"LLaMA-Factory: Module {module} is not found"
        trainable_layers += [".{:d}.{}".format(i, module if module != "all" else "") for i in layer_ids]
    return {n for n in names if any(t in n for t in trainable_layers)}


def _slam(family, layers, targets):
    model = tiny_model(family)
    return model, get_slam_model(model, SelectiveFFNConfig(layers=layers, target_modules=targets))


# ------------------------------------------------------------------------------------------
# Axolotl
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_axolotl_patterns_unfreeze_exactly_what_slam_trains(family):
    for targets in TARGETS:
        model, slam = _slam(family, [0, 2], targets)
        params = dict(model.named_parameters())
        patterns = Selection(layers=[0, 2]).to_axolotl(model, targets)["unfrozen_parameters"]
        # compiled as written, each pattern (its row range aside) matches exactly one trained matrix
        plain = {n for p in patterns for n in params if re.compile(p.split("$[")[0] + ("$" if "$[" in p else "")).match(n)}
        assert plain == set(slam.target_names), (family, targets)
        # through Axolotl's own rule: the same parameters, and only the rows SLAM lets train
        unfrozen = axolotl_unfrozen(patterns, params)
        assert set(unfrozen) == set(slam.target_names), (family, targets)
        model.zero_grad()
        slam(IDS).logits.float().pow(2).mean().backward()
        for name, spans in unfrozen.items():
            grad = params[name].grad
            moving = {int(i) for i in torch.nonzero(grad.abs().sum(dim=1)).flatten()}
            rows = set(range(grad.shape[0])) if spans is None else {i for a, b in spans for i in range(a, b)}
            assert moving == rows, (family, targets, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_name_gives_the_same_patterns_as_the_model(family):
    model = tiny_model(family)
    sel = Selection(layers=[1, 3])
    for targets in [("up", "down"), "ffn", "attn", ["o", "down"]]:
        try:
            from_model = sel.to_axolotl(model, targets)
        except InvalidInputError:
            continue
        if any("$[" in p for p in from_model["unfrozen_parameters"]):  # rows depend on the model's sizes
            with pytest.raises(InvalidInputError, match="pass the model or its config"):
                sel.to_axolotl(family, targets)
        else:
            assert sel.to_axolotl(family, targets) == from_model
            assert sel.to_axolotl(model.config, targets) == from_model


def test_phi3_half_of_a_fused_matrix_is_a_row_range():
    model = tiny_model("phi3")
    rows = model.model.layers[0].mlp.gate_up_proj.weight.shape[0]
    patterns = Selection(layers=[0]).to_axolotl(model)["unfrozen_parameters"]
    assert patterns == [f"^model.layers.0.mlp.gate_up_proj.weight$[{rows // 2}:{rows}]",
                        "^model.layers.0.mlp.down_proj.weight$"]


# ------------------------------------------------------------------------------------------
# LLaMA-Factory
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_llamafactory_round_trips_through_its_documented_meaning(family):
    model = tiny_model(family)  # 4 layers
    names = [n for n, _ in model.named_parameters()]
    checked = 0
    for layers in ([0], [0, 1, 2], [2, 3], [0, 1, 2, 3]):
        for targets in ("ffn", "attn", ["ffn", "attn"]):
            _, slam = _slam(family, layers, targets)
            try:
                settings = Selection(layers=layers).to_llamafactory(model, targets)
            except CannotExpressError as exc:  # only when LLaMA-Factory would train something else
                assert "self_attn" in str(exc) and targets != "ffn", (family, layers, targets, str(exc))
                continue
            assert settings["finetuning_type"] == "freeze"
            got = llamafactory_trainable(names, 4, settings["freeze_trainable_layers"],
                                         settings["freeze_trainable_modules"])
            assert got == set(slam.target_names), (family, layers, targets, settings)
            checked += 1
    assert checked >= 4
    first_two = Selection(layers=[0, 1]).to_llamafactory(model, "ffn")
    assert first_two["freeze_trainable_layers"] == -2 and first_two["freeze_trainable_modules"] == "mlp"
    last_two = Selection(layers=[2, 3]).to_llamafactory(model, "ffn")
    assert last_two["freeze_trainable_layers"] == 2  # positive: the LAST n layers in LLaMA-Factory


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_what_llamafactory_cannot_express_gets_a_clear_message_and_the_axolotl_list(family):
    model = tiny_model(family)
    cases = [
        ([1], "ffn", "not the first n layers"),
        ([0, 2], "ffn", "not the first n layers"),
        ([0, 1], ("up", "down"), "gate" if family == "llama" else "fused"),
    ]
    for layers, targets, reason in cases:
        sel = Selection(layers=layers)
        with pytest.raises(CannotExpressError) as exc:
            sel.to_llamafactory(model, targets)
        message = str(exc.value)
        assert "LLaMA-Factory cannot express this selection" in message and reason in message, message
        axolotl = sel.to_axolotl(model, targets)
        assert exc.value.axolotl == axolotl
        assert all(f'"{p}"' in message for p in axolotl["unfrozen_parameters"])


def test_the_recorded_family_and_depth_are_used(tmp_path):
    stats = ActivationStats.collect(tiny_model("qwen2", num_hidden_layers=6), tiny_tokenizer(), tiny_texts(3),
                                    progress=False)
    sel = select(stats, "first_n", n=2)
    assert sel.meta["model_type"] == "qwen2" and sel.meta["num_model_layers"] == 6
    back = Selection.load(sel.save(tmp_path / "sel.json"))
    assert back.to_axolotl() == back.to_axolotl(tiny_model("qwen2", num_hidden_layers=6))
    assert back.to_llamafactory(target_modules="ffn")["freeze_trainable_layers"] == -2
    last = Selection(layers=[4, 5], meta={"model_type": "qwen2", "num_model_layers": 6})
    assert last.to_llamafactory(target_modules="ffn")["freeze_trainable_layers"] == 2
    with pytest.raises(InvalidInputError, match="records no model family"):
        Selection(layers=[0]).to_axolotl()
    with pytest.raises(InvalidInputError, match="unknown model family 'gpt2'"):
        Selection(layers=[0]).to_axolotl("gpt2")
    with pytest.raises(InvalidInputError, match="out of range"):
        Selection(layers=[9]).to_axolotl(tiny_model("llama"))


# ------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selection_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("emit")
    stats = ActivationStats.collect(tiny_model("llama", num_hidden_layers=6), tiny_tokenizer(), tiny_texts(3),
                                    progress=False)
    stats.save(root / "stats")
    assert main(["select", str(root / "stats"), "--criterion", "first_n", "--param", "n=2",
                 "--out", str(root / "sel.json")]) == 0
    return root / "sel.json"


def _yaml(text):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(text)


def test_cli_emit_axolotl_and_llamafactory(selection_file, tmp_path, capsys):
    capsys.readouterr()
    sel = Selection.load(selection_file)
    assert main(["select", str(selection_file), "--emit", "axolotl"]) == 0
    captured = capsys.readouterr()
    assert _yaml(captured.out) == sel.to_axolotl(tiny_model("llama", num_hidden_layers=6))  # stdout: YAML only
    assert "first_n" in captured.err  # the explanation went to stderr
    out = tmp_path / "lf.yaml"
    assert main(["select", str(selection_file), "--emit", "llamafactory", "--target-modules", "ffn",
                 "--emit-out", str(out)]) == 0
    assert _yaml(out.read_text()) == {"finetuning_type": "freeze", "freeze_trainable_layers": -2,
                                      "freeze_trainable_modules": "mlp"}
    assert f"wrote {out}" in capsys.readouterr().out
    # up/down only: LLaMA-Factory cannot say it; one clear error with the Axolotl list
    assert main(["select", str(selection_file), "--emit", "llamafactory"]) == 2
    err = capsys.readouterr().err
    assert "LLaMA-Factory cannot express this selection" in err and "--target-modules ffn" in err
    assert "unfrozen_parameters:" in err and "^model.layers.1.mlp.down_proj.weight$" in err
    assert "Traceback" not in err


def test_cli_emit_peft_and_family(selection_file, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    capsys.readouterr()
    assert main(["select", str(selection_file), "--emit", "peft"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers_to_transform"] == [0, 1] and sorted(data["target_modules"]) == ["down_proj", "up_proj"]
    config = peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
    assert config.layers_to_transform == [0, 1]
    # a family given by hand; a half of Phi-3's fused matrix needs the model's sizes
    assert main(["select", str(selection_file), "--emit", "axolotl", "--family", "phi3", "--target-modules", "ffn"]) == 0
    assert "gate_up_proj.weight$" in capsys.readouterr().out
    assert main(["select", str(selection_file), "--emit", "axolotl", "--family", "phi3"]) == 2
    assert "pass --model" in capsys.readouterr().err
    # --model reads only the config (no weights) of a checkpoint folder
    tiny_model("phi3", num_hidden_layers=6, dtype=torch.float32).save_pretrained(tmp_path / "phi3")
    assert main(["select", str(selection_file), "--emit", "axolotl", "--model", str(tmp_path / "phi3")]) == 0
    assert "gate_up_proj.weight$[48:96]" in capsys.readouterr().out
    assert main(["select", str(selection_file), "--emit-out", str(tmp_path / "x")]) == 2
    assert "--emit-out needs --emit" in capsys.readouterr().err

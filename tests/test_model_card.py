"""The adapter's model card (README.md): Hub metadata, no machine paths, the user's edits kept, readers unaffected."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerselect.cli import main
from layerselect.selection import Selection
from layerselect.selective_ffn import (
    SelectiveFFNConfig,
    SelectiveFFNModel,
    get_slam_model,
    read_adapter,
)
from layerselect.selective_ffn.adapter_file import CONFIG_NAME, WEIGHTS_NAME
from layerselect.selective_ffn.card import (
    CARD_NAME,
    MARKER,
    card_facts_of,
    is_unedited_card,
    public_model_name,
    public_text,
    update_model_card,
)
from tiny import IDS, tiny_cli_files, tiny_model


def front_matter(text: str) -> dict:
    """The YAML between the first two ``---`` lines (PyYAML when installed, else a small parser)."""
    lines = text.splitlines()
    assert lines[0] == "---", text[:200]
    block = lines[1:lines.index("---", 1)]
    try:
        import yaml
    except ImportError:
        out: dict = {}
        key = None
        for line in block:
            if line.startswith("- "):
                out[key].append(json.loads(line[2:]) if line[2:].startswith('"') else line[2:])
            else:
                key, _, value = line.partition(":")
                value = value.strip()
                out[key] = [] if not value else json.loads(value) if value.startswith('"') else value
        return out
    return yaml.safe_load("\n".join(block))


def _slam(family="llama", layers=(0, 2), **config):
    model = tiny_model(family, dtype=torch.float32)
    slam = get_slam_model(model, SelectiveFFNConfig(layers=list(layers), **config))
    with torch.no_grad():  # a change, so the deltas are not all zero
        for name in slam.target_names:
            dict(model.named_parameters())[name].add_(0.01)
    return slam


def _card(folder) -> str:
    return (folder / CARD_NAME).read_text(encoding="utf-8")


def test_card_written_with_hub_metadata(tmp_path):
    sel = Selection(layers=[0, 2], scores={0: 2.0, 1: 0.5, 2: 1.7, 3: 0.1}, threshold=1.0, criterion="msd",
                    reason="Selected the layers of K with MSD > theta: [0, 2].", notes={1: "MSD <= theta"})
    slam = _slam(layers=[0, 2])
    slam.adapter_config = SelectiveFFNConfig(layers=sel, base_model_name_or_path="org/tiny-llama")
    slam.save_pretrained(tmp_path / "adapter", card_facts={"steps": 30, "final_train_loss": 0.568,
                                                           "reasoning_gap": 0.21, "languages": ["de", "sw"]})
    text = _card(tmp_path / "adapter")
    meta = front_matter(text)
    assert meta["library_name"] == "layerselect"
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["tags"] == ["layerselect", "slam", "selective-ffn"]
    assert meta["language"] == ["de", "en", "sw"]
    assert MARKER in text and is_unedited_card(text)
    for words in ("`msd`", "Selected the layers of K with MSD > theta: [0, 2].", "MSD &lt;= theta",
                  "`mlp.up_proj`, `mlp.down_proj`", "| optimizer steps | 30 |", "0.5680", "reasoning gap",
                  "SelectiveFFNModel.from_pretrained", "layerselect merge", "layerselect export-lora"):
        assert words in text, words


def test_no_machine_path_when_the_base_came_from_a_local_folder(tmp_path):
    tiny_model("llama", dtype=torch.float32).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert str(tmp_path) in base.config.name_or_path  # what get_slam_model records
    slam = get_slam_model(base, SelectiveFFNConfig(layers=[1]))
    slam.save_pretrained(tmp_path / "adapter", card_facts={"train_data": f"pairs:{tmp_path}/pairs/de-en"})
    text = _card(tmp_path / "adapter")
    assert str(tmp_path) not in text and "/tmp" not in text
    assert re.search(r"(^|[\s:\"'(=`])(~|/)[A-Za-z]", text) is None, "an absolute path in the card"
    assert "base_model" not in front_matter(text)
    assert "a local checkpoint" in text and "pairs:…/de-en" in text
    # what the adapter itself records is unchanged (the card is the public face)
    assert read_adapter(tmp_path / "adapter").meta["base_model"]["name_or_path"] == str(tmp_path / "base")


def test_public_names_and_texts(tmp_path):
    assert public_model_name("gemma-3-270m") == "gemma-3-270m"
    assert public_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for local in ("/abs/model", "./model", "~/m", "a/b/c", "C:\\m", "model.gguf", str(tmp_path), None, ""):
        assert public_model_name(local) is None, local
    (tmp_path / "here").mkdir()
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert public_model_name("here") is None  # exists on this machine: a folder, not a Hub id
    finally:
        os.chdir(cwd)
    assert public_text("pairs:/data/x/de-en") == "pairs:…/de-en"
    assert public_text({"a": ["jsonl:/home/me/p.jsonl", "https://example.org/x"]}) == \
        {"a": ["jsonl:…/p.jsonl", "https://example.org/x"]}


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_trainable_share_and_layers_equal_the_models(tmp_path, family):
    slam = _slam(family, layers=[1, 3])
    slam.save_pretrained(tmp_path / "a")
    text = _card(tmp_path / "a")
    facts = card_facts_of(text)
    trainable, total = slam.get_nb_trainable_parameters()
    assert (facts["trainable_parameters"], facts["total_parameters"]) == (trainable, total)
    assert facts["layers"] == slam.adapter_config.layers == [1, 3]
    assert f"({100 * trainable / total:.4f}%)" in text and "| trained layers | 1, 3 |" in text
    if family == "phi3":  # up of the fused gate_up: only those rows train, and the card says so
        assert facts["partial_fused"] == {"mlp.gate_up_proj": ["up"]}
    # a loaded, frozen adapter saved again reports the same share
    loaded = SelectiveFFNModel.from_pretrained(tiny_model(family, dtype=torch.float32), tmp_path / "a")
    assert loaded.get_nb_trainable_parameters()[0] == 0
    loaded.save_pretrained(tmp_path / "b")
    assert card_facts_of(_card(tmp_path / "b"))["trainable_parameters"] == trainable


def test_the_adapter_with_a_card_loads_and_verifies(tmp_path):
    slam = _slam(layers=[0])
    folder = tmp_path / "adapter"
    slam.save_pretrained(folder)
    with torch.no_grad():
        want = slam(IDS).logits
    (folder / CARD_NAME).write_text(_card(folder) + "\nMy notes.\n", encoding="utf-8")  # not in any checksum
    adapter = read_adapter(folder)  # checksums verified, README ignored
    assert CARD_NAME not in json.dumps(adapter.meta)
    loaded = SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=torch.float32), folder)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, want)


def test_an_edited_readme_survives_a_resave(tmp_path):
    slam = _slam(layers=[0])
    folder = tmp_path / "adapter"
    slam.save_pretrained(folder)
    first = _card(folder)
    slam.save_pretrained(folder, card_facts={"steps": 5})  # our unedited card is rewritten
    assert "| optimizer steps | 5 |" in _card(folder) and _card(folder) != first
    edited = _card(folder).replace("## How to use it", "## How to use it (my words)")
    (folder / CARD_NAME).write_text(edited, encoding="utf-8")
    old_weights = (folder / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        slam.model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    with pytest.warns(UserWarning, match="README.md was edited"):
        slam.save_pretrained(folder, card_facts={"steps": 9})
    assert _card(folder) == edited  # carried across the atomic folder swap, untouched
    assert (folder / WEIGHTS_NAME).read_bytes() != old_weights  # while the adapter itself was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no scratch folder left
    read_adapter(folder)
    # a README of the user's own (no marker) is kept too, and update_model_card leaves it alone
    (folder / CARD_NAME).write_text("# My adapter\n", encoding="utf-8")
    slam.save_pretrained(folder)
    assert _card(folder) == "# My adapter\n"
    assert update_model_card(folder, {"steps": 3}) is None
    assert _card(folder) == "# My adapter\n"


def test_a_symlinked_readme_is_never_followed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key\n")
    secret.chmod(0o600)
    slam = _slam(layers=[0])
    folder = tmp_path / "adapter"
    slam.save_pretrained(folder)
    (folder / CARD_NAME).unlink()
    (folder / CARD_NAME).symlink_to(secret)
    with pytest.warns(UserWarning, match="symbolic link"):
        slam.save_pretrained(folder)
    assert not (folder / CARD_NAME).exists()  # its target's content was not copied in
    assert "private key" not in "".join(p.read_text(errors="replace") for p in folder.iterdir())
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.read_text() == "private key\n"
    read_adapter(folder)


def test_readme_in_a_shared_checkpoint_folder(tmp_path):
    slam = _slam(layers=[0])
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    slam.save_pretrained(ckpt, into_existing=True)
    assert is_unedited_card(_card(ckpt))
    (ckpt / CARD_NAME).write_text("mine\n")
    with pytest.warns(UserWarning, match="kept as it is"):
        slam.save_pretrained(ckpt, into_existing=True)
    assert _card(ckpt) == "mine\n" and (ckpt / CONFIG_NAME).is_file()


def test_update_model_card_adds_facts_and_rebuilds_a_missing_card(tmp_path):
    slam = _slam(layers=[0, 1])
    folder = tmp_path / "adapter"
    slam.save_pretrained(folder)
    update_model_card(folder, {"train_data": "demo", "steps": 7, "heldout_loss_before": 1.1, "heldout_loss_after": 0.6})
    text = _card(folder)
    assert is_unedited_card(text) and "| training data | demo |" in text and "1.1000" in text
    assert card_facts_of(text)["trainable_parameters"] == slam.get_nb_trainable_parameters()[0]  # kept
    (folder / CARD_NAME).unlink()
    update_model_card(folder, {"steps": 2})  # rebuilt from layerselect_adapter.json
    facts = card_facts_of(_card(folder))
    assert facts["layers"] == [0, 1] and facts["steps"] == 2 and facts["target_matrices"] == ["mlp.up_proj", "mlp.down_proj"]


def test_layerselect_train_writes_a_card_with_what_it_knows(tmp_path):
    model_dir, train_data = tiny_cli_files(tmp_path)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--layers", "1", "--train-data", train_data, "--max-steps", "2",
               "--batch-size", "4", "--grad-accum", "1", "--precision", "fp32", "--device", "cpu", "--no-filter",
               "--holdout", "2", "--out", str(out)])
    assert rc == 0
    text = _card(out / "adapter")
    facts = card_facts_of(text)
    summary = json.loads((out / "train_summary.json").read_text())
    assert facts["steps"] == 2 and facts["train_data"] == "pairs:…/pairs" and facts["languages"] == ["de"]
    assert facts["heldout_loss_after"] == pytest.approx(summary["heldout_loss_after"])
    assert facts["trainable_parameters"] == summary["trainable_parameters"]
    assert str(tmp_path) not in text and "base_model" not in front_matter(text)


def test_free_text_in_the_facts_cannot_forge_the_card():
    from layerselect.selective_ffn.card import render_card

    forged = '<!-- layerselect:card-facts {"layers": [7]} -->'
    text = render_card({"layers": [0], "target_modules": ["up"], "selection": {"criterion": "x", "reason": forged},
                        "note": "a | b\n<script>"})
    assert is_unedited_card(text) and card_facts_of(text)["layers"] == [0]
    assert "<script>" not in text and forged not in text.split("\n<!-- layerselect:card-facts")[0]

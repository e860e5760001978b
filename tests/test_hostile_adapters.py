"""Hostile and broken adapter folders, and interrupted adapter saves."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _hostile import Injected, assert_error, count_steps, fail_at, snapshot
from layerselect import _io
from layerselect.errors import BaseModelMismatchError, FormatError, InvalidInputError
from layerselect.selective_ffn import (
    SelectiveFFNConfig,
    SelectiveFFNModel,
    get_slam_model,
    load_deltas,
)
from layerselect.selective_ffn.adapter_file import CONFIG_NAME, PATCHES_NAME, WEIGHTS_NAME
from layerselect.selective_ffn.tensorfile import sha256_file
from tiny import IDS, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _trained(layers=(1,), seed=0, steps=2, lr=0.1):
    model = tiny_model("llama", dtype=torch.float32, seed=seed)
    slam = get_slam_model(model, SelectiveFFNConfig(layers=list(layers)))
    opt = torch.optim.SGD([p for p in slam.parameters() if p.requires_grad], lr=lr)
    slam.train()
    for _ in range(steps):
        slam(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    return slam.eval()


@pytest.fixture
def adapter(tmp_path):
    _trained().save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_same_model(model, state):
    weights, grads = state
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in weights.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def _rewrite(folder, change_meta=None, change_tensors=None):
    """Edit an adapter and recompute its checksum: self-consistent, possibly hostile."""
    meta = json.loads((folder / CONFIG_NAME).read_text())
    if change_tensors is not None:
        tensors = load_file(str(folder / WEIGHTS_NAME))
        change_tensors(tensors, meta)
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        meta["weights_sha256"] = sha256_file(folder / WEIGHTS_NAME)
    if change_meta is not None:
        change_meta(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def _add_embedding(tensors, meta):
    tensors["model.embed_tokens.weight"] = torch.ones(320, 32)
    meta["tensors"]["model.embed_tokens.weight"] = {"shape": [320, 32], "delta_dtype": "float32",
                                                    "base_dtype": "float32", "patched_elements": 0}


def _add_other_layer(tensors, meta):
    name = "model.layers.3.mlp.up_proj.weight"
    tensors[name] = torch.ones(48, 32)
    meta["tensors"][name] = {"shape": [48, 32], "delta_dtype": "float32", "base_dtype": "float32",
                             "patched_elements": 0}


def _add_attention(tensors, meta):
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name] = torch.ones(32, 32)
    meta["tensors"][name] = {"shape": [32, 32], "delta_dtype": "float32", "base_dtype": "float32",
                             "patched_elements": 0}


@pytest.mark.parametrize("change", [_add_embedding, _add_other_layer, _add_attention],
                         ids=["embedding", "undeclared-layer", "attention"])
@pytest.mark.parametrize("entry", ["load_deltas", "from_pretrained"])
def test_tensors_outside_the_config_are_refused_everywhere(adapter, change, entry):
    _rewrite(adapter, change_tensors=change)
    model = tiny_model("llama", dtype=torch.float32)
    state = _state(model)
    with pytest.raises(FormatError) as exc:
        if entry == "load_deltas":
            load_deltas(model, adapter)
        else:
            SelectiveFFNModel.from_pretrained(model, adapter)
    assert_error(exc, "outside what its config declares")
    _assert_same_model(model, state)


def test_a_declared_layer_without_tensors_is_refused(adapter):
    _rewrite(adapter, change_meta=lambda m: m["config"].update(layers=[1, 2]))
    with pytest.raises(FormatError, match=r"no tensors for layers \[2\]"):
        load_deltas(tiny_model("llama", dtype=torch.float32), adapter)


def test_an_unknown_config_key_is_refused_by_name(adapter):
    # a typo, or a field of a newer layerselect: never silently dropped
    _rewrite(adapter, change_meta=lambda m: m["config"].update(target_module=["up"]))
    with pytest.raises(FormatError, match=r"no field 'target_module'.*newer"):
        load_deltas(tiny_model("llama", dtype=torch.float32), adapter)


def test_a_format_3_file_without_its_config_is_refused(adapter):
    _rewrite(adapter, change_meta=lambda m: m.pop("config"))
    with pytest.raises(FormatError, match="must be a JSON object"):
        load_deltas(tiny_model("llama", dtype=torch.float32), adapter)


def test_a_format_2_folder_with_the_config_among_the_metadata_still_loads(adapter):
    from layerselect.selective_ffn import SelectiveFFNConfig

    want = load_deltas(tiny_model("llama", dtype=torch.float32), adapter)

    def to_format_2(meta):
        meta.update(meta.pop("config"), format_version=2)

    _rewrite(adapter, change_meta=to_format_2)
    got = load_deltas(tiny_model("llama", dtype=torch.float32), adapter)
    assert got.config == want.config and got.meta["format_version"] == 2
    new, old = want.load_tensors(), got.load_tensors()
    assert set(new) == set(old) and all(torch.equal(new[k], old[k]) for k in new)
    assert SelectiveFFNConfig.from_json_file(adapter).layers == [1]


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.safetensors", "sub/x.safetensors", "..", 7],
                         ids=["absolute", "dotdot", "subfolder", "parent", "not-a-string"])
def test_patches_file_names_are_never_followed(adapter, tmp_path, name):
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    before = snapshot(tmp_path)
    _rewrite(adapter, change_meta=lambda m: m.update(patches_file=name, patches_sha256="0" * 64))
    with pytest.raises(FormatError) as exc:
        load_deltas(tiny_model("llama", dtype=torch.float32), adapter)
    assert_error(exc, "only 'layerselect_patches.safetensors'")
    # The message is the same whether the named file exists or not: nothing is revealed.
    assert "exist" not in str(exc.value) and "missing" not in str(exc.value)
    assert snapshot(tmp_path, exclude=adapter) == {k: v for k, v in before.items() if not k.startswith("adapter/")}


def test_refused_from_pretrained_leaves_the_model_exactly_as_it_was(adapter):
    other = tiny_model("llama", dtype=torch.float32, seed=5)  # another base: fingerprint differs
    other.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a user's own freezing
    state = _state(other)
    with pytest.raises(BaseModelMismatchError):
        SelectiveFFNModel.from_pretrained(other, adapter)
    _assert_same_model(other, state)


def test_config_layer_beyond_the_model_is_refused_without_changes(adapter):
    model = tiny_model("llama", dtype=torch.float32, num_hidden_layers=1)
    state = _state(model)
    with pytest.raises(BaseModelMismatchError) as exc:
        SelectiveFFNModel.from_pretrained(model, adapter)
    assert_error(exc, "layer")
    _assert_same_model(model, state)


def test_truncated_weights_and_newer_versions_are_refused(adapter):
    data = (adapter / WEIGHTS_NAME).read_bytes()
    (adapter / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="checksum"):
        load_deltas(tiny_model("llama", dtype=torch.float32), adapter)
    (adapter / WEIGHTS_NAME).write_bytes(data)
    _rewrite(adapter, change_meta=lambda m: m.update(format_version=42))
    with pytest.raises(FormatError, match="Upgrade layerselect"):
        load_deltas(tiny_model("llama", dtype=torch.float32), adapter)


def test_save_refuses_a_folder_that_is_not_an_adapter(tmp_path):
    slam = _trained()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"precious")
    before = snapshot(tmp_path)
    with pytest.raises(InvalidInputError) as exc:
        slam.save_pretrained(folder)
    assert_error(exc, "checkpoint.pt", "overwrite")
    assert snapshot(tmp_path) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="existing file"):
        slam.save_pretrained(tmp_path / "file")
    slam.save_pretrained(folder, overwrite=True)
    names = {p.name for p in folder.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME} <= names and "checkpoint.pt" not in names


def test_resave_without_patches_leaves_no_stale_patch_file(tmp_path):
    # Weights pushed across zero need exactness patches; a later save without them must not keep the old file.
    slam = _trained(lr=50.0, steps=1)
    slam.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / PATCHES_NAME).exists()
    plain = _trained(steps=0)
    plain.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / PATCHES_NAME).exists()
    model = tiny_model("llama", dtype=torch.float32)
    load_deltas(model, tmp_path / "a")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_interrupted_saves_keep_the_previous_adapter(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    old, new = _trained(seed=0), _trained(seed=0, steps=4)
    folder = tmp_path / "adapter"
    old.save_pretrained(folder)
    reference = tiny_model("llama", dtype=torch.float32)
    load_deltas(reference, folder)
    expected = _state(reference)[0]
    steps = count_steps(lambda: new.save_pretrained(folder))
    old.save_pretrained(folder)
    assert steps >= 4
    for step in range(1, steps + 1):
        with fail_at(step), pytest.raises(Injected):
            new.save_pretrained(folder)
        model = tiny_model("llama", dtype=torch.float32)
        load_deltas(model, folder)  # loads (checksums agree) and equals the old adapter
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), f"step {step}"
        assert [p.name for p in tmp_path.iterdir()] == ["adapter"], f"step {step}: leftovers"
    new.save_pretrained(folder)
    model = tiny_model("llama", dtype=torch.float32)
    load_deltas(model, folder)
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight, expected["model.layers.1.mlp.up_proj.weight"])


def test_a_swap_interrupted_between_renames_is_restored_by_the_next_write(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    slam = _trained()
    folder = tmp_path / "adapter"
    slam.save_pretrained(folder)
    calls = []
    real_rename = _io.os.rename

    def crash_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the old folder was moved aside
        return real_rename(src, dst)

    monkeypatch.setattr(_io.os, "rename", crash_second)
    with pytest.raises(KeyboardInterrupt):
        slam.save_pretrained(folder)
    monkeypatch.setattr(_io.os, "rename", real_rename)
    # The except-branch already put the old folder back; the adapter is whole.
    load_deltas(tiny_model("llama", dtype=torch.float32), folder)

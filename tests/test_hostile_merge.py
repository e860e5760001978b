"""Hostile checkpoints and output folders for the streaming merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _hostile import Injected, assert_error, fail_at, snapshot
from layerselect.cli import main
from layerselect.errors import FormatError, InvalidInputError
from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model, merge_checkpoint
from layerselect.selective_ffn.adapter_file import CONFIG_NAME, WEIGHTS_NAME
from layerselect.selective_ffn.tensorfile import sha256_file
from tiny import IDS, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

INDEX = "model.safetensors.index.json"


@pytest.fixture
def world(tmp_path):
    """tmp/base (sharded), tmp/adapter, tmp/victim/model.safetensors (must never change)."""
    base = tiny_model("llama", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    slam = get_slam_model(base, SelectiveFFNConfig(layers=[1]))
    opt = torch.optim.SGD([p for p in slam.parameters() if p.requires_grad], lr=0.1)
    slam(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    slam.save_pretrained(tmp_path / "adapter")
    victim = tmp_path / "victim"
    victim.mkdir()
    save_file({"w": torch.arange(6.0)}, str(victim / "model.safetensors"))
    return tmp_path


def _point_index_at(world, shard_name):
    index_path = world / "base" / INDEX
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard_name
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("shard", ["../victim/model.safetensors", "{world}/victim/model.safetensors",
                                   "sub/model.safetensors", ""],
                         ids=["dotdot", "absolute", "subfolder", "empty"])
def test_shard_names_outside_the_base_folder_are_refused(world, shard):
    _point_index_at(world, shard.format(world=world))
    before = snapshot(world)
    with pytest.raises(FormatError) as exc:
        merge_checkpoint(world / "base", world / "adapter", world / "out")
    assert_error(exc, "not a plain file name")
    assert snapshot(world) == before and not (world / "out").exists()


def test_index_naming_a_missing_shard_is_refused(world):
    _point_index_at(world, "model-00009-of-00009.safetensors")
    with pytest.raises(FormatError, match="not in"):
        merge_checkpoint(world / "base", world / "adapter", world / "out")


def test_cli_reports_a_hostile_index_in_one_line(world, capsys):
    _point_index_at(world, "../victim/model.safetensors")
    before = snapshot(world)
    rc = main(["merge", "--base", str(world / "base"), "--adapter", str(world / "adapter"),
               "--out", str(world / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("layerselect merge: error:") and err.count("\n") == 1
    assert snapshot(world) == before


def test_an_adapter_touching_the_embeddings_is_refused_by_merge(world):
    folder = world / "adapter"
    meta = json.loads((folder / CONFIG_NAME).read_text())
    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors["model.embed_tokens.weight"] = torch.ones(320, 32)
    meta["tensors"]["model.embed_tokens.weight"] = {"shape": [320, 32], "delta_dtype": "float32",
                                                    "base_dtype": "float32", "patched_elements": 0}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    meta["weights_sha256"] = sha256_file(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="outside what its config declares"):
        merge_checkpoint(world / "base", folder, world / "out")
    assert not (world / "out").exists()


def test_out_holding_another_checkpoint_is_refused_then_replaced_whole(world):
    out = world / "out"
    out.mkdir()
    save_file({"stale": torch.zeros(1)}, str(out / "model.safetensors"))
    before = snapshot(world)
    with pytest.raises(InvalidInputError) as exc:
        merge_checkpoint(world / "base", world / "adapter", out)
    assert_error(exc, "model.safetensors", "overwrite=True")
    assert "--" not in str(exc.value)  # library messages name parameters, not command-line flags
    assert snapshot(world) == before
    merge_checkpoint(world / "base", world / "adapter", out, overwrite=True)
    # The base is sharded: the stale single-file checkpoint must be gone, or it would load instead.
    assert not (out / "model.safetensors").exists() and (out / INDEX).exists()


@pytest.mark.parametrize("out", ["base/merged", "."], ids=["inside-base", "parent-of-base"])
def test_out_overlapping_the_base_is_refused(world, out):
    before = snapshot(world)
    with pytest.raises(InvalidInputError, match="outside base_dir") as exc:
        merge_checkpoint(world / "base", world / "adapter", world / out)
    assert "--" not in str(exc.value)
    assert snapshot(world) == before


def test_the_cli_words_the_same_refusal_with_its_flags(world, capsys):
    before = snapshot(world)
    code = main(["merge", "--base", str(world / "base"), "--adapter", str(world / "adapter"),
                 "--out", str(world / "base" / "merged")])
    err = capsys.readouterr().err
    assert code == 2 and "--out " in err and "outside --base " in err and "base_dir" not in err
    assert snapshot(world) == before


def _merged_up_proj(out):
    index = json.loads((out / INDEX).read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    return load_file(str(out / index["weight_map"][name]))[name]


def test_remerge_keeps_provenance_and_weights_consistent(world):
    out = world / "out"
    merge_checkpoint(world / "base", world / "adapter", out)
    full = _merged_up_proj(out)
    merge_checkpoint(world / "base", world / "adapter", out, scale=0.5)
    half = _merged_up_proj(out)
    assert json.loads((out / "layerselect_merge.json").read_text())["scale"] == 0.5
    assert not torch.equal(full, half)


def test_interrupted_remerge_leaves_the_earlier_merge_whole(world):
    out = world / "out"
    merge_checkpoint(world / "base", world / "adapter", out)
    before = snapshot(out)
    for step in (1, 2):
        with fail_at(step), pytest.raises(Injected):
            merge_checkpoint(world / "base", world / "adapter", out, scale=0.5)
        assert snapshot(out) == before
        assert json.loads((out / "layerselect_merge.json").read_text())["scale"] == 1.0
    assert sorted(p.name for p in world.iterdir()) == ["adapter", "base", "out", "victim"]


def test_merge_base_must_be_a_folder(world, capsys):
    shutil.copy(world / "victim" / "model.safetensors", world / "one.safetensors")
    rc = main(["merge", "--base", str(world / "one.safetensors"), "--adapter", str(world / "adapter"),
               "--out", str(world / "out")])
    assert rc == 2 and "not a checkpoint folder" in capsys.readouterr().err


def _first_shard(world):
    return sorted((world / "base").glob("model-*.safetensors"))[0]


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _pad(path):
    path.write_bytes(path.read_bytes() + b"\0" * 8)


def _garbage_header(path):
    data = bytearray(path.read_bytes())
    data[8:16] = b"not json"
    path.write_bytes(bytes(data))


def _huge_header_length(path):
    path.write_bytes((2**40).to_bytes(8, "little") + path.read_bytes()[8:])


@pytest.mark.parametrize("damage", [_truncate, _pad, _garbage_header, _huge_header_length],
                         ids=["truncated", "padded", "garbage-header", "huge-header-length"])
def test_a_damaged_shard_is_named_and_nothing_is_written(world, damage):
    shard = _first_shard(world)
    damage(shard)
    before = snapshot(world)
    with pytest.raises(FormatError) as exc:
        merge_checkpoint(world / "base", world / "adapter", world / "out")
    assert_error(exc, shard.name, "corrupt or truncated")
    assert snapshot(world) == before and not (world / "out").exists()


def test_an_index_pointing_at_a_shard_without_the_tensor_is_refused(world):
    index_path = world / "base" / INDEX
    index = json.loads(index_path.read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][name])
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=f"maps {name} to {other}, which does not contain it"):
        merge_checkpoint(world / "base", world / "adapter", world / "out")
    assert not (world / "out").exists()

"""Hostile and broken inputs around activation statistics: files, models, data."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _hostile import Injected, assert_error, count_steps, fail_at, snapshot
from _selection_helpers import hand_stats
from layerselect import ActivationStats
from layerselect.cli import main
from layerselect.errors import FormatError, InvalidInputError, NumericalError
from layerselect.stats.files import META_FILE, TENSOR_FILE, _meta_checksum, _sha256
from layerselect.texts import load_texts
from tiny import tiny_model, tiny_texts, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def saved(tmp_path):
    st = hand_stats(
        [[[3, 1, 0], [2, 2, 2]], [[5, 0, 1], [1, 4, 3]], [[0, 0, 0], [5, 5, 5]]],
        tokens=[5, 5, 5], groups=["en", "de", "zh"], questions=1,
    )
    st.save(tmp_path / "stats")
    return tmp_path / "stats", st


def _edit_meta(folder, change, *, fix_checksum: bool):
    path = folder / META_FILE
    meta = json.loads(path.read_text())
    change(meta)
    if fix_checksum:
        meta["checksum"] = _meta_checksum(meta)
    path.write_text(json.dumps(meta))


def _edit_tensors(folder, change):
    """Rewrite the tensors and every checksum: a self-consistent but invalid folder."""
    t = load_file(str(folder / TENSOR_FILE))
    change(t)
    save_file(t, str(folder / TENSOR_FILE))
    _edit_meta(folder, lambda m: m.update(tensor_sha256=_sha256(folder / TENSOR_FILE)), fix_checksum=True)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m.update(groups=["en", "en", "zh"]), ["checksum", "metadata"]),
        (lambda m: m.update(groups=["de", "en", "zh"]), ["checksum"]),  # swapped labels
        (lambda m: m.update(layers=[0, 0, 0]), ["checksum"]),
        (lambda m: m.pop("checksum"), ["checksum"]),
        (lambda m: m.pop("tensor_sha256"), ["tensor_sha256"]),
        (lambda m: m.update(format_version=99), ["newer", "upgrade"]),
    ],
    ids=["duplicate-groups", "swapped-groups", "repeated-layers", "no-checksum", "no-tensor-checksum", "newer"],
)
def test_edited_metadata_is_refused(saved, change, words):
    folder, _ = saved
    _edit_meta(folder, change, fix_checksum=False)
    with pytest.raises(FormatError) as exc:
        ActivationStats.load(folder)
    assert_error(exc, *words)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m.update(groups=["en", "en", "zh"]), ["more than once"]),
        (lambda m: m.update(layers=[3, 3, 1]), ["distinct"]),
        (lambda m: m.update(layers=[0, -1, 2]), ["non-negative"]),
        (lambda m: m.update(groups=["en", 5, "zh"]), ["groups"]),
        (lambda m: m.update(layers=["0", "1", "2"]), ["layers"]),
    ],
    ids=["duplicate-groups", "repeated-layers", "negative-layer", "group-not-a-name", "layer-not-int"],
)
def test_invalid_metadata_with_a_recomputed_checksum_is_refused(saved, change, words):
    """A checksum is not a signature: the invariants are checked as well."""
    folder, _ = saved
    _edit_meta(folder, change, fix_checksum=True)
    with pytest.raises(FormatError) as exc:
        ActivationStats.load(folder)
    assert_error(exc, *words)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda t: t["counts"].__setitem__((0, 0, 0), -1), ["negative"]),
        (lambda t: t["counts"].__setitem__((1, 0, 2), 6), ["exceed", "5 tokens"]),
        (lambda t: t["sample_group"].__setitem__(0, 7), ["sample_group", "outside"]),
        (lambda t: t["tokens"].__setitem__(1, -5), ["negative"]),
        (lambda t: t.update(counts=t["counts"].double()), ["integer"]),
        (lambda t: t.pop("sample_index"), ["lacks", "sample_index"]),
        (lambda t: t["sample_fraction"].__setitem__((0, 0), 1.5), ["sample_fraction"]),
    ],
    ids=["negative-count", "count-above-tokens", "group-id-out-of-range", "negative-tokens",
         "float-counts", "missing-tensor", "fraction-above-one"],
)
def test_invalid_tensors_are_refused(saved, change, words):
    folder, _ = saved
    _edit_tensors(folder, change)
    with pytest.raises(FormatError) as exc:
        ActivationStats.load(folder)
    assert_error(exc, *words)


def test_truncated_or_garbled_files_are_refused(saved):
    folder, _ = saved
    data = (folder / TENSOR_FILE).read_bytes()
    (folder / TENSOR_FILE).write_bytes(data[:-7])
    with pytest.raises(FormatError, match="checksum"):
        ActivationStats.load(folder)
    (folder / META_FILE).write_bytes(b"\xff\xfe{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        ActivationStats.load(folder)


def test_save_refuses_a_folder_of_other_files_and_keeps_them(tmp_path, saved):
    _, st = saved
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(InvalidInputError) as exc:
        st.save(other)
    assert_error(exc, "notes.txt", "overwrite")
    assert snapshot(tmp_path) == before
    st.save(other, overwrite=True)  # replaced whole: the folder is now exactly the stats
    assert sorted(p.name for p in other.iterdir()) == sorted([META_FILE, TENSOR_FILE])


def test_save_to_a_path_that_is_a_file_is_refused(tmp_path, saved):
    _, st = saved
    (tmp_path / "f").write_text("x")
    with pytest.raises(InvalidInputError, match="existing file"):
        st.save(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_resave_replaces_the_folder_whole(saved):
    folder, st = saved
    (folder / "stale.bin").write_bytes(b"old")
    st.save(folder)  # an earlier stats folder is replaced, stale files go with it
    assert not (folder / "stale.bin").exists()
    assert ActivationStats.load(folder) == st


def test_interrupted_save_keeps_the_previous_statistics(saved):
    folder, old = saved
    new = hand_stats([[[1, 1, 1], [0, 0, 0]]], tokens=[2, 2, 2], groups=["en", "de", "zh"])
    steps = count_steps(lambda: new.save(folder))
    old.save(folder)
    assert steps >= 3
    for step in range(1, steps + 1):
        with fail_at(step), pytest.raises(Injected):
            new.save(folder)
        assert ActivationStats.load(folder) == old, f"step {step}"
        assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".stats")] == []
    new.save(folder)
    assert ActivationStats.load(folder) == new


def test_nan_activations_are_an_error_naming_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.gate_proj.weight[3, 0] = float("nan")
    with pytest.raises(NumericalError) as exc:
        ActivationStats.collect(model, tiny_tokenizer(), tiny_texts(2), progress=False)
    assert_error(exc, "layer 2", "nan")
    # Layers below the broken one are still measurable.
    st = ActivationStats.collect(model, tiny_tokenizer(), tiny_texts(2), layers=[0, 1], progress=False)
    assert st.counts.sum() > 0


def test_inf_activations_in_float16_point_to_the_dtype():
    model = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e38)
    with pytest.raises(NumericalError) as exc:
        ActivationStats.collect(model, tiny_tokenizer(), tiny_texts(2), progress=False)
    assert_error(exc, "layer 0")


@pytest.mark.parametrize("batch_size", ["8", 0, 2.5, True])
def test_bad_batch_sizes_are_clear(batch_size):
    with pytest.raises(InvalidInputError, match="batch_size"):
        ActivationStats.collect(tiny_model("llama"), tiny_tokenizer(), tiny_texts(2), batch_size=batch_size)


def test_a_model_on_the_meta_device_is_refused():
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(InvalidInputError) as exc:
        ActivationStats.collect(model, tiny_tokenizer(), tiny_texts(2), progress=False)
    assert_error(exc, "meta device", "load")


def test_texts_longer_than_the_model_warn_with_the_count():
    model = tiny_model("llama", max_position_embeddings=8)
    texts = {"en": ["Janet has 3 ducks and sells the eggs every day at the market", "Hi"],
             "de": ["Janet hat 3 Enten", "Hallo"]}
    with pytest.warns(UserWarning, match=r"2 of 4 texts are longer than the model's 8 positions"):
        ActivationStats.collect(model, tiny_tokenizer(), texts, progress=False)


def test_non_utf8_text_file_names_file_and_line(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "en.txt").write_bytes(b"one\ntwo\n")
    (d / "de.txt").write_bytes(b"eins\nzw\xe4i\n")
    with pytest.raises(InvalidInputError) as exc:
        load_texts(f"txt:{d}")
    assert_error(exc, "de.txt:2", "utf-8")


def test_unknown_data_kind_lists_the_kinds(tmp_path):
    with pytest.raises(InvalidInputError) as exc:
        load_texts(f"csv:{tmp_path}")
    assert_error(exc, "unknown data kind 'csv'", "mgsm", "txt", "jsonl")


def test_analyze_refuses_an_out_that_is_a_file_before_loading_anything(tmp_path, capsys):
    (tmp_path / "out").write_text("precious")
    d = tmp_path / "txt"
    d.mkdir()
    (d / "en.txt").write_text("one\n")
    rc = main(["analyze", "--model", str(tmp_path / "no-such-model"), "--data", f"txt:{d}",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "existing file" in err and err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "out").read_text() == "precious"

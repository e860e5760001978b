"""Delta adapters on disk: exact round trips, file contents, fingerprint, refusals, atomic saves."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from layerselect.errors import BaseModelMismatchError, FormatError
from layerselect.selective_ffn import (
    SelectiveFFNConfig,
    SelectiveFFNModel,
    adapter_file,
    get_slam_model,
    load_deltas,
)
from layerselect.selective_ffn.adapter_file import (
    ADAPTER_FORMAT_VERSION,
    PATCHES_NAME,
    read_adapter,
)
from layerselect.selective_ffn.delta import (
    apply_delta,
    apply_patch,
    compute_delta,
    fingerprint_tensor,
)
from layerselect.selective_ffn.tensorfile import read_safetensors_header, sha256_file
from tiny import FAMILIES, IDS, tiny_model

# Tiny models run faster single-threaded, especially on a busy machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def _train(model, steps=3, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _trained_adapter(tmp_path, family="llama", dtype=torch.float32, layers=(0, 2), **cfg):
    model = get_slam_model(tiny_model(family, dtype=dtype), SelectiveFFNConfig(layers=list(layers), **cfg))
    _train(model)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_every_family_is_exact(tmp_path, family):
    model, path = _trained_adapter(tmp_path, family)
    trained_logits = _logits(model)
    fresh = tiny_model(family, dtype=torch.float32)
    assert not torch.equal(_logits(fresh), trained_logits)
    loaded = SelectiveFFNModel.from_pretrained(fresh, path)
    assert torch.equal(_logits(loaded), trained_logits)
    trained_w = dict(model.model.named_parameters())
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, trained_w[name]), name
        assert not p.requires_grad  # is_trainable=False by default
    meta = json.loads((path / "layerselect_adapter.json").read_text())
    assert meta["reconstruction"]["exact"] is True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_round_trip_other_dtypes_is_exact(tmp_path, dtype):
    model, path = _trained_adapter(tmp_path, "llama", dtype=dtype)
    loaded = SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=dtype), path)
    assert torch.equal(_logits(loaded), _logits(model))
    expected = torch.float32 if dtype == torch.bfloat16 else torch.float64
    with safe_open(str(path / "layerselect_deltas.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in list(fh.keys())} == {expected}


def test_adapter_holds_exactly_the_selected_deltas_and_nothing_else(tmp_path):
    # A slightly larger model so the ~100-byte header per tensor is small next to the data.
    base = tiny_model("llama", dtype=torch.float32, hidden_size=64, intermediate_size=256)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_slam_model(base, SelectiveFFNConfig(layers=[1, 3]))
    _train(model, lr=1e-3)
    model.save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "layerselect_deltas.safetensors"
    expected = {f"model.layers.{i}.mlp.{m}_proj.weight" for i in (1, 3) for m in ("up", "down")}
    with safe_open(str(f), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in list(fh.keys())}
    assert set(tensors) == expected
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert data_bytes == 4 * 64 * 256 * 4
    assert f.stat().st_size <= 1.01 * data_bytes
    trained = base.state_dict()
    for name, delta in tensors.items():
        exact = trained[name].double() - original[name].double()
        # float32 storage of the exact float64 difference (up to one ulp from exactness repairs)
        torch.testing.assert_close(delta.double(), exact, rtol=2.5e-7, atol=1e-12)
    assert sorted(p for p in tmp_path.iterdir()) == [tmp_path / "a"]  # no scratch dirs left


def test_adapter_config_records_provenance(tmp_path):
    from layerselect import __version__

    model, path = _trained_adapter(tmp_path, base_model_name_or_path="my/base")
    meta = json.loads((path / "layerselect_adapter.json").read_text())
    assert meta["format_version"] == ADAPTER_FORMAT_VERSION
    assert meta["library_version"] == __version__
    # format 3: the config under its own key, apart from the file's metadata
    assert meta["config"]["base_model_name_or_path"] == "my/base"
    assert meta["config"]["layers"] == [0, 2] and meta["config"]["target_modules"] == ["up", "down"]
    assert "layers" not in meta
    base = meta["base_model"]
    assert base["num_layers"] == 4 and base["model_type"] == "llama"
    assert set(base["fingerprint"]["tensors"]) == set(meta["tensors"]) == set(model.target_names)
    assert meta["weights_sha256"] == sha256_file(path / "layerselect_deltas.safetensors")


# ----------------------------------------------------------------------------------------
# Exactness: W_b + (W_t - W_b) is not W_t in floating point; the saved deltas make it so
# ----------------------------------------------------------------------------------------
def test_deltas_are_exact_where_naive_subtraction_is_not():
    torch.manual_seed(0)
    base = torch.randn(4000, dtype=torch.float32)
    # sign flips, halvings, tiny results, large jumps, and ordinary small updates
    trained = torch.cat([
        -base[:1000] * 0.37, base[1000:2000] * 2.0**-20, base[2000:3000] * 5.3,
        base[3000:] + 1e-4 * torch.randn(1000),
    ])
    naive = base + (trained - base)
    assert (naive != trained).sum() > 100  # the problem is real
    res = compute_delta(trained, base, torch.float32)
    rebuilt = apply_delta(base, res.delta)
    apply_patch(rebuilt, res.patch_index, res.patch_bits)
    assert torch.equal(rebuilt.view(torch.int32), trained.view(torch.int32))
    assert res.mismatched == 0
    # patches exactly where float32 subtraction is inexact; Sterbenz: never when t/2 <= b <= 2t
    assert torch.equal(res.patch_index, (naive != trained).nonzero().view(-1))
    sterbenz = (trained / 2 <= base) & (base <= 2 * trained) | (trained * 2 <= base) & (base <= trained / 2)
    assert not sterbenz[res.patch_index].any()
    assert (res.patch_index < 3000).all()  # the ordinary small updates need none


def test_lossy_bf16_deltas_report_their_error(tmp_path):
    model, path = _trained_adapter(tmp_path, delta_dtype="bfloat16")
    meta = json.loads((path / "layerselect_adapter.json").read_text())
    rec = meta["reconstruction"]
    assert rec["exact"] is False and rec["patched_elements"] == 0
    fresh = tiny_model("llama", dtype=torch.float32)
    load_deltas(fresh, path)
    trained = dict(model.model.named_parameters())
    got = dict(fresh.named_parameters())
    err2 = norm2 = 0.0
    max_err = 0.0
    for name in model.target_names:
        d = got[name].double() - trained[name].double()
        err2 += float((d * d).sum())
        norm2 += float((trained[name].double() ** 2).sum())
        max_err = max(max_err, float(d.abs().max()))
    assert rec["max_abs_error"] == pytest.approx(max_err, rel=1e-12)
    assert rec["relative_error"] == pytest.approx(math.sqrt(err2 / norm2), rel=1e-9)
    assert 0 < rec["relative_error"] < 1e-2
    assert (path / "layerselect_deltas.safetensors").stat().st_size < 0.6 * 4 * 32 * 48 * 4 + 2000


def test_load_deltas_with_scale(tmp_path):
    model, path = _trained_adapter(tmp_path)
    base = tiny_model("llama", dtype=torch.float32)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    load_deltas(base, path, scale=0.5)
    trained = dict(model.model.named_parameters())
    for n, p in base.named_parameters():
        want = original[n] + 0.5 * (trained[n] - original[n]) if n in trained and n in model.target_names else original[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Fingerprint: dtype-independent, change-sensitive
# ----------------------------------------------------------------------------------------
def test_fingerprint_ignores_load_dtype_but_not_changes(tmp_path):
    model = tiny_model("llama", dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")  # a bf16 checkpoint, like most hub models
    from transformers import AutoModelForCausalLM

    name = "model.layers.1.mlp.up_proj.weight"
    prints = set()
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=dtype)
        prints.add(fingerprint_tensor(dict(m.named_parameters())[name])["sha256"])
    assert len(prints) == 1
    w = dict(model.named_parameters())[name].detach().float()
    assert fingerprint_tensor(w)["sha256"] == fingerprint_tensor(w.double())["sha256"]
    bumped = w.clone()
    bumped[3, 5] += 0.05 * bumped[3, 5].abs() + 1e-3
    assert fingerprint_tensor(bumped)["sha256"] != fingerprint_tensor(w)["sha256"]


def test_adapter_trained_in_float32_loads_onto_a_float64_base(tmp_path):
    model, path = _trained_adapter(tmp_path)
    loaded = SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=torch.float32).double(), path)
    torch.testing.assert_close(_logits(loaded), _logits(model).double(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Refusals: nothing is applied
# ----------------------------------------------------------------------------------------
def test_wrong_base_is_refused_and_strict_false_applies(tmp_path):
    _, path = _trained_adapter(tmp_path)
    other = tiny_model("llama", dtype=torch.float32, seed=1)
    before = _state(other)
    with pytest.raises(BaseModelMismatchError, match=r"4 of 4 matrices differ.*model\.layers\.0\.mlp\.up_proj\.weight.*strict=False"):
        SelectiveFFNModel.from_pretrained(other, path)
    with pytest.raises(BaseModelMismatchError):
        load_deltas(other, path)
    assert _same_state(before, _state(other))
    load_deltas(other, path, strict=False)
    assert not _same_state(before, _state(other))


def test_applying_twice_is_refused(tmp_path):
    model, path = _trained_adapter(tmp_path)
    with pytest.raises(BaseModelMismatchError, match="already has this adapter merged"):
        load_deltas(model.model, path)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_hidden_layers=6), r"4 decoder layers; this model has 6"),
        (dict(intermediate_size=40), r"shape mismatch.*up_proj\.weight: adapter \(48, 32\) vs base \(40, 32\)"),
    ],
)
def test_wrong_architecture_is_refused_even_when_not_strict(tmp_path, overrides, match):
    _, path = _trained_adapter(tmp_path)
    other = tiny_model("llama", dtype=torch.float32, **overrides)
    before = _state(other)
    with pytest.raises(BaseModelMismatchError, match=match):
        load_deltas(other, path, strict=False)
    assert _same_state(before, _state(other))


def _corrupt_flip(path):
    f = path / "layerselect_deltas.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))


def _corrupt_truncate(path):
    f = path / "layerselect_deltas.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _newer_version(path):
    c = path / "layerselect_adapter.json"
    meta = json.loads(c.read_text())
    meta["format_version"] = ADAPTER_FORMAT_VERSION + 1
    c.write_text(json.dumps(meta))


def _bad_json(path):
    c = path / "layerselect_adapter.json"
    c.write_text(c.read_text()[:50])


def _missing_weights(path):
    (path / "layerselect_deltas.safetensors").unlink()


@pytest.mark.parametrize(
    "damage, match",
    [
        (_corrupt_flip, "does not match the checksum"),
        (_corrupt_truncate, "does not match the checksum"),
        (_newer_version, rf"format version {ADAPTER_FORMAT_VERSION + 1}.*Upgrade layerselect"),
        (_bad_json, "not valid JSON"),
        (_missing_weights, "layerselect_deltas.safetensors is missing"),
    ],
)
def test_damaged_adapters_are_refused_and_nothing_is_applied(tmp_path, damage, match):
    _, path = _trained_adapter(tmp_path)
    damage(path)
    base = tiny_model("llama", dtype=torch.float32)
    before = _state(base)
    with pytest.raises(FormatError, match=match):
        load_deltas(base, path)
    with pytest.raises(FormatError, match=match):
        SelectiveFFNModel.from_pretrained(base, path)
    assert _same_state(before, _state(base))


def test_truncated_file_is_caught_by_the_header_check_too(tmp_path):
    _, path = _trained_adapter(tmp_path)
    f = path / "layerselect_deltas.safetensors"
    # a whole file: every tensor's dtype and shape, as the tensors themselves have them
    infos = read_safetensors_header(f)
    assert {n: (i.dtype, i.shape) for n, i in infos.items()} == {
        n: (t.dtype, tuple(t.shape)) for n, t in load_file(str(f)).items()}
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated") as exc:
        read_safetensors_header(f)
    assert str(f) in str(exc.value)


def test_crash_during_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    model, path = _trained_adapter(tmp_path)
    first_logits = _logits(model)
    first_files = {p.name: p.read_bytes() for p in path.iterdir()}
    _train(model)  # the model moves on

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial write")
        raise OSError("simulated crash: disk full")

    monkeypatch.setattr(adapter_file, "save_file", crash)
    with pytest.raises(OSError, match="simulated crash"):
        model.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == first_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # scratch dir cleaned up
    monkeypatch.undo()
    loaded = SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=torch.float32), path)
    assert torch.equal(_logits(loaded), first_logits)


def test_from_pretrained_trainable_continues_relative_to_the_original_base(tmp_path):
    model, path = _trained_adapter(tmp_path)
    cont = SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=torch.float32), path, is_trainable=True)
    assert {n for n, p in cont.model.named_parameters() if p.requires_grad} == set(model.target_names)
    _train(cont)
    cont.save_pretrained(tmp_path / "second")
    # the second adapter applies to the original base (its fingerprint), not to the first result
    again = SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=torch.float32), tmp_path / "second")
    assert torch.equal(_logits(again), _logits(cont))


def test_patches_side_file_is_written_when_needed_and_checked(tmp_path):
    model, path = _trained_adapter(tmp_path)  # float32, lr 0.1: some weights cross zero
    meta = json.loads((path / "layerselect_adapter.json").read_text())
    n = meta["reconstruction"]["patched_elements"]
    assert n > 0 and meta["patches_file"] == PATCHES_NAME
    with safe_open(str(path / PATCHES_NAME), "pt") as fh:
        assert sum(fh.get_tensor(k).numel() for k in list(fh.keys()) if k.endswith(":index")) == n
    # without the patches the load would not be exact: they matter
    fresh = dict(tiny_model("llama", dtype=torch.float32).named_parameters())
    trained = dict(model.model.named_parameters())
    deltas = read_adapter(path).load_tensors()
    off = sum(int((apply_delta(fresh[k].detach(), d) != trained[k]).sum()) for k, d in deltas.items())
    assert off == n
    f = path / PATCHES_NAME
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(FormatError, match="layerselect_patches.safetensors does not match the checksum"):
        load_deltas(tiny_model("llama", dtype=torch.float32), path)

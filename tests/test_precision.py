"""The precision option: detection (both branches of "auto"), bf16 autocast where it is asked for,
float32 master weights and exact deltas, measures that stay close to fp32, and length-grouped batches."""

from __future__ import annotations

import json

import pytest
import torch

import layerselect.precision as precision_mod
from layerselect.cli import main
from layerselect.data import TranslationExample
from layerselect.errors import InvalidInputError
from layerselect.eval import reasoning_gap
from layerselect.precision import autocast, fast_bf16, resolve_precision
from layerselect.selective_ffn.config import SelectiveFFNConfig
from layerselect.selective_ffn.model import SelectiveFFNModel
from layerselect.train import default_training_args, train_slam, translation_loss
from tiny import tiny_cli_files, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the CPU has exactly the given feature flags."""

    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(precision_mod, "_cpu_flags", lambda *a, **k: set(flags))
        precision_mod._cpu_has_fast_bf16.cache_clear()

    yield set_flags
    precision_mod._cpu_has_fast_bf16.cache_clear()


# ------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("flags, expected", [
    ((), "fp32"),
    (("avx2", "avx512_f", "avx512_bw"), "fp32"),  # AVX-512 without its BF16 dot products: emulated, slow
    (("avx512_bf16",), "bf16"),
    (("amx_bf16", "amx_tile"), "bf16"),
    (("bf16",), "bf16"),  # Arm's BF16 extension
])
def test_auto_follows_the_cpu_flags(cpu_flags, flags, expected):
    cpu_flags(*flags)
    assert fast_bf16("cpu") is (expected == "bf16")
    assert resolve_precision("auto", "cpu") == expected
    # forced values do not look at the hardware
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


def test_auto_keeps_float64_models_exact(cpu_flags):
    cpu_flags("avx512_bf16")
    assert resolve_precision("auto", "cpu", torch.float64) == "fp32"
    assert resolve_precision("auto", "cpu", torch.float32) == "bf16"


def test_auto_on_cuda_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert resolve_precision("auto", "cuda") == "fp32"


def test_cpuinfo_fallback_reads_flags_and_features(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert "avx512_bf16" in precision_mod._cpuinfo_flags(x86)
    assert "bf16" in precision_mod._cpuinfo_flags(arm)
    assert precision_mod._cpuinfo_flags(tmp_path / "missing") == set()


def test_the_real_detection_agrees_with_proc_cpuinfo():
    # torch's cpuinfo and the kernel's flags must tell the same story on this machine
    kernel = precision_mod._cpuinfo_flags()
    if not kernel:
        pytest.skip("no /proc/cpuinfo here")
    from_kernel = bool({"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"} & kernel)
    precision_mod._cpu_has_fast_bf16.cache_clear()
    assert fast_bf16("cpu") is from_kernel


def test_a_bad_precision_is_refused_by_name():
    with pytest.raises(InvalidInputError, match="'fp16'.*auto, fp32, bf16|auto, fp32, bf16.*'fp16'"):
        resolve_precision("fp16")


# ------------------------------------------------------------------------------------- autocast
def test_autocast_runs_products_in_bf16_and_fp32_changes_nothing():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with autocast("bf16", "cpu") as used:
        assert used == "bf16"
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    with autocast("fp32", "cpu") as used:
        assert used == "fp32"
        assert torch.nn.functional.linear(x, w).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast("fp32", "cpu"):
        # fp32 leaves an enclosing autocast (e.g. the Trainer's) in charge
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16


# ------------------------------------------------------------------------- training arguments
def test_training_arguments_follow_precision(cpu_flags):
    cpu_flags("avx512_bf16")
    assert default_training_args("/tmp/x", precision="auto", use_cpu=True).bf16 is True
    assert default_training_args("/tmp/x", precision="fp32", use_cpu=True).bf16 is False
    cpu_flags()  # a CPU without bf16: auto falls back to fp32, a forced bf16 still holds
    assert default_training_args("/tmp/x", precision="auto", use_cpu=True).bf16 is False
    assert default_training_args("/tmp/x", precision="bf16", use_cpu=True).bf16 is True
    # an explicit bf16= keyword wins
    assert default_training_args("/tmp/x", precision="bf16", bf16=False, use_cpu=True).bf16 is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_bf16_training_arguments_work_on_a_cpu_only_machine_without_use_cpu(cpu_flags):
    # the Trainer refuses bf16=True on a machine without a GPU unless use_cpu is set
    cpu_flags("avx512_bf16")
    args = default_training_args("/tmp/x", precision="auto")
    assert args.bf16 is True and args.use_cpu is True


def _pairs(n: int = 16) -> list[TranslationExample]:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    out = []
    for i in range(n):
        tail = " ".join(words[: 1 + i % 8])  # lengths vary, so grouping has something to do
        out.append(TranslationExample("de", f"Janet hat {i} Enten {tail}.", f"Janet has {i} ducks {tail}."))
    return out


def _args(**kw):
    base = dict(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2,
                warmup_steps=0, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return base


def test_bf16_training_runs_under_autocast_keeps_fp32_weights_and_exact_deltas(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", dtype=torch.float32)
    seen: list[torch.dtype] = []
    hook = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    adapter, trainer = train_slam(model, tok, _pairs(), SelectiveFFNConfig(layers=[1]), output_dir=tmp_path,
                                  precision="bf16", return_trainer=True, **_args())
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the products ran in bf16 ...
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ... the master weights stayed fp32
    state = trainer.optimizer.state
    assert state and all(v["exp_avg"].dtype == torch.float32 for v in state.values())
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["precision"] == "bf16"
    # the saved deltas are float32 and put the trained weights back exactly
    fresh = SelectiveFFNModel.from_pretrained(tiny_model("llama", dtype=torch.float32), adapter)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.get_base_model().state_dict()[name], value), name


def test_fp32_training_has_no_autocast(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", dtype=torch.float32)
    seen: list[torch.dtype] = []
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    train_slam(model, tok, _pairs(), SelectiveFFNConfig(layers=[1]), output_dir=tmp_path, precision="fp32",
               **_args(max_steps=1))
    assert seen and set(seen) == {torch.float32}
    assert json.loads((tmp_path / "train_summary.json").read_text())["precision"] == "fp32"


def test_bf16_training_tracks_fp32(tmp_path):
    tok = tiny_tokenizer()
    losses = {}
    for p in ("fp32", "bf16"):
        model = tiny_model("llama", dtype=torch.float32)
        train_slam(model, tok, _pairs(), SelectiveFFNConfig(layers=[0, 1]), output_dir=tmp_path / p, precision=p,
                   **_args(max_steps=6, learning_rate=3e-3))
        losses[p] = translation_loss(model, tok, _pairs(), precision="fp32")
    # the same training in either precision ends at nearly the same loss (measured in fp32)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


# ------------------------------------------------------------------------------------- measures
def test_measures_in_bf16_are_close_to_fp32_but_really_bf16():
    tok = tiny_tokenizer()
    model = tiny_model("llama", dtype=torch.float32)
    q = {"en": ["Janet has three ducks.", "Tom buys two apples."],
         "de": ["Janet hat drei Enten.", "Tom kauft zwei Äpfel."]}
    sols = ["She has 3 ducks. The answer is 3.", "He buys 2. The answer is 2."]
    res = {p: reasoning_gap(model, tok, q, sols, bootstrap=0, precision=p) for p in ("fp32", "bf16")}
    assert res["fp32"]["precision"] == "fp32" and res["bf16"]["precision"] == "bf16"
    for lang in q:
        a, b = res["fp32"]["nll"][lang], res["bf16"]["nll"][lang]
        assert b == pytest.approx(a, rel=0.02)
        assert a != b  # bf16 products really ran: the numbers differ in the last digits
    t32 = translation_loss(model, tok, _pairs(8), precision="fp32")
    t16 = translation_loss(model, tok, _pairs(8), precision="bf16")
    assert t16 == pytest.approx(t32, rel=0.02) and t16 != t32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_auto_measures_leave_float64_models_exact(cpu_flags):
    cpu_flags("avx512_bf16")
    tok = tiny_tokenizer()
    model = tiny_model("llama")  # float64
    q = {"en": ["Janet has three ducks."], "de": ["Janet hat drei Enten."]}
    sols = ["She has 3 ducks."]
    auto = reasoning_gap(model, tok, q, sols, bootstrap=0, precision="auto")
    exact = reasoning_gap(model, tok, q, sols, bootstrap=0, precision="fp32")
    assert auto["precision"] == "fp32" and auto["nll"] == exact["nll"]


# --------------------------------------------------------------------------------------- grouping
def _padded_fraction(loader) -> float:
    pad = total = 0
    for batch in loader:
        mask = batch["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
    return pad / total


def test_length_grouped_batches_carry_less_padding(tmp_path):
    tok = tiny_tokenizer()
    pairs = [TranslationExample("de", "Wort " * (1 + (i * 7) % 40), "word " * (1 + (i * 7) % 40)) for i in range(96)]
    fractions = {}
    for order in ("random", "length"):
        model = tiny_model("llama", dtype=torch.float32)
        _, trainer = train_slam(model, tok, pairs, SelectiveFFNConfig(layers=[1]), output_dir=tmp_path / order,
                                precision="fp32", data_order=order, return_trainer=True,
                                **_args(max_steps=1, gradient_accumulation_steps=2))
        fractions[order] = _padded_fraction(trainer.get_train_dataloader())
        summary = json.loads((tmp_path / order / "train_summary.json").read_text())
        assert summary["data_order"] == order
    assert fractions["length"] < 0.5 * fractions["random"], fractions


# ------------------------------------------------------------------------------------------ CLI
def test_cli_train_takes_precision_and_records_it(tmp_path, capsys):
    model_dir, train_data = tiny_cli_files(tmp_path)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--layers", "1", "--train-data", train_data,
               "--max-steps", "1", "--batch-size", "4", "--grad-accum", "1", "--precision", "bf16",
               "--device", "cpu", "--no-filter", "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "train_summary.json").read_text())["precision"] == "bf16"
    assert "precision:            bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--model", str(model_dir), "--train-data", "demo", "--precision", "fp16", "--out", str(out)])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ stats
def test_stats_count_in_fp32_by_default_and_bf16_on_request():
    from layerselect.stats import ActivationStats
    from tiny import tiny_texts

    tok = tiny_tokenizer()
    model = tiny_model("llama", dtype=torch.float32)
    texts = tiny_texts()
    exact = ActivationStats.collect(model, tok, texts, progress=False)
    again = ActivationStats.collect(model, tok, texts, progress=False, precision="fp32")
    low = ActivationStats.collect(model, tok, texts, progress=False, precision="bf16")
    assert exact.meta["precision"] == "fp32" and low.meta["precision"] == "bf16"
    assert torch.equal(exact.counts, again.counts)
    assert torch.equal(exact.tokens, low.tokens)
    # bf16 only flips signs near zero: a small share of the firings moves
    moved = int((low.counts - exact.counts).abs().sum())
    assert moved <= 0.05 * int(exact.counts.sum())

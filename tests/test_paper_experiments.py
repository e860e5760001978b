"""benchmarks/paper_experiments.py --quick on a tiny model: every run, hand-checked counts, resume, table."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from layerselect.errors import InvalidInputError, LayerSelectError
from layerselect.eval import paired_delta, reasoning_gap
from tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

PAIRS = {
    "de": [f"Janet hat {i} Enten und verkauft {i + 2} Eier." for i in range(10)],
    "zh": [f"珍妮有{i}只鸭子,卖{i + 2}个鸡蛋。" for i in range(10)],
}
ENGLISH = [f"Janet has {i} ducks and sells {i + 2} eggs." for i in range(10)]
MGSM = {
    "en": ["Tom has 3 apples and buys 4 more. How many?", "What is 10 minus 3?", "Half of 8?", "2 + 2?"],
    "de": ["Tom hat 3 Äpfel und kauft 4. Wie viele?", "Was ist 10 minus 3?", "Die Hälfte von 8?", "2 + 2?"],
    "zh": ["汤姆有3个苹果,又买了4个。一共几个?", "10减3是多少?", "8的一半?", "2 + 2?"],
}
SOLUTIONS = ["3 + 4 = 7\n#### 7", "10 - 3 = 7\n#### 7", "8 / 2 = 4\n#### 4", "2+2=4\n#### 4"]


def _load_script():
    spec = importlib.util.spec_from_file_location("paper_experiments", ROOT / "benchmarks" / "paper_experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    for lang, src in PAIRS.items():
        d = root / "pairs" / f"{lang}-en"
        d.mkdir(parents=True)
        (d / f"train.{lang}").write_text("\n".join(src) + "\n", encoding="utf-8")
        (d / "train.en").write_text("\n".join(ENGLISH) + "\n", encoding="utf-8")
    (root / "mgsm").mkdir()
    for lang, qs in MGSM.items():
        (root / "mgsm" / f"mgsm_{lang}.tsv").write_text("".join(f"{q}\t1\n" for q in qs), encoding="utf-8")
    (root / "sol.jsonl").write_text("".join(json.dumps({"index": i, "solution": s}) + "\n"
                                            for i, s in enumerate(SOLUTIONS)), encoding="utf-8")
    args = ["--quick", "--no-isolate", "--model", str(root / "model"), "--train-data", str(root / "pairs"),
            "--train-langs", "de,zh", "--mgsm", str(root / "mgsm"), "--solutions", str(root / "sol.jsonl"),
            "--gap-langs", "en,de,zh", "--precision", "fp32", "--out", str(root / "out")]
    return root, args


def test_quick_runs_measure_resume_and_table(setup, capsys, monkeypatch):
    root, args = setup
    mod = _load_script()
    assert mod.main([*args, "--runs", "slam,attn,first_n,random,lora,full", "--save-adapters"]) == 0
    runs = {p.stem: json.loads(p.read_text()) for p in (root / "out" / "runs").glob("*.json")}
    assert set(runs) == {"base", "slam", "attn", "first_n", "random_s0", "random_s1", "random_s2", "lora", "full"}
    msd = json.loads((root / "out" / "selection.json").read_text())["layers"]
    k = len(msd)
    assert runs["slam"]["layers"] == msd and runs["first_n"]["layers"] == list(range(k))
    # a run that trains what an earlier one trained reuses its record instead of repeating it
    assert runs["first_n"].get("same_as") == ("slam" if msd == list(range(k)) else None)
    assert all(len(runs[f"random_s{s}"]["layers"]) == k for s in range(3))
    # hand-checked parameter counts of the tiny llama (hidden 32, intermediate 48, 2 kv heads of 8)
    assert runs["slam"]["trainable_params"] == k * 2 * 32 * 48
    assert runs["attn"]["trainable_params"] == k * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32)
    lora_per_layer = 8 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 48))  # q,k,v,o,gate,up,down
    assert runs["lora"]["trainable_params"] == 4 * lora_per_layer
    total = sum(p.numel() for p in tiny_model("llama").parameters())
    assert runs["full"]["trainable_params"] == runs["full"]["total_params"] == total
    assert runs["base"]["trainable_params"] == 0 and "s_per_step" not in runs["base"]
    for name, r in runs.items():
        assert r["gap"]["langs"] == ["en", "de", "zh"] and len(r["overlap_avg"]) == 4
        assert r["heldout_translation_loss"] > 0 and r["english_loss"] > 0
        if name != "base":
            assert len(r["train_loss"]) == 2 and r["s_per_step"] > 0
    # the base row's gap is the library's reasoning_gap on the untouched model
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512)
    want = reasoning_gap(model, tiny_tokenizer(), MGSM, SOLUTIONS, bootstrap=20)
    assert runs["base"]["gap"]["nll"]["de"] == pytest.approx(want["nll"]["de"], rel=1e-6)
    # training changed the model: full fine-tuning moves the held-out loss
    assert runs["full"]["heldout_translation_loss"] != runs["base"]["heldout_translation_loss"]
    # --save-adapters: the saved slam and LoRA adapters, loaded onto a fresh base, are the measured models
    from peft import PeftModel

    from layerselect.selective_ffn import SelectiveFFNModel

    adapters = root / "out" / "adapters"
    trained = {n for n, r in runs.items() if r["kind"] in ("selective", "lora") and "same_as" not in r}
    assert {p.name for p in adapters.iterdir()} == trained  # full has none; a reused record has its twin's
    assert all(runs[n]["adapter"] == f"adapters/{n}" for n in trained)
    assert {"slam", "attn", "lora"} <= trained
    fresh = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512)
    slam = SelectiveFFNModel.from_pretrained(fresh, adapters / "slam")
    got = reasoning_gap(slam, tiny_tokenizer(), MGSM, SOLUTIONS, bootstrap=20)
    assert got["nll"]["de"] == pytest.approx(runs["slam"]["gap"]["nll"]["de"], rel=1e-6)
    assert got["nll"]["de"] != pytest.approx(want["nll"]["de"], rel=1e-6)
    fresh = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512)
    lora = PeftModel.from_pretrained(fresh, adapters / "lora")
    got = reasoning_gap(lora, tiny_tokenizer(), MGSM, SOLUTIONS, bootstrap=20)
    assert got["nll"]["zh"] == pytest.approx(runs["lora"]["gap"]["nll"]["zh"], rel=1e-6)

    # resume: finished runs are skipped, the files untouched
    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "out" / "runs").glob("*.json")}
    settings_file = (root / "out" / "settings.json").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["paper_experiments.py", "--out", "/elsewhere/spelled/differently"])
    assert mod.main([*args, "--runs", "slam,full"]) == 0
    assert "slam: done, skipped" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (root / "out" / "runs").glob("*.json")} == mtimes
    assert (root / "out" / "settings.json").read_bytes() == settings_file  # the starting command is kept
    # other settings are refused rather than mixed into one table
    with pytest.raises(SystemExit, match="other settings"):
        mod.main([*args, "--runs", "slam", "--lr", "0.5"])

    md = root / "results.md"
    mod.main(["--out", str(root / "out"), "--table", str(md)])
    text = md.read_text()
    for name in runs:
        assert f"| {name} |" in text
    assert "avg gap" in text and (root / "results_overlap.png").is_file()
    assert "| slam | " in text.split("Where the change of the gap comes from")[1]  # the decomposition table
    precision = json.loads(settings_file).get("precision")  # absent = fp32 weights and compute
    assert (f"(float32, {precision} autocast)" in text) if precision else ("(float32);" in text)


def _gap(en, de, tokens=(10, 10, 10)):
    return {"reference": "en", "langs": ["en", "de"],
            "per_question": {"en": {"nll_sum": list(en), "tokens": list(tokens)},
                             "de": {"nll_sum": list(de), "tokens": list(tokens)}}}


def test_paired_gap_delta_by_hand():
    pe = _load_script()
    base = {"gap": _gap([10, 20, 30], [20, 30, 40])}  # gap = (90 - 60) / 30 = 1.0
    run = {"gap": _gap([10, 20, 30], [15, 25, 35])}   # gap = 0.5; every question moves by the same 0.5
    delta, low, high = pe.paired_gap_delta(run, base, n_boot=200)
    assert delta == pytest.approx(-0.5) and low == pytest.approx(-0.5) and high == pytest.approx(-0.5)
    uneven = {"gap": _gap([10, 20, 30], [20, 22, 40])}  # only question 1 improves: (82 - 60) / 30 - 1
    delta, low, high = pe.paired_gap_delta(uneven, base, n_boot=500)
    assert delta == pytest.approx(22 / 30 - 1.0)
    assert low < delta < high and low >= -0.8 - 1e-12 and high <= 0.0 + 1e-12
    # the decomposition: English unchanged, the other language down by exactly the gap's change
    assert pe.paired_delta(uneven, base, "nll_ref", n_boot=100) == (0.0, 0.0, 0.0)
    d_others = pe.paired_delta(uneven, base, "nll_others", n_boot=500)
    assert d_others == pytest.approx(pe.paired_gap_delta(uneven, base, n_boot=500))
    worse_en = {"gap": _gap([13, 23, 33], [20, 30, 40])}  # English 0.3 worse on every question, de unchanged
    assert pe.paired_delta(worse_en, base, "nll_ref", n_boot=100) == pytest.approx((0.3, 0.3, 0.3))
    assert pe.paired_delta(worse_en, base, "avg_gap", n_boot=100) == pytest.approx((-0.3, -0.3, -0.3))
    with pytest.raises(SystemExit, match="unknown statistic 'accuracy'"):
        pe.paired_delta(run, base, "accuracy")
    with pytest.raises(InvalidInputError, match="unknown statistic 'accuracy'"):
        paired_delta(run["gap"], base["gap"], "accuracy")
    # the library function the harness calls, on the gap results themselves
    assert paired_delta(uneven["gap"], base["gap"], "nll_others", n_boot=500) == d_others
    truncated = {"run": "cut", "gap": _gap([10, 20], [20, 30], tokens=(10, 10))}  # a record missing a question
    with pytest.raises(SystemExit, match="cannot be paired"):
        pe.paired_delta(truncated, base)


def test_interrupted_run_resumes_to_the_same_weights(setup, tmp_path, monkeypatch):
    """--checkpoint-every: a run killed after step 3 and resumed ends bitwise where an unbroken run ends.

    The harness trains through layerselect.train.train_model, so these are the library's Trainer
    checkpoints (checkpoint-N folders), not a format of the script's own.
    """
    root, args = setup
    mod = _load_script()
    opts = mod.build_parser().parse_args([*args, "--out", str(tmp_path), "--checkpoint-every", "2",
                                          "--precision", "fp32"])
    mod.apply_quick(opts)
    opts.steps = 5
    tok = tiny_tokenizer()
    features = mod.load_data(opts, tok)["train"]
    spec = {"kind": "selective", "layers": [1], "targets": ["up", "down"]}

    def run(run_dir, every=2):
        opts.checkpoint_every = every
        model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512)
        slam, _, _ = mod.prepare(model, spec, savable=True)
        log = mod.train(slam, tok, features, opts, run_dir)
        return {n: p.detach().clone() for n, p in slam.named_parameters() if p.requires_grad}, log

    unbroken, log_unbroken = run(tmp_path / "unbroken", every=0)
    assert len(log_unbroken["train_loss"]) == 5
    run_dir = tmp_path / "slam"
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # killed during step 4: the checkpoint of step 2 is the last one
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(run_dir)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    resumed, log_resumed = run(run_dir)
    assert log_resumed["resumed_at_step"] == 2 and log_unbroken["resumed_at_step"] == 0
    assert log_resumed["train_loss"] == log_unbroken["train_loss"]
    assert all(torch.equal(resumed[n], unbroken[n]) for n in unbroken)
    # the finished training is checkpointed too: a run killed while being measured trains nothing again
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-5"]
    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    calls["n"] = 0
    again, log_again = run(run_dir)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert calls["n"] == 0 and log_again["resumed_at_step"] == 5
    assert log_again["train_loss"] == log_unbroken["train_loss"]
    assert all(torch.equal(again[n], unbroken[n]) for n in unbroken)
    # a checkpoint from other settings is refused, not mixed in; so is one whose settings are unreadable
    opts.lr = 0.5
    with pytest.raises(SystemExit, match="other .*settings"):
        run(run_dir)
    (run_dir / "settings.json").write_text("{truncated")
    with pytest.raises(SystemExit, match="unreadable"):
        run(run_dir)


def test_lr_grid_picks_the_lowest_heldout_loss_and_resumes(setup, tmp_path, capsys):
    root, args = setup
    mod = _load_script()
    out = tmp_path / "lr"
    argv = [*args, "--out", str(out), "--runs", "slam", "--lr-grid", "1e-4,3e-2"]
    assert mod.main(argv) == 0
    trials = {float(p.stem.removeprefix("lr")): json.loads(p.read_text())
              for p in (out / "lr_search").glob("lr*.json")}
    assert set(trials) == {1e-4, 3e-2}
    losses = {lr: t["heldout_translation_loss"] for lr, t in trials.items()}
    assert losses[1e-4] != losses[3e-2]  # the lr changed the trained model
    chosen = json.loads((out / "lr_search.json").read_text())["chosen"]
    assert chosen == min(losses, key=losses.get)
    # the table's runs use the chosen lr, and the trials' checkpoints are gone
    assert json.loads((out / "runs" / "slam.json").read_text())["settings"]["lr"] == chosen
    assert not list((out / "lr_search").glob("*.pt"))
    capsys.readouterr()
    assert mod.main(argv) == 0
    err = capsys.readouterr().err
    assert "lr 0.0001: done, skipped" in err and "lr 0.03: done, skipped" in err
    # a truncated trial file is trained again, not trusted and not a crash
    trial = out / "lr_search" / "lr0.03.json"
    trial.write_text(trial.read_text()[:40])
    assert mod.main(argv) == 0
    err = capsys.readouterr().err
    assert "lr 0.0001: done, skipped" in err and "lr 0.03: done, skipped" not in err
    assert json.loads(trial.read_text())["heldout_translation_loss"] == losses[3e-2]  # the same training
    # --lr-grid-only chooses the lr (from the finished trials) and trains nothing else
    only = tmp_path / "lr_only"
    only.mkdir()
    shutil.copytree(out / "lr_search", only / "lr_search")
    assert mod.main([*args, "--out", str(only), "--runs", "slam", "--lr-grid", "1e-4,3e-2", "--lr-grid-only"]) == 0
    assert json.loads((only / "lr_search.json").read_text())["chosen"] == chosen
    assert not (only / "runs").exists()


def test_a_run_that_trains_what_a_finished_run_trained_reuses_its_record(tmp_path):
    mod = _load_script()
    settings = {"steps": 40, "lr": 1e-4}
    runs = tmp_path / "runs"
    runs.mkdir()
    slam = _record("slam", settings=settings)  # a complete record: an incomplete one is never a twin
    (runs / "slam.json").write_text(json.dumps(slam))
    (runs / "random_s0.json").write_text(json.dumps({**slam, "run": "random_s0"}))  # the same layer by chance
    same = {"kind": "selective", "layers": [0], "targets": ["up", "down"]}
    assert mod.finished_twin(tmp_path, "first_n", same, settings)["run"] == "slam"  # slam is named first
    # other layers, other targets, other settings, or itself: no twin
    assert mod.finished_twin(tmp_path, "first_n", {**same, "layers": [1]}, settings) is None
    assert mod.finished_twin(tmp_path, "first_n", {**same, "targets": ["gate", "up", "down"]}, settings) is None
    assert mod.finished_twin(tmp_path, "first_n", same, {**settings, "lr": 3e-4}) is None
    assert mod.finished_twin(tmp_path, "slam", same, settings)["run"] == "random_s0"  # never itself
    # a reused record is never the source of another reuse (the chain would hide the real run)
    (runs / "first_n.json").write_text(json.dumps({**slam, "run": "first_n", "same_as": "slam"}))
    (runs / "slam.json").unlink()
    (runs / "random_s0.json").unlink()
    assert mod.finished_twin(tmp_path, "random_s1", same, settings) is None


def test_mean_non_english_nll_by_hand():
    pe = _load_script()
    gap = {"reference": "en", "langs": ["en", "de", "zh"], "nll": {"en": 1.5, "de": 1.75, "zh": 2.25}}
    assert pe._mean_other_nll(gap) == pytest.approx(2.0)  # (1.75 + 2.25) / 2; avg gap = 2.0 - 1.5


@pytest.mark.parametrize("broken", ["weights", "optimizer"])
def test_a_broken_checkpoint_is_refused_by_name(setup, tmp_path, broken):
    root, args = setup
    mod = _load_script()
    opts = mod.build_parser().parse_args([*args, "--out", str(tmp_path), "--checkpoint-every", "1",
                                          "--precision", "fp32"])
    mod.apply_quick(opts)
    tok = tiny_tokenizer()
    features = mod.load_data(opts, tok)["train"]
    spec = {"kind": "selective", "layers": [1], "targets": ["up", "down"]}
    run_dir = tmp_path / "slam"
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512)
    mod.train(mod.prepare(model, spec, savable=True)[0], tok, features, opts, run_dir)
    last = run_dir / f"checkpoint-{opts.steps}"
    target = last / ("trainable_weights.safetensors" if broken == "weights" else "optimizer.pt")
    target.write_bytes(target.read_bytes()[:100])  # truncated, as by a kill mid-write of a copy
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512)
    slam = mod.prepare(model, spec, savable=True)[0]
    before = {n: p.detach().clone() for n, p in slam.named_parameters()}
    with pytest.raises(LayerSelectError, match=target.name):
        mod.train(slam, tok, features, opts, run_dir)
    assert all(torch.equal(p, before[n]) for n, p in slam.named_parameters())  # nothing half-applied


def test_paper_protocol_runs_dev_nll_time_ratio_and_guard(setup, tmp_path):
    """--english-sft: the English dev column, slam_guard, translate_train, two_stage, first_n by fraction."""
    from layerselect.train import translation_loss

    root, args = setup
    mod = _load_script()
    # GSM8K-style records: the English side of every training pair, word for word, plus 2 dev problems
    dev = ["Tom has 3 apples and buys 4 more. How many in all?", "What is 10 minus 3 today?"]
    problems = [{"index": i, "question": q, "solution": f"{q.split()[2]} + 2 = 5\n#### 5"}
                for i, q in enumerate(ENGLISH + dev)]
    sft = tmp_path / "gsm8k_train.jsonl"
    sft.write_text("".join(json.dumps(p) + "\n" for p in problems), encoding="utf-8")
    out = tmp_path / "out"
    argv = [a if a != str(root / "out") else str(out) for a in args]
    assert mod.main([*argv, "--runs", "slam,slam_guard,first_n,translate_train,two_stage", "--max-length", "512",
                     "--english-sft", str(sft), "--english-dev", "2", "--first-n-fraction", "0.5",
                     "--lr-by-run", "two_stage=0.002", "--retain-every", "1"]) == 0
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert {"base", "slam", "slam_guard", "first_n", "translate_train", "two_stage"} <= set(runs)
    assert runs["first_n"]["layers"] == [0, 1]  # round(0.5 x 4 layers)
    # the guard's run is not the plain slam run's twin, and it reports the guard's curve
    assert "same_as" not in runs["slam_guard"] and runs["slam_guard"]["retention"]["baseline"] > 0
    assert runs["two_stage"]["variant"] == "two_stage" and runs["two_stage"]["lr"] == 0.002
    stages = runs["two_stage"]["stages"]
    assert len(stages["translation"]["train_loss"]) == len(stages["english_sft"]["train_loss"]) == 2
    assert runs["two_stage"]["train_seconds"] == pytest.approx(
        stages["translation"]["train_seconds"] + stages["english_sft"]["train_seconds"])
    assert runs["translate_train"]["kind"] == "full" and runs["translate_train"]["lr"] == runs["slam"]["lr"]
    # the English dev NLL of the base row: the dev problems' solutions, scored as the gap scores them
    from layerselect.eval import gap_item

    tok = tiny_tokenizer()
    feats = []
    for p in problems[-2:]:
        ids, target = gap_item(tok, p["question"], p["solution"])
        feats.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, target)],
                      "attention_mask": [1] * len(ids)})
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=512)
    want = translation_loss(model, tok, feats)
    assert runs["base"]["english_dev_nll"] == pytest.approx(want, rel=1e-6)
    assert all("english_dev_nll" in r for r in runs.values())
    md = tmp_path / "t.md"
    text = mod.write_table(out, md)
    slam_line = next(line for line in text.splitlines() if line.startswith("| slam |"))
    assert "English dev NLL" in text and "(1.0x)" in slam_line
    with pytest.raises(SystemExit, match="needs --english-sft"):
        mod.main([*args, "--runs", "two_stage"])


def test_isolated_runs_train_at_the_learning_rate_the_grid_chose():
    """A child re-parses the command line: it must get the chosen --lr, not the grid (nor the default)."""
    mod = _load_script()
    argv = ["--model", "m", "--lr-grid", "1e-4,3e-4", "--runs", "slam", "--isolate", "--lr-by-run", "full=2e-5",
            "--out", "o"]
    child = mod.child_argv(argv, 3e-4)
    assert "--lr-grid" not in child and "--isolate" not in child and "--lr-by-run" in child
    args = mod.build_parser().parse_args([*child, "--no-isolate", "--only", "slam"])
    assert args.lr == 3e-4 and args.lr_grid is None and args.lr_by_run == "full=2e-5"
    assert mod.build_parser().parse_args(mod.child_argv(["--lr=0.5", "--out", "o"], 1e-3)).lr == 1e-3


def _sft_file(tmp_path: Path) -> Path:
    """GSM8K-style records: the English side of every training pair, word for word, plus 2 dev problems."""
    dev = ["Tom has 3 apples and buys 4 more. How many in all?", "What is 10 minus 3 today?"]
    problems = [{"index": i, "question": q, "solution": f"{q.split()[2]} + 2 = 5\n#### 5"}
                for i, q in enumerate(ENGLISH + dev)]
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems), encoding="utf-8")
    return path


def test_choose_lr_takes_each_runs_best_heldout_lr_and_keeps_the_other_rows(setup, tmp_path, capsys):
    """--choose-lr: a finished row is its own trial, the others train; only the chosen run's row is redone."""
    root, args = setup
    mod = _load_script()
    out = tmp_path / "out"
    argv = [*[a if a != str(root / "out") else str(out) for a in args], "--english-sft", str(_sft_file(tmp_path)),
            "--english-dev", "2", "--max-length", "512"]
    assert mod.main([*argv, "--runs", "lora"]) == 0
    rows = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert rows["lora"]["lr"] == 1e-4  # --lr's default
    capsys.readouterr()
    choose = ["--choose-lr", "lora=1e-4/0.05,translate_train=1e-4/0.02"]
    assert mod.main([*argv, "--runs", "lora", *choose]) == 0  # translate_train's lr chosen, its row not run
    err = capsys.readouterr().err
    lora = json.loads((out / "lr_search" / "lora.json").read_text())
    tt = json.loads((out / "lr_search" / "translate_train.json").read_text())
    assert lora["criterion"] == "heldout_translation_loss" and tt["criterion"] == "english_dev_nll"
    # lora's 1e-4 trial is its finished row; the other trials trained from a fresh base
    trials = {p.name: json.loads(p.read_text()) for p in (out / "lr_search" / "lora").glob("*.json")}
    assert trials["lr0.0001.json"]["from_table_row"] and "from_table_row" not in trials["lr0.05.json"]
    assert trials["lr0.05.json"]["train_loss"] and trials["lr0.05.json"]["lr"] == 0.05
    assert lora["values"]["0.0001"] == rows["lora"]["heldout_translation_loss"]
    assert tt["values"]["0.0001"] != tt["values"]["0.02"] and (out / "lr_search/translate_train/lr0.02.json").is_file()
    for choice in (lora, tt):
        assert choice["chosen"] == float(min(choice["values"], key=choice["values"].get))
    assert lora["chosen"] == 0.05 and tt["chosen"] == 0.02  # a tiny random model learns faster at a large lr
    # base is untouched; lora was trained again at its chosen lr, which is the very computation of its
    # trial: the row's measure is the trial's, to the bit
    assert "base: done, skipped" in err and "lora: running" in err and "translate_train: running" not in err
    assert "lora lr 0.0001: the table's row is this trial" in err and "lora lr 0.05: training" in err
    new = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert new["base"] == rows["base"]
    assert new["lora"]["lr"] == 0.05 and new["lora"]["heldout_translation_loss"] == lora["values"]["0.05"]
    assert not (out / "checkpoints" / "lr_search").exists() or not any((out / "checkpoints" / "lr_search").rglob("*.pt"))
    settings = json.loads((out / "settings.json").read_text())
    assert settings["lr_by_run"] == "lora=0.05,translate_train=0.02" and "--choose-lr" in settings["command"]
    text = mod.write_table(out, tmp_path / "t.md")
    assert "The lr of `lora` was chosen on the held-out translation loss: 0.0001 -> " in text
    assert "The lr of `translate_train` was chosen on the English dev NLL" in text
    # both choices are their grid's largest lr: the page says the best may lie beyond
    assert "chosen 0.05 (0.05 is the grid's largest lr: a larger one may do better)." in text
    assert "chosen 0.02 (0.02 is the grid's largest lr: a larger one may do better)." in text
    assert "lora: 0.05 is the grid's largest lr" in err
    # again: every trial and row is found, nothing trains
    capsys.readouterr()
    assert mod.main([*argv, "--runs", "lora", *choose]) == 0
    err = capsys.readouterr().err
    assert "training" not in err and "running" not in err
    assert "lora lr 0.05: done, skipped" in err and "lora lr 0.0001: done, skipped" in err
    assert json.loads((out / "lr_search" / "lora.json").read_text()) == lora  # the 1e-4 row was redone: kept
    # a choice its row does not match yet: the page says both things in one parenthesis
    (out / "lr_search" / "lora.json").write_text(json.dumps({**lora, "chosen": 1e-4}))
    text = mod.write_table(out, tmp_path / "t.md")
    assert ("chosen 0.0001 (0.0001 is the grid's smallest lr: a smaller one may do better; "
            "its row was trained at 0.05: run the command again).") in text


def test_a_full_trial_is_two_stages_first_stage_and_gives_the_same_choice(setup, tmp_path, capsys):
    """--choose-lr full and two_stage: each full trial's model is handed to two_stage's trial at its lr as
    stage 1, which then trains only stage 2; its criterion equals that of a two_stage trial trained whole."""
    root, args = setup
    mod = _load_script()
    sft = _sft_file(tmp_path)

    def argv(out):
        return [*[a if a != str(root / "out") else str(out) for a in args], "--english-sft", str(sft),
                "--english-dev", "2", "--max-length", "512", "--checkpoint-every", "2", "--lr-grid-only"]

    shared, alone = tmp_path / "shared", tmp_path / "alone"
    capsys.readouterr()
    assert mod.main([*argv(shared), "--choose-lr", "full=0.02,two_stage=0.02"]) == 0
    err = capsys.readouterr().err
    assert "full lr 0.02: its last checkpoint is two_stage's first stage at this lr" in err
    assert err.count("resuming at step 2 from") == 1  # two_stage's trial skipped its first stage
    assert not any((shared / "checkpoints").rglob("*.safetensors"))  # every trial cleaned up after itself
    assert mod.main([*argv(alone), "--choose-lr", "two_stage=0.02"]) == 0
    assert "resuming" not in capsys.readouterr().err
    handed, whole = (json.loads((d / "lr_search" / "two_stage.json").read_text()) for d in (shared, alone))
    # stage 2 started from stage 1's trained weights (halving them in the handed-over checkpoint fails this)
    assert handed["values"]["0.02"] == pytest.approx(whole["values"]["0.02"], rel=1e-6)


def test_a_full_trial_is_handed_over_only_when_two_stage_still_needs_it(tmp_path):
    mod = _load_script()
    args = mod.build_parser().parse_args(["--out", str(tmp_path), "--steps", "4",
                                          "--choose-lr", "full=1e-5/2e-5,two_stage=2e-5"])
    run_dir = tmp_path / "checkpoints" / "lr_search" / "full" / "lr2e-05"
    stage1 = tmp_path / "checkpoints" / "lr_search" / "two_stage" / "lr2e-05" / "stage1"
    assert not mod.hand_over_to_two_stage(args, 1e-5, run_dir)  # two_stage does not try 1e-5
    (run_dir / "checkpoint-2").mkdir(parents=True)
    assert not mod.hand_over_to_two_stage(args, 2e-5, run_dir)  # no checkpoint of the last step
    (run_dir / "checkpoint-4").mkdir()
    stage1.mkdir(parents=True)
    assert not mod.hand_over_to_two_stage(args, 2e-5, run_dir)  # two_stage's trial began on its own
    stage1.rmdir()
    trial = tmp_path / "lr_search" / "two_stage" / "lr2e-05.json"
    trial.parent.mkdir(parents=True)
    trial.write_text(json.dumps({"run": "two_stage", "lr": 2e-5, "english_dev_nll": 1.0,
                                 "settings": mod.settings_of(args)}))
    assert not mod.hand_over_to_two_stage(args, 2e-5, run_dir)  # that trial is already done
    trial.write_text("{")  # a truncated one is not
    assert mod.hand_over_to_two_stage(args, 2e-5, run_dir)
    assert (stage1 / "checkpoint-4").is_dir() and not run_dir.exists()


@pytest.mark.parametrize(("value", "extra", "message"), [
    ("full=abc", [], "must be numbers"),
    ("nope=1e-4", [], "is not RUN=LR"),
    ("full=1e-4,full=2e-4", [], "twice"),
    ("full=0/1e-4", [], "must be positive"),
    ("full=1e-5/2e-5", ["--lr-by-run", "full=2e-5"], "both set the lr of \\['full'\\]"),
    ("two_stage=1e-5/2e-5", [], "needs --english-sft"),
    ("slam_guard=1e-5/2e-5", [], "needs --english-sft"),
    ("random=1e-4/3e-4", [], "choose that one with --lr-grid"),
    ("full=1e-4/1.0000001e-4", [], "the same to 6 digits"),
    ("slam=1e-4/3e-4", ["--lr-grid", "1e-4,3e-4"], "already chooses slam's lr"),
])
def test_choose_lr_refuses_a_bad_grid_before_training(tmp_path, value, extra, message):
    mod = _load_script()
    args = mod.build_parser().parse_args(["--out", str(tmp_path), "--choose-lr", value, *extra])
    with pytest.raises(SystemExit, match=message):
        mod.choose_run_lrs(args)
    assert not any(tmp_path.iterdir())


def test_isolated_runs_get_the_chosen_per_run_lrs_not_the_grid():
    mod = _load_script()
    argv = ["--model", "m", "--choose-lr", "full=1e-5/2e-5", "--lr-by-run=lora=3e-4", "--out", "o"]
    child = mod.child_argv(argv, 1e-4, "lora=3e-4,full=1e-05")
    assert "--choose-lr" not in child and "--lr-by-run=lora=3e-4" not in child
    args = mod.build_parser().parse_args([*child, "--no-isolate", "--only", "full"])
    assert args.choose_lr is None and mod.run_args("full", args).lr == 1e-5 and mod.run_args("lora", args).lr == 3e-4
    assert mod.run_args("slam", args).lr == 1e-4


def test_a_resumed_runs_training_time_is_extrapolated_and_labelled():
    """Steps trained before a resume were timed by another process: mean of the timed steps x all steps."""
    mod = _load_script()
    resumed = {"train_seconds": 300.0, "step_seconds": [10.0] * 30, "steps_trained": 40}
    assert mod._train_seconds(resumed) == pytest.approx(400.0)  # 300 s / 30 steps x 40 steps
    assert mod._time_cell(resumed, 200.0) == "≈400 (2.0x; 30 of 40 steps timed, resumed)"
    stopped = {"train_seconds": 120.0, "step_seconds": [12.0] * 10, "steps_trained": 10}  # a guard stop: all timed
    assert mod._train_seconds(stopped) == 120.0 and mod._time_cell(stopped, 240.0) == "120 (0.5x)"
    stages = {"train_seconds": 500.0, "stages": {  # two stages, the first resumed at step 2 of 4
        "translation": {"train_seconds": 100.0, "step_seconds": [50.0, 50.0], "steps_trained": 4},
        "english_sft": {"train_seconds": 400.0, "step_seconds": [100.0] * 4, "steps_trained": 4}}}
    assert mod._timed_steps(stages) == (6, 8)
    assert mod._train_seconds(stages) == pytest.approx(4 * 50.0 + 400.0)  # each stage at its own pace
    assert mod._time_cell(stages, None) == "≈600 (6 of 8 steps timed, resumed)"
    two = json.loads((ROOT / "docs/results/gemma-3-270m-gsm8k/runs/two_stage.json").read_text())
    assert mod._train_seconds(two) == pytest.approx(two["train_seconds"])  # not resumed: as measured
    assert mod._time_cell({"step_seconds": [1.0, 2.0]}, 3.0) == "3 (1.0x)"  # old records: no steps_trained


def _record(run: str, **extra):
    """A finished run's record as the harness writes it (the fields the table reads)."""
    per_question = {"en": {"nll_sum": [1.0, 3.0], "tokens": [2, 2]}, "de": {"nll_sum": [2.0, 4.0], "tokens": [2, 2]}}
    gap = {"reference": "en", "langs": ["en", "de"], "nll": {"en": 1.0, "de": 1.5}, "gap": {"de": 0.5},
           "avg_gap": 0.5, "per_question": per_question}
    return {"run": run, "kind": "selective", "layers": [0], "targets": ["up", "down"], "gap": gap,
            "overlap_avg": [0.5, 0.6], "trainable_params": 10, "trainable_pct": 1.0, "peak_rss_mb": 100.0,
            "heldout_translation_loss": 1.0, "english_loss": 2.0, **extra}


def test_records_are_current_by_their_own_lr_old_and_new_format(tmp_path):
    """The lr map is per run: a record stands while its own lr (top level, or the table's --lr) matches."""
    mod = _load_script()
    args = mod.build_parser().parse_args(["--out", str(tmp_path), "--lr", "3e-4", "--lr-by-run", "full=1e-05,lora=1e-3"])
    settings = mod.settings_of(args)
    old_map = {**settings, "lr_by_run": "full=2e-5,two_stage=2e-5"}  # written before --choose-lr existed
    assert mod.is_current(_record("slam", settings=old_map), "slam", args)  # no top-level lr: the table's 3e-4
    assert mod.is_current(_record("full", settings=old_map, lr=1e-5), "full", args)
    assert not mod.is_current(_record("full", settings=old_map, lr=2e-5), "full", args)  # its own lr changed
    assert not mod.is_current(_record("lora", settings=old_map), "lora", args)  # trained at 3e-4, not 1e-3
    assert not mod.is_current(_record("slam", settings={**settings, "steps": 1}), "slam", args)
    assert not mod.is_current(_record("slam", settings=settings), "last_n", args)  # another run's record
    assert not mod.is_current(["not", "a", "record"], "slam", args)
    # random=LR sets every seed's lr
    assert mod.run_args("random_s1", mod.build_parser().parse_args(["--out", "o", "--lr-by-run", "random=0.002"])).lr == 0.002


def test_a_malformed_run_file_is_named_and_left_out_of_the_table(tmp_path, capsys):
    mod = _load_script()
    runs = tmp_path / "runs"
    runs.mkdir()
    settings = {"lr": 1e-4}
    (runs / "base.json").write_text(json.dumps(_record("base", settings=settings, kind="none", layers=[], targets=[])))
    (runs / "slam.json").write_text(json.dumps(_record("slam", settings=settings, lr=1e-4)))
    (runs / "lora.json").write_text('{"run": "lora", "gap": ')  # truncated
    (runs / "full.json").write_text(json.dumps(["a", "list"]))
    (runs / "last_n.json").write_text(json.dumps(_record("slam", settings=settings)))  # names another run
    (runs / "first_n.json").write_text(json.dumps({k: v for k, v in _record("first_n", settings=settings).items()
                                                   if k != "gap"}))
    assert [r["run"] for r in mod.load_runs(tmp_path)] == ["base", "slam"]
    err = capsys.readouterr().err
    for name in ("lora", "full", "last_n", "first_n"):
        assert f"{name}.json: not a finished run's record" in err
    assert "missing or wrong: gap" in err
    text = mod.write_table(tmp_path, tmp_path / "t.md")
    assert "| slam | [0] | up+down | 0.0001 |" in text and "| base | - | - | - |" in text


def test_a_run_resumed_after_its_last_step_is_not_timed_rather_than_zero():
    mod = _load_script()
    measured_only = {"train_seconds": 0, "step_seconds": [], "steps_trained": 40, "s_per_step": None}
    assert mod._train_seconds(measured_only) is None
    assert mod._time_cell(measured_only, 400.0) == "not timed (resumed after training)"
    assert mod._time_cell({"kind": "none"}, 400.0) == "-"  # base: did not train


@pytest.mark.parametrize("grid, chosen, expected", [
    ([1e-5, 2e-5, 5e-5], 1e-5, "smallest lr: a smaller one"),
    ([5e-5, 1e-5, 2e-5], 5e-5, "largest lr: a larger one"),
    ([1e-5, 2e-5, 5e-5], 2e-5, ""),
    ([3e-4], 3e-4, ""),  # one lr is no grid: nothing to widen
    ([3e-4, 3e-4], 3e-4, ""),
])
def test_a_choice_at_the_end_of_its_grid_is_flagged(grid, chosen, expected):
    note = _load_script().grid_edge_note(grid, chosen)
    assert (expected in note) if expected else note == ""


def test_a_choice_record_with_a_bad_lr_key_is_left_out_of_the_table(tmp_path):
    mod = _load_script()
    settings = {"model": "m"}
    rec = {"run": "lora", "criterion": "heldout_translation_loss", "values": {"1e-4": 1.0, "fast": 0.9},
           "chosen": 1e-4, "settings": settings}
    (tmp_path / "lr_search").mkdir()
    (tmp_path / "lr_search" / "lora.json").write_text(json.dumps(rec))
    assert mod._lr_choices(tmp_path, settings) == []
    rec["values"] = {"1e-4": 1.0, "3e-4": 0.9}
    (tmp_path / "lr_search" / "lora.json").write_text(json.dumps(rec))
    assert mod._lr_choices(tmp_path, settings) == [rec]


def test_choose_lr_skips_diverged_trials_and_refuses_when_all_diverged(tmp_path, monkeypatch):
    mod = _load_script()
    args = mod.build_parser().parse_args(["--out", str(tmp_path), "--choose-lr", "lora=1e-4/1e-2/1"])
    losses = {1e-4: 2.0, 1e-2: 1.5, 1.0: float("nan")}
    monkeypatch.setattr(mod, "run_trial", lambda a, name, lr: {"heldout_translation_loss": losses[lr]})
    assert mod.choose_run_lrs(args) == "lora=0.01"
    assert json.loads((tmp_path / "lr_search" / "lora.json").read_text())["chosen"] == 1e-2
    losses.update({1e-4: float("inf"), 1e-2: float("nan")})
    with pytest.raises(SystemExit, match="every trial diverged"):
        mod.choose_run_lrs(args)


def test_choose_lr_checks_before_training(setup, tmp_path):
    """A selective run needs the table's base run; other settings in --out stop it before any trial."""
    root, args = setup
    mod = _load_script()
    out = tmp_path / "fresh"
    argv = [a if a != str(root / "out") else str(out) for a in args]
    with pytest.raises(SystemExit, match="run 'base' first"):
        mod.main([*argv, "--runs", "first_n", "--choose-lr", "first_n=1e-4/1e-3"])
    assert not (out / "runs").exists()
    out.mkdir(exist_ok=True)
    (out / "settings.json").write_text(json.dumps({"steps": 999, "command": "x"}))
    with pytest.raises(SystemExit, match="other settings"):
        mod.main([*argv, "--runs", "lora", "--choose-lr", "lora=1e-4/1e-3"])
    assert not (out / "lr_search").exists()
    (out / "settings.json").write_text('{"steps": 9')  # truncated
    with pytest.raises(SystemExit, match="unreadable"):
        mod.main([*argv, "--runs", "lora", "--choose-lr", "lora=1e-4/1e-3"])
    assert not (out / "lr_search").exists()
    with pytest.raises(SystemExit, match="give --lr-grid or --choose-lr"):
        mod.main([*argv, "--lr-grid-only"])

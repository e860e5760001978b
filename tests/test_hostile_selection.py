"""Hostile and broken inputs around layer selection: files that try to import code, bad criteria."""

from __future__ import annotations

import json
import sys

import pytest

from _hostile import Injected, assert_error, fail_at, snapshot
from _selection_helpers import hand_stats
from layerselect import Selection, select
from layerselect.cli import main
from layerselect.errors import FormatError, InvalidInputError
from layerselect.selection import CRITERIA
from tiny import tiny_model


@pytest.fixture
def stats():
    return hand_stats(
        [[[9, 1, 0], [2, 2, 2]], [[8, 0, 1], [1, 4, 3]], [[7, 2, 2], [5, 5, 5]], [[6, 3, 3], [4, 4, 4]]],
        tokens=[10, 10, 10], groups=["en", "de", "zh"], questions=2,
    )


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module on sys.path whose import leaves a marker file: importing it is the attack."""
    marker = tmp_path / "imported.marker"
    (tmp_path / "evil_criterion_mod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\n"
        "def rule(stats, *, model=None):\n    return [0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("evil_criterion_mod", None)


def test_a_saved_selection_never_imports_the_module_it_names(stats, tmp_path, evil_module):
    path = select(stats, "msd").save(tmp_path / "sel.json")
    data = json.loads(path.read_text())
    data["criterion"] = "evil_criterion_mod:rule"
    path.write_text(json.dumps(data))
    loaded = Selection.load(path)
    with pytest.raises(InvalidInputError) as exc:
        loaded.stability(n_boot=3, stats=stats)
    assert_error(exc, "not registered", "evil_criterion_mod:rule")
    assert not evil_module.exists() and "evil_criterion_mod" not in sys.modules


def test_importing_is_an_explicit_act_of_the_caller(stats, tmp_path, evil_module):
    sel = select(stats, "msd").save(tmp_path / "sel.json")
    loaded = Selection.load(sel)
    st = loaded.stability(n_boot=3, stats=stats, criterion="evil_criterion_mod:rule")  # the user asked
    assert evil_module.exists() and st.selected == [0] and st.criterion == "rule"


def test_a_registered_name_in_a_file_still_works(stats, tmp_path):
    loaded = Selection.load(select(stats, "msd").save(tmp_path / "sel.json"))
    assert loaded.stability(n_boot=5, stats=stats).n_boot == 5


@pytest.mark.parametrize(
    ("layers", "words"),
    [([1.5], ["1.5", "not an integer"]), ([2, 2], ["more than once"]), ([-1], ["negative"]),
     (["0"], ["not an integer"]), ([True], ["not an integer"]), ("0,1", ["layers"])],
    ids=["float", "duplicate", "negative", "string", "bool", "not-a-list"],
)
def test_selection_files_with_bad_layers_are_refused(tmp_path, stats, layers, words):
    path = select(stats, "msd").save(tmp_path / "sel.json")
    data = json.loads(path.read_text())
    data["layers"] = layers
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError) as exc:
        Selection.load(path)
    assert_error(exc, *words)


def test_selection_file_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "sel.json"
    path.write_bytes(b"\x89PNG not a selection")
    with pytest.raises(FormatError) as exc:
        Selection.load(path)
    assert_error(exc, "sel.json", "not valid json")


@pytest.mark.parametrize(
    ("returned", "words"),
    [([0.5, 1], ["0.5", "not an integer"]), ([1, 1], ["more than once"]), ([7], ["not in the statistics"]),
     ([-2], ["negative"]), ("01", ["returned str"])],
    ids=["float", "duplicate", "out-of-range", "negative", "string"],
)
def test_criterion_output_is_validated_in_select(stats, returned, words):
    def bad_rule(stats, *, model=None):
        return returned

    with pytest.raises(InvalidInputError) as exc:
        select(stats, bad_rule)
    assert_error(exc, *words)


def test_criterion_layer_beyond_the_model_is_refused():
    def too_high(stats=None, *, model):
        return [0, 9]

    with pytest.raises(InvalidInputError) as exc:
        select(model=tiny_model("llama"), criterion=too_high)
    assert_error(exc, "[9]", "4 layers")


@pytest.mark.parametrize(
    ("criterion", "params", "words"),
    [("msd", {"tau": "high"}, ["tau='high'", "float"]), ("random", {"seed": "x", "k": 1}, ["seed='x'", "int"]),
     ("first_n", {"n": 2.5}, ["n=2.5", "int"]), ("topk", {"k": "2"}, ["k='2'", "int"])],
    ids=["tau", "seed", "n-float", "k-string"],
)
def test_criterion_parameters_of_the_wrong_type(stats, criterion, params, words):
    with pytest.raises(InvalidInputError) as exc:
        select(stats, criterion, **params)
    assert_error(exc, *words)


def test_a_module_function_that_is_not_a_criterion_is_clear_on_the_cli(tmp_path, stats, capsys):
    stats.save(tmp_path / "stats")
    rc = main(["select", str(tmp_path / "stats"), "--criterion", "json:dumps"])
    err = capsys.readouterr().err
    assert rc == 2 and "'dumps'" in err and "must be f(stats, *, model=None" in err and "Traceback" not in err
    assert "dumps" not in CRITERIA


def test_select_out_that_is_a_folder_fails_before_the_work(tmp_path, stats, capsys):
    stats.save(tmp_path / "stats")
    (tmp_path / "sel").mkdir()
    rc = main(["select", str(tmp_path / "stats"), "--out", str(tmp_path / "sel")])
    assert rc == 2 and "is a folder" in capsys.readouterr().err


def test_stability_needs_parallel_questions():
    # 'de' holds one question fewer than 'en': the bootstrap cannot resample questions jointly.
    st = hand_stats([[[3, 1], [1, 1]]], tokens=[4, 4], groups=["en", "de"], questions=2)
    st.sample_index[3] = 5
    with pytest.raises(InvalidInputError) as exc:
        select(st, "msd", reference="en").stability(n_boot=2)
    assert_error(exc, "same questions in every language", "parallel")


def test_interrupted_selection_save_keeps_the_old_file(tmp_path, stats):
    path = select(stats, "msd").save(tmp_path / "sel.json")
    before = snapshot(tmp_path)
    with fail_at(1), pytest.raises(Injected):
        select(stats, "first_n", n=3).save(path)
    assert snapshot(tmp_path) == before
    assert Selection.load(path).criterion == "msd"

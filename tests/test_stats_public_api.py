"""The top-level surface of layerselect: every name in __all__ resolves, dir() lists the lazy ones."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import layerselect


def test_every_name_in_all_resolves():
    for name in layerselect.__all__:
        assert getattr(layerselect, name) is not None, name
    # The lazily loaded names come from their own modules.
    assert layerselect.train_slam is importlib.import_module("layerselect.train").train_slam
    assert layerselect.load_translation_data is importlib.import_module("layerselect.data").load_translation_data


def test_dir_lists_lazy_names_before_they_are_loaded():
    # A fresh interpreter, so nothing has loaded layerselect.train yet.
    code = (
        "import sys, layerselect\n"
        "assert 'layerselect.train' not in sys.modules\n"
        "missing = sorted(set(layerselect.__all__) - set(dir(layerselect)))\n"
        "print(missing)\n"
        "assert 'layerselect.train' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_surface_is_small_and_grouped_by_stage():
    public = [n for n in layerselect.__all__ if n != "__version__"]
    assert len(public) == len(set(public)) <= 16
    for stage in ("ActivationStats", "select", "SelectiveFFNConfig", "train_slam", "evaluate"):
        assert stage in public


@pytest.mark.parametrize(
    "name, module",
    [("Overlap", "layerselect.stats"), ("list_criteria", "layerselect.selection"),
     ("load_deltas", "layerselect.selective_ffn"), ("TranslationExample", "layerselect.data"),
     ("NumericalError", "layerselect.errors")],
)
def test_names_that_live_in_their_stage_import_from_there_only(name, module):
    assert getattr(importlib.import_module(module), name) is not None
    assert name not in layerselect.__all__
    with pytest.raises(AttributeError):
        getattr(layerselect, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        layerselect.nonexistent  # noqa: B018

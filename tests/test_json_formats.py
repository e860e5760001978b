"""The shared JSON helpers: jsonable's two non-finite policies, read_json, check_format_version."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerselect._io import check_format_version, jsonable, read_json
from layerselect.errors import FormatError


def test_jsonable_converts_containers_tensors_and_numpy():
    value = {1: (torch.tensor([1, 2]), np.float64(0.5), np.arange(2)), "f": len, "x": None}
    assert jsonable(value) == {"1": [[1, 2], 0.5, [0, 1]], "f": "len", "x": None}


def test_jsonable_nonfinite_policies():
    value = [float("nan"), float("inf"), -math.inf, torch.tensor(float("nan")), 1.5]
    kept = jsonable(value)
    assert math.isnan(kept[0]) and kept[1] == math.inf and kept[2] == -math.inf and math.isnan(kept[3])
    assert jsonable(value, nonfinite="str") == ["nan", "inf", "-inf", "nan", 1.5]


@pytest.mark.parametrize("found", [None, "2", 2.0, True, 0, -1])
def test_check_format_version_refuses_non_versions(found):
    with pytest.raises(FormatError, match="no integer format_version"):
        check_format_version(found, 2, "stats", where="runs/x")


def test_check_format_version_names_the_file_and_the_fix():
    assert check_format_version(1, 2, "stats") == 1
    with pytest.raises(FormatError) as exc:
        check_format_version(3, 2, "adapter", where="runs/a", written_by="9.9")
    msg = str(exc.value)
    assert "runs/a uses adapter format version 3 (written by layerselect 9.9)" in msg
    assert "up to 2" in msg and "Upgrade layerselect" in msg


def test_read_json_names_the_file(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"a": NaN}')
    bad.write_bytes(b"{not json")
    assert math.isnan(read_json(good)["a"])
    with pytest.raises(FormatError, match=r"bad\.json is not valid JSON .*the statistics is corrupt"):
        read_json(bad, "the statistics")

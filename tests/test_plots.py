"""Figures are written, non-empty, and valid PNG / SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from layerselect.errors import InvalidInputError
from layerselect.plots import (
    plot_activation_ratio,
    plot_all,
    plot_overlap,
    plot_overlap_comparison,
    plot_selection,
)
from layerselect.selection import select
from layerselect.stats import ActivationStats
from tiny import tiny_model, tiny_texts, tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_stats():
    tok, texts = tiny_tokenizer(), tiny_texts(4)
    before = ActivationStats.collect(tiny_model("qwen2", seed=0), tok, texts, progress=False)
    after = ActivationStats.collect(tiny_model("qwen2", seed=1), tok, texts, progress=False)
    return before, after


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000


def assert_svg(path):
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    assert len(list(root.iter())) > 50  # axes, lines, text: not an empty canvas


def test_each_plot_writes_png_and_svg(two_stats, tmp_path):
    before, after = two_stats
    sel = select(before)
    figs = {
        "ratio": lambda p: plot_activation_ratio(before, p),
        "overlap": lambda p: plot_overlap(before, p),
        "selection": lambda p: plot_selection(sel, p),
        "compare": lambda p: plot_overlap_comparison(before, after, p),
    }
    for name, make in figs.items():
        fig = make(tmp_path / name)
        assert fig.axes, name
        assert_png(tmp_path / f"{name}.png")
        assert_svg(tmp_path / f"{name}.svg")
    # The overlap figure has one line per non-reference language plus AVG.
    fig = plot_overlap(before)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert set(labels) >= {"de", "sw", "zh", "AVG"} and "en" not in labels
    # The selection figure marks the threshold.
    ys = [line.get_ydata()[0] for line in plot_selection(sel).axes[0].get_lines() if line.get_linestyle() == "--"]
    assert ys == [pytest.approx(sel.threshold)]


def test_single_file_with_suffix(two_stats, tmp_path):
    before, _ = two_stats
    plot_activation_ratio(before, tmp_path / "r.png")
    assert_png(tmp_path / "r.png")
    assert not (tmp_path / "r.svg").exists()  # a path with a suffix writes that one format only
    with pytest.raises(InvalidInputError, match="png"):
        plot_activation_ratio(before, tmp_path / "r.jpg")


def test_plot_all_and_errors(two_stats, tmp_path):
    before, after = two_stats
    written = plot_all(before, tmp_path / "figs", compare=after, formats=("png",))
    names = sorted(p.name for p in written)
    assert names == ["activation_ratio.png", "overlap.png", "overlap_comparison.png", "selection_msd.png"]
    for p in written:
        assert_png(p)
    with pytest.raises(InvalidInputError, match="two languages"):
        plot_overlap(before.subset(["en"]))
    with pytest.raises(InvalidInputError, match="'en'"):
        plot_overlap_comparison(before.subset(["de", "sw"]), after)

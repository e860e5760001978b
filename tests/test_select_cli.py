"""`layerselect select` and `layerselect plot`: stats dir -> selection.json -> Selection, figures."""

from __future__ import annotations

import json
import textwrap

import pytest

from layerselect.cli import main
from layerselect.selection import CRITERIA, Selection, select
from layerselect.stats import ActivationStats
from tiny import tiny_model, tiny_texts, tiny_tokenizer


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    stats = ActivationStats.collect(
        tiny_model("llama", num_hidden_layers=6), tiny_tokenizer(), tiny_texts(5), progress=False
    )
    path = tmp_path_factory.mktemp("cli") / "stats"
    stats.save(path)
    return path


def test_select_round_trip_with_stability(stats_dir, tmp_path, capsys):
    out = tmp_path / "selection.json"
    assert main(["select", str(stats_dir), "--out", str(out), "--stability", "12", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    stats = ActivationStats.load(stats_dir)
    expected = select(stats)
    loaded = Selection.load(out)
    assert loaded == expected
    assert "R spread" in printed and "msd score" in printed and "theta" in printed
    for layer in stats.layers:  # one table row per layer, selected ones starred
        row = next(line for line in printed.splitlines() if line.split() and line.split()[0] == str(layer))
        assert row.rstrip().endswith("*") == (layer in expected.layers)
    stab = json.loads(out.with_name("selection.stability.json").read_text())
    assert stab == expected.stability(n_boot=12, seed=3).to_dict()
    assert "bootstrap resamples" in printed


def test_select_params_and_other_criteria(stats_dir, tmp_path, capsys):
    out = tmp_path / "topk.json"
    argv = ["select", str(stats_dir), "--criterion", "topk", "--param", "k=2", "--param", "score=r_spread", "--out", str(out)]
    assert main(argv) == 0
    sel = Selection.load(out)
    assert sel.criterion == "topk" and len(sel.layers) == 2 and sel.params["score"] == "r_spread"
    assert sel == select(ActivationStats.load(stats_dir), "topk", k=2, score="r_spread")
    assert main(["select", str(stats_dir), "--criterion", "nope"]) == 2
    assert "unknown criterion 'nope'" in capsys.readouterr().err
    assert main(["select", str(stats_dir), "--param", "reference=xx"]) == 2
    assert "reference language 'xx'" in capsys.readouterr().err
    assert main(["select", str(stats_dir), "--param", "novalue"]) == 2
    capsys.readouterr()
    assert main(["select", str(stats_dir), "--param", "criterion=all"]) == 2  # not a TypeError traceback
    assert "not a criterion parameter" in capsys.readouterr().err


def test_user_criterion_from_imported_module(stats_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_rules.py").write_text(textwrap.dedent('''
        from layerselect import selection as criteria

        @criteria.register_criterion("_cli_lowest")
        def lowest(stats, *, model=None, n=1):
            return sorted(stats.layers)[:n]

        def top_layer(stats, *, model=None):
            return [max(stats.layers)]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["select", str(stats_dir), "--import", "my_rules", "--criterion", "_cli_lowest", "--param", "n=2"]) == 0
        assert "selected [0, 1]" in capsys.readouterr().out
        assert main(["select", str(stats_dir), "--criterion", "my_rules:top_layer", "--stability", "3"]) == 0
        assert "selected [5]" in capsys.readouterr().out
    finally:
        CRITERIA.pop("_cli_lowest", None)


def test_plot_command(stats_dir, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["plot", str(stats_dir), "--out", str(out), "--compare", str(stats_dir), "--format", "png"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["activation_ratio.png", "overlap.png", "overlap_comparison.png", "selection_msd.png"]
    assert all(p.stat().st_size > 5_000 for p in out.iterdir())
    sel_path = tmp_path / "sel.json"
    assert main(["select", str(stats_dir), "--criterion", "first_n", "--param", "n=2", "--out", str(sel_path)]) == 0
    assert main(["plot", str(stats_dir), "--out", str(out), "--selection", str(sel_path)]) == 0
    assert (out / "selection_first_n.png").is_file() and (out / "selection_first_n.svg").is_file()


def test_select_reference_flag_reaches_the_msd_rule(tmp_path, capsys):
    import json

    from layerselect import ActivationStats
    from layerselect.cli import main
    from tiny import tiny_model, tiny_texts, tiny_tokenizer

    stats = ActivationStats.collect(tiny_model("llama"), tiny_tokenizer(), tiny_texts(3), progress=False)
    stats.save(tmp_path / "s")
    assert main(["select", str(tmp_path / "s"), "--reference", "de", "--out", str(tmp_path / "sel.json")]) == 0
    assert json.loads((tmp_path / "sel.json").read_text())["params"]["reference"] == "de"
    assert "with 'de'" in capsys.readouterr().out


def test_a_weight_criterion_never_loads_the_model_a_stats_file_names(stats_dir, capsys, monkeypatch):
    """`select --criterion snr` without --model: the path inside stats.json is data, never loaded."""
    import layerselect.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded because a data file named it")

    monkeypatch.setattr(layerselect.models, "load_model", no_load)
    assert main(["select", str(stats_dir), "--criterion", "snr"]) == 2
    err = capsys.readouterr().err
    assert "reads the model's weights: pass --model" in err and "Traceback" not in err

"""Representation plot (paper Fig. 10): last-token states vs hooks, PCA by hand, 11 colours, CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from layerselect.cli import main
from layerselect.errors import InvalidInputError
from layerselect.plots import LANG_COLORS, plot_representations, plot_state_projections
from layerselect.representations import last_token_states, parallel_alignment, project_2d
from layerselect.selective_ffn import SelectiveFFNConfig, get_slam_model
from tiny import tiny_model, tiny_texts, tiny_tokenizer

LANGS11 = ["en", "de", "fr", "es", "ru", "zh", "ja", "sw", "th", "bn", "te"]


def texts11(n: int = 4) -> dict[str, list[str]]:
    words = ["eggs", "ducks", "apples", "market", "day", "fox", "dog", "brown", "lazy", "quick", "over"]
    return {lang: [f"{words[k]} {i * 3 + k} " + words[(k + i) % 11] * (1 + i % 2) for i in range(n)]
            for k, lang in enumerate(LANGS11)}


def test_last_token_states_match_layer_outputs_and_ignore_batching():
    model, tok, texts = tiny_model("llama"), tiny_tokenizer(), tiny_texts(3)
    states, langs = last_token_states(model, tok, texts, [0, 2], batch_size=5)
    assert langs == [lang for lang in texts for _ in range(3)]
    # independent: a forward hook on the decoder layer, one text at a time, last position
    seen = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0, -1]))
        for i in (0, 2)]
    flat = [t for lang in texts for t in texts[lang]]
    for row, text in enumerate(flat):
        with torch.no_grad():
            model(torch.tensor([tok(text)["input_ids"]]))
        for i in (0, 2):
            np.testing.assert_allclose(states[i][row], seen[i].numpy(), rtol=1e-10, atol=1e-12)
    for h in hooks:
        h.remove()
    with pytest.raises(InvalidInputError, match="out of range"):
        last_token_states(model, tok, texts, [4])


def test_pca_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)) * np.array([5.0, 2.0, 0.5, 0.1, 0.1]) + 3.0
    xy = project_2d(x)
    # the coordinates' variances are the top two eigenvalues of the covariance matrix
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]
    assert xy.var(axis=0, ddof=1) == pytest.approx(eig[:2], rel=1e-10)
    assert abs(np.corrcoef(xy.T)[0, 1]) < 1e-10 and np.allclose(xy.mean(axis=0), 0)
    assert np.array_equal(project_2d(x), xy)  # deterministic signs
    with pytest.raises(InvalidInputError, match="unknown projection"):
        project_2d(x, method="umap")


def test_parallel_alignment_against_a_slow_loop():
    rng = np.random.default_rng(1)
    langs = [lang for lang in ("en", "de", "sw") for _ in range(6)]
    x = rng.normal(size=(18, 5)) + np.array([40.0, 0, 0, 0, 0])  # one huge shared dimension, as in LLM states
    x[6:12] = x[:6] + rng.normal(scale=0.1, size=(6, 5))  # "de" = English plus noise: perfectly retrievable
    got = parallel_alignment(torch.as_tensor(x), langs)
    centred = x - x.mean(axis=0)
    for lang, rows in (("de", range(6, 12)), ("sw", range(12, 18))):
        cosines, hits = [], 0
        for k, i in enumerate(rows):
            sims = [centred[i] @ centred[j] / np.linalg.norm(centred[i]) / np.linalg.norm(centred[j]) for j in range(6)]
            cosines.append(sims[k])
            hits += int(np.argmax(sims) == k)
        assert got[lang]["cosine"] == pytest.approx(np.mean(cosines), rel=1e-12)
        assert got[lang]["retrieval"] == hits / 6
    assert got["de"]["retrieval"] == 1.0 and got["de"]["cosine"] > 0.95
    assert got["avg"]["cosine"] == pytest.approx((got["de"]["cosine"] + got["sw"]["cosine"]) / 2, rel=1e-12)
    # a permuted English side: every translation is lost
    perm = x.copy()
    perm[:6] = x[[1, 2, 3, 4, 5, 0]]
    assert parallel_alignment(perm, langs)["de"]["retrieval"] == 0.0
    with pytest.raises(InvalidInputError, match="same number of rows"):
        parallel_alignment(x[:17], langs[:17])
    with pytest.raises(InvalidInputError, match="reference language 'fr'"):
        parallel_alignment(x, langs, reference="fr")
    with pytest.raises(InvalidInputError, match="do not match"):
        parallel_alignment(x, langs[:-1])


def test_tsne_needs_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(InvalidInputError, match="scikit-learn"):
        project_2d(np.eye(5), method="tsne")


def test_tsne_keeps_separated_languages_apart():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    # three "languages", far apart in 6-D: t-SNE must keep each point's nearest neighbour in its own group
    centres = np.array([[0.0] * 6, [10.0] + [0.0] * 5, [0.0, 10.0] + [0.0] * 4])
    labels = np.repeat(np.arange(3), 10)
    x = centres[labels] + rng.normal(scale=0.5, size=(30, 6))
    xy = project_2d(x, method="tsne")
    assert isinstance(xy, np.ndarray) and xy.shape == (30, 2)
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.diag([np.inf] * 30)
    assert (labels[dist.argmin(axis=1)] == labels).all()
    assert np.array_equal(project_2d(x, method="tsne"), xy)  # the seed fixes the layout
    as_tensor = project_2d(torch.as_tensor(x), method="tsne")
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float64
    assert project_2d(x[:3], method="tsne").shape == (3, 2)  # the smallest input still has a valid perplexity


def test_plot_base_vs_trained_with_11_distinct_colours(tmp_path):
    assert len(set(LANG_COLORS)) >= 11
    base, tok = tiny_model("llama"), tiny_tokenizer()
    slam = get_slam_model(tiny_model("llama"), SelectiveFFNConfig(layers=[0]))
    with torch.no_grad():
        slam.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    fig = plot_representations(base, tok, texts11(), [0, 3], trained=slam, path=tmp_path / "rep.png")
    assert (tmp_path / "rep.png").read_bytes()[:4] == b"\x89PNG"
    axes = fig.get_axes()
    assert len(axes) == 4 and "base" in axes[0].get_title() and "trained" in axes[1].get_title()
    for ax in axes:
        colours = {tuple(np.round(c.get_facecolor()[0], 4)) for c in ax.collections}
        assert len(ax.collections) == 11 and len(colours) == 11
        assert sum(len(c.get_offsets()) for c in ax.collections) == 44
    # layer 0 changed: the trained panel's points differ from the base panel's
    assert not np.allclose(axes[0].collections[0].get_offsets(), axes[1].collections[0].get_offsets())


def test_plot_representations_cli(tmp_path, capsys):
    model = tiny_model("llama", dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    data = tmp_path / "mgsm"
    data.mkdir()
    for lang, qs in texts11(3).items():
        (data / f"mgsm_{lang}.tsv").write_text("".join(f"{q}\t1\n" for q in qs), encoding="utf-8")
    slam = get_slam_model(model, SelectiveFFNConfig(layers=[1]))
    with torch.no_grad():
        slam.model.model.layers[1].mlp.up_proj.weight.mul_(2.0)
    slam.save_pretrained(tmp_path / "ad")
    rc = main(["plot", "--representations", "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"),
               "--data", f"mgsm:{data}", "--layers", "1,3", "--format", "png", "--precision", "fp32",
               "--out", str(tmp_path / "figs")])
    assert rc == 0
    assert (tmp_path / "figs" / "representations_pca.png").stat().st_size > 5000
    # the printed alignment numbers are parallel_alignment of states computed here independently
    report = json.loads((tmp_path / "figs" / "representations_alignment.json").read_text())
    assert report["texts_per_language"] == 3 and sorted(report["languages"]) == sorted(LANGS11)
    texts = texts11(3)  # the centring uses every row, so the order of languages does not matter
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # `model` itself was scaled in place above
    for name, m in (("base", fresh), ("base+adapter", slam)):
        states, langs = last_token_states(m, tiny_tokenizer(), texts, [1, 3])
        for layer in (1, 3):
            want = parallel_alignment(states[layer], langs)
            assert report["alignment"][name][str(layer)]["avg"]["cosine"] == pytest.approx(want["avg"]["cosine"], abs=1e-6)
            assert report["alignment"][name][str(layer)]["de"] == pytest.approx(want["de"], abs=1e-6)  # float32, other batches
    assert report["alignment"]["base"]["3"] != report["alignment"]["base+adapter"]["3"]
    assert "alignment with English" in capsys.readouterr().out
    assert main(["plot", "--out", str(tmp_path / "x")]) == 2
    assert "pass STATS_DIR" in capsys.readouterr().err


def test_more_languages_than_colours_is_refused_before_any_work():
    langs = [f"l{i}" for i in range(len(LANG_COLORS) + 1) for _ in range(2)]
    with pytest.raises(InvalidInputError, match="distinct colours"):
        plot_state_projections([{0: torch.zeros(len(langs), 4)}], langs, [0], labels=["base"])
    with pytest.raises(InvalidInputError, match="distinct colours"):  # refused before the model is touched
        plot_representations(None, None, {lang: ["x"] for lang in dict.fromkeys(langs)}, [0])

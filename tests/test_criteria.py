"""Selection criteria: msd derived by hand, the other criteria, registry, JSON, stability."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _selection_helpers import hand_stats
from layerselect.errors import FormatError, InvalidInputError
from layerselect.selection import (
    CRITERIA,
    Selection,
    bootstrap_sample_weights,
    get_criterion,
    list_criteria,
    register_criterion,
    resample_stats,
    select,
    stability,
)
from layerselect.stats import ActivationStats
from tiny import tiny_model, tiny_texts, tiny_tokenizer

EN, DE, FR = "en", "de", "fr"

# ---------------------------------------------------------------------------------------------
# Main hand-built case. 3 languages (en, de, fr), 4 neurons, 10 tokens each, so p = count / 10,
# R[l, g] = sum_n count / 40, S_g = {n : count > 5} (tau = 0.5).
#
# layer 0: en [8,8,0,0] R .4 S{0,1} | de [8,8,8,8] R .8 S{0,1,2,3} | fr [0,0,0,0] R 0 S{}
#          overlap de 2/2 = 1, fr 0/2 = 0 -> AVG .5 ; mean R .4, dev 0,.4,-.4 -> MSD .32/3 = 0.96/9
# layer 1: en [8,8,0,0] R .4 | de [8,8,0,0] R .4 | fr [8,0,0,0] R .2 S{0}
#          overlap 1, .5 -> AVG .75 ; mean 1/3, dev 1/15,1/15,-2/15 -> MSD (6/225)/3 = 0.08/9
# layer 2: en [8,8,0,0] R .4 | de [8,8,8,8] R .8 | fr [8,0,0,0] R .2
#          overlap 1, .5 -> AVG .75 ; mean 1.4/3, dev -1/15, 5/15, -4/15 -> MSD (42/225)/3 = 0.56/9
# layer 3: all three [8,8,0,0] -> AVG 1.0 (the peak), MSD 0
# layer 4: en [8,8,0,0] | de [8,0,0,0] S{0} | fr [8,8,8,8] -> AVG (.5 + 1)/2 = .75, MSD 0.56/9
#          (large MSD, but above the peak: not in K)
# K = {0, 1, 2}; theta = (0.96 + 0.08 + 0.56) / 9 / 3 = 1.6 / 27 = 0.0592593
# MSD > theta: layer 0 (0.10667) yes, layer 1 (0.00889) no, layer 2 (0.06222) yes -> [0, 2]
# ---------------------------------------------------------------------------------------------
A, B, Z, F = [8, 8, 0, 0], [8, 8, 8, 8], [0, 0, 0, 0], [8, 0, 0, 0]


def _layer(en, de, fr):
    return [[en[n], de[n], fr[n]] for n in range(4)]


MAIN = [_layer(A, B, Z), _layer(A, A, F), _layer(A, B, F), _layer(A, A, A), _layer(A, F, B)]


def main_stats(**kw) -> ActivationStats:
    return hand_stats(MAIN, [10, 10, 10], [EN, DE, FR], **kw)


def test_msd_hand_derived_main_case():
    stats = main_stats()
    assert stats.overlap(EN).average.tolist() == pytest.approx([0.5, 0.75, 0.75, 1.0, 0.75])
    assert stats.msd().tolist() == pytest.approx([0.96 / 9, 0.08 / 9, 0.56 / 9, 0.0, 0.56 / 9])
    sel = select(stats)
    assert sel.criterion == "msd"
    assert sel.details["peak_layer"] == 3
    assert sel.details["K"] == [0, 1, 2]
    assert sel.threshold == pytest.approx(1.6 / 27)
    assert sel.layers == [0, 2]
    assert sel.details["fallback"] is False
    assert sel.scores[1] == pytest.approx(0.08 / 9)
    text = sel.explain()
    assert "K = [0, 1, 2]" in text and "peaks at layer 3" in text
    assert "<= theta" in sel.notes[1] and "> theta" in sel.notes[0] and "not in K" in sel.notes[4]


def test_msd_uses_model_layer_ids():
    # The same counts collected for model layers 10, 12, 14, 16, 18: the rule is the same on ids.
    sel = select(main_stats(layers=[10, 12, 14, 16, 18]))
    assert sel.layers == [10, 14]
    assert sel.details["K"] == [10, 12, 14] and sel.details["peak_layer"] == 16
    assert sorted(sel.scores) == [10, 12, 14, 16, 18]


def test_msd_peak_at_layer_zero_falls_back_to_layer_zero():
    # layer 0: all [8,8,0,0] -> AVG 1 (peak), MSD 0. layer 1 = main layer 0 (AVG .5),
    # layer 2 = main layer 2 (AVG .75). K = {0}; theta = MSD[0] = 0; nothing is > 0 in K
    # -> fallback to the largest MSD in K: layer 0, and the explanation says so.
    stats = hand_stats([MAIN[3], MAIN[0], MAIN[2]], [10, 10, 10], [EN, DE, FR])
    sel = select(stats)
    assert sel.details["peak_layer"] == 0 and sel.details["K"] == [0]
    assert sel.threshold == pytest.approx(0.0, abs=1e-20)  # 0 up to float rounding of R
    assert sel.layers == [0]
    assert sel.details["fallback"] is True
    assert "falls back" in sel.reason and "single layer" in sel.reason


def test_msd_peak_at_first_collected_layer_when_layers_start_above_zero():
    stats = hand_stats([MAIN[3], MAIN[0]], [10, 10, 10], [EN, DE, FR], layers=[4, 5])
    sel = select(stats)
    assert sel.details["K"] == [4] and sel.layers == [4]


def test_msd_overlap_tie_goes_to_lowest_layer():
    # layers: main 0 (AVG .5), main 2 (AVG .75), all-A (AVG 1), main 1 (AVG .75), all-A (AVG 1).
    # The peak value 1.0 is at layers 2 and 4: the lowest (2) wins, K = {0, 1}.
    # theta = (0.96/9 + 0.56/9) / 2 = 0.76/9; MSD[0] = 0.96/9 > theta, MSD[1] = 0.56/9 < theta.
    stats = hand_stats([MAIN[0], MAIN[2], MAIN[3], MAIN[1], MAIN[3]], [10, 10, 10], [EN, DE, FR])
    sel = select(stats)
    assert sel.details["peak_layer"] == 2 and sel.details["K"] == [0, 1]
    assert sel.threshold == pytest.approx(0.76 / 9)
    assert sel.layers == [0]


def test_msd_all_equal_in_k_falls_back_to_lowest_layer():
    # Layers 0, 1, 2 have the same R pattern (.4, .8, .2; MSD 0.56/9 each) with permuted neurons,
    # layer 3 is the peak. theta = 0.56/9 and no MSD is strictly above it -> fallback to the
    # largest MSD in K; all tie, so the lowest layer, 0.
    perm = [_layer(A, [8, 8, 8, 8], [0, 0, 0, 8]), _layer(A, B, [0, 8, 0, 0]), _layer(A, B, F)]
    stats = hand_stats([*perm, MAIN[3]], [10, 10, 10], [EN, DE, FR])
    msd = stats.msd()
    assert msd[:3].tolist() == pytest.approx([0.56 / 9] * 3)
    sel = select(stats)
    assert sel.details["K"] == [0, 1, 2]
    assert sel.layers == [0] and sel.details["fallback"] is True
    assert "all MSD in K are equal" in sel.reason


def test_msd_tie_above_theta_selects_both():
    # K = {0, 1, 2} with MSD 0.96/9, 0.08/9, 0.96/9 (layers 0 and 2 identical):
    # theta = 2/27 = 0.074; both tied layers are above it and both are selected.
    stats = hand_stats([MAIN[0], MAIN[1], MAIN[0], MAIN[3]], [10, 10, 10], [EN, DE, FR])
    sel = select(stats)
    assert sel.threshold == pytest.approx(2.0 / 27)
    assert sel.layers == [0, 2]


def test_msd_two_languages_and_other_reference():
    # With reference "de" on the main case: layer 0 S_de = {0,1,2,3}; en 2/4 = .5, fr 0/4 = 0 -> .25;
    # layer 3 is still the peak (1.0), so K and theta are as before.
    sel = select(main_stats(), reference="de")
    assert sel.details["K"] == [0, 1, 2] and sel.layers == [0, 2]
    two = main_stats().subset([EN, DE])
    # en/de: R .4/.8, .4/.4, .4/.8, .4/.4, .4/.2 -> MSD .04, 0, .04, 0, .01; overlap 1 at layers 0..3.
    # The peak is layer 0 (first of the ties) -> K = {0} -> fallback [0].
    sel2 = select(two)
    assert sel2.details["peak_layer"] == 0 and sel2.layers == [0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: select(s, criterion="nope"), "unknown criterion 'nope'"),
        (lambda s: select(s, reference="xx"), "reference language 'xx'"),
        (lambda s: select(s.subset([EN])), "at least two languages"),
        (lambda s: select(s, k=3), "has no parameter"),
        (lambda s: select(s, "topk", k=99), "k=99"),
        (lambda s: select(s, "topk", score="nope"), "unknown score"),
        (lambda s: select(None, "msd"), "needs activation statistics"),
        (lambda s: select(s, "snr"), "needs the model"),
    ],
)
def test_invalid_input_names_the_fix(call, match):
    with pytest.raises(InvalidInputError, match=match):
        call(main_stats())


def test_nan_overlap_is_refused():
    # The reference never fires above tau at layer 1 -> overlap 0/0 = NaN there.
    stats = hand_stats([MAIN[0], _layer(Z, A, A)], [10, 10, 10], [EN, DE, FR])
    with pytest.raises(InvalidInputError, match="NaN at layers \\[1\\].*lower tau"):
        select(stats)


def test_nan_user_scores_are_refused():
    def nan_rule(stats, *, model=None):
        return Selection(layers=[0], scores={0: float("nan")})

    with pytest.raises(InvalidInputError, match="NaN scores"):
        select(main_stats(), nan_rule)


# ------------------------------------------------------------------------- other criteria
def test_baselines_on_hand_stats():
    stats = main_stats()
    assert select(stats, "first_n", n=2).layers == [0, 1]
    assert select(stats, "all").layers == [0, 1, 2, 3, 4]
    r1, r2 = select(stats, "random", k=3, seed=7), select(stats, "random", k=3, seed=7)
    assert r1 == r2 and len(r1.layers) == 3
    assert len({tuple(select(stats, "random", k=2, seed=s).layers) for s in range(20)}) > 1
    # topk by MSD: 0.96/9 (layer 0) then 0.56/9 tie at layers 2 and 4 -> lower layer first.
    assert select(stats, "topk", k=2).layers == [0, 2]
    assert select(stats, "topk", k=1, score="divergence").layers == [0]  # 1 - .5 is the largest
    # r_spread: .8, .2, .6, 0, .6 -> top 2: 0 and 2 (tie with 4 goes to the lower layer)
    assert select(stats, "topk", k=2, score="r_spread").layers == [0, 2]
    assert select(stats, "topk", k=1, score="msd", max_layer=2).layers == [0]



# ---------------------------------------------------------------------------------------------
# LAPE by hand. 2 languages (en, de), 2 layers x 4 neurons, 10 tokens each: p = count / 10.
# top_rate .25 -> round(8 * .25) = 2 specific neurons; filter_rate .5 -> prob_cut = the 8th
# smallest of the 16 probabilities. Entropy of q = p / sum_g p: H(a, b) = -(a ln a + b ln b).
#
# layer 0: n0 (.8, 0) H 0 | n1 (.4, .4) H ln 2 | n2 (.1, .1) H ln 2 | n3 (.6, .1) H(6/7, 1/7) = .4101
# layer 1: n0 (.5, .5) H ln 2 | n1 (.9, .3) H(.75, .25) = .5623 | n2 (.1, 0) H 0 | n3 (.2, .7) H(2/9, 7/9) = .5297
# sorted p: 0 0 .1 .1 .1 .1 .2 [.3] .4 ... -> prob_cut .3; eligible = some p > .3: all but n2 of each layer.
# Lowest entropies among the eligible: L0n0 (0), L0n3 (.4101) -> density [2/4, 0], mean .25 -> [0].
# (Without the filter, L1n2's H = 0 would be the second: density [.25, .25], a tie.)
# Fallback case: L0n3 = (.6, .2), H(.75, .25) = .5623; prob_cut is still .3, the two lowest are now
# L0n0 and L1n3 (.5297) -> density [.25, .25]: none above the mean -> the densest, lowest layer, [0].
# ---------------------------------------------------------------------------------------------
def _lape_stats(l0n3):
    en_de = [[[8, 0], [4, 4], [1, 1], l0n3], [[5, 5], [9, 3], [1, 0], [2, 7]]]
    return hand_stats(en_de, [10, 10], [EN, DE])


def _entropy(*q):
    return -sum(x * math.log(x) for x in q)


def test_lape_hand_derived_main_case():
    sel = select(_lape_stats([6, 1]), "lape", top_rate=0.25, filter_rate=0.5)
    assert sel.details["prob_cut"] == pytest.approx(0.3)
    assert sel.details["n_specific"] == 2
    assert sel.details["entropy_cut"] == pytest.approx(_entropy(6 / 7, 1 / 7))
    assert sel.scores == pytest.approx({0: 0.5, 1: 0.0})
    assert sel.threshold == pytest.approx(0.25)
    assert sel.layers == [0] and sel.details["fallback"] is False
    top1 = select(_lape_stats([6, 1]), "lape", top_rate=0.25, filter_rate=0.5, k=1)
    assert top1.layers == [0] and top1.threshold == pytest.approx(0.5)


def test_lape_hand_derived_tie_falls_back_to_the_lowest_densest_layer():
    sel = select(_lape_stats([6, 2]), "lape", top_rate=0.25, filter_rate=0.5)
    assert sel.details["prob_cut"] == pytest.approx(0.3)
    assert sel.details["entropy_cut"] == pytest.approx(_entropy(2 / 9, 7 / 9))
    assert sel.scores == pytest.approx({0: 0.25, 1: 0.25})
    assert sel.layers == [0] and sel.details["fallback"] is True
    assert "falling back" in sel.reason


# ---------------------------------------------------------------------------------------------
# SNR by hand. Every FFN matrix of layer l (gate, up [48 x 32], down [32 x 48]) is "diagonal" with
# singular values 1, 2, ..., 31 and top_l, so beta = 32 / 48. torch.quantile (linear) of the 32
# sorted values: q75 at 23.25 -> 24.25, q25 at 7.75 -> 8.75; sigma = 15.5 / 1.349;
# edge = sigma (1 + sqrt(2/3)) = 20.87: signal = 21 + ... + 31 + top = 286 + top, noise = 1 + ... + 20 = 210.
# SNR = (signal / noise) / s_max = (286 + top) / 210 / top. tops [100, 50, 200, 40] ->
# [.018381, .032, .011571, .038810]; default k = round(.25 * 4) = 1 -> [3]; k = 2 -> [1, 3], threshold .032.
# ---------------------------------------------------------------------------------------------
TOPS = [100.0, 50.0, 200.0, 40.0]


def _snr_model():
    model = tiny_model("llama")  # 4 layers, hidden 32, intermediate 48
    with torch.no_grad():
        for layer, top in zip(model.model.layers, TOPS):
            values = torch.tensor([*range(1, 32), top], dtype=torch.float64)
            for w in (layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight):
                w.zero_()
                w[range(32), range(32)] = values
    return model


def test_snr_hand_derived():
    expected = {i: (286 + top) / 210 / top for i, top in enumerate(TOPS)}
    assert expected[0] == pytest.approx(0.018381, abs=1e-6)
    sigma = 15.5 / 1.349
    assert 20 < sigma * (1 + math.sqrt(2 / 3)) < 21  # the edge falls between 20 and 21, as assumed
    sel = select(model=_snr_model(), criterion="snr")
    assert sel.scores == pytest.approx(expected, rel=1e-6)
    assert sel.layers == [3] and sel.threshold == pytest.approx(expected[3], rel=1e-6)
    two = select(model=_snr_model(), criterion="snr", k=2)
    assert two.layers == [1, 3] and two.threshold == pytest.approx(0.032, rel=1e-6)
    only_down = select(model=_snr_model(), criterion="snr", matrices=["down"], max_layer=2)
    assert only_down.layers == [1] and only_down.scores == pytest.approx(expected, rel=1e-6)

def test_register_criterion_decorator_and_call():
    @register_criterion
    def _lowest_two(stats, *, model=None):
        return sorted(stats.layers)[:2]

    @register_criterion("_highest_msd")
    def whatever(stats, *, model=None, k: int = 1):
        scores = {layer: float(v) for layer, v in zip(stats.layers, stats.msd())}
        best = sorted(scores, key=lambda layer: -scores[layer])[:k]
        return Selection(layers=best, scores=scores, reason="highest MSD")

    def plain(stats, *, model=None):
        return [1]

    register_criterion("_plain", plain)
    try:
        stats = main_stats()
        assert select(stats, "_lowest_two").layers == [0, 1]
        sel = select(stats, "_highest_msd", k=2)
        assert sel.layers == [0, 2] and sel.criterion == "_highest_msd" and sel.params == {"k": 2}
        assert select(stats, "_plain").layers == [1]
        assert {"_lowest_two", "_highest_msd", "_plain"} <= set(list_criteria())
        with pytest.raises(InvalidInputError, match="already registered"):
            register_criterion("_plain", lambda stats, *, model=None: [0])
        with pytest.raises(InvalidInputError, match="not in the statistics"):
            select(stats, lambda stats, *, model=None: [42])
    finally:
        for name in ("_lowest_two", "_highest_msd", "_plain"):
            CRITERIA.pop(name, None)


def test_module_function_criterion_name():
    spec = get_criterion("layerselect.selection.baselines:first_n_criterion")
    assert spec.name == "first_n"  # registered under its own name
    # a function that is not a criterion is refused by its signature, not guessed at
    with pytest.raises(InvalidInputError, match=r"must be f\(stats, \*, model=None, \*\*params\)"):
        get_criterion("layerselect.selection:layer_scores")
    assert "layer_scores" not in CRITERIA


@pytest.mark.parametrize("rule", [
    lambda stats: [0],                       # no model keyword
    lambda stats, model=None: [0],           # model positional: f(stats, model) would be ambiguous
    lambda data, *, model=None: [0],         # the statistics under another name
    lambda *, model: [0],                    # no statistics at all
], ids=["no-model", "positional-model", "other-name", "model-only"])
def test_one_criterion_signature_anything_else_is_refused_by_name(rule):
    with pytest.raises(InvalidInputError, match=r"has the signature .*must be f\(stats, \*, model=None"):
        register_criterion("_odd", rule)
    assert "_odd" not in CRITERIA


def test_required_inputs_come_from_the_defaults():
    def needs_model(stats=None, *, model, k=1):
        return [0]

    spec = get_criterion(needs_model)
    assert spec.required == frozenset({"model"})
    with pytest.raises(InvalidInputError, match="needs the model"):
        select(main_stats(), needs_model)
    assert get_criterion("msd").required == frozenset({"stats"})
    assert get_criterion("snr").required == frozenset({"model"})


# ------------------------------------------------------------------------- JSON
def test_selection_json_round_trip(tmp_path):
    sel = select(main_stats())
    again = Selection.from_json(sel.to_json())
    assert again == sel and again.layers == [0, 2] and again.details["K"] == [0, 1, 2]
    path = sel.save(tmp_path / "sub" / "selection.json")
    assert Selection.load(path) == sel
    data = json.loads(path.read_text())
    assert data["format"] == "layerselect.selection" and data["scores"]["1"] == pytest.approx(0.08 / 9)
    with pytest.raises(FormatError):
        Selection.from_json('{"layers": [1]}')
    with pytest.raises(FormatError):
        Selection.from_json("{not json")
    newer = dict(data, format_version=99)
    with pytest.raises(FormatError, match="upgrade"):
        Selection.from_dict(newer)


# ------------------------------------------------------------------------- stability
def test_bootstrap_weights_share_question_draws_across_languages():
    stats = main_stats(questions=7)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        w = bootstrap_sample_weights(stats, gen)
        by_lang = w.view(3, 7)  # samples are ordered group-major, question-minor
        assert torch.equal(by_lang[0], by_lang[1]) and torch.equal(by_lang[0], by_lang[2])
        assert int(by_lang[0].sum()) == 7
    # Shuffled sample order: the weight still depends only on the question index.
    perm = torch.randperm(stats.num_samples, generator=torch.Generator().manual_seed(0))
    shuffled = ActivationStats(
        counts=stats.counts, tokens=stats.tokens, groups=stats.groups, layers=stats.layers,
        sample_fraction=stats.sample_fraction[perm], sample_tokens=stats.sample_tokens[perm],
        sample_group=stats.sample_group[perm], sample_index=stats.sample_index[perm],
    )
    w = bootstrap_sample_weights(shuffled, torch.Generator().manual_seed(1))
    for q in range(7):
        assert len(set(w[shuffled.sample_index == q].tolist())) == 1


def test_stability_reproducible_and_hand_stats_are_stable():
    stats = main_stats(questions=5)
    st1 = stability(stats, "msd", n_boot=30, seed=5)
    st2 = select(stats).stability(n_boot=30, seed=5)
    assert st1 == st2
    # Every question has the same fractions, so every resample gives the same selection.
    assert st1.frequency == {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0, 4: 0.0}
    assert st1.selections == [([0, 2], 30)]
    as_json = json.loads(json.dumps(st1.to_dict()))
    assert as_json["frequency"] == {"0": 1.0, "1": 0.0, "2": 1.0, "3": 0.0, "4": 0.0}
    assert as_json["selections"] == [{"layers": [0, 2], "count": 30}]
    assert as_json["score_mean"]["0"] == pytest.approx(0.96 / 9) and as_json["score_high"]["2"] == pytest.approx(0.56 / 9)
    assert as_json["threshold_low"] == pytest.approx(1.6 / 27) == as_json["threshold_high"]
    table = st1.format_table().splitlines()
    assert table[2].split() == ["0", "yes", "1.000", "1.0667e-01", "[1.0667e-01,", "1.0667e-01]"]
    assert table[3].split()[:2] == ["1", "0.000"]  # layer 1: not selected, never chosen
    assert table[-1] == "most common selections: [0, 2] x30"


def test_stability_of_loaded_selection_needs_stats(tmp_path):
    stats = main_stats(questions=3)
    loaded = Selection.from_json(select(stats).to_json())
    with pytest.raises(InvalidInputError, match="pass stats="):
        loaded.stability(n_boot=5)
    assert loaded.stability(n_boot=5, stats=stats).frequency[0] == 1.0


# ------------------------------------------------------------------------- tiny real collection
@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", num_hidden_layers=6)
    stats = ActivationStats.collect(model, tiny_tokenizer(), tiny_texts(6), per_sample_counts=True, progress=False)
    return model, stats


@pytest.mark.parametrize("name", ["msd", "first_n", "topk", "random", "all", "lape", "snr"])
def test_every_criterion_on_tiny_collection(tiny, name):
    model, stats = tiny
    params = {"first_n": {"n": 3}, "topk": {"k": 2, "score": "r_spread"}, "random": {"k": 2, "seed": 1},
              "snr": {"k": 2}}.get(name, {})
    sel = select(stats, name, model=model, **params)
    assert sel.criterion == name
    assert sel.layers and set(sel.layers) <= set(stats.layers)
    assert set(sel.scores) == set(stats.layers)
    assert all(v == v for v in sel.scores.values())  # no NaN
    assert sel.explain().startswith(f"criterion {name!r}")
    assert Selection.from_json(sel.to_json()) == sel
    st = sel.stability(n_boot=8, seed=0)
    assert set(st.frequency) == set(stats.layers)
    assert all(0.0 <= f <= 1.0 for f in st.frequency.values())


def test_snr_is_data_free_and_deterministic(tiny):
    model, stats = tiny
    a = select(model=model, criterion="snr")
    assert a.layers == select(stats, "snr", model=model).layers
    assert len(a.layers) == 2  # round(0.25 * 6) = 2 (Spectrum's top 25%)
    assert all(v > 0 for v in a.scores.values())
    st = a.stability(n_boot=3)
    assert st.resampled.startswith("nothing") and all(st.frequency[x] == 1.0 for x in a.layers)


def test_lape_finds_one_percent_of_neurons(tiny):
    _, stats = tiny
    sel = select(stats, "lape")
    total = stats.num_layers * stats.num_neurons
    n = sel.details["n_specific"]
    assert n == round(0.01 * total)
    assert sum(sel.scores.values()) * stats.num_neurons == pytest.approx(n)
    # An independent count: the threshold is the mean share, and the layers above it are selected.
    assert sel.threshold == pytest.approx(sum(sel.scores.values()) / len(sel.scores))
    above = [layer for layer, v in sel.scores.items() if v > sel.threshold]
    assert above, "this collection has layers above the mean share; the fallback is tested by hand above"
    assert sel.layers == above and sel.details["fallback"] is False


def test_resample_stats_equals_collecting_the_resampled_texts(tiny):
    """A bootstrap resample with per-sample counts is exactly the statistics of the resampled texts."""
    model, stats = tiny
    texts = tiny_texts(6)
    mult = [2, 0, 1, 0, 3, 0]  # question q appears mult[q] times, in every language
    weights = torch.tensor([mult[int(q)] for q in stats.sample_index])
    boot = resample_stats(stats, weights)
    resampled_texts = {g: [t for q, t in enumerate(items) for _ in range(mult[q])] for g, items in texts.items()}
    direct = ActivationStats.collect(model, tiny_tokenizer(), resampled_texts, progress=False)
    assert torch.equal(boot.counts, direct.counts) and torch.equal(boot.tokens, direct.tokens)
    sel_boot, sel_direct = select(boot), select(direct)
    assert sel_boot.layers == sel_direct.layers
    assert sel_boot.scores == pytest.approx(sel_direct.scores, rel=1e-9, abs=1e-15)
    # Without per-sample counts R/MSD are still resampled (from the fractions), overlap is not.
    lean = ActivationStats(
        counts=stats.counts, tokens=stats.tokens, groups=stats.groups, layers=stats.layers,
        sample_fraction=stats.sample_fraction, sample_tokens=stats.sample_tokens,
        sample_group=stats.sample_group, sample_index=stats.sample_index,
    )
    lean_boot = resample_stats(lean, weights)
    assert torch.allclose(lean_boot.msd(), direct.msd(), rtol=1e-9, atol=1e-15)
    assert torch.equal(lean_boot.overlap().average, stats.overlap().average)


def test_stability_on_tiny_collection_is_seeded(tiny):
    _, stats = tiny
    a = stability(stats, "msd", n_boot=15, seed=11)
    b = stability(stats, "msd", n_boot=15, seed=11)
    assert a == b
    assert a.resampled.startswith("everything")
    assert sum(count for _, count in a.selections) == 15
    for layer in stats.layers:
        assert a.score_low[layer] <= a.score_mean[layer] <= a.score_high[layer]
